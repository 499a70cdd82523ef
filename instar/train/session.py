"""A training run's surroundings, shared by every stage through `loop.fit`: its directory and run id, the device
and the ranks under `torchrun`, the rows it writes to the store, its checkpoints and its peak memory.

    s = open_session("sft", cfg, store)     # creates/reuses <out>, the run row (a resumed run keeps its id)
    model = s.place(model)                  # to the device (+ torch.compile when cfg.compile)
    s.finish(model, tok, start=..., end=...) -> summary     # model/, summary.json, the run row marked done

Only rank 0 writes the store, checkpoints and the run directory. A run directory whose run row still says
`running` without a checkpoint behind it (a process SIGKILLed before its first checkpoint) is marked `killed`
when the same command starts over. Peak memory: the process's peak resident set during the stage (Linux resets
the high-water mark at the stage's start, so `instar run` reports each stage's own; elsewhere it is the process's
peak so far) and, on CUDA, torch's peak allocated memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from instar.datasets import runs
from instar.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint, write_summary
from instar.train.config import TrainConfig
from instar.train.models import resolve_device, save_model, unwrap, use_bf16
from instar.train.sampling import attention_kernel, report_samples


def autocast(device: torch.device, bf16: bool, length: int | None = None):
    """bf16 autocast when `bf16`; given the rows' `length`, also the faster attention kernel for it
    (`sampling.attention_kernel`)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
    if length is not None:
        stack.enter_context(attention_kernel(device, length))
    return stack


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Session:
    stage: str
    cfg: TrainConfig
    store: object
    out: Path
    device: torch.device
    bf16: bool
    rank: int = 0
    world: int = 1
    run_id: str | None = None
    progress: object = None
    data: dict = field(default_factory=dict)
    kept_yardsticks: list | None = None   # [(settings, values)] of each part measured at the end, for the next stage

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint"

    def say(self, text) -> None:
        if self.is_main:
            from instar.report import console
            (self.progress.console if self.progress else console).print(text, highlight=False)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def place(self, model):
        """The model on the session's device (compiled when cfg.compile); its width settles bf16 (`use_bf16`)."""
        model = model.to(self.device)
        self.bf16 = use_bf16(self.cfg, self.device, model)
        return torch.compile(model) if self.cfg.compile else model

    # --- the store -------------------------------------------------------------------------------------------------
    def write_rows(self, rows: list[tuple[str, int, object]]) -> None:
        """("metrics", step, {name: value}) and ("samples", step, [row]) items, in one transaction."""
        if not (self.is_main and self.run_id and rows):
            return
        with self.store.writing():
            for what, step, payload in rows:
                (runs.log_metrics if what == "metrics" else runs.log_samples)(self.store, self.run_id, step, payload)

    def forget_after(self, step: int) -> None:
        """Drop rows after `step`: a run resumed from that step's checkpoint writes them again."""
        if self.is_main and self.run_id:
            runs.forget_after(self.store, self.run_id, step)

    # --- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, evaluate: Callable) -> dict:
        """evaluate(model) in eval mode, under autocast and a forked RNG (an eval never shifts training's RNG)."""
        m = unwrap(model)
        was = m.training
        m.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                autocast(self.device, self.bf16):
            values = evaluate(m)
        m.train(was)
        return values

    def measure(self, lm, st, when: str, step: int, rows: list) -> dict:
        """Held-out metrics, the yardsticks, and the answers to REPORT_PROMPTS (or the stage's own `answers`)
        into `rows`."""
        values = self.evaluate(lm, st.evaluate)
        if st.yardsticks is not None:
            values.update(self.yardsticks(lm, st.yardsticks, when))
        rows.append(("metrics", step, values))
        with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                autocast(self.device, self.bf16):
            answers = st.answers(when) if st.answers else \
                report_samples(unwrap(lm), st.tok, self.cfg.sample_tokens, when=when)
        rows.append(("samples", step, answers))
        self.say(f"{when}: " + " | ".join(f"{k} {v:.4f}" for k, v in values.items() if v is not None))
        return values

    def yardsticks(self, lm, ys, when: str) -> dict:
        """The external yardsticks, part by part (`yardsticks.Yardsticks`); at the start, a part the stage that made
        this model measured the same way at its end is taken from there (`yardsticks.kept`); the end values are
        kept beside model/ by `finish`. A plain function (no parts) is always run."""
        from instar.train import yardsticks

        if not isinstance(ys, yardsticks.Yardsticks):
            return self.evaluate(lm, ys)
        out, kept = {}, []
        for part in ys.parts:
            settings = {**part.settings, "device": self.device.type, "bf16": self.bf16}
            reusable = when == "start" and not part.own
            values = yardsticks.kept(self.cfg.model, settings) if reusable else None
            if values is not None:
                self.say(f"start: {len(values)} external yardsticks as the stage that made this model measured them")
            else:
                values = self.evaluate(lm, part.measure)
                if reusable:
                    yardsticks.remember_base(self.cfg.model, settings, values)
            out.update(values)
            kept.append((settings, {k: v for k, v in values.items() if k not in part.own}))
        if when == "end":
            self.kept_yardsticks = kept
        return out

    # --- ranks -----------------------------------------------------------------------------------------------------
    def all_sum(self, x: float | list[float]) -> float:
        """The sum of x (or of the list x) over ranks."""
        x = sum(x) if isinstance(x, list) else x
        if self.world == 1:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t)

    def all_mean(self, values: dict) -> dict:
        """Each value's mean over ranks (each rank's values are means over equal amounts of work); None stays."""
        keys = [k for k, v in values.items() if v is not None]
        if self.world == 1 or not keys:
            return dict(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return {**values, **{k: float(v) / self.world for k, v in zip(keys, t.tolist())}}

    # --- checkpoints -----------------------------------------------------------------------------------------------
    def resume(self, model) -> dict | None:
        """Load checkpoint/ into `model` if there is one; return its state (None for a fresh run)."""
        if not has_checkpoint(self.ckpt):
            return None
        state = load_checkpoint(self.ckpt, model)
        self.say(f"resuming {self.stage} from {self.ckpt} at step {state['step']}")
        return state

    def checkpoint(self, st, run) -> None:
        """Save the state of step `run.step` (see loop.Run), on rank 0."""
        if self.is_main:
            state = {"step": run.step, "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                     "rng": run.rng, "start": run.start, "end": run.end, "values": run.values, "samples": run.samples,
                     "done": run.done,
                     "extra": st.extra(), "run_id": self.run_id or ""}
            save_checkpoint(self.ckpt, st.model, state, trainable_only=self.cfg.lora)
        run.saved = run.step

    def checkpoint_on_stop(self, st, run, error: BaseException) -> None:
        """After a Ctrl-C or an error (an evaluation that failed, a rollout that crashed, a full disk...): save the
        last finished step, unless an update was cut in half, so the same command resumes there instead of
        starting over. Saving must not hide the error that stopped the run."""
        how = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped by an error"
        if run.updating:
            kept = f"the checkpoint of step {run.saved}" if run.saved else "no checkpoint yet: it starts over"
            self.say(f"{how} inside step {run.step + 1}'s update: resuming from {kept}")
        elif run.step > 0 and run.saved != run.step:
            try:
                self.checkpoint(st, run)
            except Exception as e:  # noqa: BLE001 - the run's own error is the one to report
                self.say(f"{how} after step {run.step}; its checkpoint could not be saved ({e})")
                return
            self.say(f"{how} after step {run.step}: checkpoint saved, run the same command to resume")
        elif run.step > 0:
            self.say(f"{how} after step {run.step}: its checkpoint is saved, run the same command to resume")

    # --- the end ---------------------------------------------------------------------------------------------------
    def finish(self, model, tok, *, start: dict, end: dict) -> dict:
        """Write model/ (LoRA merged) and summary.json, mark the run done; return the summary."""
        summary = {"stage": self.stage, "run_id": self.run_id, "config": self.cfg.recorded(), "data": self.data,
                   "start": start, "end": end, **peak_memory(self.device)}
        if self.is_main:
            save_model(model, tok, self.out / "model")
            if self.kept_yardsticks is not None:
                from instar.train.yardsticks import keep
                keep(self.out / "model", self.kept_yardsticks)
            write_summary(self.out, summary)
            if self.run_id:
                runs.finish_run(self.store, self.run_id, summary=summary)
        self.barrier()
        return summary


def reset_peak_memory(device: torch.device) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts from the current RSS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)
    out = {"peak_rss_mb": round(rss, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def sum_across_ranks(params: list, bucket: int = 1 << 24) -> None:
    """p.grad <- the sum over ranks, in flat buckets of up to 16M values; a parameter no rank has a gradient
    for keeps none (AdamW then skips it, as a single process would)."""
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    torch.distributed.all_reduce(has)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(live):
        end, size = start, 0
        while end < len(live) and (end == start or size + live[end].numel() <= bucket):
            size, end = size + live[end].numel(), end + 1
        flat = torch.cat([p.grad.flatten() for p in live[start:end]])
        torch.distributed.all_reduce(flat)
        for p, g in zip(live[start:end], flat.split([p.numel() for p in live[start:end]])):
            p.grad.copy_(g.view_as(p))
        start = end


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def open_session(stage: str, cfg: TrainConfig, store) -> Session:
    """Create/reuse the run directory and run id (a resumed run keeps its id, stored in <out>/run.json)."""
    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = init_distributed(device)
    reset_peak_memory(device)
    s = Session(stage, cfg, store, Path(cfg.out), device, use_bf16(cfg, device), rank, world)
    if s.is_main:
        s.out.mkdir(parents=True, exist_ok=True)
        marker = s.out / "run.json"
        old = json.loads(marker.read_text()).get("run_id") if marker.exists() else None
        row = runs.get_run(store, old) if old else None
        if row and has_checkpoint(s.ckpt):
            runs.resume_run(store, old)
            s.run_id = old
        else:
            if row and row["status"] == "running":  # its process died before any checkpoint (SIGKILL)
                runs.finish_run(store, old, status="killed")
            s.run_id = runs.start_run(store, kind="train", stage=stage, config=cfg.recorded(), out_dir=str(s.out))
            marker.write_text(json.dumps({"run_id": s.run_id}))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return s

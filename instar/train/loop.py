"""The one optimisation loop, plus the helpers RL stages reuse when they drive their own rollout->update cycle.

    session = open_session("sft", cfg, store)        # out dir, run id (kept across resumes), device, DDP, logging
    session.data = {"train_conversations": 1200}      # counts for summary.json
    model = session.place(model)                      # to device (+ torch.compile) ; DDP wrap happens in train()
    state = session.resume(model)                     # None, or the checkpoint's state (weights already loaded)
    start = state["start"] if state else session.measure(model, tok, evaluate, "start")
    train(session, model, batch_at=..., loss_fn=..., evaluate=..., state=state, start=start)
    end = session.measure(model, tok, evaluate, "end", step=cfg.max_steps)
    return session.finish(model, tok, start=start, end=end)    # model/ + summary.json + run row

`batch_at(i)` returns the i-th micro-batch of the whole run (a pure function of i and the seed), so the data
position is just the step: rank r of W at step s, micro-batch m reads i = (s * grad_accum + m) * W + r.
Exact resume = weights + AdamW + scheduler + torch RNG + step, all in `checkpoint/` (see checkpoint.save_checkpoint).

Reusable pieces: `make_optimizer` (AdamW, fused when available, no decay on norms), `make_scheduler` (linear
warmup then cosine to lr*min_lr_ratio), `optimizer_step` (unscale-free clip + step + zero_grad), `autocast`,
`Session.log_metrics / log_samples / checkpoint`. Under `torchrun --nproc_per_node=N` it uses DDP (gloo on CPU,
nccl on CUDA); only rank 0 writes the store, checkpoints and the run directory.
Simplifications: no gradient scaler (bf16 needs none; fp16 is not offered), no mid-epoch dataloader workers
(on 2 cores a worker costs more than it saves, FIELD-NOTES), eval runs the whole val slice on every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from instar.datasets import runs
from instar.errors import InstarError
from instar.train.checkpoint import load_checkpoint, save_checkpoint, write_summary
from instar.train.config import TrainConfig
from instar.train.models import resolve_device, save_model, unwrap, use_bf16
from instar.train.sampling import attention_kernel, report_samples


# --- optimiser, schedule, precision ----------------------------------------------------------------------
def make_optimizer(cfg: TrainConfig, model) -> torch.optim.AdamW:
    """AdamW over trainable params; weight decay only on matrices (decaying norms/biases hurts small models)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:  # fused: optimizer step ~2.5x cheaper on this CPU (FIELD-NOTES)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step`: linear warmup, then cosine from 1 to min_lr_ratio at max_steps."""
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_scheduler(cfg: TrainConfig, opt) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


def optimizer_step(model, opt, sched, cfg: TrainConfig) -> float:
    """Clip (if grad_clip > 0), step, schedule, zero grads; return the pre-clip global grad norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    else:
        norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


def autocast(device: torch.device, bf16: bool, length: int | None = None):
    """bf16 autocast when `bf16`; given the batch's sequence `length`, also the faster attention kernel for it
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


def restore_training_state(state: dict, opt, sched) -> int:
    """Put a checkpoint's optimizer, scheduler and RNG state back; return the step to continue from."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


# --- a run: directory, run id, distributed, logging ------------------------------------------------------
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
    at_step: int = 0
    step_rng: dict | None = None
    data: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoint"

    def log_metrics(self, step: int, values: dict) -> None:
        if self.is_main and self.run_id:
            runs.log_metrics(self.store, self.run_id, step, values)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if self.is_main and self.run_id:
            runs.log_samples(self.store, self.run_id, step, rows)

    def say(self, text: str) -> None:
        if self.is_main:
            from instar.report import console
            (self.progress.console if self.progress else console).print(text, highlight=False)

    def place(self, model):
        model = model.to(self.device)
        return torch.compile(model) if self.cfg.compile else model

    def resume(self, model) -> dict | None:
        """Load checkpoint/ into `model` if there is one; return its state (or None for a fresh run)."""
        if not (self.ckpt / "state.pt").exists() and not (self.ckpt / "model.safetensors").exists():
            return None
        state = load_checkpoint(self.ckpt, model)
        if self.is_main and self.run_id:  # steps after the checkpoint are replayed: log them once
            runs.forget_after(self.store, self.run_id, int(state["step"]))
        self.say(f"resuming {self.stage} from {self.ckpt} at step {state['step']}")
        return state

    def checkpoint(self, model, opt, sched, step: int, start: dict, extra: dict | None = None,
                   rng: dict | None = None) -> None:
        if self.is_main:
            save_checkpoint(self.ckpt, model, {"step": step, "optimizer": opt.state_dict(),
                                               "scheduler": sched.state_dict(), "rng": rng or rng_state(),
                                               "start": start, "run_id": self.run_id or "", **(extra or {})},
                            trainable_only=self.cfg.lora)

    @torch.no_grad()
    def evaluate(self, model, evaluate: Callable) -> dict:
        m = unwrap(model)
        was = m.training
        m.eval()
        with autocast(self.device, self.bf16):
            values = evaluate(m)
        m.train(was)
        return values

    def measure(self, model, tok, evaluate: Callable, when: str, step: int = 0) -> dict:
        """Held-out metrics + answers to REPORT_PROMPTS, logged to the run tables; returns the metrics."""
        values = self.evaluate(model, evaluate)
        self.log_metrics(step, values)
        with autocast(self.device, self.bf16):
            rows = report_samples(unwrap(model), tok, self.cfg.sample_tokens, when=when)
        self.log_samples(step, rows)
        self.say(f"{when}: " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()))
        return values

    def finish(self, model, tok, *, start: dict, end: dict) -> dict:
        """Write model/ (LoRA merged) and summary.json, close the run; return the summary."""
        summary = {"stage": self.stage, "run_id": self.run_id, "config": self.cfg.model_dump(), "data": self.data,
                   "start": start, "end": end}
        if self.is_main:
            save_model(model, tok, self.out / "model")
            write_summary(self.out, summary)
            if self.run_id:
                runs.finish_run(self.store, self.run_id, summary=summary)
        barrier(self)
        return summary


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world) — from torchrun's env vars; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def barrier(session: Session) -> None:
    if session.world > 1:
        torch.distributed.barrier()


def open_session(stage: str, cfg: TrainConfig, store) -> Session:
    """Create/reuse the run directory and run id (a resumed run keeps its id, stored in <out>/run.json)."""
    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = init_distributed(device)
    out = Path(cfg.out)
    s = Session(stage, cfg, store, out, device, use_bf16(cfg, device), rank, world)
    if s.is_main:
        out.mkdir(parents=True, exist_ok=True)
        marker = out / "run.json"
        old = json.loads(marker.read_text()).get("run_id") if marker.exists() else None
        if old and (s.ckpt / "state.pt").exists() and runs.get_run(store, old):
            runs.resume_run(store, old)
            s.run_id = old
        else:
            s.run_id = runs.start_run(store, kind="train", stage=stage, config=cfg.model_dump(), out_dir=str(out))
            marker.write_text(json.dumps({"run_id": s.run_id}))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return s


# --- the loop ----------------------------------------------------------------------------------------------
def train(s: Session, model, *, batch_at: Callable[[int], dict], loss_fn: Callable, evaluate: Callable,
          state: dict | None, start: dict) -> dict:
    """Run optimizer steps from the checkpoint's step (or 0) to cfg.max_steps; return the last logged values.

    loss_fn(model, batch) -> scalar loss (a mean over the batch's loss tokens); batch tensors are moved to the
    device here. evaluate(model) -> {"val_loss": ...} runs every eval_every steps (no grad, autocast)."""
    from instar.report import make_progress

    cfg = s.cfg
    ddp = model
    if s.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[s.device.index] if s.device.type == "cuda"
                                                        else None)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    step = restore_training_state(state, opt, sched) if state is not None else 0
    model.train()
    progress = make_progress() if s.is_main else contextlib.nullcontext()
    with progress:
        s.progress = progress if s.is_main else None
        task = progress.add_task(s.stage, total=cfg.max_steps, completed=step, info="") if s.is_main else None
        try:
            last = _steps(s, model, ddp, opt, sched, step, batch_at, loss_fn, evaluate, start, progress, task)
        except KeyboardInterrupt:  # keep the work: the checkpoint is taken at the last step boundary
            s.checkpoint(model, opt, sched, s.at_step, start, rng=s.step_rng)
            s.say(f"interrupted at step {s.at_step}: checkpoint saved, run the same command to resume")
            raise
    s.progress = None
    return last


def _steps(s, model, ddp, opt, sched, step, batch_at, loss_fn, evaluate, start, progress, task) -> dict:
    from instar.report import step_line

    cfg, last = s.cfg, {}
    window_tokens, window_t0 = 0, time.perf_counter()
    while step < cfg.max_steps:
        s.at_step, s.step_rng = step, rng_state()  # what an interrupt-time checkpoint must restore
        total_loss = 0.0
        for micro in range(cfg.grad_accum):
            batch = batch_at((step * cfg.grad_accum + micro) * s.world + s.rank)
            batch = {k: v.to(s.device) for k, v in batch.items()}
            sync = micro == cfg.grad_accum - 1 or s.world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()), \
                    autocast(s.device, s.bf16, batch["input_ids"].shape[1]):
                loss = loss_fn(ddp, batch)
            (loss / cfg.grad_accum).backward()
            total_loss += float(loss.detach()) / cfg.grad_accum
            window_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
                else batch["input_ids"].numel()
        if not math.isfinite(total_loss):
            raise InstarError(f"loss became {total_loss} at step {step + 1}: lower lr or check the data")
        gnorm = optimizer_step(model, opt, sched, cfg)
        step += 1
        if s.is_main:
            progress.update(task, completed=step)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if s.world > 1:  # mean loss over ranks for the log
                t = torch.tensor([total_loss], device=s.device)
                torch.distributed.all_reduce(t)
                total_loss = float(t) / s.world
            elapsed = time.perf_counter() - window_t0
            last = {"loss": total_loss, "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                    "tok/s": window_tokens * s.world / max(elapsed, 1e-9)}
            s.log_metrics(step, last)
            s.say(step_line(step, cfg.max_steps, last))
            window_tokens, window_t0 = 0, time.perf_counter()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            values = s.evaluate(model, evaluate)
            s.log_metrics(step, values)
            s.say(step_line(step, cfg.max_steps, values))
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
            s.checkpoint(model, opt, sched, step, start)
    return last

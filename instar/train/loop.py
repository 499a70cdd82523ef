"""THE loop: every stage (pretrain, SFT, reward, DPO, PPO, GRPO) steps through `fit`; a stage supplies only what is
its own — how a micro-batch or rollout is made, its loss, its metrics — as a `Stage`.

    s = open_session("sft", cfg, store)              # run dir, run id (kept across resumes), device, ranks
    stage = Stage(model, tok, micro=batch_at, updates=supervised(s, loss_fn), evaluate=evaluate)
    start, end = fit(s, stage)                       # start measure, steps, evals, checkpoints, end measure
    return s.finish(model, tok, start=start, end=end)  # model/ (LoRA merged) + summary.json + the run row

A step: the rank's `grad_accum` micro-batches `micro(i)`, i = (step * grad_accum + m) * world + rank (a pure
function of i: a batch of the sampler, or a rollout seeded by i), then `updates(micros)`: one or more optimizer
steps (PPO: one per minibatch; GRPO: one per epoch), each a list of closures model -> (loss share, stats) whose
gradients add up. Shares of all micro-batches of all ranks sum to the step's loss, so the loop sums gradients
across ranks (one all-reduce per optimizer step, under `torchrun`; gloo on CPU, nccl on CUDA) and a
2-process run equals one process with grad_accum=2. Metrics are stored every step; `log_every` paces the step line.

Endings. A checkpoint of step N holds exactly N finished steps: weights (LoRA: adapters and heads only), AdamW,
scheduler, the RNG as it was at the boundary, the stage's extra state, and N's metrics if its evals were cut short
(the resumed run redoes them; every eval and answer runs under a forked RNG, so redoing one changes nothing).
A first Ctrl-C (SIGINT) inside an update lets the update finish, elsewhere it stops at once; either way the
checkpoint is of the last finished step. An error outside an update (an evaluation, a rollout, the data) saves
that checkpoint too before it propagates: 40 GRPO steps of SmolLM2 (45 minutes) were once lost to a file missing
in the final evaluation. Any other interrupt or crash mid-update saves nothing: the last periodic checkpoint
stands. A SIGKILL leaves the last periodic checkpoint (atomic) and a run row marked `running`, which the same
command resumes. Metric rows are written per finished step; a resumed run first drops the rows after its
checkpoint. Simplifications: no gradient scaler (bf16 needs none; fp16 is not offered); gradients are all-reduced
after the backward passes instead of overlapping with them (DDP's buckets); under torchrun every rank evaluates.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from instar.errors import InstarError
from instar.train.config import TrainConfig
from instar.train.sampling import attention_kernel
from instar.train.session import Session, autocast, open_session, rng_state, set_rng_state, sum_across_ranks
from instar.train.tokens import label_count

__all__ = ["Stage", "fit", "supervised", "open_session", "autocast", "make_optimizer", "make_scheduler",
           "optimizer_step"]  # what stages import from here (open_session and autocast live in session.py)

Closure = Callable[[torch.nn.Module], tuple[torch.Tensor, dict]]  # model -> (loss share, stats to add up)


# --- optimiser and schedule ---------------------------------------------------------------------------------------
def make_optimizer(cfg: TrainConfig, model) -> torch.optim.AdamW:
    """AdamW over trainable params; weight decay only on matrices (decaying norms/biases hurts small models)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:  # fused: the optimizer step ~2.5x cheaper on a 2-core CPU (docs/measured-facts.md)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_factor(step: int, cfg: TrainConfig, per_step: int = 1) -> float:
    """Multiplier of cfg.lr at optimizer step `step`: linear warmup, then cosine to min_lr_ratio at the last step
    (a stage with `per_step` optimizer steps per step stretches both by that factor)."""
    warmup, total = cfg.warmup * per_step, cfg.max_steps * per_step
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_scheduler(cfg: TrainConfig, opt, per_step: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, cfg, per_step))


def optimizer_step(params: list, opt, sched, cfg: TrainConfig, world: int = 1) -> float:
    """Sum gradients across ranks, clip (if grad_clip > 0), step, schedule, zero grads; return the pre-clip norm.
    A step with no gradient at all (GRPO: no group carried signal) still steps the schedule."""
    if world > 1:
        sum_across_ranks(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = 0.0
    if grads:
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


# --- what a stage supplies ----------------------------------------------------------------------------------------
@dataclass
class Stage:
    model: torch.nn.Module                       # what trains and is checkpointed (PPO: policy + value head)
    tok: object
    micro: Callable[[int], object]               # i -> the i-th micro-batch (or rollout) of the run, pure in i
    updates: Callable[[list], list[list[Closure]]]  # the step's micro-batches -> optimizer steps of closures
    evaluate: Callable[[torch.nn.Module], dict]  # held-out metrics (called with `lm`, no grad, eval mode)
    yardsticks: Callable[[torch.nn.Module], dict] | None = None  # more of them at start and end only (external sets)
    metrics: Callable[[list, dict], dict] = lambda micros, sums: sums  # step values from the summed stats
    lm: torch.nn.Module | None = None            # the model saved and asked REPORT_PROMPTS (default: model)
    answers: Callable[[str], list[dict]] | None = None   # rows logged at start/end (default: REPORT_PROMPTS)
    samples: Callable[[list], list[dict]] | None = None  # a few rows of the step's rollouts, logged at evals
    table: Callable[[list[dict], str], object] | None = None  # how those rows are shown
    extra: Callable[[], dict] = dict             # stage state a checkpoint keeps (GRPO's curriculum)
    restore: Callable[[dict], None] = lambda state: None
    per_step: int = 1                            # optimizer steps per step (for the schedule)


def supervised(s: Session, loss_fn: Callable) -> Callable[[list], list[list[Closure]]]:
    """`updates` of the stages that learn from fixed batches: one optimizer step over the step's micro-batches,
    each in the loss as its mean loss / (grad_accum x world). A micro-batch may be a list of buckets of one batch
    (`tokens.collate_buckets`): each bucket's mean loss then counts by its share of the batch's labelled tokens,
    so the gradient is the whole batch's token mean, as if it had been padded as one."""
    def updates(batches: list) -> list[list[Closure]]:
        closures = []
        for b in batches:
            parts = b if isinstance(b, list) else [b]
            closures += [lambda model, p=p, w=w: _batch_share(s, loss_fn, model, p, len(batches), w)
                         for p, w in zip(parts, label_shares(parts))]
        return [closures]
    return updates


def label_shares(parts: list[dict]) -> list[float]:
    """Each bucket's share of the labelled tokens (those `tokens.lm_loss` averages over); equal without labels."""
    if len(parts) == 1:  # a plain micro-batch: nothing to count
        return [1.0]
    counts = [label_count(p["labels"]) if "labels" in p else 0 for p in parts]
    total = sum(counts)
    return [c / total for c in counts] if total else [1 / len(parts)] * len(parts)


def _batch_share(s: Session, loss_fn, model, batch: dict, accum: int, weight: float = 1.0):
    batch = {k: v.to(s.device) for k, v in batch.items()}
    with attention_kernel(s.device, batch["input_ids"].shape[1]):
        loss = loss_fn(model, batch)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return loss * weight / (accum * s.world), {"loss": float(loss.detach()) * weight / accum, "tokens": tokens}


# --- the loop -----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Where a fit stands: the step finished last, and what a checkpoint of it must hold."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    start: dict | None = None
    end: dict | None = None
    values: dict | None = None       # the finished step's metrics, until its evals are done
    samples: list | None = None      # and a few of its rollouts, when an eval or the end is due
    done: int = -1                   # the last step whose evals, answers and rows are complete
    rng: dict = field(default_factory=rng_state)   # the RNG at the boundary after `step`
    updating: bool = False           # between the step's first backward and its last optimizer step
    stop: bool = False               # a Ctrl-C arrived mid-update: stop once it is over
    saved: int = 0                   # the step of the checkpoint on disk (0: none)


def fit(s: Session, st: Stage) -> tuple[dict, dict]:
    """Train from the checkpoint (or step 0) to cfg.max_steps; return the (start, end) held-out metrics."""
    from instar.report import make_progress

    cfg, lm = s.cfg, st.lm or st.model
    params = [p for p in st.model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, st.model)
    run = Run(opt, make_scheduler(cfg, opt, st.per_step))
    if (state := s.resume(st.model)) is not None:
        opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        st.restore(state["extra"])
        run.step, run.start, run.end, run.values = state["step"], state["start"], state["end"], state["values"]
        run.samples, run.done, run.rng, run.saved = state["samples"], state["done"], state["rng"], state["step"]
        set_rng_state(run.rng)
    s.forget_after(run.done)  # rows after the checkpoint, and its step's if its evals are to be redone
    st.model.train()
    progress = make_progress() if s.is_main else contextlib.nullcontext()
    with progress, _sigint_at_boundaries(s, run):
        s.progress = progress if s.is_main else None
        task = progress.add_task(s.stage, total=cfg.max_steps, completed=run.step, info="") if s.is_main else None
        try:
            if run.done < run.step:
                _after_step(s, st, lm, run)
            while run.step < cfg.max_steps:
                t0 = time.perf_counter()
                micros = [st.micro((run.step * cfg.grad_accum + m) * s.world + s.rank) for m in range(cfg.grad_accum)]
                run.updating, sums, loss = True, {}, 0.0
                for group in st.updates(micros):
                    for closure in group:
                        with autocast(s.device, s.bf16):
                            share, stats = closure(st.model)
                        share.backward()
                        loss += float(share.detach())
                        for k, v in stats.items():
                            sums[k] = sums.get(k, 0.0) + v
                    if not math.isfinite(loss):
                        raise InstarError(f"loss became {loss} at step {run.step + 1}: lower lr or check the data")
                    gnorm = optimizer_step(params, opt, run.sched, cfg, s.world)
                tokens = sums.pop("tokens", None)
                values = {**st.metrics(micros, sums), "lr": run.sched.get_last_lr()[0], "grad_norm": gnorm}
                values = s.all_mean(values)
                seconds = time.perf_counter() - t0
                values["sec_per_step"] = seconds
                if tokens is not None:
                    values["tok/s"] = s.all_sum(tokens) / max(seconds, 1e-9)
                due = (cfg.eval_every and (run.step + 1) % cfg.eval_every == 0) or run.step + 1 == cfg.max_steps
                run.samples = st.samples(micros) if st.samples and due else None
                run.step, run.values, run.rng, run.updating = run.step + 1, values, rng_state(), False
                if run.stop:
                    raise KeyboardInterrupt
                if s.is_main:
                    progress.update(task, completed=run.step)
                _after_step(s, st, lm, run)
        except BaseException as e:  # Ctrl-C or an error: keep the finished steps
            s.checkpoint_on_stop(st, run, e)
            raise
        finally:
            s.progress = None
    return run.start, run.end


def _after_step(s: Session, st: Stage, lm, run: Run) -> None:
    """What follows step N (N = 0: the start): its metric row, evals, answers, samples, then a checkpoint when due.
    Rows reach the store only once all of them exist, so an interrupted eval is simply done again on resume."""
    from instar.report import step_line

    cfg, n, rows = s.cfg, run.step, []
    last = n == cfg.max_steps
    if n == 0:
        run.start = s.measure(lm, st, "start", 0, rows)
    else:
        rows.append(("metrics", n, run.values))
        if n % cfg.log_every == 0 or last:
            s.say(step_line(n, cfg.max_steps, {k: v for k, v in run.values.items() if v is not None}))
        if cfg.eval_every and n % cfg.eval_every == 0 and not last:
            values = s.evaluate(lm, st.evaluate)
            rows.append(("metrics", n, values))
            s.say(step_line(n, cfg.max_steps, values))
        if run.samples:
            rows.append(("samples", n, run.samples))
            if st.table:
                s.say(st.table(run.samples, f"step {n}: sampled completions"))
        if last:
            run.end = s.measure(lm, st, "end", n, rows)
    s.write_rows(rows)
    run.done, run.values, run.samples = n, None, None
    if n and ((cfg.save_every and n % cfg.save_every == 0) or last):
        s.checkpoint(st, run)


@contextlib.contextmanager
def _sigint_at_boundaries(s: Session, run: Run):
    """A first Ctrl-C mid-update lets the update finish (then the loop stops and checkpoints); anywhere else, or
    a second one, stops at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if run.updating and not run.stop:
            run.stop = True
            s.say("stopping after this step's update (Ctrl-C again to stop now, back to the last checkpoint)")
            return
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


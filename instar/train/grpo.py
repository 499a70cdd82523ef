"""Stage 4: GRPO with verifiable rewards on math problems — does the model get better at math?

    instar train grpo                                        # from runs/sft, procedural problems, curriculum on
    instar train grpo --set model=embedded-smollm2 --set lora=true --set lr=1e-4 --set max_new_tokens=96
    instar train grpo --set source=store                     # the stored `math` records (train split; val held out)

Each step: `batch_size` problems at the curriculum's difficulty, `group_size` sampled completions each (one
batched, KV-cached `generate`), rewards from `rewards.py` (correct answer 1.0 + well-formed `Answer:` line 0.1),
then a policy-gradient update. The one formulation, and where each piece comes from:
- advantages are group-relative, A_i = r_i - mean(r_group) (Shao et al. 2024, DeepSeekMath, sec. 4.1.2), WITHOUT
  dividing by the group std (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO: the std scaling
  over-weights near-uniform groups); `scale_rewards = true` turns it on;
- the PPO clipped surrogate (`losses.ppo_policy_loss`, eps 0.2), aggregated over TOKENS: one mean over every
  completion token of the step, so long completions are not down-weighted (Yu et al. 2025, DAPO, sec. 3.3);
- optional KL to the starting model with the k3 estimator exp(q - p) - (q - p) - 1 (Schulman 2020, as in
  DeepSeekMath eq. 4); beta = 0 by default (DAPO and Dr. GRPO drop it), logged either way when `log_kl`;
- groups whose rewards are all equal carry no signal and are skipped (DAPO filters them too, but refills
  the batch by resampling; we don't, to keep a step's cost fixed);
- a completion that hits `max_new_tokens` without its stop token is TRUNCATED: it gets reward 0 whatever it
  says (its answer line may be cut mid-number) and stays in the loss, so the model learns to finish in budget.
Curriculum: the procedural difficulty (1..5) moves up when the smoothed pass rate rises above
target_pass + band and down when it falls below target_pass - band, keeping groups mixed (all-wrong groups are
the usual failure of tiny models: no signal at all). Held-out greedy pass@1 is measured at the start, every
`eval_every` steps and at the end on problems never used for training.
Speed: the update runs each group's prompt once and shares its KV cache with the G completions (exact; see
`completion_logprobs`). Simplifications: `epochs` optimizer steps per rollout batch on the whole batch (no
minibatch shuffling); no dynamic resampling; one reward mix; the old policy's log-probs are the current ones
detached when epochs = 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from instar.errors import InstarError
from instar.generate.procedural import FAMILIES, MAX_DIFFICULTY, make_problems
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train.loop import (autocast, make_optimizer, make_scheduler, open_session, optimizer_step,
                               restore_training_state)
from instar.train.losses import grpo_loss, group_advantages
from instar.train.models import load_model, unwrap, wrap_lora
from instar.train.rewards import INSTRUCTION, math_prompt, score
from instar.train.sampling import generate
from instar.train.tokens import render_chat, stop_ids, token_logprobs

HELDOUT_SEED = -1  # held-out problems come from this seed whatever cfg.seed is: SFT math conversations stored by a
                   # run with one seed must not contain the held-out problems of a run with another (they did:
                   # seed 1 on seed 0's database started GRPO at 0.74 instead of ~0.5). Training seeds are >= 0.


# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    model: str = Field("runs/sft", description="Policy to start from: a run directory, an HF directory or "
                       "embedded-smollm2.")
    out: str = Field("runs/grpo", description="Run directory.")
    max_steps: int = Field(100, ge=1, description="Rollout + update steps.")
    batch_size: int = Field(8, ge=1, description="Problems per step; each gets group_size completions.")
    group_size: int = Field(8, ge=2, description="Completions sampled per problem (G).")
    # 1e-5 for SmolLM2-135M (full FT); the ~1M presets need ~3e-4 to move within a few dozen steps.
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    warmup: int = Field(0, ge=0, description="Linear warmup steps.")
    log_every: int = Field(5, ge=1, description="Step line every N steps (metrics are stored every step).")
    eval_every: int = Field(25, ge=0, description="Held-out pass@1 + a sample table every N steps (0 = start/end).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (log-probs use the same).")
    top_k: int = Field(0, ge=0, description="Top-k sampling for rollouts (0 = off).")
    max_new_tokens: int = Field(48, ge=1, description="Completion budget; longer completions are truncated.")
    epochs: int = Field(1, ge=1, description="Optimizer steps per rollout batch (>1 makes the clip matter).")
    micro_batch: int = Field(64, ge=1, description="Sequences per forward/backward (memory, not maths).")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range for the probability ratio.")
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL penalty to the starting model (0 = off).")
    log_kl: bool = Field(True, description="Measure KL to the starting model even when beta = 0 (one extra forward).")
    scale_rewards: bool = Field(False, description="Divide advantages by the group std (GRPO) instead of not (Dr. GRPO).")
    source: Literal["procedural", "store"] = Field("procedural", description="Problems: generated on the fly, "
                                                   "or the stored `math` records (train split; val is held out).")
    families: list[str] = Field(default_factory=lambda: list(FAMILIES), description="Procedural families.")
    difficulty: int = Field(1, ge=1, le=10, description="Starting difficulty.")
    curriculum: bool = Field(True, description="Adapt difficulty to keep the pass rate near target_pass.")
    target_pass: float = Field(0.5, gt=0, lt=1, description="Pass rate the curriculum aims for.")
    band: float = Field(0.2, gt=0, lt=0.5, description="Difficulty moves when the smoothed pass rate leaves target ± band.")
    eval_problems: int = Field(64, ge=1, description="Held-out problems for pass@1 (procedural source).")
    eval_difficulty: int | None = Field(None, ge=1, le=MAX_DIFFICULTY, description="Held-out level (procedural); "
                                        "default: mixed levels 1..5.")
    instruction: str = Field(INSTRUCTION, description="Appended to each question ('' = the bare question).")


# --- data ------------------------------------------------------------------------------------------------
class Problems:
    """Training problems by difficulty, and a held-out set no training batch ever contains."""

    def __init__(self, cfg: Config, store):
        self.cfg = cfg
        if cfg.source == "procedural":
            unknown = [f for f in cfg.families if f not in FAMILIES]
            if unknown:
                raise InstarError(f"families: unknown {unknown[0]!r} (expected from {', '.join(FAMILIES)})")
            raw = make_problems(cfg.eval_problems, HELDOUT_SEED, cfg.families, cfg.eval_difficulty)
            self.heldout = list({r["question"]: r for r in raw}.values())
            self.levels = list(range(1, MAX_DIFFICULTY + 1))
        else:
            self.heldout = store.require("math", "val", 1)
            self.pool: dict[int, list[dict]] = {}
            for r in store.require("math", "train", 1):
                self.pool.setdefault(r.get("difficulty", 1), []).append(r)
            self.levels = sorted(self.pool)
        self.seen = {r["question"] for r in self.heldout}

    def batch(self, step: int, level: int) -> list[dict]:
        """The step's problems: a pure function of (seed, step, level), so resuming needs only the step."""
        n, seed = self.cfg.batch_size, self.cfg.seed * 1_000_003 + step
        if self.cfg.source == "store":
            pool = self.pool[min(self.levels, key=lambda d: abs(d - level))]
            g = torch.Generator().manual_seed(seed)
            return [pool[int(i)] for i in torch.randint(len(pool), (n,), generator=g)]
        rows = [r for r in make_problems(8 * n, seed, self.cfg.families, level) if r["question"] not in self.seen]
        if len(rows) < n:
            raise InstarError(f"level {level} has too few problems outside the held-out set; lower eval_problems")
        return rows[:n]


@dataclass
class Curriculum:
    """Difficulty dial: an exponential average of the pass rate (~3 steps of memory) steers the level."""

    level: int
    lo: int
    hi: int
    target: float
    band: float
    avg: float = -1.0  # -1 = no history at this level yet

    def update(self, pass_rate: float) -> int:
        self.avg = pass_rate if self.avg < 0 else 0.7 * self.avg + 0.3 * pass_rate
        move = 1 if self.avg > self.target + self.band else -1 if self.avg < self.target - self.band else 0
        if move and self.lo <= self.level + move <= self.hi:
            self.level, self.avg = self.level + move, -1.0
        return self.level


# --- loss ------------------------------------------------------------------------------------------------
def completion_logprobs(model, seqs: dict, temperature: float, group: int = 1) -> torch.Tensor:
    """Log-probs [B, C] of the completion tokens under `model`, at the sampling temperature.

    seqs: prompt_ids/prompt_mask [B, P] (left-padded) and completion_ids/completion_mask [B, C]. Positions come
    from the attention mask, as in `generate`, so left padding does not shift them; only the last C + 1 positions'
    logits are computed (`logits_to_keep`), which skips the LM head over the prompt.
    group = G > 1 when rows come in runs of G with the same prompt (a GRPO group): each prompt is run ONCE, its KV
    cache repeated G times and the completions run on it. Gradients flow through the shared cache, so this is the
    same function (fp32: log-probs and gradients equal to 1e-6) on ~2.4x fewer tokens at 8 x 8 (prompt ~33 +
    completion ~16 tokens): the update's forward+backward 0.086 -> 0.053 s here.
    Columns after every row's stop token are padding that no scored token attends to (attention is causal), so
    they are not run: a micro-batch of groups that stopped early costs its own length, not the batch's."""
    C = seqs["completion_ids"].shape[1]
    live = int(seqs["completion_mask"].sum(1).max())                                     # longest completion here
    if live < C:
        trimmed = {k: v[:, :live] if k.startswith("completion") else v for k, v in seqs.items()}
        return F.pad(completion_logprobs(model, trimmed, temperature, group), (0, C - live))  # [B, C], 0 on pads
    ids = torch.cat([seqs["prompt_ids"], seqs["completion_ids"]], dim=1)                 # [B, P + C]
    att = torch.cat([seqs["prompt_mask"], seqs["completion_mask"]], dim=1)
    pos = (att.cumsum(1) - 1).clamp(min=0)
    B, P = seqs["prompt_ids"].shape
    labels = ids[:, -(C + 1):].masked_fill(att[:, -(C + 1):] == 0, -100)
    prompts = seqs["prompt_ids"].view(B // group, group, P) if group > 1 and B % group == 0 else None
    if prompts is None or not bool((prompts == prompts[:, :1]).all()):
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=C + 1).logits  # [B, C+1, V]
        return token_logprobs(logits, labels, temperature)[:, 1:]                        # [B, C]
    first = torch.arange(0, B, group, device=ids.device)                                 # one row per group
    head = model(input_ids=ids[first, :P], attention_mask=att[first, :P], position_ids=pos[first, :P],
                 use_cache=True, logits_to_keep=1)
    head.cache.batch_repeat_interleave(group)                                            # [B/G] -> [B] rows
    tail = model(input_ids=ids[:, P:], attention_mask=att, position_ids=pos[:, P:], cache=head.cache, use_cache=True)
    logits = torch.cat([head.logits.repeat_interleave(group, dim=0), tail.logits], dim=1)  # [B, C+1, V]
    return token_logprobs(logits, labels, temperature)[:, 1:]                            # [B, C]


# --- rollouts, update, evaluation ------------------------------------------------------------------------
class AdapterOff:
    """The reference of a LoRA policy: the same model with its adapters disabled, so no second copy is loaded."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, **inputs):
        with unwrap(self.policy).disable_adapter():
            return self.policy(**inputs)


def finished(gen, tok) -> torch.Tensor:
    """[B] bool: the completion ended with a stop token (False = truncated at max_new_tokens)."""
    stops = torch.tensor(stop_ids(tok), device=gen.completion_ids.device)
    return (torch.isin(gen.completion_ids, stops) & gen.completion_mask.bool()).any(dim=1).cpu()


def rollout(model, tok, rows: list[dict], cfg: Config, seed: int, bf16: bool, device) -> dict:
    """G completions per problem, their rewards (0 when truncated), correctness and advantages."""
    G = cfg.group_size
    prompts = [render_chat(tok, math_prompt(r["question"], cfg.instruction), add_generation_prompt=True)[0]
               for r in rows]
    with autocast(device, bf16):
        gen = generate(model, tok, [p for p in prompts for _ in range(G)], cfg.max_new_tokens, cfg.temperature,
                       cfg.top_k or None, seed=seed)
    done = finished(gen, tok)                                                                  # [P*G]
    rewards, correct = [], []
    for i, row in enumerate(rows):
        r, c = score(gen.texts[i * G:(i + 1) * G], row)
        rewards += r
        correct += c
    rewards = torch.tensor([r if ok else 0.0 for r, ok in zip(rewards, done.tolist())])
    correct = torch.tensor([c and ok for c, ok in zip(correct, done.tolist())], dtype=torch.float32)
    R = rewards.view(len(rows), G)
    return {"gen": gen, "rewards": rewards, "correct": correct, "truncated": (~done).float().cpu(),
            "adv": group_advantages(R, cfg.scale_rewards).flatten(), "informative": (R.max(1).values > R.min(1).values)}


def update(model, ref, opt, sched, cfg: Config, ro: dict, device, bf16: bool) -> dict:
    """`epochs` optimizer steps on the informative groups of one rollout batch; returns step metrics."""
    gen, G = ro["gen"], cfg.group_size
    keep = ro["informative"].repeat_interleave(G).nonzero().flatten().tolist()
    if not keep:  # nothing to learn from; empty optimizer steps keep the schedule aligned with steps
        for _ in range(cfg.epochs):
            optimizer_step(model, opt, sched, cfg)
        return {"clip_frac": 0.0, "kl": None}
    seqs = {k: getattr(gen, k).to(device) for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    size = max(G, cfg.micro_batch // G * G)  # whole groups per micro-batch, so each shares its prompt's forward
    chunks = [keep[i:i + size] for i in range(0, len(keep), size)]
    part = lambda idx: {k: v[idx] for k, v in seqs.items()}  # noqa: E731
    total = float(seqs["completion_mask"][keep].sum())
    length = seqs["prompt_ids"].shape[1] + seqs["completion_ids"].shape[1]
    with torch.no_grad(), autocast(device, bf16, length):
        old = [completion_logprobs(model, part(c), cfg.temperature, G) for c in chunks] if cfg.epochs > 1 else None
        refs = [completion_logprobs(ref, part(c), cfg.temperature, G) for c in chunks] if ref is not None else None
    adv = ro["adv"].to(device)
    clip, kl, n = 0.0, 0.0, 0.0
    for epoch in range(cfg.epochs):
        for j, c in enumerate(chunks):
            b = part(c)
            with autocast(device, bf16, length):
                logp = completion_logprobs(model, b, cfg.temperature, G)
            mask = b["completion_mask"].float()
            loss, m = grpo_loss(logp, old[j] if old else logp.detach(), refs[j] if refs else None, adv[c], mask,
                                cfg.clip_eps, cfg.beta, total)
            loss.backward()
            if epoch == cfg.epochs - 1:  # report the last epoch's clip fraction and KL, token-weighted
                clip, kl, n = clip + m["clip_frac"] * m["tokens"], kl + m.get("kl", 0.0) * m["tokens"], n + m["tokens"]
        optimizer_step(model, opt, sched, cfg)
    return {"clip_frac": clip / n, "kl": kl / n if ref is not None else None}


@torch.no_grad()
def evaluate_math(model, tok, records: list[dict], max_new_tokens: int = 48, instruction: str = INSTRUCTION,
                  batch_size: int = 64, answers: bool = False) -> dict:
    """Greedy pass@1 on math records with the training reward functions: accuracy, format rate, reward mean."""
    rewards, correct, given = [], [], []
    for i in range(0, len(records), batch_size):
        rows = records[i:i + batch_size]
        prompts = [render_chat(tok, math_prompt(r["question"], instruction), add_generation_prompt=True)[0]
                   for r in rows]
        gen = generate(model, tok, prompts, max_new_tokens, temperature=0.0)
        for row, text, ok in zip(rows, gen.texts, finished(gen, tok).tolist()):
            r, c = score([text], row) if ok else ([0.0], [False])  # truncated: no reward, as in training
            rewards.append(r[0])
            correct.append(c[0])
            given.append({"question": row["question"], "answer": row["answer"], "completion": text, "correct": c[0]})
    n = max(len(records), 1)
    out = {"accuracy": sum(correct) / n, "format_rate": sum(r > 0 for r in rewards) / n, "reward_mean": sum(rewards) / n}
    return {**out, "answers": given} if answers else out


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store) -> dict:
    from instar.report import grpo_samples_table, make_progress, step_line

    if (done := finished_summary(cfg.out)) is not None:
        return {**done, "already_done": True}
    problems = Problems(cfg, store)
    s = open_session("grpo", cfg, store)
    model, tok = load_model(cfg.model, purpose="lora" if cfg.lora else "full")
    ref = None
    if cfg.lora:
        model = wrap_lora(model, cfg)
        ref = AdapterOff(model) if cfg.beta > 0 or cfg.log_kl else None
    elif cfg.beta > 0 or cfg.log_kl:  # the frozen starting policy
        ref = load_model(cfg.model, s.device)[0].eval().requires_grad_(False)
    model = s.place(model)
    s.data = {"source": cfg.source, "heldout_problems": len(problems.heldout), "families": cfg.families,
              "group_size": cfg.group_size, "rollouts_per_step": cfg.batch_size * cfg.group_size,
              "base": cfg.model}

    def evaluate(m):
        return evaluate_math(m, tok, problems.heldout, cfg.max_new_tokens, cfg.instruction)

    # The schedule counts optimizer steps: `epochs` per GRPO step.
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg.model_copy(update={"max_steps": cfg.max_steps * cfg.epochs,
                                                  "warmup": cfg.warmup * cfg.epochs}), opt)
    first = max(min(cfg.difficulty, problems.levels[-1]), problems.levels[0])
    cur = Curriculum(first, problems.levels[0], problems.levels[-1], cfg.target_pass, cfg.band)
    state = s.resume(model)
    step = 0
    if state is not None:
        step = restore_training_state(state, opt, sched)
        cur.level, cur.avg = int(state["level"]), float(state["avg"])
    start = state["start"] if state else s.measure(model, tok, evaluate, "start")
    history: list[float] = []
    model.train()
    with make_progress() as progress:
        s.progress = progress
        task = progress.add_task("grpo", total=cfg.max_steps, completed=step, info="")
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            level = cur.level
            rows = problems.batch(step, level)
            ro = rollout(model, tok, rows, cfg, seed=cfg.seed * 1_000_003 + step, bf16=s.bf16, device=s.device)
            m = update(model, ref, opt, sched, cfg, ro, s.device, s.bf16)
            pass_rate = float(ro["correct"].mean())
            if cfg.curriculum:
                cur.update(pass_rate)
            step += 1
            history.append(float(ro["rewards"].mean()))
            values = {"rollout_reward": history[-1], "pass_rate": pass_rate,
                      "completion_len": float(ro["gen"].completion_mask.sum(1).float().mean()),
                      "truncated": float(ro["truncated"].mean()), "kl": m["kl"], "clip_frac": m["clip_frac"],
                      "skipped_groups": 1.0 - float(ro["informative"].float().mean()), "difficulty": level,
                      "lr": sched.get_last_lr()[0], "sec_per_step": time.perf_counter() - t0}
            s.log_metrics(step, values)
            progress.update(task, completed=step, info=f"pass {pass_rate:.2f} | level {level}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                s.say(step_line(step, cfg.max_steps, {k: v for k, v in values.items() if v is not None}))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                s.log_metrics(step, s.evaluate(model, evaluate))
                samples = sample_rows(rows, ro, cfg.group_size)
                s.log_samples(step, samples)
                s.say(grpo_samples_table(samples, f"step {step}: sampled completions"))
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                s.checkpoint(model, opt, sched, step, start, extra={"level": cur.level, "avg": cur.avg})
    s.progress = None
    end = s.measure(model, tok, evaluate, "end", step=cfg.max_steps)
    if history:
        end["rollout_reward"] = sum(history[-10:]) / len(history[-10:])  # mean of the last 10 steps
    end["difficulty"] = cur.level
    return s.finish(unwrap(model), tok, start=start, end=end)


def sample_rows(rows: list[dict], ro: dict, G: int, per_step: int = 4) -> list[dict]:
    """A few (prompt, completion, reward, advantage) rows of one rollout for the table and the run tables."""
    out = []
    for i in range(min(per_step, len(rows))):
        k = i * G + i % G  # one completion of each of the first problems
        out.append({"prompt": rows[k // G]["question"], "completion": ro["gen"].texts[k],
                    "reward": float(ro["rewards"][k]), "advantage": float(ro["adv"][k]), "tag": "grpo"})
    return out

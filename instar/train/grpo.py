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
- groups whose rewards are all equal carry no signal and are skipped; `oversample` > 1 is DAPO's dynamic
  sampling in one round (Yu et al. 2025, sec. 3.2): draw oversample x batch_size problems, sample them all and
  train on at most batch_size of the groups with signal, so a step's cost stays bounded (DAPO resamples until
  the batch is full);
- a completion that hits `max_new_tokens` without its stop token is TRUNCATED: it gets reward 0 whatever it
  says (its answer line may be cut mid-number) and stays in the loss, so the model learns to finish in budget.
- optional ptx term (`ptx_coef`, after Ma et al. 2025, ReLIFT): + the SFT loss on the worked solutions of the
  step's problems that fewer than half of their samples got right (`demos`), which teaches what the samples rarely
  reach; on the default run's PPO model it turned GRPO's own held-out change from -3 / -0.5 points to +2.5 / +5.5
  and the external arithmetic's from -0.7 / -0.4 to +1.4 / +1.1 (seeds 0 / 1; default.toml).
- optional chat rows (`chat_prompts`): questions that are not math, about the corpus topics in wordings SFT never
  used (`requests.topic_questions`), sampled and grouped like the problems and rewarded 1 for a reply in words that
  is not a math drill (`rewards.chat_score`), a rule reward beside the verifiable one as in DeepSeek-R1's
  all-scenario RL stage (Guo et al. 2025, sec. 2.3.4, with a reward model there): GRPO on math alone brought back
  the drill replies PPO had removed (0.113 -> 0.177 of the hand-written chat prompts); with 4 a step, 0.065.
Curriculum: the procedural difficulty (1..5) moves up when the smoothed pass rate rises above
target_pass + band and down when it falls below target_pass - band, keeping groups mixed (all-wrong groups are
the usual failure of tiny models: no signal at all). Held-out greedy pass@1 is measured at the start, every
`eval_every` steps and at the end on problems never used for training.
Each step makes one rollout batch per micro-batch (`grad_accum`, and one per rank under torchrun); the token mean
runs over all of them, so 2 ranks equal one process with grad_accum=2 (tested). The loop (`loop.fit`) does the
rest: `epochs` optimizer steps, the schedule, interrupts at step boundaries, checkpoints (with the curriculum), evals.
Speed: the update runs each group's prompt once and shares its KV cache with the G completions (exact; see
`completion_logprobs`). Simplifications: `epochs` optimizer steps per rollout batch on the whole batch (no
minibatch shuffling); dynamic sampling in one round, not until the batch is full; one reward mix; the old
policy's log-probs are the current ones detached when epochs = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from instar.errors import InstarError
from instar.generate.procedural import FAMILIES, MAX_DIFFICULTY, heldout_problems, make_problems
from instar.generate.requests import topic_questions
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train import yardsticks
from instar.train.evaluate import evaluate_math, math_prompt_ids
from instar.train.loop import Closure, Stage, autocast, fit, open_session
from instar.train.losses import grpo_loss, group_advantages
from instar.train.models import load_model, unwrap, wrap_lora
from instar.train.rewards import INSTRUCTION, chat_score, math_messages, score, step_accuracy
from instar.train.sampling import attention_kernel, generate, stopped
from instar.train.sft import loss_fn as sft_loss
from instar.train.tokens import collate, render_chat, token_logprobs



# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    model: str = Field("runs/sft", description="Policy to start from: a run directory, an HF directory or "
                       "embedded-smollm2.")
    out: str = Field("runs/grpo", description="Run directory.")
    max_steps: int = Field(100, ge=1, description="Rollout + update steps.")
    batch_size: int = Field(8, ge=1, description="Problems per step; each gets group_size completions.")
    oversample: float = Field(1.0, ge=1, le=4, description="Dynamic sampling (DAPO): sample oversample x batch_size "
                              "problems per step and train on at most batch_size of those whose group's rewards "
                              "differ (1 = off: every group with signal of batch_size problems).")
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
    mixed_levels: float = Field(0.0, ge=0, le=1, description="Share of each batch drawn from every level 1..5 "
                                "(procedural), the rest at the curriculum's level: keeps the forms SFT taught in play.")
    eval_problems: int = Field(64, ge=1, description="Held-out problems for pass@1 (procedural source).")
    eval_difficulty: int | None = Field(None, ge=1, le=MAX_DIFFICULTY, description="Held-out level (procedural); "
                                        "default: mixed levels 1..5.")
    instruction: str = Field(INSTRUCTION, description="Appended to each question ('' = the bare question).")
    ptx_coef: float = Field(0.0, ge=0, description="+ ptx_coef x the SFT loss on the worked solutions of the step's "
                            "problems that fewer than half of their samples got right (ReLIFT-style; `demos`).")
    chat_prompts: int = Field(0, ge=0, description="Questions that are not math per step, beside the batch_size "
                              "problems: about the stored documents' topics in wordings SFT never saw, group_size "
                              "samples each, reward 1 for a reply in words that is not a math drill "
                              "(`rewards.chat_score`).")

    unsupported = {"max_len": "max_new_tokens and the prompt set the length",
                   "eval_batches": "eval_problems sets the held-out size",
                   "compile": "rollouts change shape every token: recompiling would cost more than it saves"}


# --- data ------------------------------------------------------------------------------------------------
class Problems:
    """Training problems by difficulty, and a held-out set no training batch ever contains."""

    def __init__(self, cfg: Config, store):
        self.cfg = cfg
        if cfg.source == "procedural":
            unknown = [f for f in cfg.families if f not in FAMILIES]
            if unknown:
                raise InstarError(f"families: unknown {unknown[0]!r} (expected from {', '.join(FAMILIES)})")
            self.heldout = heldout_problems(cfg.eval_problems, cfg.families, cfg.eval_difficulty)
            self.levels = list(range(1, MAX_DIFFICULTY + 1))
        else:
            self.heldout = store.require("math", "val", 1)
            self.pool: dict[int, list[dict]] = {}
            for r in store.require("math", "train", 1):
                self.pool.setdefault(r.get("difficulty", 1), []).append(r)
            self.levels = sorted(self.pool)
        self.seen = {r["question"] for r in self.heldout}
        self.chats = chat_prompts(store) if cfg.chat_prompts else []

    def batch(self, step: int, level: int) -> list[dict]:
        """The step's problems, then its `chat_prompts` chat rows: a pure function of (seed, step, level), so
        resuming needs only the step."""
        seed = self.cfg.seed * 1_000_003 + step
        return self.problems(seed, level) + draw(self.chats, self.cfg.chat_prompts, -seed - 1)

    def problems(self, seed: int, level: int) -> list[dict]:
        n = drawn(self.cfg)
        if self.cfg.source == "store":
            return draw(self.pool[min(self.levels, key=lambda d: abs(d - level))], n, seed)
        mixed = mixed_count(self.cfg)
        rows = [r for r in make_problems(8 * (n - mixed), seed, self.cfg.families, level) if r["question"] not in self.seen]
        if len(rows) < n - mixed:
            raise InstarError(f"level {level} has too few problems outside the held-out set; lower eval_problems")
        rest = [r for r in make_problems(2 * mixed, -seed - 2, self.cfg.families) if r["question"] not in self.seen]
        return rows[:n - mixed] + rest[:mixed]


def draw(pool: list[dict], n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [pool[int(i)] for i in torch.randint(len(pool), (n,), generator=g)] if n else []


def chat_prompts(store) -> list[dict]:
    """The chat rows `chat_prompts` draws from: questions about the stored documents' topics in wordings no SFT
    conversation used (`requests.topic_questions`), as {"messages", "question", "chat": True}. The stored chat
    conversations' own prompts carried no signal: the SFT model answers them as it was taught (measured)."""
    return [{"messages": [{"role": "user", "content": q}], "question": q, "chat": True} for q in topic_questions(store)]


def drawn(cfg: Config) -> int:
    """Problems sampled per rollout batch: batch_size, more with dynamic sampling (`oversample`)."""
    return math.ceil(cfg.batch_size * cfg.oversample - 1e-9)


def mixed_count(cfg: Config) -> int:
    """Problems of each batch drawn from every level (`mixed_levels`; procedural only): the last ones of the batch."""
    return round(drawn(cfg) * cfg.mixed_levels) if cfg.source == "procedural" else 0


def level_pass_rate(micros: list[dict], cfg: Config) -> float:
    """The pass rate the curriculum steers by: over the problems drawn at its level only (the first ones of each
    rollout batch, `Problems.batch`), not the `mixed_levels` share drawn from every level, whose pass rate does not
    move with the level (with it, the default run's curriculum never left level 1); all problems when every one is
    mixed or the source is the store; never the `chat_prompts` rows."""
    own = drawn(cfg) - mixed_count(cfg)
    k = (own or drawn(cfg)) * cfg.group_size  # never the chat rows, which come after every problem
    return sum(float(ro["correct"][:k].mean()) for ro in micros) / len(micros)


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


# --- rollouts ------------------------------------------------------------------------------------------------
Scorer = Callable[[list[str], dict], tuple[list[float], list[bool]]]  # completions, problem -> rewards, correct


class AdapterOff:
    """The reference of a LoRA policy: the same model with its adapters disabled, so no second copy is loaded."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, **inputs):
        with unwrap(self.policy).disable_adapter():
            return self.policy(**inputs)


def rollout(model, tok, rows: list[dict], cfg: Config, seed: int, bf16: bool, device, scorer: Scorer = score) -> dict:
    """G completions per row, their rewards (0 when truncated), correctness and advantages. Rows are the step's math
    problems, then its chat rows (`Problems.batch`), rewarded by `rewards.chat_score`; "correct" there means "not
    a drill", and the math-only metrics (pass rate, worked steps) read the first `n_math` rows."""
    G, n_math = cfg.group_size, sum(not r.get("chat") for r in rows)
    prompts = (math_prompt_ids(tok, rows[:n_math], cfg.instruction)
               + [render_chat(tok, r["messages"], add_generation_prompt=True)[0] for r in rows[n_math:]])
    with autocast(device, bf16):
        gen = generate(model, tok, [p for p in prompts for _ in range(G)], cfg.max_new_tokens, cfg.temperature,
                       cfg.top_k or None, seed=seed)
    done = stopped(gen, tok)                                                                   # [P*G]
    rewards, correct = [], []
    for i, row in enumerate(rows):
        r, c = (chat_score if row.get("chat") else scorer)(gen.texts[i * G:(i + 1) * G], row)
        rewards += r
        correct += c
    rewards = torch.tensor([r if ok else 0.0 for r, ok in zip(rewards, done.tolist())])
    correct = torch.tensor([c and ok for c, ok in zip(correct, done.tolist())], dtype=torch.float32)
    taught = demos(tok, rows, correct.view(len(rows), G), cfg, scorer) if cfg.ptx_coef > 0 else []
    R = rewards.view(len(rows), G)
    informative = R.max(1).values > R.min(1).values
    return {"gen": gen, "rows": rows, "rewards": rewards, "correct": correct, "truncated": (~done).float().cpu(),
            "adv": group_advantages(R, cfg.scale_rewards).flatten(), "informative": informative,
            "trained": at_most(informative, cfg.batch_size + len(rows) - n_math, seed), "demos": taught,
            "pad": tok.pad_token_id, "step_right": step_accuracy(gen.texts[:n_math * G]), "n_math": n_math}


def at_most(informative: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The groups a step trains on: every informative one, or n of them drawn at random (seeded) when there are more
    (dynamic sampling: the level's problems come first in a batch, so taking the first n would favour them)."""
    idx = informative.nonzero().flatten()
    if len(idx) <= n:
        return informative
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]]
    return torch.zeros_like(informative).index_fill(0, pick, True)


def demos(tok, rows: list[dict], correct: torch.Tensor, cfg: Config, scorer: Scorer) -> list[tuple[list, list]]:
    """The ptx term's conversations, after Ma et al. 2025 (ReLIFT: fine-tune on the questions RL does not solve):
    (ids, assistant mask) of the worked solution (`rewards.math_messages`, the reply SFT taught) of every problem
    fewer than half of whose G samples were right. Left out: rows without a solution, a solution the scorer does
    not score right, one longer than `max_new_tokens` (the policy could not write it within budget)."""
    out = []
    for i, row in enumerate(rows):
        if float(correct[i].mean()) >= 0.5 or not row.get("solution"):
            continue
        messages = math_messages(row, cfg.instruction)["messages"]
        ids, mask = render_chat(tok, messages)
        if scorer([messages[-1]["content"]], row)[1][0] and sum(mask) <= cfg.max_new_tokens:
            out.append((ids, mask))
    return out


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


def updates(s, model, ref, cfg: Config, micros: list[dict]) -> list[list[Closure]]:
    """`epochs` optimizer steps on the informative groups of the step's rollouts, in chunks of whole groups; the
    loss is the token mean over all of them (across ranks too). No informative group: steps without gradients,
    which keep the schedule aligned with the steps."""
    G, device = cfg.group_size, s.device
    size = max(G, cfg.micro_batch // G * G)  # whole groups per chunk, so each shares its prompt's forward
    work = []
    for ro in micros:
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        ro["seqs"] = {k: getattr(ro["gen"], k).to(device) for k in keys}
        keep = ro["trained"].repeat_interleave(G).nonzero().flatten().tolist()
        work += [(ro, keep[i:i + size]) for i in range(0, len(keep), size)]
    total = s.all_sum([float(ro["seqs"]["completion_mask"][c].sum()) for ro, c in work])
    with torch.no_grad(), autocast(device, s.bf16):  # the old policy's and the reference's log-probs, once
        old = [chunk_logprobs(model, ro, c, cfg) for ro, c in work] if cfg.epochs > 1 else [None] * len(work)
        refs = [chunk_logprobs(ref, ro, c, cfg) for ro, c in work] if ref is not None else [None] * len(work)
    taught = [d for ro in micros for d in ro.get("demos", [])]
    ptx = collate([i for i, _ in taught], [m for _, m in taught], micros[0]["pad"]) if taught else None
    return [[lambda m, w=w, o=o, r=r, last=e == cfg.epochs - 1: chunk_share(m, *w, o, r, total, cfg, last)
             for w, o, r in zip(work, old, refs)]
            + ([lambda m, last=e == cfg.epochs - 1: ptx_share(m, ptx, cfg, s, last)] if ptx is not None else [])
            for e in range(cfg.epochs)]


def ptx_share(model, batch: dict, cfg: Config, s, report: bool) -> tuple[torch.Tensor, dict]:
    """ptx_coef x the SFT loss (token mean) of the step's worked solutions, as this rank's share."""
    batch = {k: v.to(s.device) for k, v in batch.items()}
    with attention_kernel(s.device, batch["input_ids"].shape[1]):
        loss = sft_loss(model, batch)
    return cfg.ptx_coef * loss / s.world, {"ptx_loss": float(loss.detach())} if report else {}


def chunk_logprobs(model, ro: dict, chunk: list[int], cfg: Config) -> torch.Tensor:
    seqs = {k: v[chunk] for k, v in ro["seqs"].items()}
    with attention_kernel(seqs["prompt_ids"].device, seqs["prompt_ids"].shape[1] + seqs["completion_ids"].shape[1]):
        return completion_logprobs(model, seqs, cfg.temperature, cfg.group_size)


def chunk_share(model, ro: dict, chunk: list[int], old, ref, total: float, cfg: Config, report: bool):
    """The GRPO loss of one chunk as its share of the step's token mean (`losses.grpo_loss`)."""
    logp = chunk_logprobs(model, ro, chunk, cfg)
    mask = ro["seqs"]["completion_mask"][chunk].float()
    loss, m = grpo_loss(logp, old if old is not None else logp.detach(), ref, ro["adv"][chunk].to(logp.device), mask,
                        cfg.clip_eps, cfg.beta, total)
    stats = {"clip_sum": m["clip_frac"] * m["tokens"], "kl_sum": m.get("kl", 0.0) * m["tokens"],
             "kept": m["tokens"]} if report else {}  # the last epoch's clip fraction and KL, token-weighted
    return loss, stats


def metrics(s, micros: list[dict], sums: dict, has_ref: bool, G: int) -> dict:
    """The step's rollouts (means over its rollout batches; the math rows', and the chat rows' reward apart) and its
    update (token-weighted over all ranks)."""
    n, kept = len(micros), s.all_sum(sums.get("kept", 0.0))
    mean = lambda f: sum(float(f(ro)) for ro in micros) / n  # noqa: E731
    math, chat = (lambda ro: slice(0, ro["n_math"] * G)), (lambda ro: slice(ro["n_math"] * G, None))
    return {"rollout_reward": mean(lambda ro: ro["rewards"][math(ro)].mean()),
            "pass_rate": mean(lambda ro: ro["correct"][math(ro)].mean()),
            "chat_reward": mean(lambda ro: ro["rewards"][chat(ro)].mean()) if micros[0]["rows"][-1].get("chat")
            else None,
            "completion_len": mean(lambda ro: ro["gen"].completion_mask[math(ro)].sum(1).float().mean()),
            "truncated": mean(lambda ro: ro["truncated"][math(ro)].mean()),
            "kl": s.all_sum(sums.get("kl_sum", 0.0)) / kept if has_ref and kept else None,
            "clip_frac": s.all_sum(sums.get("clip_sum", 0.0)) / kept if kept else 0.0,
            "skipped_groups": 1.0 - mean(lambda ro: ro["informative"].float().mean()),
            "trained_groups": mean(lambda ro: ro["trained"].sum()),
            "step_right": mean(lambda ro: ro["step_right"]) if all(ro["step_right"] is not None for ro in micros) else None,
            "ptx_loss": sums.get("ptx_loss"), "ptx_rows": mean(lambda ro: len(ro["demos"])),
            "difficulty": micros[0]["level"]}


# --- samples -----------------------------------------------------------------------------------------------------
def sample_rows(rows: list[dict], ro: dict, G: int, per_step: int = 4) -> list[dict]:
    """A few (prompt, completion, reward, advantage) rows of one rollout for the table and the run tables."""
    out = []
    for i in range(min(per_step, len(rows))):
        k = i * G + i % G  # one completion of each of the first problems
        out.append({"prompt": rows[k // G]["question"], "completion": ro["gen"].texts[k],
                    "reward": float(ro["rewards"][k]), "advantage": float(ro["adv"][k]), "tag": "grpo"})
    return out


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store, scorer: Scorer = score) -> dict:
    """Train; `scorer` replaces the math rewards (tests plant a reward a random model can earn this way)."""
    from instar.report import grpo_samples_table

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
              "group_size": cfg.group_size, "chat_prompts": len(problems.chats),
              "rollouts_per_step": (drawn(cfg) + cfg.chat_prompts) * cfg.group_size * cfg.grad_accum,
              "base": cfg.model}
    first = max(min(cfg.difficulty, problems.levels[-1]), problems.levels[0])
    cur = Curriculum(first, problems.levels[0], problems.levels[-1], cfg.target_pass, cfg.band)
    history: list[float] = []  # rollout reward per step, for the end's mean of the last 10

    def micro(i):
        ro = rollout(model, tok, problems.batch(i, cur.level), cfg, cfg.seed * 1_000_003 + i, s.bf16, s.device, scorer)
        return {**ro, "level": cur.level}

    def step_updates(micros):
        if cfg.curriculum:  # the step's pass rate (all ranks) sets the next step's level
            cur.update(s.all_mean({"p": level_pass_rate(micros, cfg)})["p"])
        return updates(s, model, ref, cfg, micros)

    def step_metrics(micros, sums):
        values = metrics(s, micros, sums, ref is not None, cfg.group_size)
        history.append(s.all_mean(values)["rollout_reward"])
        return values

    def restore(state):
        cur.level, cur.avg = int(state["level"]), float(state["avg"])
        history[:] = state["history"]

    stage = Stage(model, tok, micro=micro, updates=step_updates, metrics=step_metrics,
                  evaluate=lambda m: evaluate_math(m, tok, problems.heldout, cfg.max_new_tokens, cfg.instruction),
                  samples=lambda micros: sample_rows(micros[0]["rows"], micros[0], cfg.group_size),
                  table=grpo_samples_table, extra=lambda: {"level": cur.level, "avg": cur.avg, "history": history},
                  restore=restore, per_step=cfg.epochs,
                  yardsticks=yardsticks.for_stage(cfg, tok, instruction=cfg.instruction))
    start, end = fit(s, stage)
    end = {**end, "rollout_reward": sum(history[-10:]) / max(len(history[-10:]), 1), "difficulty": cur.level}
    return s.finish(unwrap(model), tok, start=start, end=end)

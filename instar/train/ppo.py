"""Stage 3b: RLHF with PPO — the policy learns to write answers the reward model (stage 3a) scores highly.

    instar train reward && instar train ppo                  # policy from runs/sft, reward model runs/reward
    instar train ppo --set lora=true --set lr=1e-4 --set kl_coef=0.1

One formulation, the one of Ouyang et al. 2022 / Stiennon et al. 2020 as TRL's PPO trainer implements it:
  * rollouts: `batch_size` stored prompts (train split of the `preference` records), one sampled response each
    (batched, KV cache, `temperature`), scored once by the frozen reward model at the response's end;
  * reward per token = -kl_coef * (log pi - log ref) at every response token (k1 KL estimate), plus the score
    at the last one; the reference is a frozen copy of the starting policy, or the same weights with the LoRA
    adapter disabled (`lora = true`: no second model);
  * GAE with gamma 1, lambda 0.95 over the response tokens, advantages whitened over the batch;
  * `ppo_epochs` passes over the batch in minibatches: clipped policy surrogate + vf_coef * clipped value loss;
  * a value head (one linear layer on the policy's last hidden state, zero-initialised) shares the trunk.
Every log-prob that feeds a ratio or the KL is taken from logits divided by the sampling temperature, the
distribution the tokens were actually drawn from. Padding and EOS as in SFT: the response mask covers the
response and its `<|im_end|>`, never the prompt or padding (labels -100).
Guards against gaming the reward model, the field's standard ones (which one mattered: docs/measurements.md "Stage 3"):
  * the adaptive KL controller of Ziegler et al. 2019 (`kl_target`): kl_coef follows the KL per response;
  * `no_eos_penalty`: a response cut at `max_new_tokens` without its stop token loses this much score;
  * `length_coef`: a length-aware score, minus length_coef * |log(length / the starting policy's length)|
    (`losses.shaped_scores`; the starting length is its mean on the held-out prompts at the start measure).
Against the "alignment tax" (PPO on chat prompts cost the SFT model 3-4 points of arithmetic in every default run
measured): PPO-ptx of Ouyang et al. 2022, `ptx_coef` x the SFT loss on `ptx_batch` stored conversations added
to every update (InstructGPT mixed in pretraining text; here the stored SFT conversations, mostly math in `instar
run`, are what the regression was measured on).
Prompts are split by prompt (`generate.pairs.split_by_prompt`): the val prompts are never trained on, and at the
start and end the policy also answers the hand-written chat prompts of `yardsticks` (reward, length, repetition).
Stops with a clear error on a non-finite loss or reward, or when the mean KL per response passes `kl_max`.
Each step is one rollout batch per micro-batch (`grad_accum`, and one per rank under torchrun): advantages are
whitened over all of them, and minibatch k of the step is the k-th minibatch of every one of them, so 2 ranks
equal one process with grad_accum=2 (tested). The loop (`loop.fit`) does the rest: one optimizer step per
minibatch, the schedule over all of them, interrupts at step boundaries, checkpoints, evals.
Simplifications: no entropy bonus, no reward whitening/clipping; the value head is dropped at the end (model/
is the plain policy).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from pydantic import Field, model_validator

from instar.errors import ConfigError, InstarError
from instar.generate.pairs import stored_split
from instar.train import yardsticks
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train.loop import Closure, Stage, autocast, fit, open_session
from instar.train.losses import (adaptive_kl_coef, entropy, gae, kl_penalty, ppo_policy_loss, ppo_value_loss,
                                 shaped_scores, whiten)
from instar.train.models import load_model, wrap_lora
from instar.train.sampling import attention_kernel, generate, stopped
from instar.train.sft import examples as sft_examples
from instar.train.sft import loss_fn as sft_loss
from instar.train.tokens import Sampler, collate, render_chat, token_logprobs


# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    model: str = Field("runs/sft", description="Policy (and reference): the SFT run, an HF directory or embedded-smollm2.")
    reward_model: str = Field("runs/reward", description="The reward model: a finished `instar train reward` run.")
    out: str = Field("runs/ppo", description="Run directory.")
    max_steps: int = Field(100, ge=1, description="Rollout batches (each followed by ppo_epochs of updates).")
    # 3e-5 full fine-tuning of the presets; ~1e-6 SmolLM2-135M full, ~1e-4 LoRA. PPO diverges well below SFT lrs.
    lr: float = Field(3e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(16, ge=1, description="Prompts (= responses) per rollout batch.")
    mini_batch_size: int = Field(8, ge=1, description="Responses per PPO update; must divide batch_size.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    max_new_tokens: int = Field(48, ge=1, description="Response length cap.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (also divides logits for log-probs).")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty to the reference, in the reward (the "
                           "starting value when kl_target is set).")
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL controller: steer kl_coef so the KL per "
                                    "response tracks this (nats); unset = kl_coef stays fixed.")
    kl_horizon: int = Field(10, ge=1, description="Controller horizon in steps: kl_coef moves at most "
                            "20%/kl_horizon per step.")
    no_eos_penalty: float = Field(0.0, ge=0, description="Subtracted from the score of a response cut at "
                                  "max_new_tokens without its stop token.")
    length_coef: float = Field(0.0, ge=0, description="Subtract length_coef * |log(length / start length)| from "
                               "the score (start length: the starting policy's mean on the val prompts).")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    vf_clip: float = Field(0.2, gt=0, description="Value clip range around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount (1: a response is one short episode).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_max: float = Field(20.0, gt=0, description="Stop when the mean KL of a response to the reference exceeds this (nats).")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx: add ptx_coef x the SFT loss on stored conversations "
                            "to every update, so PPO keeps what SFT taught (0 = off).")
    ptx_batch: int = Field(8, ge=1, description="Stored conversations (train split, drawn at random) per update "
                           "and rollout batch for the ptx term.")
    max_len: int = Field(256, ge=8, description="Prompt + response tokens (a longer prompt keeps its end).")
    eval_batches: int = Field(5, ge=1, description="Held-out prompts at each eval: at most this many batches of them.")
    # One sample per prompt of 32 moved the held-out reward of one and the same SFT model by up to 0.09 between
    # seeds (0.515 / 0.427 / 0.516; temperature 0.7, the Quickstart run of 58fd575), more than PPO's usual gain.
    eval_samples: int = Field(2, ge=1, description="Samples of each held-out prompt at each eval (the held-out "
                              "reward, KL and length are their means).")

    unsupported = {"compile": "rollouts change shape every token: recompiling would cost more than it saves"}

    @model_validator(mode="after")
    def _minibatches(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} must divide batch_size {self.batch_size}")
        return self


# --- data ------------------------------------------------------------------------------------------------
def prompts_from_store(store, tok, split: str, max_len: int) -> tuple[list[list[int]], list[str]]:
    """Distinct rendered prompts (ending with the assistant header) of the stored preference pairs on one side
    of the by-prompt split (`generate.pairs.split_by_prompt`: no val prompt is ever trained on), and their last
    user turns (for the sample table)."""
    seen, ids_out, texts = set(), [], []
    for r in stored_split(store, split):
        ids = tuple(render_chat(tok, r["prompt"], add_generation_prompt=True)[0][-max_len:])
        if ids not in seen:
            seen.add(ids)
            ids_out.append(list(ids))
            texts.append(r["prompt"][-1]["content"])
    return ids_out, texts


# --- rollouts ------------------------------------------------------------------------------------------------
Scorer = Callable[[dict], torch.Tensor]  # batch {"input_ids", "attention_mask", "labels"} -> [B] scores


class PolicyWithValue(torch.nn.Module):
    """The policy LM plus a scalar value head on its last hidden state; both outputs aligned with input_ids."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Linear(lm.config.get_text_config().hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at first: early advantages are the plain returns
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        v = self.value_head(out.hidden_states[-1]).squeeze(-1).float()      # [B, T]: value after token t
        values = torch.zeros_like(v)
        values[:, 1:] = v[:, :-1]  # V(state before token t) at t, like token_logprobs' alignment
        return out.logits, values


@torch.no_grad()
def rollout(policy, reference: Callable, scorer: Scorer, tok, prompts: list[list[int]], cfg: Config, seed: int,
            device, bf16: bool, kl_coef: float | None = None, ref_length: float | None = None) -> dict:
    """Sample one response per prompt and score it: right-padded batch + old log-probs, values, rewards, GAE
    advantages (whitened later, over the whole step). `scores` are the reward model's, `shaped` what PPO
    optimises (`losses.shaped_scores`); kl_coef defaults to cfg.kl_coef; without `ref_length` no length term."""
    kl_coef = cfg.kl_coef if kl_coef is None else kl_coef
    gen = generate(policy.lm, tok, prompts, cfg.max_new_tokens, cfg.temperature, seed=seed)
    ended = stopped(gen, tok).to(device)                   # [B] False = cut at max_new_tokens
    lengths = gen.completion_mask.sum(1).tolist()          # response tokens incl. the stop token (>= 1)
    comps = gen.completion_ids.tolist()
    seqs = [p + c[:n] for p, c, n in zip(prompts, comps, lengths)]
    masks = [[0] * len(p) + [1] * n for p, n in zip(prompts, lengths)]
    batch = {k: v.to(device) for k, v in collate(seqs, masks, tok.pad_token_id).items()}
    mask = (batch["labels"] != -100).float()               # [B, T] response tokens
    with autocast(device, bf16, batch["input_ids"].shape[1]):
        logits, values = policy(batch["input_ids"], batch["attention_mask"])
        logp = token_logprobs(logits, batch["labels"], cfg.temperature)
        ref_logp = token_logprobs(reference(batch), batch["labels"], cfg.temperature)
        scores = scorer(batch).float()                     # [B]
    shaped = shaped_scores(scores, ended, torch.tensor(lengths, device=device), ref_length or 1.0,
                           cfg.no_eos_penalty, cfg.length_coef if ref_length else 0.0)   # [B]
    kl = kl_penalty(logp, ref_logp) * mask                 # [B, T]
    rewards = -kl_coef * kl
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    rewards[torch.arange(len(seqs), device=device), last] += shaped
    values = values * mask
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return {**batch, "mask": mask, "old_logp": logp, "old_values": values, "adv": adv, "returns": returns,
            "scores": scores, "shaped": shaped, "stopped": ended, "kl": kl.sum(1), "texts": gen.texts,
            "lengths": lengths, "seed": seed}


# --- loss ------------------------------------------------------------------------------------------------
def updates(s, cfg: Config, micros: list[dict], ctl: dict, ptx: dict | None = None) -> list[list[Closure]]:
    """ppo_epochs passes over the step's rollouts in minibatches: one optimizer step per minibatch, made of the
    k-th minibatch of every rollout batch (each reshuffled per epoch by its own seed), its loss the token mean
    over all of them (across ranks too). With `kl_target`, the step's KL moves `ctl["kl_coef"]` for the next
    step's rollouts (the adaptive controller). `ptx`: the stored SFT conversations of the ptx term ("rows") and
    the pad id; each closure draws its `ptx_batch` of them from its rollout's seed and its update's index (the
    same on resume)."""
    reward = s.all_mean({"r": sum(float(r["scores"].mean()) for r in micros) / len(micros)})["r"]
    kl = s.all_mean({"k": sum(float(r["kl"].mean()) for r in micros) / len(micros)})["k"]
    if not (math.isfinite(reward) and math.isfinite(kl)):
        raise InstarError(f"reward {reward} / KL {kl} is not finite: check the reward model")
    if kl > cfg.kl_max:
        raise InstarError(f"KL to the reference reached {kl:.1f} nats per response (kl_max {cfg.kl_max}): lower lr "
                          f"or raise kl_coef; the last checkpoint is in {s.ckpt}")
    if cfg.kl_target is not None:
        ctl["kl_coef"] = adaptive_kl_coef(ctl["kl_coef"], kl, cfg.kl_target, cfg.kl_horizon)
    n = s.all_sum([float(r["mask"].sum()) for r in micros])
    mean = s.all_sum([float((r["adv"] * r["mask"]).sum()) for r in micros]) / n
    var = s.all_sum([float(((r["adv"] - mean) ** 2 * r["mask"]).sum()) for r in micros]) / n
    B, M = cfg.batch_size, cfg.mini_batch_size
    orders = []
    for r in micros:
        r["adv_w"] = whiten(r["adv"], r["mask"], mean=mean, var=var)
        g = torch.Generator().manual_seed(r["seed"])
        orders.append([torch.randperm(B, generator=g) for _ in range(cfg.ppo_epochs)])
    groups = []
    for e in range(cfg.ppo_epochs):
        for k in range(0, B, M):
            mbs = [order[e][k:k + M] for order in orders]
            total = s.all_sum(sum(float(r["mask"][mb].sum()) for r, mb in zip(micros, mbs)))
            extra = [ptx_batch(ptx, cfg, r["seed"], len(groups), s.device) for r in micros]
            groups.append([lambda model, r=r, mb=mb, t=total, x=x: minibatch_share(model, r, mb, t, cfg, x,
                                                                                   len(micros) * s.world)
                           for r, mb, x in zip(micros, mbs, extra)])
    return groups


def ptx_batch(ptx: dict | None, cfg: Config, seed: int, update: int, device) -> dict | None:
    """`ptx_batch` stored conversations for one closure of the ptx term, drawn from (rollout seed, update index)."""
    if ptx is None:
        return None
    g = torch.Generator().manual_seed(seed * 31 + update)
    rows = [ptx["rows"][int(j)] for j in torch.randint(len(ptx["rows"]), (cfg.ptx_batch,), generator=g)]
    batch = collate([ids for ids, _ in rows], [mask for _, mask in rows], ptx["pad"])
    return {k: v.to(device) for k, v in batch.items()}


def minibatch_share(policy, r: dict, mb: torch.Tensor, total: float, cfg: Config, ptx: dict | None = None,
                    parts: int = 1):
    """Clipped surrogate + vf_coef * clipped value loss over one minibatch, as its share (tokens / total) of the
    minibatch across every rollout batch of the step; plus, with a `ptx` batch, ptx_coef x its SFT loss / `parts`
    (the closures of one update, over every rank)."""
    m = r["mask"][mb]
    with attention_kernel(m.device, m.shape[1]):
        logits, values = policy(r["input_ids"][mb], r["attention_mask"][mb])
    logp = token_logprobs(logits, r["labels"][mb], cfg.temperature)
    pg_loss, pm = ppo_policy_loss(logp, r["old_logp"][mb], r["adv_w"][mb], m, cfg.clip)
    vf_loss = ppo_value_loss(values, r["old_values"][mb], r["returns"][mb], m, cfg.vf_clip)
    with torch.no_grad():  # logits at t-1 predict token t: entropy of the distribution each token came from
        ent = entropy(logits[:, :-1].float() / cfg.temperature, m[:, 1:])
    stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": ent, **pm}
    loss = (pg_loss + cfg.vf_coef * vf_loss) * m.sum() / total
    if ptx is not None:
        with attention_kernel(m.device, ptx["input_ids"].shape[1]):
            stats["ptx_loss"] = sft_loss(policy.lm, ptx)
        loss = loss + cfg.ptx_coef * stats["ptx_loss"] / parts
    return loss, {k: float(v.detach()) for k, v in stats.items()}


def metrics(micros: list[dict], sums: dict, updates_per_step: int, kl_coef: float) -> dict:
    """The step's rollouts (reward, shaped score, KL, length, stop rate: `rollout_*`, apart from the held-out
    `reward_mean`, `kl`, `response_length`), the KL coefficient its rollouts used, and its updates' means
    (losses, entropy, clip fraction)."""
    n = len(micros)
    return {"rollout_reward": sum(float(r["scores"].mean()) for r in micros) / n,
            "rollout_shaped": sum(float(r["shaped"].mean()) for r in micros) / n,
            "rollout_kl": sum(float(r["kl"].mean()) for r in micros) / n,
            "rollout_length": sum(sum(r["lengths"]) / len(r["lengths"]) for r in micros) / n,
            "rollout_stop": sum(float(r["stopped"].float().mean()) for r in micros) / n, "kl_coef": kl_coef,
            **{k: v / (updates_per_step * n) for k, v in sums.items()}}


# --- samples -----------------------------------------------------------------------------------------------------
def sample_rows(r: dict, per_step: int = 4) -> list[dict]:
    """A few (prompt, response, reward) rows of one rollout batch for the table and the run tables."""
    return [{"prompt": q, "completion": t, "reward": float(sc), "tag": "rollout"}
            for q, t, sc in zip(r["questions"], r["texts"], r["scores"])][:per_step]


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store, scorer: Scorer | None = None) -> dict:
    """Train; `scorer` replaces the reward model (tests plant a known reward this way)."""
    from instar.report import ppo_samples_table

    if (done := finished_summary(cfg.out)) is not None:
        return {**done, "already_done": True}
    stored_split(store, "train"), stored_split(store, "val")  # both sides of the by-prompt split exist
    s = open_session("ppo", cfg, store)
    lm, tok = load_model(cfg.model, purpose="lora" if cfg.lora else "full")
    prompt_len = max(1, cfg.max_len - cfg.max_new_tokens)
    train_prompts, questions = prompts_from_store(store, tok, "train", prompt_len)
    val_prompts = prompts_from_store(store, tok, "val", prompt_len)[0][:cfg.eval_batches * cfg.batch_size]
    reward_source = cfg.reward_model if scorer is None else "custom scorer"
    if scorer is None:
        scorer = reward_scorer(cfg.reward_model, tok, s.device)
    ref_lm = None if cfg.lora else copy.deepcopy(lm).requires_grad_(False).eval().to(s.device)
    if cfg.lora:
        lm = wrap_lora(lm, cfg)
    policy = s.place(PolicyWithValue(lm))

    @torch.no_grad()
    def reference(batch):  # the starting policy: a frozen copy, or (LoRA) the same weights with adapters off
        if ref_lm is not None:
            return ref_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with policy.lm.disable_adapter():
            return policy.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    ptx = ({"rows": sft_examples(store, tok, "train", cfg.max_len)[0], "pad": tok.pad_token_id}
           if cfg.ptx_coef > 0 else None)
    s.data = {"train_prompts": len(train_prompts), "val_prompts": len(val_prompts), "trainable_params": trainable,
              "base": cfg.model, "reward_model": reward_source, "ptx_conversations": len(ptx["rows"]) if ptx else 0}
    s.say(f"ppo: {len(train_prompts)} train / {len(val_prompts)} val prompts, {trainable:,} trainable params"
          f"{' (LoRA, reference = adapter off)' if cfg.lora else ' (reference = frozen copy)'}")
    sampler = Sampler(len(train_prompts), cfg.batch_size, cfg.seed)
    # What the guards read, kept by the checkpoint: the KL coefficient (moved by the controller) and the starting
    # policy's mean response length on the val prompts (the length term's zero point, set by the start measure).
    ctl: dict = {"kl_coef": cfg.kl_coef, "ref_length": None}

    def micro(i):
        idx = sampler.batch(i)
        r = rollout(policy, reference, scorer, tok, [train_prompts[j] for j in idx], cfg, cfg.seed * 1_000_003 + i,
                    s.device, s.bf16, ctl["kl_coef"], ctl["ref_length"])
        return {**r, "questions": [questions[j] for j in idx], "kl_coef": ctl["kl_coef"]}

    def evaluate(_lm):
        scores, kls, lens, reps, ended = [], [], [], [], []
        held_out = [p for p in val_prompts for _ in range(cfg.eval_samples)]
        for i in range(0, len(held_out), cfg.batch_size):
            r = rollout(policy, reference, scorer, tok, held_out[i:i + cfg.batch_size], cfg, cfg.seed + 7919 * i,
                        s.device, s.bf16, ctl["kl_coef"], ctl["ref_length"])
            scores += r["scores"].tolist()
            kls += r["kl"].tolist()
            lens += r["lengths"]
            reps += [yardsticks.rep_n(t) for t in r["texts"]]
            ended += r["stopped"].tolist()
        mean = yardsticks.mean
        if ctl["ref_length"] is None:  # the start measure: the starting policy's length
            ctl["ref_length"] = mean(lens)
        return {"reward_mean": mean(scores), "kl": mean(kls), "response_length": mean(lens),
                "response_rep3": mean(reps), "stop_rate": mean(ended)}

    per_step = (cfg.batch_size // cfg.mini_batch_size) * cfg.ppo_epochs
    start, end = fit(s, Stage(policy, tok, micro=micro, updates=lambda micros: updates(s, cfg, micros, ctl, ptx),
                              evaluate=evaluate, lm=policy.lm,
                              metrics=lambda micros, sums: metrics(micros, sums, per_step, micros[0]["kl_coef"]),
                              samples=lambda micros: sample_rows(micros[0]), table=ppo_samples_table,
                              per_step=per_step, yardsticks=yardsticks.for_stage(cfg, tok, scorer=scorer),
                              extra=lambda: dict(ctl), restore=ctl.update))
    return s.finish(policy.lm, tok, start=start, end=end)


def reward_scorer(source: str, tok, device) -> Scorer:
    """The frozen reward model as a Scorer; its tokenizer must be the policy's (same ids, same pad)."""
    from instar.train.reward import load_reward_model, score

    rm, rm_tok = load_reward_model(source, device)
    if rm_tok.get_vocab() != tok.get_vocab() or rm_tok.pad_token_id != tok.pad_token_id:
        raise ConfigError(f"reward_model {source} was trained with another tokenizer than the policy "
                          "(train it from the same SFT run)")
    rm.requires_grad_(False).eval()

    def scorer(batch):
        return score(rm, batch["input_ids"], batch["attention_mask"])
    return scorer

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
Stops with a clear error on a non-finite loss or reward, or when the mean KL per response passes `kl_max`.
Simplifications: no entropy bonus, no adaptive KL controller, no reward whitening/clipping, no penalty for
responses cut at `max_new_tokens`; the value head is dropped at the end (model/ is the plain policy).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from pydantic import Field, model_validator

from instar.errors import ConfigError, InstarError
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train.loop import (autocast, make_optimizer, make_scheduler, open_session, optimizer_step,
                               restore_training_state)
from instar.train.losses import entropy, gae, kl_penalty, ppo_policy_loss, ppo_value_loss, whiten
from instar.train.models import load_model, wrap_lora
from instar.train.sampling import generate
from instar.train.tokens import collate, render_chat, Sampler, token_logprobs


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
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty to the reference, in the reward.")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    vf_clip: float = Field(0.2, gt=0, description="Value clip range around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount (1: a response is one short episode).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_max: float = Field(20.0, gt=0, description="Stop when the mean KL of a response to the reference exceeds this (nats).")
    max_len: int = Field(256, ge=8, description="Prompt + response tokens (a longer prompt keeps its end).")
    eval_batches: int = Field(2, ge=1, description="Held-out rollout batches at each eval.")

    @model_validator(mode="after")
    def _minibatches(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} must divide batch_size {self.batch_size}")
        return self


Scorer = Callable[[dict], torch.Tensor]  # batch {"input_ids", "attention_mask", "labels"} -> [B] scores


# --- data ------------------------------------------------------------------------------------------------
def prompts_from_store(store, tok, split: str, max_len: int) -> tuple[list[list[int]], list[str]]:
    """Distinct rendered prompts (ending with the assistant header) of the stored preference pairs, and
    their last user turns (for the sample table)."""
    seen, ids_out, texts = set(), [], []
    for r in store.require("preference", split, 1):
        ids = tuple(render_chat(tok, r["prompt"], add_generation_prompt=True)[0][-max_len:])
        if ids not in seen:
            seen.add(ids)
            ids_out.append(list(ids))
            texts.append(r["prompt"][-1]["content"])
    return ids_out, texts


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
            device, bf16: bool) -> dict:
    """Sample one response per prompt and score it: right-padded batch + old log-probs, values, rewards, GAE."""
    gen = generate(policy.lm, tok, prompts, cfg.max_new_tokens, cfg.temperature, seed=seed)
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
    kl = kl_penalty(logp, ref_logp) * mask                 # [B, T]
    rewards = -cfg.kl_coef * kl
    last = torch.tensor([len(s) - 1 for s in seqs], device=device)
    rewards[torch.arange(len(seqs), device=device), last] += scores
    values = values * mask
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return {**batch, "mask": mask, "old_logp": logp, "old_values": values, "adv": whiten(adv, mask),
            "returns": returns, "scores": scores, "kl": kl.sum(1), "texts": gen.texts, "lengths": lengths}


# --- loss ------------------------------------------------------------------------------------------------
def ppo_update(policy, opt, sched, r: dict, cfg: Config, device, bf16: bool, gen: torch.Generator) -> dict:
    """ppo_epochs passes over the rollout in minibatches; returns the mean of each logged quantity."""
    sums: dict[str, float] = {}
    n = 0
    B = r["input_ids"].shape[0]
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(B, generator=gen).split(cfg.mini_batch_size):
            m = r["mask"][mb]
            with autocast(device, bf16, r["input_ids"].shape[1]):
                logits, values = policy(r["input_ids"][mb], r["attention_mask"][mb])
            logp = token_logprobs(logits, r["labels"][mb], cfg.temperature)
            pg_loss, pm = ppo_policy_loss(logp, r["old_logp"][mb], r["adv"][mb], m, cfg.clip)
            vf_loss = ppo_value_loss(values, r["old_values"][mb], r["returns"][mb], m, cfg.vf_clip)
            loss = pg_loss + cfg.vf_coef * vf_loss
            if not torch.isfinite(loss):
                raise InstarError(f"PPO loss became {float(loss)}: lower lr, or check the reward model's scores")
            loss.backward()
            optimizer_step(policy, opt, sched, cfg)
            with torch.no_grad():  # logits at t-1 predict token t: entropy of the distribution each token came from
                ent = entropy(logits[:, :-1].float() / cfg.temperature, m[:, 1:])
            for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": ent, **pm}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
    return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store, scorer: Scorer | None = None) -> dict:
    """Train; `scorer` replaces the reward model (tests plant a known reward this way)."""
    if (done := finished_summary(cfg.out)) is not None:
        return {**done, "already_done": True}
    store.require("preference", "train", 1)
    store.require("preference", "val", 1)
    s = open_session("ppo", cfg, store)
    lm, tok = load_model(cfg.model, purpose="lora" if cfg.lora else "full")
    prompt_len = max(1, cfg.max_len - cfg.max_new_tokens)
    train_prompts, questions = prompts_from_store(store, tok, "train", prompt_len)
    val_prompts = prompts_from_store(store, tok, "val", prompt_len)[0][:cfg.eval_batches * cfg.batch_size]
    reward_source = cfg.reward_model if scorer is None else "custom scorer"
    if scorer is None:
        scorer = reward_scorer(cfg.reward_model, tok, s.device)
    ref_lm = None if cfg.lora else copy.deepcopy(lm).requires_grad_(False).eval()
    if cfg.lora:
        lm = wrap_lora(lm, cfg)
    policy = PolicyWithValue(lm).to(s.device)
    if ref_lm is not None:
        ref_lm.to(s.device)

    @torch.no_grad()
    def reference(batch):
        if ref_lm is not None:
            return ref_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with policy.lm.disable_adapter():
            return policy.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    s.data = {"train_prompts": len(train_prompts), "val_prompts": len(val_prompts), "trainable_params": trainable,
              "base": cfg.model, "reward_model": reward_source}
    s.say(f"ppo: {len(train_prompts)} train / {len(val_prompts)} val prompts, {trainable:,} trainable params"
          f"{' (LoRA, reference = adapter off)' if cfg.lora else ' (reference = frozen copy)'}")

    def evaluate(_m):
        scores, kls, lens = [], [], []
        for i in range(0, len(val_prompts), cfg.batch_size):
            r = rollout(policy, reference, scorer, tok, val_prompts[i:i + cfg.batch_size], cfg, cfg.seed + 7919 * i,
                        s.device, s.bf16)
            scores += r["scores"].tolist()
            kls += r["kl"].tolist()
            lens += r["lengths"]
        return {"reward_mean": sum(scores) / len(scores), "kl": sum(kls) / len(kls),
                "response_length": sum(lens) / len(lens)}

    updates = (cfg.batch_size // cfg.mini_batch_size) * cfg.ppo_epochs  # optimizer steps per rollout batch
    opt = make_optimizer(cfg, policy)
    sched = make_scheduler(cfg.model_copy(update={"max_steps": cfg.max_steps * updates, "warmup": cfg.warmup * updates}),
                           opt)
    state = s.resume(policy)
    step = restore_training_state(state, opt, sched) if state is not None else 0
    start = state["start"] if state else s.measure(policy.lm, tok, evaluate, "start")
    train_loop(s, policy, reference, scorer, tok, train_prompts, questions, opt, sched, step, start)
    end = s.measure(policy.lm, tok, evaluate, "end", step=cfg.max_steps)
    return s.finish(policy.lm, tok, start=start, end=end)


def train_loop(s, policy, reference, scorer, tok, prompts, questions, opt, sched, step: int, start: dict) -> None:
    """Rollout -> PPO update, max_steps times; metrics + step line + sample table every log_every steps."""
    from instar.report import make_progress, ppo_samples_table, step_line

    cfg = s.cfg
    sampler = Sampler(len(prompts), cfg.batch_size, cfg.seed)
    policy.train()
    with make_progress() as progress:
        s.progress = progress
        task = progress.add_task("ppo", total=cfg.max_steps, completed=step, info="")
        try:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                idx = sampler.batch(step)
                batch_prompts = [prompts[j] for j in idx]
                r = rollout(policy, reference, scorer, tok, batch_prompts, cfg, cfg.seed * 1_000_003 + step,
                            s.device, s.bf16)
                reward, kl = float(r["scores"].mean()), float(r["kl"].mean())
                if not (math.isfinite(reward) and math.isfinite(kl)):
                    raise InstarError(f"reward {reward} / KL {kl} is not finite at step {step + 1}: check the reward model")
                if kl > cfg.kl_max:
                    raise InstarError(f"KL to the reference reached {kl:.1f} nats per response at step {step + 1} "
                                      f"(kl_max {cfg.kl_max}): lower lr or raise kl_coef; the last checkpoint is in {s.ckpt}")
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                stats = ppo_update(policy, opt, sched, r, cfg, s.device, s.bf16, gen)
                step += 1
                progress.update(task, completed=step, info=f"reward {reward:.3f}")
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    values = {"reward": reward, "kl": kl, "response_length": sum(r["lengths"]) / len(r["lengths"]),
                              **stats, "lr": sched.get_last_lr()[0], "s/step": time.perf_counter() - t0}
                    s.log_metrics(step, values)
                    s.say(step_line(step, cfg.max_steps, values))
                    rows = [{"prompt": questions[j], "completion": t, "reward": float(sc)}
                            for j, t, sc in zip(idx, r["texts"], r["scores"])][:4]
                    s.log_samples(step, [{**row, "tag": "rollout"} for row in rows])
                    progress.console.print(ppo_samples_table(rows, f"ppo rollouts · step {step}"))
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                    s.checkpoint(policy, opt, sched, step, start)
        except KeyboardInterrupt:
            s.checkpoint(policy, opt, sched, step, start)
            s.say(f"interrupted at step {step}: checkpoint saved, run the same command to resume")
            raise
        finally:
            s.progress = None


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

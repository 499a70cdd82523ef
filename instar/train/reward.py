"""Stage 3a: a reward model that learns the judge's preferences (the "RM" of RLHF), for PPO to optimise.

    instar train reward                                      # from runs/sft, stored `preference` pairs
    instar train reward --set model=embedded-smollm2 --set lr=1e-5 --set max_steps=300

The model is the SFT model with a scalar head: `AutoModelForSequenceClassification(num_labels=1)` built from
the SFT model's config, its transformer copied in, a fresh linear `score` head. The score of a conversation
is the head's output at the last token that is not padding (Hugging Face's own pooling, so the saved
`model/` scores the same wherever it is loaded, TRL included). Each pair is rendered with the one chat
renderer and cut right after the response's `<|im_end|>`, which is exactly where a PPO rollout ends, so
the reward model is read at the same place in training and in PPO.
Loss: Bradley-Terry, -log sigmoid(r_chosen - r_rejected) (losses.bt_loss). Held-out pairwise accuracy and
mean margin are logged at the start, every `eval_every` steps and at the end, on pairs whose PROMPTS the model
never saw (`generate.pairs.split_by_prompt`: ~20% of prompts with all their pairs), not merely unseen pairs.
With `lora = true` the trunk trains LoRA adapters and the fresh head trains in full (peft's `SEQ_CLS` task keeps
a trainable copy of `score`); both are merged into the plain sequence-classification model in `model/`.
Simplifications: no margin term, no score centring (TRL's `center_rewards_coefficient`); a reward model answers
no REPORT_PROMPTS (it cannot generate) — it logs its scores of a few held-out pairs instead.
"""

from __future__ import annotations

import torch
from pydantic import Field

from instar.errors import InstarError
from instar.generate.pairs import stored_split
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train.evaluate import render_examples
from instar.train.loop import Stage, fit, open_session, supervised
from instar.train.losses import bt_loss
from instar.train.models import load_model, model_dir, wrap_lora
from instar.train.tokens import Sampler, collate


# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    model: str = Field("runs/sft", description="Start from: the SFT run directory, an HF directory or embedded-smollm2.")
    out: str = Field("runs/reward", description="Run directory.")
    # 1e-4: the fresh head needs a larger step than DPO's policy; 1e-5 for SmolLM2-135M.
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch (2x sequences).")
    max_len: int = Field(384, ge=8, description="Tokens per prompt+response (longer ones are truncated).")

    unsupported = {"sample_tokens": "a reward model answers no prompts; it logs its scores of held-out pairs",
                   "external_eval": "a reward model answers no prompts; PPO scores the chat yardsticks with it"}


# --- data ------------------------------------------------------------------------------------------------
Rendered = tuple[list[int], list[int]]  # (ids, response mask), as tokens.render_chat gives


def render_pairs(tok, records: list[dict], max_len: int) -> list[tuple[Rendered, Rendered]]:
    """(chosen, rejected) renderings of preference records, each cut after its last response token.

    A pair is dropped when either side keeps no response token within `max_len` (evaluate.render_examples)."""
    out = []
    for r in records:
        convs = [r["prompt"] + [{"role": "assistant", "content": r[side]}] for side in ("chosen", "rejected")]
        both = render_examples(tok, convs, max_len)
        if len(both) == 2:
            out.append((cut_after_response(*both[0]), cut_after_response(*both[1])))
    return out


def cut_after_response(ids: list[int], mask: list[int]) -> Rendered:
    """The template adds "\n" after <|im_end|>: drop it, so the sequence ends where a rollout ends."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    return ids[:end], mask[:end]


def pairs_from_store(store, tok, split: str, max_len: int) -> list[tuple[Rendered, Rendered]]:
    """The rendered pairs of one side of the by-prompt split (`generate.pairs.split_by_prompt`): val pairs'
    prompts never occur in training, so held-out accuracy says whether the preference carries to new prompts."""
    out = render_pairs(tok, stored_split(store, split), max_len)
    if not out:
        raise InstarError(f"no {split} preference pair keeps a response token within max_len={max_len}")
    return out


def collate_pairs(chunk: list[tuple[Rendered, Rendered]], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows: the B chosen first, then the B rejected (one forward for both)."""
    seqs = [p[0][0] for p in chunk] + [p[1][0] for p in chunk]
    masks = [p[0][1] for p in chunk] + [p[1][1] for p in chunk]
    return collate(seqs, masks, pad_id)


# --- model -----------------------------------------------------------------------------------------------
def load_reward_model(source: str, device: torch.device | str | None = None):
    """(reward model, tokenizer): a saved reward model as is, or a causal LM given a fresh scalar head."""
    import copy
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = model_dir(source) if source != "embedded-smollm2" else None
    archs = (json.loads((path / "config.json").read_text()).get("architectures") or []) if path else []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        rm = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    else:
        lm, tok = load_model(source)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights newly initialised": the head, on purpose
        config = copy.deepcopy(lm.config)
        config.num_labels = 1
        rm = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        hf_logging.set_verbosity(verbosity)
        rm.base_model.load_state_dict(lm.base_model.state_dict())
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rm.config.pad_token_id = tok.pad_token_id  # HF pools at the rightmost token that is not padding
    return (rm.to(device) if device is not None else rm), tok


def score(rm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per right-padded sequence: [B, T] -> [B] float32."""
    return rm(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


# --- loss ------------------------------------------------------------------------------------------------
def loss_fn(model, batch):
    r = score(model, batch["input_ids"], batch["attention_mask"])      # [2B]: chosen then rejected
    half = r.shape[0] // 2
    return bt_loss(r[:half], r[half:])[0]


@torch.no_grad()
def evaluate_pairs(rm, pairs, pad_id: int, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
    """Held-out Bradley-Terry loss, pairwise accuracy (r_chosen > r_rejected) and mean margin."""
    device = next(rm.parameters()).device
    diffs = []
    for b, i in enumerate(range(0, len(pairs), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = collate_pairs(pairs[i:i + batch_size], pad_id)
        r = score(rm, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        diffs.append(r[:r.shape[0] // 2] - r[r.shape[0] // 2:])
    d = torch.cat(diffs)
    loss, m = bt_loss(d, torch.zeros_like(d))
    return {"val_loss": float(loss), "pair_accuracy": float(m["pair_accuracy"]), "margin": float(m["margin"])}


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store) -> dict:
    if (done := finished_summary(cfg.out)) is not None:
        return {**done, "already_done": True}
    stored_split(store, "train"), stored_split(store, "val")  # both sides exist, before a run row is made
    s = open_session("reward", cfg, store)
    rm, tok = load_reward_model(cfg.model)
    if cfg.lora:
        rm = wrap_lora(rm, cfg, task="SEQ_CLS")
    train_pairs = pairs_from_store(store, tok, "train", cfg.max_len)
    val_pairs = pairs_from_store(store, tok, "val", cfg.max_len)
    s.data = {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "base": cfg.model,
              "trainable_params": sum(p.numel() for p in rm.parameters() if p.requires_grad)}
    s.say(f"reward: {len(train_pairs)} train / {len(val_pairs)} val pairs, "
          f"{s.data['trainable_params']:,} trainable params{' (LoRA + head)' if cfg.lora else ''}")
    rm = s.place(rm)

    sampler = Sampler(len(train_pairs), cfg.batch_size, cfg.seed)

    def batch_at(i):
        return collate_pairs([train_pairs[j] for j in sampler.batch(i)], tok.pad_token_id)

    def evaluate(m):
        return evaluate_pairs(m, val_pairs, tok.pad_token_id, cfg.batch_size, cfg.eval_batches)

    stage = Stage(rm, tok, micro=batch_at, updates=supervised(s, loss_fn), evaluate=evaluate,
                  answers=lambda when: scored_samples(s, rm, tok, val_pairs[:4], when))
    start, end = fit(s, stage)
    return s.finish(rm, tok, start=start, end=end)


@torch.no_grad()
def scored_samples(s, rm, tok, pairs, when: str) -> list[dict]:
    """A few held-out pairs with their scores, for the report card (tag "pairs")."""
    rm.eval()
    batch = collate_pairs(pairs, tok.pad_token_id)
    r = score(rm, batch["input_ids"].to(s.device), batch["attention_mask"].to(s.device)).tolist()
    rm.train()
    rows = []
    for k, ((c_ids, c_mask), (r_ids, r_mask)) in enumerate(pairs):
        prompt = tok.decode([t for t, m in zip(c_ids, c_mask) if not m], skip_special_tokens=True)
        for side, ids, mask, value in (("chosen", c_ids, c_mask, r[k]), ("rejected", r_ids, r_mask, r[len(pairs) + k])):
            text = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            rows.append({"prompt": prompt, "completion": text, "reward": value, "tag": "pairs", "side": side,
                         "when": when})
    return rows

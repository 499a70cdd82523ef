"""Stage 3 (the cheaper alternative to reward model + PPO): Direct Preference Optimisation on stored pairs.

    instar train dpo                                         # from runs/sft
    instar train dpo --set model=embedded-smollm2 --set lora=true --set lr=5e-5 --set beta=0.1

One formulation: the sigmoid loss of Rafailov et al. 2023 (eq. 7), -log sigmoid(beta * (log-ratio chosen -
log-ratio rejected)), with log-ratio = log pi(y|x) - log ref(y|x) summed over the response tokens only
(prompt tokens and padding are -100 in the labels, so `tokens.token_logprobs` gives them 0). The same as TRL's
`DPOTrainer(loss_type="sigmoid")`, which a test checks to 1e-4.
Reference: the model as loaded, before any update. Its log-probs are computed once, over the train and val
pairs, and kept in `<out>/reference.pt` (a resumed run reads them back), so no second model is ever held —
with LoRA or without. At step 0 policy == reference, every implicit reward is 0 and the loss is ln 2 (tested).
Logged on the held-out pairs at the start, every `eval_every` steps and at the end: loss, reward accuracy
(chosen reward > rejected reward), reward margin, mean chosen and rejected rewards (beta * log-ratio).
Simplifications: no label smoothing / IPO / hinge variants, no reference-model sync, no length normalisation.
"""

from __future__ import annotations

import os

import torch
from pydantic import Field

from instar.errors import InstarError
from instar.generate.pairs import stored_split
from instar.train import yardsticks
from instar.train.checkpoint import finished_summary, has_checkpoint
from instar.train.config import TrainConfig
from instar.train.loop import Stage, fit, open_session, supervised
from instar.train.losses import dpo_loss
from instar.train.models import load_model, wrap_lora
from instar.train.reward import collate_pairs, pairs_from_store
from instar.train.tokens import Sampler, token_logprobs


# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    model: str = Field("runs/sft", description="Policy (and reference): the SFT run, an HF directory or embedded-smollm2.")
    out: str = Field("runs/dpo", description="Run directory.")
    # 5e-5 for the 1M-10M presets (about SFT lr / 10); ~1e-6 for SmolLM2-135M full fine-tuning, ~5e-5 LoRA.
    lr: float = Field(5e-5, gt=0, description="Peak learning rate.")
    # 0.1: the paper's and TRL's default; smaller lets the policy drift further from the reference.
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint to the reference.")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch (2x sequences).")
    max_len: int = Field(384, ge=8, description="Tokens per prompt+response (longer ones are truncated).")


# --- data ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_logps(model, pairs, pad_id: int, batch_size: int) -> torch.Tensor:
    """[N, 2] summed response log-probs (chosen, rejected) of each pair under `model` as it is now."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], pad_id)
        lp = response_logps(model, {k: v.to(device) for k, v in batch.items()}).cpu()   # [2b]
        out.append(torch.stack(lp.chunk(2), dim=1))                                     # [b, 2]
    return torch.cat(out)


def load_or_compute_reference(s, model, train_pairs, val_pairs, pad_id: int, batch_size: int) -> dict:
    """The reference log-probs of this run: from `<out>/reference.pt`, or computed now from the unchanged model."""
    path = s.out / "reference.pt"
    if path.exists():
        ref = torch.load(path, weights_only=True)
        if ref["train"].shape[0] == len(train_pairs) and ref["val"].shape[0] == len(val_pairs):
            return ref
    if has_checkpoint(s.ckpt):
        raise InstarError(f"{path} is missing or stale but {s.ckpt} exists: the reference can no longer be "
                          f"recomputed from the trained weights; delete {s.out} to start over")
    ref = {name: s.evaluate(model, lambda m, p=p: reference_logps(m, p, pad_id, batch_size))
           for name, p in (("train", train_pairs), ("val", val_pairs))}
    if s.is_main:
        torch.save(ref, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return ref


# --- loss ------------------------------------------------------------------------------------------------
def response_logps(model, batch) -> torch.Tensor:
    """[B] log pi(response | prompt): per-token log-probs summed where labels != -100 (response + <|im_end|>)."""
    labels = batch["labels"]
    # Logits only from the position before the batch's earliest response token on (`logits_to_keep`, like TRL's
    # fused head): the LM head and the fp32 log-softmax skip the prompts, ~1/3 of the tokens of a short pair.
    first = int((labels != -100).int().argmax(1).min())          # >= 1: every response follows a prompt
    keep = labels.shape[1] - first + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return token_logprobs(logits, labels[:, -keep:]).sum(-1)     # [B, keep, V] with its labels: same shift


def pair_loss(model, batch, beta: float):
    """DPO loss and metrics of one batch of pairs (rows: B chosen, then B rejected; ref_* from the cache)."""
    pi_chosen, pi_rejected = response_logps(model, batch).chunk(2)                      # [B], [B]
    return dpo_loss(pi_chosen, pi_rejected, batch["ref_chosen"], batch["ref_rejected"], beta)


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store) -> dict:
    if (done := finished_summary(cfg.out)) is not None:
        return {**done, "already_done": True}
    stored_split(store, "train"), stored_split(store, "val")  # both sides of the by-prompt split exist
    s = open_session("dpo", cfg, store)
    model, tok = load_model(cfg.model, purpose="lora" if cfg.lora else "full")
    train_pairs = pairs_from_store(store, tok, "train", cfg.max_len)
    val_pairs = pairs_from_store(store, tok, "val", cfg.max_len)[:cfg.eval_batches * cfg.batch_size]
    if cfg.lora:
        model = wrap_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s.data = {"train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "trainable_params": trainable,
              "base": cfg.model}
    s.say(f"dpo: {len(train_pairs)} train / {len(val_pairs)} val pairs, {trainable:,} trainable params"
          f"{' (LoRA)' if cfg.lora else ''}, beta {cfg.beta}")
    model = s.place(model)
    ref = load_or_compute_reference(s, model, train_pairs, val_pairs, tok.pad_token_id, cfg.batch_size)

    sampler = Sampler(len(train_pairs), cfg.batch_size, cfg.seed)

    def batch_at(i):
        idx = sampler.batch(i)
        batch = collate_pairs([train_pairs[j] for j in idx], tok.pad_token_id)
        return {**batch, "ref_chosen": ref["train"][idx, 0], "ref_rejected": ref["train"][idx, 1]}

    def loss_fn(m, batch):
        return pair_loss(m, batch, cfg.beta)[0]

    def evaluate(m):
        # Same batches as reference_logps(val): at the start this is exactly ln 2 and margin 0.
        totals, n = {}, 0
        for i in range(0, len(val_pairs), cfg.batch_size):
            chunk = val_pairs[i:i + cfg.batch_size]
            batch = {k: v.to(s.device) for k, v in collate_pairs(chunk, tok.pad_token_id).items()}
            r = ref["val"][i:i + len(chunk)].to(s.device)
            loss, metrics = pair_loss(m, {**batch, "ref_chosen": r[:, 0], "ref_rejected": r[:, 1]}, cfg.beta)
            for k, v in {"val_loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
            n += len(chunk)
        return {k: v / n for k, v in totals.items()}

    start, end = fit(s, Stage(model, tok, micro=batch_at, updates=supervised(s, loss_fn), evaluate=evaluate,
                              yardsticks=yardsticks.for_stage(cfg, tok)))
    # `loss` in the summary is the held-out DPO loss (the metrics table calls it val_loss: `loss` is the train loss)
    return s.finish(model, tok, start={"loss": start["val_loss"], **start}, end={"loss": end["val_loss"], **end})

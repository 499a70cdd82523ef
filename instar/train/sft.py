"""Stage 2: instruction fine-tuning on the stored `messages` records (full fine-tuning or LoRA).

    instar train sft                                          # from runs/pretrain, full fine-tuning
    instar train sft --set model=embedded-smollm2 --set lora=true --set lr=1e-3 --set max_len=512

One renderer (`tokens.render_chat`, driven by the tokenizer's own chat template) produces both the token ids
and the assistant-only loss mask, so they cannot drift: system/user turns and the `<|im_start|>assistant\\n`
header are never in the loss; the assistant's words and its `<|im_end|>` are, so the model learns to stop
even where pad == eos (labels come from the mask, never from comparing ids with pad). With `lora = true`,
peft adapters train on every projection and are merged into a plain model in `model/`. Held-out loss on
assistant tokens and answers to REPORT_PROMPTS are logged at the start and the end.
Simplifications: no packing of conversations (each row is one conversation, right-padded; a conversation
longer than `max_len` is truncated, and dropped if no assistant token survives), no NEFTune, no loss weighting
by turn.
"""

from __future__ import annotations

from pydantic import Field

from instar.errors import InstarError
from instar.train import yardsticks
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train.evaluate import render_examples, score_conversations
from instar.train.loop import Stage, fit, open_session, supervised
from instar.train.models import load_model, wrap_lora
from instar.train.tokens import Sampler, collate, lm_loss, scored_positions


# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    model: str = Field("runs/pretrain", description="Base: a run directory, an HF directory or embedded-smollm2.")
    out: str = Field("runs/sft", description="Run directory.")
    # 5e-4 full fine-tuning of the 1M-10M presets; ~5e-5 for SmolLM2-135M full FT, ~1e-3 for LoRA.
    lr: float = Field(5e-4, gt=0, description="Peak learning rate.")
    max_len: int = Field(384, ge=8, description="Tokens per conversation (longer ones are truncated).")


# --- data ------------------------------------------------------------------------------------------------
def examples(store, tok, split: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    rows = store.require("messages", split, 1)
    out = render_examples(tok, [r["messages"] for r in rows], max_len)
    if not out:
        raise InstarError(f"no {split} conversation keeps an assistant token within max_len={max_len}")
    return out


# --- loss ------------------------------------------------------------------------------------------------
def loss_fn(model, batch):
    # labels = ids on assistant tokens, -100 elsewhere (from render_chat's mask); mean over assistant tokens.
    # The LM head runs only where some row has a label (SmolLM2: 49k-vocab head and log-softmax on ~40% of rows).
    keep = scored_positions(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return lm_loss(logits, batch["labels"], keep)[0]


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store) -> dict:
    if (done := finished_summary(cfg.out)) is not None:
        return {**done, "already_done": True}
    store.require("messages", "train", 1)
    store.require("messages", "val", 1)
    s = open_session("sft", cfg, store)
    model, tok = load_model(cfg.model, purpose="lora" if cfg.lora else "full")
    train_ex = examples(store, tok, "train", cfg.max_len)
    val_ex = examples(store, tok, "val", cfg.max_len)
    if cfg.lora:
        model = wrap_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s.data = {"train_conversations": len(train_ex), "val_conversations": len(val_ex),
              "train_loss_tokens": sum(sum(m) for _, m in train_ex), "trainable_params": trainable,
              "base": cfg.model}
    s.say(f"sft: {len(train_ex)} train / {len(val_ex)} val conversations, {trainable:,} trainable params"
          f"{' (LoRA)' if cfg.lora else ''}")
    model = s.place(model)

    sampler = Sampler(len(train_ex), cfg.batch_size, cfg.seed)

    def batch_at(i):
        chunk = [train_ex[j] for j in sampler.batch(i)]
        return collate([c[0] for c in chunk], [c[1] for c in chunk], tok.pad_token_id)

    def evaluate(m):
        return {"val_loss": score_conversations(m, val_ex, tok.pad_token_id, cfg.batch_size, cfg.eval_batches)["loss"]}

    start, end = fit(s, Stage(model, tok, micro=batch_at, updates=supervised(s, loss_fn), evaluate=evaluate,
                              yardsticks=yardsticks.for_stage(cfg, tok)))
    return s.finish(model, tok, start=start, end=end)

"""Stage 2: instruction fine-tuning on the stored `messages` records (full fine-tuning or LoRA).

    instar train sft                                          # from runs/pretrain, full fine-tuning
    instar train sft --set model=embedded-smollm2 --set lora=true --set lr=1e-3 --set max_len=512

One renderer (`tokens.render_chat`, driven by the tokenizer's own chat template) produces both the token ids
and the assistant-only loss mask, so they cannot drift: system/user turns and the `<|im_start|>assistant\\n`
header are never in the loss; the assistant's words and its `<|im_end|>` are, so the model learns to stop
even where pad == eos (labels come from the mask, never from comparing ids with pad). With `lora = true`,
peft adapters train on every projection and are merged into a plain model in `model/`. Held-out loss on
assistant tokens and answers to REPORT_PROMPTS are logged at the start and the end, with the external
yardsticks (`yardsticks.py`: replies to hand-written chat prompts, bits per byte on hand-written text).
Mixing: a conversation whose last reply ends with an `Answer:` line is math, the others chat; `math_share` fixes
the share of math in every batch (`MixSampler`) whatever the stored counts — `instar run` stores 20,000 math
conversations next to ~40 chats, and as stored 99.8% of every batch is math. (The corpus documents as "continue
this text" conversations on the chat side, tried on the lang branch, doubled the drill replies: not kept. More
weight on the same chats raised them too, measured at 300 steps on the default run's data, math_share 0.8: drill replies
0.18 as is, 0.31 with each corpus document answering 3 more request wordings, 0.29 with the last third at 0.4; and
0.42 at math_share 0.9.)
Batches: each step's conversations are sorted by length and padded in buckets (`tokens.collate_buckets`), so a
long chat conversation no longer pads the short math ones of its batch to its length; the gradient is the
batch's all the same. Simplifications: no packing of conversations (each row is one conversation; a conversation
longer than `max_len` is truncated, and dropped if no assistant token survives), no NEFTune, no loss weighting
by turn.
"""

from __future__ import annotations

import math

from pydantic import Field

from instar.errors import InstarError
from instar.train import yardsticks
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train.evaluate import render_examples, score_conversations
from instar.train.loop import Stage, fit, open_session, supervised
from instar.train.models import load_model, wrap_lora
from instar.train.rewards import extract_answer, prompt_form_of, save_prompt_form
from instar.train.tokens import Sampler, collate_buckets, lm_loss, scored_positions


# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    model: str = Field("runs/pretrain", description="Base: a run directory, an HF directory or embedded-smollm2.")
    out: str = Field("runs/sft", description="Run directory.")
    # 5e-4 full fine-tuning of the 1M-10M presets; ~5e-5 for SmolLM2-135M full FT, ~1e-3 for LoRA.
    lr: float = Field(5e-4, gt=0, description="Peak learning rate.")
    max_len: int = Field(384, ge=8, description="Tokens per conversation (longer ones are truncated).")
    math_share: float | None = Field(None, ge=0, le=1, description="Share of each batch drawn from the math "
                                     "conversations (those ending with an `Answer:` line), the rest from chat; "
                                     "unset = as stored.")


# --- data ------------------------------------------------------------------------------------------------
def examples(store, tok, split: str, max_len: int) -> tuple[list, int, str | None]:
    """(rendered conversations, how many of them are math, the prompt form of the math ones): chat first, then
    math, so a sampler can mix the two. A math conversation is one whose last reply ends with an `Answer:` line
    (`rewards.extract_answer`); its prompt form is the bare question or the question + the answer-line
    instruction (`rewards.prompt_form_of`; None without math)."""
    rows = [r["messages"] for r in store.require("messages", split, 1)]
    is_math = [extract_answer(m[-1]["content"]) is not None for m in rows]
    math_rows = [m for m, x in zip(rows, is_math) if x]
    chat = render_examples(tok, [m for m, x in zip(rows, is_math) if not x], max_len)
    math = render_examples(tok, math_rows, max_len)
    if not chat + math:
        raise InstarError(f"no {split} conversation keeps an assistant token within max_len={max_len}")
    return chat + math, len(math), prompt_form_of(math_rows)


class MixSampler:
    """Batch i of a run with a fixed share of math: examples [0, n_chat) are chat, [n_chat, n) math; each kind
    is drawn from its own epoch-shuffled stream (`tokens.Sampler`), the math count of batch i being
    floor((i+1) * B * share) - floor(i * B * share), so the share holds exactly over any run of batches and
    batch i stays a pure function of i (exact resume). Without a share, or with one kind missing, it is a
    plain `Sampler` over everything."""

    def __init__(self, n: int, n_math: int, batch_size: int, share: float | None, seed: int):
        self.n_chat, self.batch_size = n - n_math, batch_size
        self.share = None if share is None or n_math in (0, n) else share
        self.plain = Sampler(n, batch_size, seed)
        self.chat, self.math = Sampler(max(self.n_chat, 1), 1, seed), Sampler(max(n_math, 1), 1, seed + 1)

    def batch(self, i: int) -> list[int]:
        if self.share is None:
            return self.plain.batch(i)
        B = self.batch_size
        m0, m1 = math.floor(i * B * self.share), math.floor((i + 1) * B * self.share)  # math drawn so far
        c0 = i * B - m0                                                                 # chat drawn so far
        return ([self.chat.batch(j)[0] for j in range(c0, c0 + B - (m1 - m0))]
                + [self.n_chat + self.math.batch(j)[0] for j in range(m0, m1)])


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
    train_ex, train_math, form = examples(store, tok, "train", cfg.max_len)
    val_ex = examples(store, tok, "val", cfg.max_len)[0]
    if form is not None:  # the external arithmetic, and `instar eval` later, ask this run's models its way
        save_prompt_form(cfg.out, form)
    if cfg.lora:
        model = wrap_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    s.data = {"train_conversations": len(train_ex), "train_math": train_math, "val_conversations": len(val_ex),
              "train_loss_tokens": sum(sum(m) for _, m in train_ex), "trainable_params": trainable,
              "base": cfg.model}
    s.say(f"sft: {len(train_ex)} train ({train_math} math) / {len(val_ex)} val conversations, {trainable:,} "
          f"trainable params, math share {'as stored' if cfg.math_share is None else cfg.math_share}"
          f"{' (LoRA)' if cfg.lora else ''}")
    model = s.place(model)

    sampler = MixSampler(len(train_ex), train_math, cfg.batch_size, cfg.math_share, cfg.seed)

    def batch_at(i):
        chunk = [train_ex[j] for j in sampler.batch(i)]
        return collate_buckets([c[0] for c in chunk], [c[1] for c in chunk], tok.pad_token_id)

    def evaluate(m):
        return {"val_loss": score_conversations(m, val_ex, tok.pad_token_id, cfg.batch_size, cfg.eval_batches)["loss"]}

    start, end = fit(s, Stage(model, tok, micro=batch_at, updates=supervised(s, loss_fn), evaluate=evaluate,
                              yardsticks=yardsticks.for_stage(cfg, tok)))
    return s.finish(model, tok, start=start, end=end)

"""Stages 0 and 1: build a model (random init + a tokenizer trained on the corpus, or a pretrained base) and
pretrain it on the stored `text` records.

    instar train pretrain                                    # tiny preset from scratch, runs/pretrain
    instar train pretrain --set preset=small --set max_steps=2000
    instar train pretrain --set model=embedded-smollm2 --set lr=5e-5 --set out=runs/cpt   # continued pretraining

Stage 0 (`model = "scratch"`): a byte-level BPE tokenizer is trained on the train split (never the val split)
and on a sample of the stored conversations the later stages train on (`tokenizer_texts`), then a randomly
initialised Llama of the chosen preset; its answers to REPORT_PROMPTS are logged as the
report card's "before" (gibberish, as expected). Stage 1: next-token loss on packed rows of `max_len` tokens,
documents joined by <|endoftext|>; held-out val loss and bits-per-byte at the start, every `eval_every`
steps and at the end; at the start and end also the external yardsticks (`yardsticks.language`: bits per byte
on hand-written text, greedy continuations of fixed openings). With `chat_text`, the chat conversations' text
joins the train documents (and the tokenizer's training text); the held-out numbers stay on the `text` val
split, comparable with runs without it. Simplifications: attention is not masked at document boundaries
(nanoGPT's choice; the separator token carries the boundary), the tail of the token stream shorter than one
row is dropped.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from instar.train import yardsticks
from instar.train.checkpoint import finished_summary
from instar.train.config import TrainConfig
from instar.train.evaluate import score_rows
from instar.train.loop import Stage, fit, open_session, supervised
from instar.train.models import PRESETS, load_model, new_model, non_embedding_params, wrap_lora
from instar.train.tokens import Sampler, lm_loss, pack_documents, token_bytes


# ---------------------------------------------------------------------------------------------------------
class Config(TrainConfig):
    out: str = Field("runs/pretrain", description="Run directory.")
    preset: str = Field("tiny", description="Size from scratch: tiny (~1M), small (~10M), medium (~30M).")
    vocab_size: int | None = Field(None, ge=260, description="Tokenizer vocabulary from scratch "
                                   "(default by preset: tiny 1024, small 4096, medium 8192).")
    # 1e-3: at 1M-10M params a higher peak lr converges faster in a few hundred steps; for continued
    # pretraining of a real base use ~5e-5 (3e-4 visibly damaged SmolLM2's instruction following).
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    chat_text: bool = Field(False, description="Also pretrain on the stored chat conversations' text (train split, "
                            "one document per conversation; math conversations left out).")

    @model_validator(mode="after")
    def _lora_needs_a_base(self):
        if self.lora and self.model == "scratch":
            raise ValueError("lora = true needs a pretrained `model` (adapters on random weights learn little)")
        return self


# --- data ------------------------------------------------------------------------------------------------
def chat_documents(store, split: str) -> list[str]:
    """The chat conversations of a split as plain documents, turns joined by newlines: teacher-written English
    the pipeline already has. Math conversations (an `Answer:` line at the end) stay out: stage 1 learns
    language, and the drills are stage 2's and 4's."""
    from instar.train.rewards import extract_answer

    return ["\n".join(m["content"] for m in r["messages"]) for r in store.records("messages", split)
            if extract_answer(r["messages"][-1]["content"]) is None]


def tokenizer_texts(store, corpus: list[str], seed: int) -> list[str]:
    """What stage 0's tokenizer learns its merges from: the corpus, and stored conversations of the train split
    (each turn as its role and content on separate lines) drawn at random up to the corpus's size in characters,
    so the corpus keeps at least half of the weight. A tokenizer learns from the text its model will read: with
    the corpus alone (the default run: 74 documents) "assistant" was 5 tokens, "Answer" 5 and " + " 3, and a
    worked math conversation ~100 tokens; with the sample ~77 (SFT's steps ~20% cheaper), the corpus ~5% more."""
    import random

    rows = [r["messages"] for r in store.records("messages", "train")]
    random.Random(seed).shuffle(rows)
    budget, sample = sum(map(len, corpus)), []
    for messages in rows:
        if budget <= 0:
            break
        sample.append("\n".join(f"{m['role']}\n{m['content']}" for m in messages))
        budget -= len(sample[-1])
    return corpus + sample


def build(cfg: Config, store, train_texts: list[str], session):
    """(model, tokenizer): stage 0 from scratch, or a pretrained base."""
    if cfg.model != "scratch":
        return load_model(cfg.model, purpose="lora" if cfg.lora else "full")
    from transformers import AutoTokenizer

    from instar.train.tokenizer import train_tokenizer

    if cfg.preset not in PRESETS:
        from instar.errors import ConfigError
        raise ConfigError(f"preset: unknown {cfg.preset!r} (expected one of {', '.join(PRESETS)})")
    saved = session.out / "tokenizer"
    # Rank 0 trains and saves the tokenizer (or finds the one a resumed checkpoint was trained with);
    # other torchrun ranks wait, then load that same file.
    if session.is_main and not (saved / "tokenizer.json").exists():
        texts = tokenizer_texts(store, train_texts, cfg.seed)
        train_tokenizer(texts, cfg.vocab_size or PRESETS[cfg.preset]["vocab"]).save_pretrained(saved)
    session.barrier()
    tok = AutoTokenizer.from_pretrained(saved)
    return new_model(cfg.preset, tok, cfg.max_len), tok


# --- loss ------------------------------------------------------------------------------------------------
def loss_fn(model, batch):
    # Every token of a packed row is a target (labels = inputs; the shift is inside lm_loss).
    logits = model(input_ids=batch["input_ids"]).logits
    return lm_loss(logits, batch["input_ids"])[0]


# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, store) -> dict:
    if (done := finished_summary(cfg.out)) is not None:
        return {**done, "already_done": True}
    train_texts = [r["text"] for r in store.require("text", "train", 1)]
    n_docs = len(train_texts)
    if cfg.chat_text:
        train_texts += chat_documents(store, "train")
    val_texts = [r["text"] for r in store.require("text", "val", 1)]
    s = open_session("pretrain", cfg, store)
    model, tok = build(cfg, store, train_texts, s)
    rows = pack_documents(tok, train_texts, cfg.max_len)
    val_rows = pack_documents(tok, val_texts, cfg.max_len)
    tbytes = token_bytes(tok)
    s.data = {"train_docs": n_docs, "train_chats": len(train_texts) - n_docs, "val_docs": len(val_texts),
              "train_rows": rows.shape[0],
              "val_rows": val_rows.shape[0], "seq_len": rows.shape[1], "train_tokens": rows.numel(),
              "vocab_size": len(tok), "non_embedding_params": non_embedding_params(model)}
    s.say(f"pretrain: {s.data['non_embedding_params']:,} non-embedding params, vocab {len(tok):,}, "
          f"{rows.numel():,} train tokens in {rows.shape[0]} rows of {rows.shape[1]}")
    if cfg.lora:
        model = wrap_lora(model, cfg)
    model = s.place(model)

    sampler = Sampler(rows.shape[0], cfg.batch_size, cfg.seed)

    def batch_at(i):
        return {"input_ids": rows[sampler.batch(i)]}

    def evaluate(m):
        v = score_rows(m, val_rows, tbytes, cfg.batch_size, cfg.eval_batches)
        return {"val_loss": v["loss"], "val_bpb": v["bpb"]}

    start, end = fit(s, Stage(model, tok, micro=batch_at, updates=supervised(s, loss_fn), evaluate=evaluate,
                              yardsticks=yardsticks.for_stage(cfg, tok, chat=False)))
    return s.finish(model, tok, start=start, end=end)

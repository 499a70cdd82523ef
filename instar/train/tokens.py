"""Tokens: chat rendering with the assistant mask, padding, packing, batches, and the one log-prob shift.

    render_chat(tok, messages, add_generation_prompt=False) -> (ids, assistant_mask)   THE chat renderer
    stop_ids(tok)               ids that end a generation (<|im_end|>, eos, <|endoftext|> when present)
    collate(seqs, masks, pad_id) -> {"input_ids", "attention_mask", "labels"}  right padding, labels -100 off-mask
    collate_buckets(seqs, masks, pad_id) -> [batch, ...]  the same rows in buckets of similar length (less padding)
    pack_documents(tok, texts, seq_len) -> [N, seq_len]  packed pretraining rows, separator after each document
    token_bytes(tok) -> [V]     UTF-8 bytes per token (0 for specials), for bits-per-byte
    Sampler(n, batch_size, seed).batch(i)  example indices of the i-th batch (reshuffled per epoch, pure in i)
    token_logprobs(logits, labels, temperature=1.0, positions=None) -> [B, T]: logp[b, t] = log p(labels[b, t] | labels[b, :t])
    lm_loss(logits, labels, positions=None)  mean next-token cross-entropy over labels != -100 (on token_logprobs)
    label_count(labels) -> int  how many labels lm_loss averages over (the predicted ones: position 0 never is)
    scored_positions(labels) -> [K]  positions whose logits score a label: model(..., logits_to_keep=them)

Alignment convention (the classic off-by-one): masks and labels are always aligned with `input_ids`; the one
shift from "logits at t predict token t+1" happens only inside `token_logprobs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def stop_ids(tok) -> list[int]:
    """Token ids that end a generation: <|im_end|>, the eos, <|endoftext|> (those that exist), eos first."""
    ids = [tok.eos_token_id]
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)  # may return unk for a missing token: check the round trip
        if isinstance(i, int) and tok.convert_ids_to_tokens(i) == t and i not in ids:
            ids.append(i)
    return [i for i in ids if i is not None]


def _template(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the mask of tokens the model is trained on (1 = in the loss).

    The text comes from the tokenizer's own chat template (ChatML for ours and SmolLM2), rendered turn by
    turn: everything up to an assistant turn's content (including `<|im_start|>assistant\\n` and any default
    system prompt the template adds) is prompt, mask 0; the assistant's content and its end token
    (`<|im_end|>`) are mask 1; whitespace after the end token is mask 0. Pieces are tokenised separately
    at special-token boundaries, so `ids` equal tokenising the whole rendered text (tested).
    With `add_generation_prompt=True` the result ends with the assistant header, ready for `generate`."""
    stops = set(stop_ids(tok))
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = _template(tok, messages[:i], add_generation_prompt=True)
            piece = tok(head[len(done):], add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [0] * len(piece)
            done = head
        text = _template(tok, messages[:i + 1], add_generation_prompt=False)
        piece = tok(text[len(done):], add_special_tokens=False)["input_ids"]
        keep = [0] * len(piece)
        if m["role"] == "assistant":
            last = max((j for j, t in enumerate(piece) if t in stops), default=len(piece) - 1)
            keep = [1] * (last + 1) + [0] * (len(piece) - last - 1)
        ids += piece
        mask += keep
        done = text
    if add_generation_prompt:
        text = _template(tok, messages, add_generation_prompt=True)
        piece = tok(text[len(done):], add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [0] * len(piece)
    return ids, mask


def collate(seqs: list[list[int]], masks: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence. labels = ids where mask == 1 (all real tokens if masks is None), else
    -100 — built from lengths and masks, never by comparing with pad_id (pad may equal eos)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        row = torch.tensor(s, dtype=torch.long)
        ids[b, :len(s)] = row
        att[b, :len(s)] = 1
        keep = torch.ones(len(s), dtype=torch.bool) if masks is None else torch.tensor(masks[b], dtype=torch.bool)
        labels[b, :len(s)] = torch.where(keep, row, torch.full_like(row, -100))
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


# What one more bucket costs, in padded token positions (a forward + backward's fixed part: kernel launches and
# Python, large next to the small matrices of the presets). Measured on the default run's SFT batches (tiny preset,
# 32 rows, half math half chat, CPU seconds per step with AdamW, Zen 3, 2 threads): one padded batch 2.6-3.0 s;
# buckets with overhead 4096: 1.8, 1024: 1.7, 512: 1.1, 256: 1.0-1.4, 64: 1.1, 0 (a bucket per length): 2.3.
BUCKET_OVERHEAD = 256


def collate_buckets(seqs: list[list[int]], masks: list[list[int]] | None, pad_id: int,
                    overhead: int = BUCKET_OVERHEAD) -> list[dict[str, torch.Tensor]]:
    """The rows of one batch sorted by length and cut into buckets, each right-padded to its own longest row
    (`collate`), the cuts chosen to minimise padded positions + `overhead` per bucket (exact: a small dynamic
    program over the sorted lengths). One long chat conversation no longer pads 31 short math ones to its
    length; the gradient is the batch's all the same when each bucket's mean loss is weighted by its share
    of the labelled tokens (`loop.supervised` does so for a list of buckets)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    lens = [len(seqs[i]) for i in order]
    best, cut = [0] + [None] * len(lens), [0] * (len(lens) + 1)  # best[j]: cheapest cover of the j shortest rows
    for j in range(1, len(lens) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lens[j - 1] + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], len(lens)
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    return [collate([seqs[k] for k in order[i:j]], None if masks is None else [masks[k] for k in order[i:j]], pad_id)
            for i, j in reversed(bounds)]


def pack_documents(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents with a separator after each (<|endoftext|> when the tokenizer has it, else eos)
    and cut the stream into rows of `seq_len` tokens: [N, seq_len]. The tail shorter than a row is dropped;
    a stream shorter than one row becomes a single shorter row. Attention crosses document boundaries
    (the separator tells the model a new document starts; nanoGPT does the same)."""
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    if not isinstance(sep, int) or tok.convert_ids_to_tokens(sep) != "<|endoftext|>":
        sep = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(list(texts), add_special_tokens=False)["input_ids"]:
        stream += ids + [sep]
    seq_len = min(seq_len, len(stream))
    n = len(stream) // seq_len
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)


def token_bytes(tok) -> torch.Tensor:
    """[V] UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte.

    Byte-level BPE (ours, SmolLM2, GPT-2) spells every byte as one printable character, so a token's byte
    count is its length in that alphabet; other tokenizers (SentencePiece) fall back to their text."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = set(bytes_to_unicode().values())
    special = set(tok.all_special_ids) | set(stop_ids(tok))
    out = torch.zeros(len(tok), dtype=torch.float32)
    for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in special or t is None:
            continue
        out[i] = len(t) if all(c in alphabet for c in t) else len(t.replace("\u2581", " ").encode("utf-8"))
    return out


class Sampler:
    """Which examples form the i-th batch of a run: reshuffled each epoch from (seed, epoch), a pure function
    of i, so resuming at a step needs nothing but the step (exact data position)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep at most two epochs
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def batch(self, i: int) -> list[int]:
        first = i * self.batch_size
        return [self._perm(j // self.n)[j % self.n] for j in range(first, first + self.batch_size)]


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[K] ascending positions t whose logits some row scores (labels[b, t + 1] != -100 for some b).

    Given to the model as `logits_to_keep` (transformers accepts a tensor of positions) and to
    token_logprobs / lm_loss as `positions`, the LM head, its fp32 log-softmax and their backward run on K of
    T positions. SFT on SmolLM2's 49k vocabulary: K/T ~0.4 on short math conversations (bench/README.md)."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs, aligned with `labels`: out[b, t] = log softmax(logits[b, t-1] / T)[labels[b, t]].

    logits [B, T, V] from model(input_ids) — or [B, K, V] at `positions` [K] only (`scored_positions`, with
    model(..., logits_to_keep=positions)); labels [B, T] (usually input_ids; -100 = ignore).
    out [B, T] float32; out[:, 0] = 0 (nothing predicts the first token) and 0 wherever labels == -100.
    This is the ONLY place the one-token shift happens. Temperature divides the logits, so log-probs used
    in PPO/GRPO ratios match the distribution that was sampled."""
    B, T = labels.shape
    if positions is None:
        logits, target = logits[:, :-1], labels[:, 1:]                  # [B, T-1, V], [B, T-1]
    else:
        target = labels[:, positions + 1]                                # [B, K]
    valid = target != -100
    # Only scored positions go through the fp32 softmax (SFT scores ~1/3 of them); cross_entropy is a fused
    # log_softmax + gather.
    pred = logits[valid].float() / temperature                           # [N, V]
    scores = torch.zeros(target.shape, dtype=torch.float32, device=logits.device)
    scores[valid] = -F.cross_entropy(pred, target[valid], reduction="none")
    out = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
    if positions is None:
        out[:, 1:] = scores
    else:
        out[:, positions + 1] = scores
    return out


def label_count(labels: torch.Tensor) -> int:
    """How many labels a loss over `labels` scores: those != -100 except position 0, which nothing predicts."""
    return int((labels[:, 1:] != -100).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy over labels != -100 except position 0, number of such tokens).
    `logits` over every position, or at `positions` only (see token_logprobs)."""
    n = label_count(labels)
    return -token_logprobs(logits, labels, positions=positions).sum() / max(n, 1), n  # 0 off the labels

"""Sampling from the student: the batched decode loop, `generate()`, and the report card's fixed prompts.

    generate(model, tok, prompts, max_new_tokens, temperature, top_k, seed) -> Completions (batched, KV cache)
    stopped(completions, tok) -> [B] bool   which completions ended with a stop token (not cut at the budget)
    attention_kernel(device, length)        the faster SDPA kernel for short rows under CPU bf16
    REPORT_PROMPTS, report_samples(model, tok)          the fixed questions every stage answers at start and end

Simplifications: no top-p, no repetition penalty, no beam search; one stop-token set (`tokens.stop_ids`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from instar.train.models import unwrap
from instar.train.tokens import render_chat, stop_ids


@dataclass
class Completions:
    """The student's sampled batch (not `generate.backends.Generation`, the teacher's one reply)."""

    texts: list[str]                 # decoded completions, stop token removed
    prompt_ids: torch.Tensor         # [B, P] left-padded prompts
    prompt_mask: torch.Tensor        # [B, P] 1 = real token
    completion_ids: torch.Tensor     # [B, C] generated ids (pad after the stop)
    completion_mask: torch.Tensor    # [B, C] 1 up to and including the stop token


SHORT_ATTENTION = 128  # tokens; see attention_kernel


def attention_kernel(device: torch.device, length: int):
    """PyTorch's plain ("math") attention kernel for sequences up to SHORT_ATTENTION tokens under CPU bf16
    autocast, where its flash kernel is the slower one: forward+backward 1.1-1.5x faster with math at 24-128
    tokens for the tiny and small presets, and GRPO's update 1.7x (`bench/bench_attention.py`); at 256 tokens the
    two are even (tiny) or flash is ahead (small, 0.9x). Elsewhere (fp32, CUDA, long rows) PyTorch chooses."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu") and length <= SHORT_ATTENTION:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]] | list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None) -> Completions:
    """Batched generation with a KV cache, left padding, stops at `stop_ids(tok)`.

    prompts: token-id lists (e.g. from `render_chat(..., add_generation_prompt=True)`) or raw strings.
    temperature 0 = greedy. `seed` makes sampling reproducible without disturbing the caller's RNG.
    Runs under the caller's autocast (the stages wrap it in `loop.autocast`)."""
    m = unwrap(model)
    device = next(m.parameters()).device
    seqs = [tok(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    P = max(len(s) for s in seqs)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(s)) + s for s in seqs], device=device)
    att = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs], device=device)
    stops = torch.tensor(stop_ids(tok), device=device)
    was_training = m.training
    m.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        with attention_kernel(device, P + max_new_tokens):
            comp = _decode(m, ids, att, max_new_tokens, temperature, top_k, stops, pad)
    m.train(was_training)
    is_stop = torch.isin(comp, stops)
    # 1 up to and including the first stop token; everything after it is padding.
    after = (is_stop.cumsum(1) - is_stop.long()) > 0
    cmask = (~after).long()
    texts = []
    for b in range(comp.shape[0]):
        keep = [t for t, k, s in zip(comp[b].tolist(), cmask[b].tolist(), is_stop[b].tolist()) if k and not s]
        texts.append(tok.decode(keep, skip_special_tokens=True))
    return Completions(texts, ids, att, comp * cmask + pad * (1 - cmask), cmask)


def _decode(m, ids, att, max_new_tokens: int, temperature: float, top_k: int | None, stops, pad: int):
    """[B, C] new tokens: one prefill forward, then one forward per token on the KV cache.

    A plain loop instead of HF `generate`, with one saving HF does not make: a row that has stopped leaves the
    batch (its cache rows are dropped), so a GRPO group whose answers stop after ~11 of 24 tokens stops paying
    for them. Everything else is HF's arithmetic (tested equal to HF `generate`): position ids from the left
    padding (pads get 1), fp32 logits of the last position, greedy argmax or logits / T -> top-k (-inf below
    the k-th) -> softmax -> one multinomial draw over all B rows per step, C = steps until every row stopped.
    Stopped rows still take part in the draw, as a one-hot on pad: torch's one-sample multinomial draws one
    exponential per [B, V] entry whatever the probabilities, so the RNG stream and each live row's token are
    exactly HF's. A second saving: repeated prompts (GRPO's G samples of one problem) are prefilled once each
    and their KV cache rows copied (`_prefill`)."""
    B = ids.shape[0]
    pos = (att.cumsum(1) - 1).masked_fill(att == 0, 1)                             # [B, P]
    live = torch.arange(B, device=ids.device)                                      # rows still generating
    out, cache, x = [], None, ids
    for i in range(max_new_tokens):
        if i == 0:
            cache, logits = _prefill(m, ids, att, pos)                              # [B, V]
        else:
            o = m(input_ids=x, attention_mask=att, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
            cache, logits = o.cache, o.logits[:, -1].float()                        # [L, V], L = len(live)
        nxt = torch.full((B,), pad, dtype=torch.long, device=ids.device)            # [B]
        if temperature > 0:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.zeros(B, logits.shape[-1], device=ids.device)
            probs[:, pad] = 1.0
            probs[live] = torch.softmax(logits, -1)
            nxt[live] = torch.multinomial(probs, 1).squeeze(1)[live]
        else:
            nxt[live] = logits.argmax(-1)
        out.append(nxt)
        going = ~torch.isin(nxt[live], stops)                                       # [L]
        if not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            live, att, pos = live[keep], att[keep], pos[keep]
            cache.batch_select_indices(keep)
        x, pos = nxt[live][:, None], pos[:, -1:] + 1
        att = torch.cat([att, att.new_ones(att.shape[0], 1)], 1)
    return torch.stack(out, 1) if out else ids[:, :0]


def stopped(gen: Completions, tok) -> torch.Tensor:
    """[B] bool: the completion ended with a stop token (False = cut at max_new_tokens)."""
    stops = torch.tensor(stop_ids(tok), device=gen.completion_ids.device)
    return (torch.isin(gen.completion_ids, stops) & gen.completion_mask.bool()).any(dim=1).cpu()


def _prefill(m, ids, att, pos):
    """(KV cache, fp32 logits of the last position [B, V]) for the prompts, each DISTINCT prompt run once.

    GRPO samples G completions of each problem, so a rollout batch holds every prompt G times; the prompt is
    most of a rollout's tokens (SmolLM2, 8 x 8: ~40-token prompts, ~20-token answers), and running it once
    and copying its cache rows is the same function (fp32: equal tokens to HF `generate`, tested)."""
    rows = torch.cat([ids, att], 1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)                 # [U, 2P], [B]
    if len(uniq) == len(rows):
        o = m(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
        return o.cache, o.logits[:, -1].float()
    first = torch.empty(len(uniq), dtype=torch.long, device=ids.device)
    first.scatter_(0, inverse, torch.arange(len(rows), device=ids.device))          # one row of each prompt
    o = m(input_ids=ids[first], attention_mask=att[first], position_ids=pos[first], use_cache=True, logits_to_keep=1)
    o.cache.batch_select_indices(inverse)                                          # [U] -> [B] cache rows
    return o.cache, o.logits[:, -1].float()[inverse]


# The fixed questions every stage answers at its start and end (the report card's before/after).
REPORT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 7 + 5?",
    "Give me a tip for learning a new language.",
    "Who are you?",
]


def report_samples(model, tok, max_new_tokens: int = 48, when: str = "start") -> list[dict]:
    """Greedy answers to REPORT_PROMPTS as chat turns; rows ready for `log_samples` (extra tag + when)."""
    prompts = [render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in REPORT_PROMPTS]
    gen = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return [{"prompt": q, "completion": a, "tag": "report", "when": when} for q, a in zip(REPORT_PROMPTS, gen.texts)]

"""Continuous batching for llama.cpp: many chat requests decoded together in one context, one sequence each.

    decoder = BatchDecoder(llm, slots=8, n_ctx=2048)       # llm: a loaded llama_cpp.Llama (its model is reused)
    tokens, finish = decoder.run(prompt_tokens, grammar=gbnf, temperature=0.8, seed=7, max_tokens=400)

`run` may be called from many threads at once (the generation pipeline's workers); each call waits while one
decode thread serves them all. Every step evaluates each newly admitted prompt (a call each), then feeds one
`llama_decode` with the next token of every generating sequence (llama.cpp's examples/parallel, in Python).
A request joins as soon as a slot is free, so a slow item never holds the others back.

Two choices carry the speed (measured in bench/README.md, "Data generation"):
- Batching: one step over 8 sequences reads the weights once for 8 tokens (~4-5x the cost of a step over one
  on this CPU, so ~2x the tokens per second).
- Grammar last, as llama.cpp's own samplers do: sample from top-k without the grammar, then ask the grammar
  only whether that one token is allowed; only when it is not, the grammar filters the whole 49,152-token
  vocabulary and we sample again. llama-cpp-python's `create_chat_completion` filters the whole vocabulary on
  every token, which is what made constrained decoding ~3x slower than free decoding here.

Deterministic: the KV cache is split per sequence (`kv_unified = False`) and every prompt is evaluated in a call
of its own, so a sequence's logits are bit-identical whether it runs alone or beside 7 others (measured with
llama-cpp-python 0.3.36 on this CPU; `--concurrency 1, 3 and 6` stored the same records for the same seeds).
The same (prompt, seed) gives the same text however requests happen to be batched, and in whichever lane
(`backends.decoder_lanes`: the backend may run several decoders side by side, each with the same thread count).
With the Q8_0 teacher one lane of two threads and two lanes of one thread also stored the same records; with the
Q4_1 file they did not (the thread count changed some logits), so records are tied to lanes x threads there.

Sequences enter each step in slot order (`_decode`): in admission order, as until 2026-11-30, a step over 8
sequences took twice as long (114 vs 62 ms inside the pipeline), and 8 sequences per lane (`LANE_WIDTH`) pay
only now: 64 instruction items took 51 s at 16 in flight, 62 s at 8 (AMD EPYC Zen 4, 2 cores, quiet).

Where the time went before that (AMD EPYC Zen 3, 2 cores, quiet, 32 instruction items of ~110 prompt and ~80 generated
tokens): with the Q4_1 file a 110-token prompt took 480-650 ms on two threads (llama.cpp has no fast x86 kernel
for Q4_1), with Q8_0 ~290 ms (tinyBLAS); a step over 8 sequences costs 50-75 ms in a loop that does nothing else
but ~100 ms in the pipeline: the Python sampling between steps lets the second OpenMP thread fall asleep
(OMP_WAIT_POLICY=PASSIVE, `runtime.py`) and waking it inside the step costs (a 4 ms pause between steps of the
plain loop: 74 -> 100 ms). Hence lanes of one thread: no barriers at all, and one lane's Python work overlaps
the other lane's decoding (32 items: 59.9 s with one lane of 2 threads, 45.4 s with two of one). Tried and
left out: caching shared prompt prefixes (restoring saved KV cells changed later logits, and the prompt layouts
with a long shared prefix made the 135M teacher ramble: 3-4 of 8 instruction items accepted instead of 7).
Simplifications: one sampling recipe (top-k 40, top-p 0.95, min-p 0.05, temperature, seeded draw; greedy at
temperature 0).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field

import numpy as np

TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05  # llama-cpp-python's defaults, which the one-at-a-time path used
NEG_INF = float("-inf")


@dataclass
class _Request:
    prompt: list[int]
    grammar: str | None
    temperature: float
    seed: int
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    out: list[int] = field(default_factory=list)
    finish: str = "stop"
    error: BaseException | None = None


class _Sequence:
    """One request in a slot: its samplers, the tokens still to feed, its position in its own KV stream."""

    def __init__(self, L, vocab, slot: int, req: _Request):
        self.L, self.slot, self.req = L, slot, req
        self.feed, self.pos, self.logit_row = list(req.prompt), 0, -1
        self.chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if req.temperature <= 0:
            L.llama_sampler_chain_add(self.chain, L.llama_sampler_init_greedy())
        else:
            for s in (L.llama_sampler_init_top_k(TOP_K), L.llama_sampler_init_top_p(TOP_P, 1),
                      L.llama_sampler_init_min_p(MIN_P, 1), L.llama_sampler_init_temp(req.temperature),
                      L.llama_sampler_init_dist(req.seed & 0xFFFFFFFF)):
                L.llama_sampler_chain_add(self.chain, s)
        self.grammar = None
        if req.grammar is not None:
            self.grammar = L.llama_sampler_init_grammar(vocab, req.grammar.encode(), b"root")
            if not self.grammar:
                raise ValueError("llama.cpp could not parse the JSON-schema grammar")

    def free(self) -> None:
        for s in (self.chain, self.grammar):
            if s:
                self.L.llama_sampler_free(s)
        self.chain = self.grammar = None


class BatchDecoder:
    """One llama.cpp context with `slots` sequences, driven by one thread; `run` is thread-safe and blocks.
    `threads`: llama.cpp's compute threads for this context (default: every core)."""

    def __init__(self, llm, *, slots: int, n_ctx: int, threads: int | None = None):
        import llama_cpp as L

        # A call holds one whole prompt (< n_ctx tokens) or one token of every sequence.
        n_batch = max(n_ctx, slots)
        self.L, self.slots, self.n_ctx, self.n_batch = L, slots, n_ctx, n_batch
        self.model = llm._model.model
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx * slots, slots, False  # each sequence its own n_ctx stream
        # Micro-batches of 128 tokens: a 110-token prompt on one thread took 506 / 455 / 419 / 419 / 424 ms in
        # micro-batches of 32 / 64 / 128 / 256 / 512 (Q8_0, AMD EPYC Zen 4, quiet, medians of 6).
        cp.n_batch, cp.n_ubatch = n_batch, max(128, slots)
        cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {slots} sequences of {n_ctx} tokens")
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        # Scratch for the rare full-vocabulary grammar pass: (id, logit, p) rows laid out as llama_token_data.
        self._cand = np.zeros(self.n_vocab, dtype=np.dtype([("id", np.int32), ("logit", np.float32),
                                                           ("p", np.float32)]))
        self._one = (L.llama_token_data * 1)()
        self._pending: list[_Request] = []
        self.load = 0  # requests given to this decoder and not yet answered (the backend balances on it)
        self.served = 0  # requests answered (counted by the decode thread)
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="llama-batch", daemon=True)
        self._thread.start()

    def run(self, prompt: list[int], *, grammar: str | None, temperature: float, seed: int,
            max_tokens: int) -> tuple[list[int], str]:
        """Generated token ids and why decoding stopped ("stop" or "length"); raises what the decoder raised."""
        req = _Request(prompt, grammar, temperature, seed, max_tokens)
        with self._cv:
            self._pending.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.out, req.finish

    # -- the decode thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        active: dict[int, _Sequence] = {}
        while True:
            with self._cv:
                while not self._pending and not active:
                    self._cv.wait()
                free = [s for s in range(self.slots) if s not in active]
                while free and self._pending:  # first come, first served
                    req, slot = self._pending.pop(0), free.pop(0)
                    try:
                        active[slot] = _Sequence(self.L, self.vocab, slot, req)
                    except Exception as e:  # a grammar llama.cpp refuses: that request fails, the others go on
                        req.error = e
                        req.done.set()
            try:
                self._step(active)
            except Exception as e:  # llama_decode failed: every request in flight fails with it
                for seq in active.values():
                    self._finish(seq, error=e)
                active.clear()
            for slot in [s for s, seq in active.items() if seq.req.done.is_set()]:
                del active[slot]

    def _step(self, active: dict[int, _Sequence]) -> None:
        """Each new prompt in a call of its own, then one call with the next token of every other sequence.

        Why prompts go alone: with a KV stream per sequence llama.cpp splits a batch into micro-batches holding
        the same number of tokens of each sequence, so a prompt sharing a call with 1-token sequences is cut
        into pieces, and how it is cut changed its logits (8 vs 16 sequences gave different texts for the same
        seeds). Alone, a prompt is always evaluated the same way; prompt tokens gain little from sharing a call."""
        for seq in [s for s in active.values() if s.pos == 0]:
            self._decode([seq])
        self._decode([seq for _, seq in sorted(active.items())  # in slot order: see `_decode`
                      if seq.pos > 0 and seq.feed and not seq.req.done.is_set()])

    def _decode(self, seqs: list[_Sequence]) -> None:
        """One llama_decode over the pending tokens of `seqs`, then a sampled token for each.

        `seqs` must come in slot order, the slots as few runs as possible: with a KV stream per sequence llama.cpp
        evaluates each run of consecutive sequence ids as a micro-batch of its own, and its matrix kernels pay per
        call (one thread, Q8_0, one token each of 8 sequences: slots 0-7 in order 53 ms, in reverse 104 ms, shuffled
        129 ms, 6 slots 0,1,3,4,6,7 100 ms vs 0-5 59 ms). Admission fills the lowest free slot."""
        L, b, n = self.L, self.batch, 0
        for seq in seqs:
            for i, token in enumerate(seq.feed):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = token, seq.pos + i, 1, seq.slot
                b.logits[n] = i == len(seq.feed) - 1  # logits only where the sequence samples next
                n += 1
            seq.logit_row, seq.pos, seq.feed = n - 1, seq.pos + len(seq.feed), []
        if not n:
            return
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        for seq in seqs:
            self._advance(seq)

    def _advance(self, seq: _Sequence) -> None:
        """Sample one token for `seq` and decide whether it is finished."""
        L, req = self.L, seq.req
        token = L.llama_sampler_sample(seq.chain, self.ctx, seq.logit_row)
        if seq.grammar is not None and not self._allowed(seq.grammar, token):
            token = self._resample(seq)
        if L.llama_vocab_is_eog(self.vocab, token):
            return self._finish(seq, "stop")
        if seq.grammar is not None:
            L.llama_sampler_accept(seq.grammar, token)  # EOG is never accepted: llama.cpp aborts on it
        req.out.append(token)
        if len(req.out) >= req.max_tokens or seq.pos >= self.n_ctx:  # no room for this token in its stream
            return self._finish(seq, "length")
        seq.feed = [token]

    def _allowed(self, grammar, token: int) -> bool:
        one = self._one
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        arr = self.L.llama_token_data_array(one, 1, -1, False)
        self.L.llama_sampler_apply(grammar, ctypes.byref(arr))
        return one[0].logit != NEG_INF

    def _resample(self, seq: _Sequence) -> int:
        """The grammar over the whole vocabulary, then the sampling chain on what it allows."""
        L, cand = self.L, self._cand
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, seq.logit_row), shape=(self.n_vocab,))
        cand["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cand["logit"], cand["p"] = logits, 0.0
        arr = L.llama_token_data_array(cand.ctypes.data_as(L.llama_token_data_p), self.n_vocab, -1, False)
        L.llama_sampler_apply(seq.grammar, ctypes.byref(arr))
        L.llama_sampler_apply(seq.chain, ctypes.byref(arr))
        token = int(cand["id"][arr.selected])
        L.llama_sampler_accept(seq.chain, token)
        return token

    def _finish(self, seq: _Sequence, finish: str = "stop", error: BaseException | None = None) -> None:
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), seq.slot, -1, -1)
        seq.free()
        seq.req.finish, seq.req.error = finish, error
        self.served += 1
        seq.req.done.set()


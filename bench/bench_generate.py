"""Benchmark data generation with the embedded SmolLM2-135M GGUF on this machine.

    .venv/bin/python bench/bench_generate.py                 # all parts, ~25 min on 2 cores
    .venv/bin/python bench/bench_generate.py --part decode --n 10
    .venv/bin/python bench/bench_generate.py --part batched --n 64 --slots 8,16

Four parts, each printed as a markdown table (copied into bench/README.md):
  batched   side by side in one run: accepted records per minute for corpus and instructions, one item at a
            time as instar did before issue 13 (llama-cpp-python's `create_chat_completion`, the grammar over
            the whole vocabulary every token, the wheel's Q4_1 file) vs the batched decoder with N sequences
            (`--slots`) as `instar generate` runs it now (`decoder_lanes`' lanes of one thread each, the Q8_0
            teacher of `embedded_teacher`; the default is 16 on 2 cores, `default_concurrency`).
  decode    constrained (JSON-schema grammar) vs free decoding: valid outputs per second for the output
            model of each kind, same prompts and seeds in both modes. "Valid" = parses into the outputs.py model.
  kinds     accepted records per minute for each kind, through the whole pipeline (`generate`).
  overhead  the pipeline's own cost: wall time of `generate` minus the time spent inside backend calls,
            relative to the latter (goal < 10%); plus the per-item cost against an instant fake backend.
Simplifications: one seed set, medians not taken (each number is one run on a shared machine: rerun to
see the spread); the judge's and math checker's rejections count against records per minute, as they do
for a user.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console

from instar.datasets.store import Store
from instar.generate import prompts as P
from instar.generate.backends import (FakeBackend, Generation, LlamaCppBackend, decoder_lanes, embedded_model_path,
                                     embedded_teacher, import_llama_cpp, schema_grammar)
from instar.generate.pipeline import GenerateConfig, generate
from instar.generate.recipes import Ask, Rejected
from instar.schemas.outputs import Document, InstructionPair, WordProblem

QUIET = Console(quiet=True)  # no progress bars between the table rows


class Timed:
    """A backend proxy that sums the seconds spent inside chat()."""

    def __init__(self, backend):
        self.backend, self.seconds, self.calls = backend, 0.0, 0
        self.name, self.model, self.max_concurrency = backend.name, backend.model, backend.max_concurrency

    def check(self):
        self.backend.check()

    def chat(self, messages, **kw):
        t0 = time.perf_counter()
        try:
            return self.backend.chat(messages, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


class OneAtATime:
    """instar's llama.cpp backend before issue 13, kept here as the baseline: one request at a time through
    llama-cpp-python's high-level API, whose sampler applies the grammar to all 49,152 tokens every step."""

    name, max_concurrency = "embedded", 1

    def __init__(self, path, n_ctx: int = 2048):
        llama_cpp = import_llama_cpp()
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(),
                                   verbose=False)
        self.model, self.grammars = Path(path).name, {}

    def check(self):
        pass

    def chat(self, messages, *, schema, temperature, seed, max_tokens):
        key = json.dumps(schema, sort_keys=True)
        if key not in self.grammars:
            self.grammars[key] = import_llama_cpp().LlamaGrammar.from_string(schema_grammar(schema), verbose=False)
        t0 = time.perf_counter()
        self.llm.reset()
        out = self.llm.create_chat_completion(messages, temperature=temperature, seed=seed, max_tokens=max_tokens,
                                              grammar=self.grammars[key])
        choice, usage = out["choices"][0], out["usage"]
        return Generation(choice["message"]["content"] or "", choice["finish_reason"] or "stop",
                          usage["prompt_tokens"], usage["completion_tokens"], time.perf_counter() - t0)


def batched(n: int, slots: list[int], kinds_: list[str]) -> None:
    """Before/after in one run: one at a time vs the batched decoder, same kinds, seeds and item counts."""
    path, teacher, cores = embedded_model_path(), embedded_teacher(), os.cpu_count() or 1
    rows = [("one at a time (before)", lambda: OneAtATime(path), 1)]
    for k in slots:
        lanes, threads = decoder_lanes(k, cores)
        rows.append((f"batched, {k} sequences, {lanes} lanes x {threads} threads, Q8_0 (now)",
                     lambda k=k: LlamaCppBackend(teacher, name="embedded", slots=k), k))
    print("| kind | decoding | accepted | tried | minutes | records/min | tok/s | speed-up | top rejection reasons |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for kind in kinds_:
        base = None
        for label, make, workers in rows:
            backend = make()
            with tempfile.TemporaryDirectory() as tmp:
                store = Store.open(Path(tmp) / "bench.db")
                t0 = time.perf_counter()
                r = generate(store, GenerateConfig(kind=kind, count=n, max_attempts=n, concurrency=workers,
                                                   max_tokens=300), backend=backend, console=QUIET)
                minutes = (time.perf_counter() - t0) / 60
            rate = r.accepted / minutes
            base = base or rate
            top = ", ".join(f"{k} {v}" for k, v in r.reasons.most_common(3))
            print(f"| {kind} | {label} | {r.accepted} | {r.attempts} | {minutes:.2f} | {rate:.1f} | "
                  f"{r.tokens / (minutes * 60):.1f} | {rate / base:.1f}x | {top} |", flush=True)


def decode(n: int) -> None:
    """Constrained vs free: same prompts, same seeds, valid outputs per second."""
    cases = [("corpus", Document, P.SYSTEM_WRITER, lambda r: P.CORPUS.format(
                 style=r.choice(P.STYLES), topic=r.choice(P.TOPICS), audience=r.choice(P.AUDIENCES))),
             ("instructions", InstructionPair, P.SYSTEM_TEACHER, lambda r: P.INSTRUCTION_PAIR.format(
                 topic=r.choice(P.TOPICS), task=r.choice(P.TASK_TYPES))),
             ("math", WordProblem, P.SYSTEM_MATH, lambda r: P.MATH.format(
                 setting=r.choice(P.MATH_SETTINGS), operation=r.choice(P.MATH_OPERATIONS)))]
    rows = []
    for constrained in (True, False):
        backend = LlamaCppBackend(embedded_teacher(), constrained=constrained)
        backend.check()
        for name, output, system, prompt in cases:
            valid, tokens, t0, reasons = 0, 0, time.perf_counter(), {}
            for i in range(n):
                ask = Ask(backend, seed=i, temperature=0.8, max_tokens=400)
                try:
                    ask(system, prompt(random.Random(i)), output)
                    valid += 1
                except Rejected as r:
                    reasons[r.reason] = reasons.get(r.reason, 0) + 1
                tokens += ask.tokens
            dt = time.perf_counter() - t0
            rows.append((name, "constrained" if constrained else "free", valid, n, valid / dt, tokens / dt,
                         json.dumps(reasons)))
    print("| kind | decoding | valid | valid/s | tok/s | rejections |\n|---|---|---|---|---|---|")
    for name, mode, valid, total, vps, tps, reasons in rows:
        print(f"| {name} | {mode} | {valid}/{total} | {vps:.3f} | {tps:.1f} | {reasons} |")


def kinds(n: int, kinds_: list[str]) -> None:
    """Accepted records per minute per kind through the whole pipeline."""
    backend = LlamaCppBackend(embedded_teacher(), name="embedded")
    print("| kind | accepted | tried | minutes | records/min | tok/s | top rejection reasons |\n"
                  "|---|---|---|---|---|---|---|")
    for kind in kinds_:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store.open(Path(tmp) / "bench.db")
            t0 = time.perf_counter()
            r = generate(store, GenerateConfig(kind=kind, count=n, max_attempts=n), backend=backend, console=QUIET)
            minutes = (time.perf_counter() - t0) / 60
        top = ", ".join(f"{k} {v}" for k, v in r.reasons.most_common(3))
        print(f"| {kind} | {r.accepted} | {r.attempts} | {minutes:.2f} | {r.accepted / minutes:.1f} | "
                      f"{r.tokens / (minutes * 60):.1f} | {top} |")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = generate(Store.open(Path(tmp) / "b.db"), GenerateConfig(kind="math", count=10 * n, source="procedural"),
                     console=QUIET)
        minutes = (time.perf_counter() - t0) / 60
        print(f"| math (procedural) | {r.accepted} | {r.attempts} | {minutes:.3f} | "
                      f"{r.accepted / minutes:,.0f} | - | {dict(r.reasons)} |")


def overhead(n: int) -> None:
    """Wall time of the pipeline beyond the backend calls, real model and instant fake."""
    timed = Timed(LlamaCppBackend(embedded_teacher(), name="embedded"))
    timed.check()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate(Store.open(Path(tmp) / "o.db"), GenerateConfig(kind="corpus", count=n, max_attempts=n),
                 backend=timed, console=QUIET)
        wall = time.perf_counter() - t0
    print(f"embedded, {timed.calls} corpus items: wall {wall:.2f} s, inside backend {timed.seconds:.2f} s, "
                  f"pipeline overhead {100 * (wall - timed.seconds) / timed.seconds:.1f}%")
    rng = random.Random(0)
    words = "the a and of to in cat dog sun moon tree river boat kite bread apple song hill star door".split()
    replies = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) for _ in range(500)]
    fake = Timed(FakeBackend(replies))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = generate(Store.open(Path(tmp) / "f.db"), GenerateConfig(kind="corpus", count=500, max_attempts=500),
                     backend=fake, console=QUIET)
        wall = time.perf_counter() - t0
    print(f"instant fake backend, {r.attempts} corpus items: {1000 * (wall - fake.seconds) / r.attempts:.2f} ms "
                  "of pipeline work per item (validation, filters, MinHash, SQLite insert, metrics row, progress)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["batched", "decode", "kinds", "overhead", "all"], default="all")
    ap.add_argument("--slots", default="16", help="batched: sequences per batch to compare, e.g. 8,16")
    ap.add_argument("--n", type=int, default=10, help="items per measurement")
    ap.add_argument("--kinds", default="corpus,instructions,math,preferences")
    args = ap.parse_args()
    if args.part in ("batched", "all"):
        batched(args.n, [int(k) for k in args.slots.split(",")], ["corpus", "instructions"])
    if args.part in ("decode", "all"):
        decode(args.n)
    if args.part in ("kinds", "all"):
        kinds(args.n, args.kinds.split(","))
    if args.part in ("overhead", "all"):
        overhead(args.n)


if __name__ == "__main__":
    main()

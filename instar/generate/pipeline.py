"""The generation loop: `instar generate KIND --count N` tops the store up to N accepted records of KIND.

    result = generate(store, GenerateConfig(kind="corpus", count=100))     # a re-run continues, never duplicates
    generate(store, GenerateConfig(kind="corpus", count=100, topics=["tide pools", "volcanoes"]))
    generate(store, GenerateConfig(kind="instructions", count=50, documents="notes/"))   # grounded Q&A

Per item: a seeded rng (same seed and item number -> same prompt) -> recipe (backend calls, parsing) ->
validation against records.py -> filters.py -> exact duplicate (content-hash id) and near duplicate
(MinHash) check -> store, with provenance (run id, backend, model, template version, seed, topic, document
passage). Item i of a `documents` run is grounded in passage i mod (number of passages), so every passage is
used once before any is used twice. Every item ends
as exactly one row: a record, or a failure with its reason and the raw output ("duplicate" included), so
`records + failures` of a kind counts the items tried, and a re-run starts at the next item number.

Concurrency: up to `concurrency` items in flight on worker threads (Ollama and OpenAI-compatible servers serve
them in parallel; llama.cpp decodes them as one batch, a sequence each). Results are stored by the main thread as they finish, one transaction per item, so
SIGKILL loses at most the items in flight. Ctrl-C stops handing out items, stores those in flight, marks
the run "interrupted" and re-raises: nothing finished is lost, and the same command resumes.
The run gets a row in `runs` (stage "generate") and its counts are logged as metrics after every item.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from instar.config import StrictConfig
from instar.datasets.runs import finish_run, log_metrics, start_run
from instar.datasets.store import Provenance, Store, record_id, validate_record
from instar.datasets.documents import Passage, read_passages
from instar.errors import InputError, InstarError
from instar.generate import filters
from instar.generate.backends import Backend, NoModel, make_backend
from instar.generate.prompts import TEMPLATE_VERSION
from instar.generate.recipes import KIND_OF, RECIPES, Ask, Draft, Rejected, math_procedural


class GenerateConfig(StrictConfig):
    kind: Literal["corpus", "instructions", "preferences", "math"] = Field(description="What to generate.")
    count: int = Field(ge=1, description="Target number of stored records of this kind from this source (a top-up, "
                       "not an addition; instar's procedural records count only for --source procedural).")
    backend: Literal["embedded", "llamacpp", "ollama", "openai"] = Field("embedded", description="Where text "
                                                                         "comes from.")
    model: str | None = Field(None, description="GGUF path (llamacpp) or model name (ollama, openai).")
    hosts: list[str] = Field(default_factory=list, description="Server URLs (Ollama, or OpenAI-compatible ending "
                             "in /v1); several spread the load.")
    topics: list[str] = Field(default_factory=list, description="Subjects the items are about (default: the "
                              "built-in pools of prompts.py).")
    topics_file: str | None = Field(None, description="A text file of topics, one per line (added to `topics`).")
    documents: str | None = Field(None, description="instructions only: a file or folder (.txt .md .html .pdf) "
                                  "whose passages ground question-answer conversations.")
    source: Literal["llm", "procedural", "rephrase"] = Field("llm", description="math only: LLM word problems, "
                                                             "procedural, or procedural reworded by the LLM.")
    seed: int = Field(0, description="Base seed; item i of a kind uses a seed derived from (seed, kind, i).")
    concurrency: int | None = Field(None, ge=1, le=64, description="Items in flight: requests to a server, or "
                                    "sequences llama.cpp decodes in batches (default: 8 to a server, 8 per core "
                                    "in-process, at most 32: bench/README.md).")
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature of generation requests.")
    max_tokens: int = Field(400, ge=16, description="Max new tokens per request; hitting it is a failure.")
    num_ctx: int = Field(2048, ge=256, description="Context window (llama.cpp n_ctx, Ollama num_ctx).")
    timeout: float = Field(120.0, gt=0, description="Seconds per Ollama request before it counts as dropped.")
    retries: int = Field(3, ge=0, description="Retries (with backoff) on busy servers and dropped connections.")
    constrained: bool | None = Field(None, description="Schema-constrained decoding; default: per backend.")
    max_attempts: int | None = Field(None, ge=1, description="Stop after this many items (default 5 x needed + 10).")

    @model_validator(mode="after")
    def _check(self):
        if self.source != "llm" and self.kind != "math":
            raise ValueError(f"--source {self.source} is only for math")
        if self.documents is not None and self.kind != "instructions":
            raise ValueError("--from is only for instructions (`instar data import PATH` makes pretraining text)")
        if any(not t.strip() or len(t) > 200 for t in self.topics):
            raise ValueError("a topic must be 1-200 characters")
        return self


@dataclass
class GenerateResult:
    kind: str
    target: int
    before: int
    run_id: str | None = None
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    tokens: int = 0
    seconds: float = 0.0
    status: str = "done"
    reasons: Counter = field(default_factory=Counter)

    @property
    def attempts(self) -> int:
        return self.accepted + self.rejected + self.duplicates

    def add(self, verdict: str, tokens: int) -> None:
        self.tokens += tokens
        if verdict in ("accepted", "duplicates"):
            setattr(self, verdict, getattr(self, verdict) + 1)
        else:
            self.rejected += 1
            self.reasons[verdict] += 1

    def values(self) -> dict[str, float]:
        return {"accepted": self.accepted, "rejected": self.rejected, "duplicates": self.duplicates,
                "tok/s": self.tokens / self.seconds if self.seconds else 0.0}


def item_seed(seed: int, kind: str, index: int) -> int:
    return random.Random(f"{seed}:{kind}:{index}").randrange(2**31)


def read_topics(path: str) -> list[str]:
    """Topics from a text file, one per line (blank lines and `#` comments skipped); a one-line error if none."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise InputError(f"topics file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read topics file {path}: {e}") from None
    topics = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    if not topics:
        raise InputError(f"topics file {path} has no topics (one per line)")
    return topics


def steering(cfg: GenerateConfig) -> tuple[list[str], list[Passage], list[tuple[str, str]]]:
    """The topics and document passages this run is about, read and checked before anything is generated."""
    topics = [t.strip() for t in cfg.topics] + (read_topics(cfg.topics_file) if cfg.topics_file else [])
    topics = list(dict.fromkeys(topics))  # a repeated topic would only skew the draw
    passages, bad = read_passages(cfg.documents) if cfg.documents else ([], [])
    return topics, passages, bad


def run_item(recipe, backend: Backend, cfg: GenerateConfig, seed: int, topics: list[str] = (),
             passage: Passage | None = None) -> tuple[Draft | Rejected, int]:
    """One item on a worker thread: a Draft or a Rejected, plus the tokens it cost. Only InstarError escapes."""
    ask = Ask(backend, seed=seed, temperature=cfg.temperature, max_tokens=cfg.max_tokens, topics=topics,
              passage=passage)
    try:
        draft = recipe(random.Random(seed), ask)
        draft.raw = ask.raw() if ask.raws else json.dumps(draft.record, ensure_ascii=False)
        return draft, ask.tokens
    except Rejected as r:
        return r, ask.tokens
    except InstarError:
        raise
    except Exception as e:  # a library error on one item must not end a long run; it is stored with its text
        return Rejected(f"error: {type(e).__name__}", f"{e}\n{ask.raw() if ask.raws else ''}"), ask.tokens


class Keeper:
    """Validation -> filters -> exact and near duplicates -> store; every outcome is one row."""

    def __init__(self, store: Store, kind: str, run_id: str, backend: Backend):
        self.store, self.kind, self.run_id, self.backend = store, kind, run_id, backend
        self.near = filters.NearDuplicates()
        for rec in store.records(kind):  # so a re-run also catches near-copies of what earlier runs stored
            self.near.add(filters.key_text(kind, rec))

    def keep(self, outcome: Draft | Rejected, seed: int) -> str:
        """Store one outcome; return "accepted", "duplicates" or the rejection reason."""
        if isinstance(outcome, Rejected):
            return self.fail(outcome.reason, outcome.raw, seed)
        raw = outcome.raw
        try:
            record = validate_record(self.kind, outcome.record)
        except ValueError as e:
            return self.fail(f"invalid record: {str(e).split(':')[0]}", raw, seed)
        # Filters judge what a model wrote; procedural problems are correct by construction ("What is 3 + 4?"
        # is short on purpose), so only deduplication applies to them.
        reason = None if isinstance(self.backend, NoModel) else filters.check(self.kind, record, outcome.prompt)
        if reason:
            return self.fail(f"filter: {reason}", raw, seed)
        key = filters.key_text(self.kind, record)
        if self.store.existing_ids([record_id(self.kind, record)]):
            return self.fail("duplicate", raw, seed, "duplicates")
        if self.near.is_duplicate(key):
            return self.fail("near duplicate", raw, seed, "duplicates")
        source = "procedural" if isinstance(self.backend, NoModel) else self.backend.name
        self.store.add(self.kind, [record], Provenance(source=source, run_id=self.run_id, backend=self.backend.name,
                                                        model=self.backend.model, template=TEMPLATE_VERSION,
                                                        seed=seed, topic=outcome.topic, document=outcome.document),
                       validated=True)
        self.near.add(key)
        return "accepted"

    def fail(self, reason: str, raw: str | None, seed: int, outcome: str | None = None) -> str:
        self.store.add_failure(reason, raw, kind=self.kind, run_id=self.run_id, seed=seed)
        return outcome or reason


def items_tried(store: Store, kind: str) -> int:
    """Records plus failures of this kind: the next item number, so a re-run draws fresh seeds. (Rows for
    unreadable documents are not items.)"""
    failed = store.db.execute("select count(*) from failures where kind = ? and reason not like 'document:%'",
                              [kind]).fetchone()[0]
    return store.count(kind) + failed


def counted(store: Store, cfg: GenerateConfig) -> int:
    """The records a top-up to `cfg.count` counts: those of its kind made the way this command makes them. A model's
    (or imported) records for an LLM source, instar's own for `--source procedural`: the 20,000 math conversations
    `instar run` builds are `messages` too, and do not make `instar generate instructions -n 400` a no-op."""
    return store.count(KIND_OF[cfg.kind], procedural=cfg.source == "procedural")


def generate(store: Store, cfg: GenerateConfig, backend: Backend | None = None, console=None) -> GenerateResult:
    """Top the store up to `cfg.count` records of `cfg.kind`, showing progress on `console`."""
    from instar import report

    kind = KIND_OF[cfg.kind]
    result = GenerateResult(kind=kind, target=cfg.count, before=counted(store, cfg))
    # A missing path or an empty topics file: one line, nothing stored (even when the store is already full).
    topics, passages, bad_files = steering(cfg)
    need = cfg.count - result.before
    if need <= 0:
        result.status = "nothing to do"
        return result
    recipe, backend = source(cfg, backend)
    backend.check()  # no server, model not pulled, file missing: one line, before a run row exists
    max_attempts = cfg.max_attempts or 5 * need + 10
    result.run_id = run_id = start_run(store, kind="generate", stage="generate", name=f"generate {cfg.kind}",
                                       config=cfg.model_dump() | {"backend_name": backend.name, "model": backend.model})
    keeper = Keeper(store, kind, run_id, backend)
    for file, reason in bad_files:  # one unreadable file among readable ones: a failure row, the run goes on
        store.add_failure(f"document: {reason}", file, kind=kind, run_id=run_id)
    first = items_tried(store, kind)
    workers = max(1, min(cfg.concurrency or backend.max_concurrency, backend.max_concurrency))
    progress = report.make_progress(console)
    task = progress.add_task(f"generate {cfg.kind}", total=need, info="")
    in_flight: dict[Future, int] = {}
    started, interrupted, t0 = 0, False, time.perf_counter()

    def handle(fut: Future) -> None:
        # The future leaves `in_flight` only once its outcome is stored: a Ctrl-C landing anywhere before that
        # (it arrives in this thread at any bytecode) leaves it for the interrupt branch below to store.
        seed = in_flight[fut]
        outcome, tokens = fut.result()  # InstarError (dead server) propagates from here
        verdict = keeper.keep(outcome, seed)
        in_flight.pop(fut, None)
        result.add(verdict, tokens)
        if result.reasons.get(verdict) == 1:  # each new kind of rejection is reported once, above the bar
            progress.console.log(report.generate_event(verdict, outcome), markup=False, highlight=False)
        result.seconds = time.perf_counter() - t0
        log_metrics(store, run_id, result.attempts, result.values())
        progress.update(task, completed=result.accepted, info=report.generate_info(result.values()))

    with progress, ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            while True:
                while len(in_flight) < workers and started < max_attempts and result.accepted + len(in_flight) < need:
                    index = first + started
                    seed = item_seed(cfg.seed, kind, index)
                    passage = passages[index % len(passages)] if passages else None
                    in_flight[pool.submit(run_item, recipe, backend, cfg, seed, topics, passage)] = seed
                    started += 1
                if not in_flight:
                    break
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in done:
                    handle(fut)
        except KeyboardInterrupt:  # stop between items: store what is in flight, then let the CLI say so
            interrupted = True
            for fut in list(in_flight):
                fut.cancel() or handle(fut)  # cancelled ones never started; the rest finish and are kept
            # (an item interrupted between being stored and leaving in_flight is offered again: the store's
            # dedup makes that a `duplicate`, not a second record)
            result.status = "interrupted"
        except InstarError:
            for fut in list(in_flight):
                fut.cancel()
            finish_run(store, run_id, status="failed", summary=summary(result))
            raise
    if result.status == "done" and result.accepted < need:
        result.status = "stopped"  # max_attempts reached: the acceptance rate is too low for this target
    finish_run(store, run_id, status=result.status, summary=summary(result))
    if interrupted:
        raise KeyboardInterrupt
    return result


def source(cfg: GenerateConfig, backend: Backend | None) -> tuple:
    """The recipe for this config and the backend it runs on (built from the config unless given)."""
    if cfg.source == "procedural":
        return math_procedural, backend or NoModel()
    if cfg.source == "rephrase":
        from instar.generate.rephrase import math_rephrase
    recipe = math_rephrase if cfg.source == "rephrase" else RECIPES[cfg.kind]
    return recipe, backend or make_backend(
        cfg.backend, model=cfg.model, hosts=cfg.hosts, concurrency=cfg.concurrency, timeout=cfg.timeout,
        retries=cfg.retries, num_ctx=cfg.num_ctx, constrained=cfg.constrained)


def summary(result: GenerateResult) -> dict:
    return {"kind": result.kind, "target": result.target, "before": result.before, "attempts": result.attempts,
            **result.values(), "reasons": dict(result.reasons)}


def config_from_options(path, sets: list[str] | None, **options) -> GenerateConfig:
    """CLI options (those given) under a TOML file and `--set` overrides."""
    from instar.config import load_config

    base = {k: v for k, v in options.items() if v is not None and v != []}
    return load_config(GenerateConfig, path, sets, base=base)

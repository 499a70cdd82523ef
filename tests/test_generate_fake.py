"""Recipes and the generation pipeline driven by a scripted fake backend: every edge case, no model."""

import _thread
import json
import random

import pytest

from instar.datasets.runs import get_run, list_runs, metric_series
from instar.errors import ConfigError, InstarError
from instar.generate import filters
from instar.generate import prompts as P
from instar.generate.backends import FakeBackend, Generation
from instar.generate.pipeline import GenerateConfig, config_from_options, generate

VOCAB = ("the a and to of in cat dog bird sun moon tree river boat green small happy run jump sing "
         "read play walk friend garden house rain snow light night morning bread apple kite ball song "
         "road hill star cloud flower door window table chair school teacher mother father sister").split()


def story(n: int, words: int = 40) -> str:
    rng = random.Random(n)
    # every third word a function word, so the English filter always passes
    return " ".join(rng.choice(VOCAB[:6] if i % 3 == 0 else VOCAB[6:]) for i in range(words)).capitalize() + "."


def doc(n: int) -> str:
    return json.dumps({"text": story(n)})


def failures(store, kind=None):
    rows = store.db.execute("select reason, raw, seed from failures" + (" where kind = ?" if kind else "") + " order by id",
                            [kind] if kind else []).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def rows(store):
    return list(store.db["records"].rows)


def test_corpus_stores_records_with_provenance_and_a_run(store):
    fake = FakeBackend([doc(i) for i in range(10)])
    result = generate(store, GenerateConfig(kind="corpus", count=3, seed=5), backend=fake)
    assert (result.accepted, result.rejected, result.duplicates, result.status) == (3, 0, 0, "done")
    stored = rows(store)
    assert len(stored) == 3 and store.count("text") == 3
    assert {r["backend"] for r in stored} == {"fake"} and {r["template"] for r in stored} == {P.TEMPLATE_VERSION}
    assert {r["run_id"] for r in stored} == {result.run_id}
    assert sorted(r["seed"] for r in stored) == sorted(c["seed"] for c in fake.calls)
    run = get_run(store, result.run_id)
    assert run["status"] == "done" and run["kind"] == "generate" and run["summary"]["accepted"] == 3
    assert metric_series(store, result.run_id, "accepted")[-1] == (3, 3.0)
    # the request carried the JSON schema and the field descriptions as prompt text
    call = fake.calls[0]
    assert call["schema"]["required"] == ["text"] and '"text":' in call["messages"][1]["content"]


def test_bad_outputs_become_failures_with_reasons_and_raw_text(store):
    replies = ["not json at all", json.dumps({"story": story(1)}), json.dumps({"text": story(2), "x": 1}),
               json.dumps({"text": "too short"}), Generation(doc(3)[:50], finish_reason="length"),
               Generation("", finish_reason="stop"), Generation("", finish_reason="context"),
               json.dumps({"text": "I'm sorry, but as an AI I cannot write " + story(4)}),
               json.dumps({"text": "la " * 60}), doc(5), doc(6)]
    result = generate(store, GenerateConfig(kind="corpus", count=2), backend=FakeBackend(replies))
    assert result.accepted == 2 and result.rejected == 9
    reasons = [f[0] for f in failures(store, "text")]
    assert reasons == ["invalid json", "schema mismatch: text", "schema mismatch: x", "schema mismatch: text",
                       "truncated (max tokens)", "empty content", "truncated (prompt fills the context window)",
                       "filter: refusal", "filter: not english"]
    assert failures(store)[0][1] == "not json at all"  # the raw output is kept
    assert all(f[2] is not None for f in failures(store))  # and the item's seed


def test_free_decoding_output_wrapped_in_prose_is_parsed(store):
    fake = FakeBackend([f"Sure! Here it is:\n```json\n{doc(1)}\n```\nHope it helps."])
    assert generate(store, GenerateConfig(kind="corpus", count=1), backend=fake).accepted == 1


def test_exact_and_near_duplicates_are_rejected_and_counted(store):
    near = story(1).replace("the", "one", 1).replace("a", "the", 1) if "the" in story(1) else story(1) + " Yes."
    replies = [doc(1), doc(1), json.dumps({"text": near}), doc(2)]
    result = generate(store, GenerateConfig(kind="corpus", count=2), backend=FakeBackend(replies))
    assert (result.accepted, result.duplicates) == (2, 2)
    assert [f[0] for f in failures(store)] == ["duplicate", "near duplicate"]


def test_top_up_semantics_and_rerun_idempotence(store):
    fake = FakeBackend([doc(i) for i in range(10)])
    generate(store, GenerateConfig(kind="corpus", count=3), backend=fake)
    assert store.count("text") == 3 and len(fake.calls) == 3
    again = generate(store, GenerateConfig(kind="corpus", count=3), backend=fake)
    assert again.status == "nothing to do" and len(fake.calls) == 3 and store.count("text") == 3
    generate(store, GenerateConfig(kind="corpus", count=5), backend=fake)
    assert store.count("text") == 5 and len(fake.calls) == 5
    assert len({c["seed"] for c in fake.calls}) == 5  # a re-run continues with fresh item seeds
    assert len(list_runs(store, kind="generate")) == 2  # "nothing to do" starts no run


def test_a_top_up_counts_the_records_of_its_own_source(store):
    """`instar run` stores thousands of procedural math conversations as `messages`: `instar generate instructions
    -n 2` after it still asks the model for two (it once said "nothing to do"); `--source procedural` counts only
    instar's own records, a model's math does not fill it."""
    from instar.datasets.store import Provenance
    from instar.generate.sft_math import math_conversations

    assert math_conversations(store, 30, 0, ["arithmetic"], "", set()) == 30
    chat = json.dumps({"question": "Why do cats purr so often?", "answer": "Cats purr when they are calm and happy, "
                                  "and sometimes when they are hurt, because the sound helps them rest and heal."})
    chat2 = chat.replace("cats", "dogs").replace("Cats purr", "Dogs pant")
    result = generate(store, GenerateConfig(kind="instructions", count=2, max_attempts=4),
                      backend=FakeBackend([chat, chat2]))
    assert (result.before, result.accepted) == (0, 2) and store.count("messages") == 32
    store.add("math", [{"question": "Tom has 3 apples and gets 4 more. How many?", "answer": "7",
                        "family": "llm", "verified_by": "safe_eval"}], Provenance(source="fake"))
    assert generate(store, GenerateConfig(kind="math", count=1, source="procedural")).accepted == 1
    assert store.count("math") == 2 and store.count("math", procedural=False) == 1


def test_same_seed_same_prompts(tmp_path):
    from instar.datasets.store import Store

    first = FakeBackend([json.dumps({"instruction": "Explain rain to me please.", "response": story(1)})])
    second = FakeBackend([json.dumps({"instruction": "Explain rain to me please.", "response": story(1)})])
    generate(Store.open(tmp_path / "c.db"), GenerateConfig(kind="instructions", count=1, seed=9), backend=first)
    generate(Store.open(tmp_path / "d.db"), GenerateConfig(kind="instructions", count=1, seed=9), backend=second)
    assert first.calls[0]["messages"] == second.calls[0]["messages"]
    assert first.calls[0]["seed"] == second.calls[0]["seed"]


def test_instructions_make_messages_records_and_echoes_are_filtered(store):
    def reply(messages):  # the request or question echoed as the answer
        topic = messages[1]["content"].split(" about ")[1].split(".")[0].split(",")[0]
        if '"question"' in messages[1]["content"]:
            return json.dumps({"question": f"What is {topic} like?", "answer": f"What is {topic} like?"})
        return json.dumps({"instruction": f"Tell me about {topic} please.", "response": f"Tell me about {topic} please."})
    bad = generate(store, GenerateConfig(kind="instructions", count=1, max_attempts=4), backend=FakeBackend(reply))
    assert bad.accepted == 0 and bad.status == "stopped" and set(bad.reasons) == {"filter: echoes prompt"}

    def good(messages):
        n = len(backend.calls)
        if '"question"' in messages[1]["content"]:
            return json.dumps({"question": f"Why do {VOCAB[6 + n]}s fall in autumn?", "answer": story(100 + n)})
        return json.dumps({"instruction": f"Explain why the {VOCAB[6 + n]} is blue.", "response": story(200 + n)})
    backend = FakeBackend(good)
    generate(store, GenerateConfig(kind="instructions", count=12), backend=backend)
    recs = store.records("messages")
    assert len(recs) == 12 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in recs)
    # about half the items are short questions answered in prose (recipes.QUESTION_SHARE), opened by a drawn word
    asked = [c["messages"][1]["content"] for c in backend.calls if '"question"' in c["messages"][1]["content"]]
    assert 3 <= len(asked) <= 9
    assert len({a.split('starting with "')[1].split('"')[0] for a in asked}) >= 3


def test_a_question_that_is_not_one_question_is_refused_by_its_schema(store):
    not_a_question = json.dumps({"question": "Tell me about the moon.", "answer": story(3)})
    two = json.dumps({"question": "Why? And how?", "answer": story(3)})
    backend = FakeBackend(lambda m: not_a_question if '"question"' in m[1]["content"] else two)
    result = generate(store, GenerateConfig(kind="instructions", count=1, max_attempts=4), backend=backend)
    assert result.accepted == 0 and set(result.reasons) <= {"schema mismatch: question", "schema mismatch: instruction"}
    assert "schema mismatch: question" in result.reasons


def judge_backend(first_score, second_score, same=False):
    """Instruction, careful and hasty candidates, then two judge calls returning the given score pairs."""
    verdicts = iter([first_score, second_score])

    def reply(messages):
        system = messages[0]["content"]
        if system == P.SYSTEM_TEACHER:
            return json.dumps({"instruction": "Explain why leaves fall in autumn."})
        if system == P.CAREFUL[0]:
            return json.dumps({"response": story(1)})
        if system == P.HASTY[0]:
            return json.dumps({"response": story(1) if same else story(2)})
        s1, s2 = next(verdicts)
        return json.dumps({"score_1": s1, "score_2": s2})
    return FakeBackend(reply)


@pytest.mark.parametrize("first,second,reason", [((8, 3), (3, 8), None), ((3, 8), (8, 3), None),
                                                 ((5, 5), (3, 8), "judge tie"),
                                                 ((8, 3), (8, 3), "judge inconsistent"),
                                                 ((6, 5), (5, 6), "judge margin too small")])
def test_preferences_keep_only_consistent_verdicts_with_margin(store, first, second, reason):
    fake = judge_backend(first, second)
    result = generate(store, GenerateConfig(kind="preferences", count=1, max_attempts=1), backend=fake)
    assert len(fake.calls) == 5
    judge_texts = [c["messages"][1]["content"] for c in fake.calls[3:]]
    assert judge_texts[0].index(story(1)) < judge_texts[0].index(story(2))  # order A, B
    assert judge_texts[1].index(story(2)) < judge_texts[1].index(story(1))  # then B, A
    if reason is None:
        rec = store.records("preference")[0]
        winner = story(1) if first[0] > first[1] else story(2)
        assert rec["chosen"] == winner and rec["rejected"] != winner and rec["margin"] == 5.0
        assert rec["prompt"] == [{"role": "user", "content": "Explain why leaves fall in autumn."}]
    else:
        assert store.count("preference") == 0 and [f[0] for f in failures(store)] == [reason]
        assert story(1) in failures(store)[0][1]  # raw keeps every reply of the item


def test_preferences_identical_candidates_fail(store):
    result = generate(store, GenerateConfig(kind="preferences", count=1, max_attempts=1),
                      backend=judge_backend((8, 3), (3, 8), same=True))
    assert result.reasons == {"identical candidates": 1}


@pytest.mark.parametrize("expression,answer,reason", [("(12 + 8) * 3", "60", None), ("12 + 8 * 3", "60",
                          "math: answer does not match expression"), ("__import__('os').system('id')", "0",
                          "schema mismatch: expression"), ("7 / 2", "3.5", None), ("5 * 4", "twenty",
                          "schema mismatch: answer"), ("9**9**9", "1", "math: expression refused")])
def test_llm_math_is_verified_by_the_safe_evaluator(store, expression, answer, reason):
    reply = json.dumps({"question": "Sam buys 12 apples and 8 pears, three times. How many fruits?",
                        "expression": expression, "answer": answer})
    result = generate(store, GenerateConfig(kind="math", count=1, max_attempts=1), backend=FakeBackend([reply]))
    if reason is None:
        rec = store.records("math")[0]
        assert rec["answer"] == answer and rec["verified_by"] == "safe_eval"
    else:
        assert dict(result.reasons) == {reason: 1}


def test_procedural_math_needs_no_backend_and_tops_up(store):
    result = generate(store, GenerateConfig(kind="math", count=6, source="procedural"))
    assert result.accepted == 6 and store.count("math") == 6
    assert {r["verified_by"] for r in store.records("math")} == {"procedural"}
    assert {r["source"] for r in rows(store)} == {"procedural"}
    assert generate(store, GenerateConfig(kind="math", count=6, source="procedural")).status == "nothing to do"
    more = generate(store, GenerateConfig(kind="math", count=40, source="procedural"))
    assert more.accepted == 34 and not any(r.startswith("filter") for r in more.reasons)  # short is fine here


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as in a fresh `instar` process: interrupt_main() does nothing while SIGINT is
    SIG_DFL or SIG_IGN, as a native library or an earlier test in this process may leave it."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_stops_between_items_and_loses_nothing(store, python_sigint):
    n = {"calls": 0}

    def reply(messages):
        n["calls"] += 1
        if n["calls"] == 3:
            _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread
        return doc(n["calls"])
    with pytest.raises(KeyboardInterrupt):
        generate(store, GenerateConfig(kind="corpus", count=10), backend=FakeBackend(reply))
    run = list_runs(store, kind="generate")[0]
    assert run["status"] == "interrupted"
    kept = store.count("text")
    assert kept == n["calls"] >= 3  # the item in flight when Ctrl-C came was finished and stored
    result = generate(store, GenerateConfig(kind="corpus", count=10), backend=FakeBackend(reply))
    assert result.accepted == 10 - kept and store.count("text") == 10


def test_user_errors_stop_the_run_with_one_line(store):
    def dead(messages):
        raise InstarError("cannot reach an Ollama server at x: start it with `ollama serve`")
    with pytest.raises(InstarError, match="ollama serve"):
        generate(store, GenerateConfig(kind="corpus", count=2), backend=FakeBackend(dead))
    assert list_runs(store, kind="generate")[0]["status"] == "failed"


def test_library_errors_on_one_item_become_failures(store):
    replies = [lambda m: 1 / 0, doc(1)]
    result = generate(store, GenerateConfig(kind="corpus", count=1), backend=FakeBackend(replies))
    assert result.accepted == 1 and dict(result.reasons) == {"error: ZeroDivisionError": 1}


def test_concurrency_keeps_every_item(store):
    fake = FakeBackend([doc(i) for i in range(40)], max_concurrency=8)
    result = generate(store, GenerateConfig(kind="corpus", count=20, concurrency=8), backend=fake)
    assert result.accepted == 20 and store.count("text") == 20 and len(fake.calls) == 20


def test_config_errors():
    with pytest.raises(ConfigError, match="procedural"):
        config_from_options(None, [], kind="corpus", count=3, source="procedural")
    with pytest.raises(ConfigError, match="count"):
        config_from_options(None, [], kind="corpus", count=0)
    cfg = config_from_options(None, ["temperature=0.2"], kind="math", count=3, hosts=[])
    assert cfg.temperature == 0.2 and cfg.backend == "embedded"


def test_filters_directly():
    assert filters.check("text", {"text": story(3)}) is None
    assert filters.check("text", {"text": "Short text."}) == "too short"
    assert filters.check("text", {"text": "Это рассказ о собаке " * 10}) == "not english"
    assert filters.check("text", {"text": "As an AI language model, " + story(3)}) == "refusal"
    assert filters.check("text", {"text": ("the dog ran home " * 20)}) == "repetitive"
    prompt = "Write a short story about a dog for a child. Use short sentences and simple words."
    assert filters.check("text", {"text": prompt + " " + story(3)}, prompt) == "echoes prompt"


def test_cli_generate_procedural(tmp_path):
    from typer.testing import CliRunner

    from instar.cli import app

    db = tmp_path / "cli.db"
    out = CliRunner().invoke(app, ["generate", "math", "--source", "procedural", "--count", "4", "--db", str(db)])
    assert out.exit_code == 0, out.output
    assert "4/4 stored" in out.output
    from instar.datasets.store import Store

    assert Store.open(db).count("math") == 4


KILLABLE = """
import json, random, sys, time
from instar.datasets.store import Store
from instar.generate.backends import FakeBackend
from instar.generate.pipeline import GenerateConfig, generate
VOCAB = "the a and of cat dog sun moon tree river boat kite bread apple song hill star door rain snow".split()
def reply(messages):
    time.sleep(0.05)
    return json.dumps({"text": " ".join(random.choice(VOCAB) for _ in range(40))})
generate(Store.open(sys.argv[1]), GenerateConfig(kind="corpus", count=1000), backend=FakeBackend(reply))
"""


def test_sigkill_loses_at_most_the_items_in_flight(db_path):
    import signal
    import subprocess
    import sys
    import time

    from instar.datasets.store import Store

    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(db_path)], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.5)
        if db_path.exists() and Store.open(db_path).count("text") >= 5:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store.open(db_path)
    kept = store.count("text")
    assert kept >= 5
    run = list_runs(store, kind="generate")[0]
    assert run["status"] == "running"  # killed: the row says so until a later run finishes
    # every stored record is whole and valid; the metrics row count never exceeds the stored outcomes
    assert len(store.records("text")) == kept
    assert len(metric_series(store, run["id"], "accepted")) <= kept + len(failures(store))
    result = generate(store, GenerateConfig(kind="corpus", count=kept + 2), backend=FakeBackend([doc(1), doc(2)]))
    assert result.accepted == 2

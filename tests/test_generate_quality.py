"""Cleaner data: the garbage filters on the real garbage a default run let through, and the quality numbers
of `instar data stats` and the report card (acceptance by reason, distinct-2, near duplicates, lengths, topics)."""

import io
import json

import pytest
from rich.console import Console

from instar.datasets.store import Provenance
from instar.generate import filters
from instar.generate.backends import FakeBackend
from instar.generate.pipeline import GenerateConfig, generate
from instar.generate.quality import distinct_n, near_duplicate_rate, quality

# Quoted from records a fresh default run stored before these filters existed (issue 13).
ECHOED_SCHEMA = ("The whole document: several sentences of plain, simple English that a young reader understands. "
                 "The dog ran to the park and played with a red ball until the sun went down.")
PLACEHOLDER_REQUEST = "Use the {{response_json}} to write a short poem about the ocean and the waves."
CLEAN_STORY = ("Mia found a small grey kitten under the stairs. She gave it warm milk and a soft blanket, and the "
               "kitten purred all night. In the morning it followed her to the garden.")


@pytest.mark.parametrize("kind, record, reason", [
    ("text", {"text": ECHOED_SCHEMA}, "echoes schema description"),
    ("messages", {"messages": [{"role": "user", "content": PLACEHOLDER_REQUEST},
                               {"role": "assistant", "content": "The waves roll in and out under the bright moon."}]},
     "template placeholder"),
    ("messages", {"messages": [{"role": "user", "content": "Tell me about the sea."},
                               {"role": "assistant", "content": "Here is the JSON object with the response field: "
                                                                "the sea is big and blue."}]}, "talks about the JSON"),
    ("messages", {"messages": [{"role": "user", "content": "Give me ideas for a picnic."},
                               {"role": "assistant", "content": 'Sure! {response} Bring bread, fruit and a blanket.'}]},
     "template placeholder"),
    ("text", {"text": "Write a short story with a lesson about a kite for a young child. Use short sentences and "
                      "simple words. The kite flew high over the hill."}, "echoes prompt text"),
    ("messages", {"messages": [{"role": "user", "content": "Please plant 10 seeds in the [location] for me."},
                               {"role": "assistant", "content": "I planted them in neat rows by the fence."}]},
     "template placeholder"),  # quoted from a default run's teacher instructions, as the next two
    ("messages", {"messages": [{"role": "user", "content": "Can you paint something like [Artist_Name]'s work?"},
                               {"role": "assistant", "content": "Yes, with bright colours and thick strokes."}]},
     "template placeholder"),
    ("messages", {"messages": [{"role": "user", "content": "When does the museum open?"},
                               {"role": "assistant", "content": "At nine. Please write to <EMAIL> to book a visit."}]},
     "template placeholder"),
    ("messages", {"messages": [{"role": "user", "content": "Write a Python function that sums a list."},
                               {"role": "assistant", "content": "def total(xs: list[int]) -> int: return sum(xs) "
                                                                "# see [1] and <b>the docs</b>"}]}, None),
    ("text", {"text": CLEAN_STORY}, None),
    ("messages", {"messages": [{"role": "user", "content": "How do I read a JSON file in Python?"},
                               {"role": "assistant", "content": "Open the file and call json.load on it to get a dict."}]},
     None),  # JSON is fine when the request is about JSON
])
def test_garbage_filters_each_have_their_own_reason(kind, record, reason):
    assert filters.check(kind, record) == reason


def test_garbage_is_rejected_by_the_pipeline_with_its_reason(store):
    replies = [json.dumps({"text": ECHOED_SCHEMA}),
               json.dumps({"text": CLEAN_STORY})]
    result = generate(store, GenerateConfig(kind="corpus", count=1), backend=FakeBackend(replies))
    assert result.accepted == 1 and dict(result.reasons) == {"filter: echoes schema description": 1}


def test_distinct_2_and_near_duplicate_rate():
    assert distinct_n(["a b a b a b"]) == pytest.approx(2 / 5)
    assert distinct_n(["one two three", "four five six"]) == 1.0
    texts = [CLEAN_STORY, CLEAN_STORY.replace("garden", "gardens"), ECHOED_SCHEMA]
    assert near_duplicate_rate(texts) == pytest.approx(1 / 3)


def test_quality_by_kind_from_stored_rows_and_the_stats_and_card_sections(store, tmp_path):
    from instar import report
    from test_report import fill

    for i, (topic, text) in enumerate([("kites", CLEAN_STORY), ("kites", ECHOED_SCHEMA.split(". ", 1)[1]),
                                       ("bees", "Bees fly from flower to flower and carry pollen home to the hive.")]):
        store.add("text", [{"text": text}], Provenance(source="fake", topic=topic))
    store.add("text", [{"text": "Rivers run to the sea, and boats carry grain along them every summer."}],
              Provenance(source="import", document="notes/rivers.md#2"))
    store.add_failure("filter: too short", "x", kind="text")
    store.add_failure("filter: too short", "y", kind="text")
    store.add_failure("invalid json", "z", kind="text")
    q = quality(store)["text"]
    assert q.records == 4 and q.acceptance == pytest.approx(4 / 7)
    assert q.failures == {"filter: too short": 2, "invalid json": 1}
    assert 0.8 < q.distinct_2 <= 1.0 and q.near_duplicates == 0.0
    assert q.words["min"] == 13 and q.words["max"] == len(CLEAN_STORY.split())
    assert q.topics == {"kites": 2, "bees": 1} and q.documents == {"notes/rivers.md": 1}

    con = Console(file=io.StringIO(), width=200, color_system=None)
    report.render_stats(store, con)
    out = con.file.getvalue()
    assert "data quality" in out and "57%" in out and "filter: too short 2" in out
    assert "text topics: 2 covered, records per topic 1-2 (most: kites 2, bees 1)" in out
    assert "text documents: 1 covered" in out

    from instar.report_card import report as card

    fill(store, out_dir=str(tmp_path / "pipe"))
    con = Console(file=io.StringIO(), width=200, color_system=None)
    html = card(store, None, con, html_out=tmp_path / "card.html")
    assert "data quality" in con.file.getvalue() and "<h2>Data quality</h2>" in html.read_text()

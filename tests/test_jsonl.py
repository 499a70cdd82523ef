"""JSONL import/export: every shape round-trips with the same ids; every malformed line is reported and counted."""

import json

import pytest

from instar.datasets.jsonl import MAX_LINE_BYTES, export_jsonl, import_jsonl
from instar.datasets.store import Store
from instar.errors import InstarError

USER, BOT = {"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}

SHAPES = {  # input line -> (kind, the record as stored)
    "text": ({"text": "Once upon a time."}, "text", {"text": "Once upon a time."}),
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, USER, BOT]}, "messages",
                 {"messages": [{"role": "system", "content": "Be brief."}, USER, BOT]}),
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, "messages",
               {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, BOT]}),
    "alpaca-no-input": ({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "messages",
                        {"messages": [{"role": "user", "content": "Say hi."},
                                      {"role": "assistant", "content": "Hi!"}]}),
    "preference-string-prompt": ({"prompt": "Pick one.", "chosen": "Good.", "rejected": "Bad."}, "preference",
                                 {"prompt": [{"role": "user", "content": "Pick one."}], "chosen": "Good.",
                                  "rejected": "Bad."}),
    "preference-trl-conversational": (
        {"prompt": [USER], "chosen": [{"role": "assistant", "content": "5"}],
         "rejected": [{"role": "assistant", "content": "6"}], "score_chosen": 9.0, "score_rejected": 3.5},
        "preference", {"prompt": [USER], "chosen": "5", "rejected": "6", "score_chosen": 9.0,
                       "score_rejected": 3.5}),
    "math-question": ({"question": "What is 6*7?", "answer": "42", "solution": "6*7 = 42", "family": "arith",
                       "difficulty": 2}, "math",
                      {"question": "What is 6*7?", "answer": "42", "solution": "6*7 = 42", "family": "arith",
                       "difficulty": 2, "verified_by": "import"}),
    "math-prompt-numeric-answer": ({"prompt": "Half of 7?", "answer": 3.5}, "math",
                                   {"question": "Half of 7?", "answer": "3.5", "family": "other", "difficulty": 1,
                                    "verified_by": "import"}),
}


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_imports_as_its_kind_and_round_trips(tmp_path, shape):
    line, kind, stored = SHAPES[shape]
    store = Store.open(tmp_path / "a.db")
    result = import_jsonl(store, write_lines(tmp_path / "in.jsonl", [json.dumps(line)]))
    assert (result.lines, result.inserted, result.invalid) == (1, 1, 0)
    assert store.records(kind) == [stored]

    out = tmp_path / "out.jsonl"
    assert export_jsonl(store, out) == 1
    again = Store.open(tmp_path / "b.db")
    import_jsonl(again, out)
    assert list(again.iter_rows()) == [{**row, "source": "import"} for row in store.iter_rows()]  # same ids


def test_round_trip_of_everything_at_once_keeps_ids_and_splits(tmp_path):
    store = Store.open(tmp_path / "a.db")
    lines = [json.dumps(line) for line, _, _ in SHAPES.values()]
    lines += [json.dumps({"text": f"document number {i}"}) for i in range(200)]
    result = import_jsonl(store, write_lines(tmp_path / "in.jsonl", lines))
    assert result.inserted == len(lines) and result.invalid == 0
    out = tmp_path / "out.jsonl"
    assert export_jsonl(store, out) == len(lines)
    back = Store.open(tmp_path / "b.db")
    assert import_jsonl(back, out).inserted == len(lines)
    ids = lambda s: [(r["id"], r["kind"], r["split"]) for r in s.iter_rows()]  # noqa: E731
    assert ids(back) == ids(store)
    # Re-importing the export into the same store is a no-op.
    assert import_jsonl(store, out).duplicates == len(lines)
    # Filtered export: one kind, one split.
    n_train = store.count("text", "train")
    assert export_jsonl(store, tmp_path / "t.jsonl", kind="text", split="train") == n_train
    assert all(set(json.loads(x)) == {"text"} for x in (tmp_path / "t.jsonl").read_text().splitlines())


def test_export_writes_fields_in_schema_order(tmp_path):
    store = Store.memory()
    store.add("math", [{"question": "q?", "answer": "1"}])
    store.add("messages", [{"messages": [USER, BOT]}])
    export_jsonl(store, tmp_path / "o.jsonl")
    first, second = (tmp_path / "o.jsonl").read_text().splitlines()
    assert first.startswith('{"question": "q?", "answer": "1"')
    assert second.startswith('{"messages": [{"role": "user", "content"')


def test_explicit_kind_overrides_inference(tmp_path):
    store = Store.memory()
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": "2+2?", "answer": "4"}),
                                               json.dumps({"text": "not math"})])
    result = import_jsonl(store, path, kind="math")
    assert (result.inserted, result.invalid) == (1, 1)
    assert result.errors[0][0] == 2 and "question: required field is missing" in result.errors[0][1]
    with pytest.raises(InstarError, match="unknown kind"):
        import_jsonl(store, path, kind="tweets")


MALFORMED = [
    (b'{"text": "unterminated', "bad JSON"),
    (b"not json at all", "bad JSON"),
    (b'{"text": "a"} trailing', "bad JSON: Extra data"),
    (b"[1, 2, 3]", "expected a JSON object, got list"),
    (b'"just a string"', "expected a JSON object, got str"),
    (b"[" * 100_000, "bad JSON"),  # nesting deep enough to hit the recursion limit
    (b'{"colour": "blue"}', "cannot tell the kind"),
    (b'{"text": "ok", "title": "extra"}', "title: unknown field"),
    (b'{"text": 42}', "text: Input should be a valid string"),
    (b'{"text": "   "}', "text: must not be empty"),
    (b'{"text": "bell\\u0007"}', "control character U+0007"),
    (b'{"text": "\\ud800"}', "text: "),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "messages: List should have at least 2 items"),
    (b'{"messages": "hello"}', "messages: Input should be a valid list"),
    (b'{"prompt": "q", "chosen": "same", "rejected": "same"}', "chosen and rejected must differ"),
    (b'{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
     "chosen: expected a string or a single assistant message"),
    (b'{"question": "q", "answer": true}', "answer: Input should be a valid string"),
    (b'{"question": "q", "answer": "1", "difficulty": "hard"}', "difficulty"),
    (b'{"instruction": ["a"], "output": "b"}', "instruction: must be a string"),
    (b'{"instruction": "a", "output": ""}', "messages.1.content: must not be empty"),
    (b"\xff\xfe\x00binary\x80junk", "not valid UTF-8 (byte 0xff at column 1)"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    (b"\x00\x00\x00\x00", "bad JSON"),
]


def test_malformed_lines_are_reported_counted_and_kept(tmp_path):
    good = [json.dumps({"text": f"good line {i}"}).encode() for i in range(3)]
    lines = [good[0], *[raw for raw, _ in MALFORMED], b"", b"   ", good[1], good[2], good[0]]
    store = Store.memory()
    result = import_jsonl(store, write_lines(tmp_path / "bad.jsonl", lines))

    # Nothing lost: every non-blank line is inserted, a duplicate, or invalid.
    assert result.lines == len(lines) - 2 and result.blank == 2
    assert result.lines == result.inserted + result.duplicates + result.invalid
    assert (result.inserted, result.duplicates, result.invalid) == (3, 1, len(MALFORMED))
    for (number, reason), (_, expected) in zip(result.errors, MALFORMED):
        assert expected in reason, (number, reason)
        assert "\n" not in reason
    assert [n for n, _ in result.errors] == list(range(2, 2 + len(MALFORMED)))  # 1-based line numbers

    failures = list(store.db["failures"].rows_where(order_by="id"))
    assert len(failures) == len(MALFORMED)
    assert all(f["reason"].startswith("import: ") and f["run_id"] == result.run_id for f in failures)
    assert failures[0]["raw"] == '{"text": "unterminated'
    assert failures[6]["kind"] is None and failures[7]["kind"] == "text"  # kind kept when it was clear
    assert max(len(f["raw"]) for f in failures) <= 2_000  # the deep-nesting line is truncated
    run = store.db["runs"].get(result.run_id)
    assert run["kind"] == "import" and run["status"] == "done"
    assert json.loads(run["summary"])["invalid"] == len(MALFORMED)


def test_a_10mb_line_is_rejected_without_losing_its_neighbours(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "before"}\n')
        f.write(b'{"text": "' + b"x" * (10 * 1024 * 1024) + b'"}\n')
        f.write(b'{"text": "after"}\n')
    store = Store.memory()
    result = import_jsonl(store, path)
    assert (result.lines, result.inserted, result.invalid) == (3, 2, 1)
    assert result.errors[0][0] == 2 and f"over the {MAX_LINE_BYTES:,}-byte limit" in result.errors[0][1]
    assert {r["text"] for r in store.records("text")} == {"before", "after"}


def test_a_long_record_under_the_line_limit_is_reported_by_the_schema(tmp_path):
    path = write_lines(tmp_path / "long.jsonl", [json.dumps({"text": "y" * 1_000_000})])
    result = import_jsonl(Store.memory(), path)
    assert result.invalid == 1 and "at most 20000 characters" in result.errors[0][1]


def test_last_line_without_newline_and_crlf_and_bom(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}')
    result = import_jsonl(Store.memory(), path)
    assert (result.inserted, result.invalid) == (2, 0)


def test_empty_missing_and_directory_inputs_are_clear_errors(tmp_path):
    store = Store.memory()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(InstarError, match="empty"):
        import_jsonl(store, tmp_path / "empty.jsonl")
    with pytest.raises(InstarError, match="file not found"):
        import_jsonl(store, tmp_path / "missing.jsonl")
    with pytest.raises(InstarError, match="not a file"):
        import_jsonl(store, tmp_path)
    blank = write_lines(tmp_path / "blank.jsonl", [b"", b"  "])
    result = import_jsonl(store, blank)
    assert (result.lines, result.blank, result.inserted) == (0, 2, 0)


def test_export_errors_and_atomic_output(tmp_path):
    store = Store.memory()
    store.add("text", [{"text": "a"}])
    with pytest.raises(InstarError, match="unknown split"):
        export_jsonl(store, tmp_path / "o.jsonl", split="dev")
    with pytest.raises(InstarError, match="folder does not exist"):
        export_jsonl(store, tmp_path / "no" / "o.jsonl")
    assert export_jsonl(store, tmp_path / "o.jsonl", kind="math") == 0
    assert (tmp_path / "o.jsonl").read_text() == ""
    assert not list(tmp_path.glob("*.part"))


def test_batches_cover_many_lines(tmp_path):
    # 1,234 lines span three 500-line batches; a bad line in each batch keeps its exact line number.
    lines = [json.dumps({"text": f"line {i}"}) if i % 500 != 7 else "oops" for i in range(1234)]
    result = import_jsonl(Store.memory(), write_lines(tmp_path / "many.jsonl", lines))
    assert result.invalid == 3 and [n for n, _ in result.errors] == [8, 508, 1008]
    assert result.inserted == 1231

"""The dataset store: migrations from a blank database, content-hash ids, stable splits, provenance, validation."""

import sqlite3
import unicodedata

import pytest
import sqlite_utils

from instar.datasets.migrations import MIGRATIONS, migrate
from instar.datasets.store import Provenance, Store, record_id, split_of, validate_record
from instar.errors import InstarError

EXPECTED_COLUMNS = {
    "_instar_migrations": ["name", "applied_at"],
    "records": ["id", "kind", "split", "data", "n_chars", "run_id", "source", "backend", "model", "template",
                "seed", "created_at", "topic", "document"],
    "runs": ["id", "kind", "stage", "name", "status", "config", "out_dir", "parent_id", "started_at",
             "finished_at", "summary"],
    "metrics": ["id", "run_id", "step", "name", "value", "created_at"],
    "samples": ["id", "run_id", "step", "prompt", "completion", "reward", "extra", "created_at"],
    "failures": ["id", "run_id", "kind", "reason", "raw", "seed", "created_at"],
}

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_migrations_from_blank_database(db_path):
    db = sqlite_utils.Database(db_path)
    applied = migrate(db)
    assert applied == [fn.__name__ for fn in MIGRATIONS]
    # Tables other migrations add later must be listed here too: this is the schema's one snapshot.
    assert set(db.table_names()) == set(EXPECTED_COLUMNS)
    for table, columns in EXPECTED_COLUMNS.items():
        assert [c.name for c in db[table].columns] == columns, table
    assert migrate(db) == []  # re-running is a no-op
    assert db["_instar_migrations"].count == len(MIGRATIONS)


def test_open_sets_wal_and_reopens(db_path):
    store = Store.open(db_path)
    assert store.db.journal_mode == "wal"
    store.add("text", [{"text": "kept"}])
    assert Store.open(db_path).count("text") == 1


def test_open_refuses_a_file_that_is_not_a_database(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("this is not sqlite" * 100)
    with pytest.raises(InstarError, match="cannot open database"):
        Store.open(bad)
    with pytest.raises(InstarError, match="directory"):
        Store.open(tmp_path)


def test_insert_is_idempotent(store):
    first = store.add("messages", [CHAT, {"messages": CHAT["messages"]}])
    assert (first.inserted, first.duplicates) == (1, 1)  # a repeat inside one batch
    again = store.add("messages", [CHAT])
    assert (again.inserted, again.duplicates) == (0, 1)
    assert again.ids == first.ids
    assert store.count("messages") == 1


def test_judge_scores_do_not_make_a_new_record(store):
    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"}
    store.add("preference", [pair])
    result = store.add("preference", [{**pair, "score_chosen": 9.0, "score_rejected": 2.0, "margin": 7.0}])
    assert result.inserted == 0 and store.count("preference") == 1


def test_split_is_stable_when_the_dataset_grows(store):
    rid = store.add("text", [{"text": "the record we watch"}]).ids[0]
    before = store.db["records"].get(rid)["split"]
    store.add("text", [{"text": f"other document {i}"} for i in range(1000)])
    assert store.db["records"].get(rid)["split"] == before == split_of(rid)
    counts = {s: store.count("text", s) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 1001
    assert 850 <= counts["train"] <= 950 and counts["val"] > 10 and counts["test"] > 10  # ~90/5/5


def test_ids_are_content_hashes():
    a = validate_record("text", {"text": "  same text "})
    b = validate_record("text", {"text": "same text"})
    assert record_id("text", a) == record_id("text", b)  # normalised before hashing
    assert record_id("text", a) != record_id("math", {"question": "same text", "answer": "1"})


def test_provenance_is_stored(store):
    prov = Provenance(source="llama_cpp", run_id="corpus-1", backend="llama_cpp", model="smollm2",
                      template="corpus-v1", seed=7)
    rid = store.add("text", [{"text": "a generated doc"}], prov).ids[0]
    row = store.db["records"].get(rid)
    assert {k: row[k] for k in ("run_id", "source", "backend", "model", "template", "seed")} == {
        "run_id": "corpus-1", "source": "llama_cpp", "backend": "llama_cpp", "model": "smollm2",
        "template": "corpus-v1", "seed": 7}
    assert row["created_at"] > 0 and row["n_chars"] == len(row["data"])


@pytest.mark.parametrize("kind, data, message", [
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     "messages.1.content: must not be empty"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "roles must alternate"),
    ("messages", {"messages": [{"role": "bot", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages.0.role"),
    ("text", {"text": "ok", "title": "x"}, "title: unknown field"),
    ("text", {}, "text: required field is missing"),
    ("text", {"text": 3}, "text: Input should be a valid string"),
    ("preference", {"prompt": [{"role": "user", "content": "q"}], "chosen": "same", "rejected": "same"},
     "chosen and rejected must differ"),
    ("math", {"question": "q", "answer": "1", "difficulty": 11}, "difficulty"),
    ("nope", {"text": "x"}, "unknown kind"),
])
def test_validation_errors_name_the_field(store, kind, data, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        store.add(kind, [data])
    assert store.count() == 0


def test_a_bad_record_rolls_back_its_whole_batch(store):
    with pytest.raises(ValueError):
        store.add("text", [{"text": "fine"}, {"text": ""}])
    assert store.count() == 0


def test_unicode_is_nfc_normalised():
    decomposed = "cafe\u0301 \u212b"  # e + combining acute; the angstrom sign
    out = validate_record("text", {"text": decomposed})["text"]
    assert out == unicodedata.normalize("NFC", decomposed) == "caf\u00e9 \u00c5"
    assert validate_record("text", {"text": "a\r\nb\tc\n"})["text"] == "a\nb\tc"  # CRLF -> LF, tab kept


@pytest.mark.parametrize("bad", ["nul\x00byte", "bell\x07", "escape\x1b[31m", "del\x7f", "c1\x85", "lone\ud800"])
def test_control_characters_and_surrogates_are_refused(bad):
    with pytest.raises(ValueError, match="text: .*(control character|surrogate|unicode)"):
        validate_record("text", {"text": bad})


def test_failures_keep_raw_text_and_reason(store):
    store.add_failure("schema: answer missing", '{"question": "q"}', kind="math", run_id="r1", seed=3)
    (row,) = store.db["failures"].rows
    assert (row["reason"], row["raw"], row["kind"], row["run_id"], row["seed"]) == (
        "schema: answer missing", '{"question": "q"}', "math", "r1", 3)


def test_records_iter_rows_stats_and_require(store):
    store.add("text", [{"text": f"doc {i}"} for i in range(20)])
    assert len(store.records("text", limit=5)) == 5
    rows = list(store.iter_rows("text"))
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert sum(store.count("text", s) for s in ("train", "val", "test")) == 20
    stats = store.stats()
    assert sum(n for _, _, n in stats["by_split"]) == 20
    assert stats["lengths"]["text"]["min"] <= stats["lengths"]["text"]["median"] <= stats["lengths"]["text"]["max"]
    with pytest.raises(InstarError, match="need at least 100 'text' records"):
        store.require("text", "train", 100)


def test_nested_adds_share_one_transaction(store):
    with pytest.raises(RuntimeError):
        with store.writing():
            store.add("text", [{"text": "first"}])
            store.add_failure("x", "raw")
            raise RuntimeError("killed before the batch ended")
    assert store.count() == 0 and store.db["failures"].count == 0


def test_integrity_after_normal_use(db_path):
    store = Store.open(db_path)
    store.add("text", [{"text": "x"}])
    con = sqlite3.connect(db_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_concurrent_first_opens_migrate_once(tmp_path):
    """Four processes' worth of connections open the same new database at once (threads, separate connections),
    on 100 new databases: SQLite refuses the switch to WAL at once ("database is locked", no busy wait) about once
    in 150 such opens, so a single try would pass by luck."""
    from concurrent.futures import ThreadPoolExecutor

    def open_and_look(path):
        store = Store.open(path)
        return store.db["_instar_migrations"].count, [c.name for c in store.db["records"].columns]

    with ThreadPoolExecutor(4) as pool:
        for n in range(100):
            seen = list(pool.map(open_and_look, [tmp_path / f"shared{n}.db"] * 4))
            assert seen == [(len(MIGRATIONS), EXPECTED_COLUMNS["records"])] * 4


def test_a_second_writer_waits_instead_of_failing(db_path):
    """Two processes writing one database (two connections here): while one write transaction that read first
    is open, another connection's write waits for it, and both land. With a DEFERRED transaction the second
    writer commits in between and the first one's write fails at once ("database is locked")."""
    import threading
    import time

    first = Store.open(db_path)
    Store.open(db_path)  # migrated before the threads start
    done = []

    def second_writer():
        other = Store.open(db_path)
        other.add("text", [{"text": "from the other process"}])
        done.append(time.monotonic())

    with first.writing():
        assert first.count("text") == 0  # a read inside the transaction, before its write
        thread = threading.Thread(target=second_writer)
        thread.start()
        time.sleep(0.5)  # the other writer is waiting for the lock by now
        assert not done
        first.add("text", [{"text": "from this process"}])
        committed = time.monotonic()
    thread.join(10)
    assert done and done[0] >= committed and first.count("text") == 2
    assert first.db["runs"].count == 0  # and runs' writes go through the same door:
    from instar.datasets import runs

    run_id = runs.start_run(first, kind="train", stage="sft")
    runs.log_metrics(first, run_id, 1, {"loss": 1.0})
    assert first.db["metrics"].count == 1

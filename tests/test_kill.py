"""A large import killed with SIGKILL mid-way leaves an intact database of whole, valid records; re-running finishes it.

The import runs in a subprocess through the real CLI (`python -m instar.cli data import`); the test waits until a
few batches are committed, then kills it without warning, so the kill lands inside a later batch.
"""

import json
import signal
import sqlite3
import subprocess
import sys
import time

from instar.datasets.jsonl import import_jsonl
from instar.datasets.store import Store, record_id, split_of, validate_record

N_LINES = 40_000


def make_file(path) -> int:
    """A mixed-kind JSONL file with one bad line in every 97; return the number of valid lines."""
    valid = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N_LINES):
            if i % 97 == 13:
                f.write('{"text": "broken\n')
                continue
            if i % 3 == 0:
                line = {"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 3}
            elif i % 3 == 1:
                line = {"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                     {"role": "assistant", "content": f"{i + 1}"}]}
            else:
                line = {"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"{i + 1}"}
            f.write(json.dumps(line) + "\n")
            valid += 1
    return valid


def count_records(db_path) -> int:
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("select count(*) from records").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # not created or not migrated yet
        return 0


def test_sigkill_mid_import_leaves_intact_valid_database_and_rerun_completes(tmp_path):
    src, db_path = tmp_path / "big.jsonl", tmp_path / "instar.db"
    n_valid = make_file(src)
    proc = subprocess.Popen([sys.executable, "-m", "instar.cli", "data", "import", str(src), "--db", str(db_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while count_records(db_path) < 2_000 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"import ended before the kill: {proc.stderr.read().decode()[-500:]}"

    con = sqlite3.connect(db_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()

    store = Store.open(db_path)
    partial = store.count()
    assert 0 < partial < n_valid, partial  # killed mid-way: some, not all
    for row in store.db.execute("select id, kind, split, data from records"):
        rid, kind, split, data = row
        data = json.loads(data)
        assert validate_record(kind, data) == data
        assert record_id(kind, data) == rid and split_of(rid) == split
    assert [r[0] for r in store.db.execute("select status from runs where kind = 'import'")] == ["running"]

    result = import_jsonl(store, src)  # the same command again
    assert result.lines == N_LINES and result.invalid == N_LINES - n_valid
    assert result.inserted == n_valid - partial and result.duplicates == partial
    assert store.count() == n_valid
    assert store.db.execute("select count(distinct id) from records").fetchone()[0] == n_valid
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

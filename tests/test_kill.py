"""Real signals to real processes, through the CLI (`python -m instar.cli ...` in a subprocess):
- a large import killed with SIGKILL mid-way leaves an intact database of whole, valid records; re-running finishes it;
- `instar train` stopped by SIGINT (Ctrl-C) exits 130 with a checkpoint of the last finished step, and by SIGKILL
  leaves its last periodic checkpoint and a run row marked `running`; the same command resumes either, and ends
  with the parameters and curves of an uninterrupted run; a run SIGKILLed before any checkpoint is marked `killed`
  when the command starts over.
The tests wait for a checkpoint (or the run row) to appear, then signal, so the signal lands inside a later step.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import torch

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


# --- instar train ------------------------------------------------------------------------------------------------
TRAIN = ["batch_size=4", "max_len=32", "log_every=1", "eval_batches=1", "sample_tokens=4", "dtype=fp32",
         "eval_every=0", "max_steps=60", "warmup=2"]


def train_proc(db_path, out, *sets):
    args = [a for s in (*TRAIN, f"out={out}", *sets) for a in ("--set", s)]
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-m", "instar.cli", "train", "pretrain", "--db", str(db_path), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def wait_for(path, proc, timeout=180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists() and proc.poll() is None, "the run ended (or stalled) before the signal"


def train_world(tmp_path):
    from instar.train import run_stage
    from train_fixtures import fill_store

    store = Store.open(tmp_path / "instar.db")
    fill_store(store, n_docs=150, n_convs=0)
    whole = run_stage("pretrain", None, TRAIN + [f"out={tmp_path}/whole", "save_every=5"], store)
    return store, whole


def run_row(store, out) -> dict:
    from instar.datasets import runs

    return runs.get_run(store, json.loads((out / "run.json").read_text())["run_id"])


def test_ctrl_c_and_sigkill_mid_training_resume_to_the_same_model(tmp_path):
    from instar.train import run_stage
    from train_fixtures import assert_same_run

    store, whole = train_world(tmp_path)
    for sig, out in ((signal.SIGINT, tmp_path / "ctrl_c"), (signal.SIGKILL, tmp_path / "killed")):
        proc = train_proc(store.path, out, "save_every=5")
        wait_for(out / "checkpoint" / "state.pt", proc)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        err = proc.stderr.read().decode()
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
            assert run_row(store, out)["status"] == "interrupted"
        else:
            assert proc.returncode == -signal.SIGKILL and run_row(store, out)["status"] == "running"
        step = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
        assert 5 <= step < 60, step
        run_id = run_row(store, out)["id"]
        resumed = run_stage("pretrain", None, TRAIN + [f"out={out}", "save_every=5"], store)
        assert resumed["run_id"] == run_id and run_row(store, out)["status"] == "done"
        assert_same_run(store, whole, resumed, tmp_path / "whole", out, tol=1e-5)


def test_a_run_killed_before_its_first_checkpoint_is_marked_killed_when_restarted(tmp_path):
    from instar.datasets import runs
    from instar.train import run_stage
    from train_fixtures import fill_store

    store = Store.open(tmp_path / "instar.db")
    fill_store(store, n_docs=150, n_convs=0)
    out = tmp_path / "p"
    proc = train_proc(store.path, out, "save_every=0", "max_steps=2000")
    wait_for(out / "run.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (old,) = runs.list_runs(store, stage="pretrain")
    assert old["status"] == "running" and not (out / "checkpoint").exists()
    summary = run_stage("pretrain", None, TRAIN + [f"out={out}", "max_steps=3"], store)
    assert runs.get_run(store, old["id"])["status"] == "killed"
    assert summary["run_id"] != old["id"] and runs.get_run(store, summary["run_id"])["status"] == "done"

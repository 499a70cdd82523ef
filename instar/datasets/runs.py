"""Runs, metrics, samples and failures: written by generate AND train; the report reads only these.

    run = start_run(store, kind="train", stage="sft", config=cfg.model_dump(), out_dir="runs/sft")
    log_metrics(store, run, step=10, values={"loss": 2.31, "lr": 3e-4})
    log_samples(store, run, step=10, samples=[{"prompt": "...", "completion": "...", "reward": 1.0}])
    finish_run(store, run, status="done", summary={...})

A run id is `<stage>-<yyyymmdd-hhmmss>-<4 hex>`; a resumed run keeps its id (`resume_run`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from instar.datasets.store import Store


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def start_run(store: Store, *, kind: str, stage: str, config: dict | None = None, out_dir: str | None = None,
              parent_id: str | None = None, name: str | None = None) -> str:
    run_id = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"
    with store.writing():
        store.db["runs"].insert({"id": run_id, "kind": kind, "stage": stage, "name": name or stage,
                                 "status": "running", "config": _json(config or {}), "out_dir": out_dir,
                                 "parent_id": parent_id, "started_at": time.time()})
    return run_id


def resume_run(store: Store, run_id: str) -> None:
    """Mark an existing run as running again (after a crash or Ctrl-C)."""
    with store.writing():
        store.db["runs"].update(run_id, {"status": "running", "finished_at": None})


def finish_run(store: Store, run_id: str, *, status: str = "done", summary: dict | None = None) -> None:
    updates: dict[str, Any] = {"status": status, "finished_at": time.time()}
    if summary is not None:
        updates["summary"] = _json(summary)
    with store.writing():
        store.db["runs"].update(run_id, updates)


def log_metrics(store: Store, run_id: str, step: int, values: dict[str, float]) -> None:
    now = time.time()
    rows = [{"run_id": run_id, "step": step, "name": k, "value": float(v), "created_at": now}
            for k, v in values.items() if v is not None]
    with store.writing():
        store.db["metrics"].insert_all(rows)


def log_samples(store: Store, run_id: str, step: int, samples: list[dict]) -> None:
    """Each sample: prompt, completion, optional reward, anything else goes to `extra` as JSON."""
    now = time.time()
    rows = []
    for s in samples:
        extra = {k: v for k, v in s.items() if k not in ("prompt", "completion", "reward")}
        rows.append({"run_id": run_id, "step": step, "prompt": s.get("prompt"), "completion": s.get("completion"),
                     "reward": s.get("reward"), "extra": _json(extra) if extra else None, "created_at": now})
    with store.writing():
        store.db["samples"].insert_all(rows)


def get_run(store: Store, run_id: str) -> dict | None:
    rows = list(store.db["runs"].rows_where("id = ?", [run_id]))
    if not rows:
        return None
    run = rows[0]
    run["config"] = json.loads(run["config"] or "{}")
    run["summary"] = json.loads(run["summary"]) if run.get("summary") else None
    return run


def list_runs(store: Store, kind: str | None = None, stage: str | None = None) -> list[dict]:
    where, args = [], []
    if kind:
        where.append("kind = ?")
        args.append(kind)
    if stage:
        where.append("stage = ?")
        args.append(stage)
    return list(store.db["runs"].rows_where(" and ".join(where) or None, args, order_by="started_at"))


def metric_series(store: Store, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(r[0], r[1]) for r in store.db.execute(
        "select step, value from metrics where run_id = ? and name = ? order by step, id", [run_id, name])]


def run_samples(store: Store, run_id: str) -> list[dict]:
    return list(store.db["samples"].rows_where("run_id = ?", [run_id], order_by="id"))


def child_runs(store: Store, parent_id: str) -> list[dict]:
    """Runs started under a pipeline run (`parent_id`), oldest first."""
    return list(store.db["runs"].rows_where("parent_id = ?", [parent_id], order_by="started_at"))


def metric_names(store: Store, run_id: str) -> list[str]:
    """Every metric name a run logged, in the order first logged."""
    return [r[0] for r in store.db.execute(
        "select name from metrics where run_id = ? group by name order by min(id)", [run_id])]


def set_parent(store: Store, run_id: str, parent_id: str) -> None:
    """Attach a run to a pipeline run (stages open their own rows; `instar run` ties them together)."""
    with store.writing():
        store.db["runs"].update(run_id, {"parent_id": parent_id})


def forget_after(store: Store, run_id: str, step: int) -> None:
    """Drop metrics and samples logged after `step`: a run resumed from that step's checkpoint logs them again."""
    with store.writing():
        store.db.execute("delete from metrics where run_id = ? and step > ?", [run_id, step])
        store.db.execute("delete from samples where run_id = ? and step > ?", [run_id, step])

"""Append-only numbered migrations: the only place instar's tables are defined.

Add a new function at the end decorated with `@migration`; never edit one that has shipped. Each runs
once, inside a transaction, and is recorded in `_instar_migrations` (the pattern of simonw/llm).

Tables
    records   one row per distinct record (id = content hash), its kind, split and provenance (m002: the topic
              it was written about, the document passage it came from)
    runs      one row per generate/train/pipeline run, with its resolved config and status
    metrics   (run, step, name, value): every number a report draws
    samples   model outputs kept for reading: prompts, completions, rewards
    failures  every rejected output with its reason and raw text
"""

from __future__ import annotations

import time
from typing import Callable

import sqlite_utils

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["records"].create(
        {"id": str, "kind": str, "split": str, "data": str, "n_chars": int, "run_id": str, "source": str,
         "backend": str, "model": str, "template": str, "seed": int, "created_at": float},
        pk="id", not_null={"kind", "split", "data"},
    )
    db["records"].create_index(["kind", "split"])
    db["runs"].create(
        {"id": str, "kind": str, "stage": str, "name": str, "status": str, "config": str, "out_dir": str,
         "parent_id": str, "started_at": float, "finished_at": float, "summary": str},
        pk="id", not_null={"kind", "status"},
    )
    db["metrics"].create(
        {"id": int, "run_id": str, "step": int, "name": str, "value": float, "created_at": float},
        pk="id", not_null={"run_id", "name"},
    )
    db["metrics"].create_index(["run_id", "name"])
    db["samples"].create(
        {"id": int, "run_id": str, "step": int, "prompt": str, "completion": str, "reward": float,
         "extra": str, "created_at": float},
        pk="id", not_null={"run_id"},
    )
    db["samples"].create_index(["run_id"])
    db["failures"].create(
        {"id": int, "run_id": str, "kind": str, "reason": str, "raw": str, "seed": int, "created_at": float},
        pk="id", not_null={"reason"},
    )
    db["failures"].create_index(["kind", "reason"])


@migration
def m002_records_topic_document(db: sqlite_utils.Database) -> None:
    """Provenance of steered generation: `topic` (what the item was asked to be about) and `document`
    ("file#passage" it was grounded in, or the file an imported document was cut from)."""
    db["records"].add_column("topic", str)
    db["records"].add_column("document", str)


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply every pending migration in order; return the names applied.

    Each runs inside `BEGIN IMMEDIATE` (the write lock is taken before the check), so two processes opening
    a new database at the same moment apply each migration exactly once, and a kill mid-migration rolls it back.
    """
    table = db["_instar_migrations"]
    db.execute('create table if not exists "_instar_migrations" ("name" TEXT PRIMARY KEY, "applied_at" FLOAT)')
    applied = []
    for fn in MIGRATIONS:
        if _applied(db, fn.__name__):
            continue
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            if not _applied(db, fn.__name__):  # another process may have applied it while we waited
                fn(db)  # sqlite-utils nests its own writes as savepoints inside this transaction
                table.insert({"name": fn.__name__, "applied_at": time.time()})
                applied.append(fn.__name__)
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
    return applied


def _applied(db: sqlite_utils.Database, name: str) -> bool:
    return db.execute('select 1 from "_instar_migrations" where name = ?', [name]).fetchone() is not None

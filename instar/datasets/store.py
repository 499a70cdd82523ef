"""Records in, validated records out: the one door into instar's SQLite database.

    store = Store.open("instar.db")               # creates + migrates; WAL mode
    store.add("text", [{"text": "..."}], Provenance(source="import"))  -> AddResult(inserted=1, duplicates=0)
    store.records("text", split="train")          # list of validated dicts
    store.count("math")

Ids are content hashes (sha256 of the kind and the record's canonical JSON), so inserting the same
record twice keeps one row and a re-run of any job is idempotent. The split is derived from the id
(90% train / 5% val / 5% test), so a record never changes split when the dataset grows. Each `add`
call is one transaction: a process killed mid-way leaves whole batches only. Several calls can share one
transaction inside `with store.writing():` (nested calls become savepoints), as `data import` does.

Several processes may use one database at once (`instar generate` in one terminal, `instar train` in another;
`instar run`'s teacher child): every write transaction takes SQLite's write lock when it begins
(`Store.writing`, BEGIN IMMEDIATE), so a second writer waits for it (busy timeout, 30 s) instead of failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlite_utils
from pydantic import BaseModel, ValidationError

from instar.datasets.migrations import migrate
from instar.errors import InstarError
from instar.schemas.records import KINDS

DEFAULT_DB = "instar.db"
SPLITS = ("train", "val", "test")
BUSY_TIMEOUT_S = 30


def default_db_path() -> Path:
    return Path(os.environ.get("INSTAR_DB") or DEFAULT_DB)


def canonical_json(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def record_id(kind: str, data: dict) -> str:
    """Content hash over the fields that define the record (judge scores do not make a new pair)."""
    key = {k: v for k, v in data.items() if k not in ("score_chosen", "score_rejected", "margin",
                                                       "solution", "family", "difficulty", "verified_by")}
    return hashlib.sha256(f"{kind}\n{canonical_json(key)}".encode()).hexdigest()[:20]


def split_of(rid: str) -> str:
    """Deterministic split from the id: 90/5/5."""
    bucket = int(rid[:8], 16) % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def format_error(e: ValidationError) -> str:
    """pydantic's report as one line: `messages.1.content: must not be empty`."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "record"
    msg = {"extra_forbidden": "unknown field", "missing": "required field is missing"}.get(
        err["type"], err["msg"].removeprefix("Value error, "))
    return f"{loc}: {msg}"


def validate_record(kind: str, data: Any) -> dict:
    """Validate `data` as a `kind` record and return its normalised dict; raise ValueError with one line."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    try:
        model = KINDS[kind].model_validate(data.model_dump() if isinstance(data, BaseModel) else data)
    except ValidationError as e:
        raise ValueError(format_error(e)) from None
    data = model.model_dump(exclude_none=True)
    try:  # fields without text cleaning (e.g. math.family) could still carry a lone surrogate
        canonical_json(data).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("record: contains an unpaired surrogate (not valid Unicode)") from None
    return data


@dataclass
class Provenance:
    """Where a record came from. `source` is 'import', 'procedural', or the generating backend."""

    source: str = "import"
    run_id: str | None = None
    backend: str | None = None
    model: str | None = None
    template: str | None = None
    seed: int | None = None
    topic: str | None = None  # what the item was asked to be about (a built-in pool entry or the user's topic)
    document: str | None = None  # "file#passage" the record was grounded in or cut from


@dataclass
class AddResult:
    inserted: int = 0
    duplicates: int = 0
    ids: list[str] = field(default_factory=list)


def _until_unlocked(step) -> None:
    """Run `step`, again while SQLite answers "database is locked" without waiting, for up to the busy timeout.

    Switching a new database to WAL needs every other connection out of the way, and SQLite refuses that at once
    rather than calling the busy handler: four processes opening one new database together saw it about once in
    150 opens. `step` must be idempotent (the WAL switch and the migrations are).
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Store:
    def __init__(self, db: sqlite_utils.Database, path: Path | None = None):
        self.db = db
        self.path = path

    @classmethod
    def open(cls, path: str | Path | None = None) -> "Store":
        path = Path(path) if path is not None else default_db_path()
        if path.exists() and path.is_dir():
            raise InstarError(f"database path is a directory: {path}")
        if not path.parent.exists():
            raise InstarError(f"database folder does not exist: {path.parent}")
        try:
            db = sqlite_utils.Database(path)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")  # wait for another writer, not fail
            _until_unlocked(lambda: (db.enable_wal(), migrate(db)))
        except Exception as e:  # sqlite3.DatabaseError: file is not a database, locked, ...
            raise InstarError(f"cannot open database {path}: {e}") from None
        return cls(db, path)

    @classmethod
    def memory(cls) -> "Store":
        db = sqlite_utils.Database(memory=True)
        migrate(db)
        return cls(db)

    # -- writing --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator["Store"]:
        """One write transaction (a savepoint inside an open one) that holds SQLite's write lock from its start.

        sqlite-utils' `atomic()` begins DEFERRED: a transaction that reads first (an insert looks up its table)
        and then writes fails at once with "database is locked" when another process committed in between (WAL
        mode cannot upgrade a stale read snapshot, and no busy timeout helps): an `instar run` training SFT beside
        an `instar train sft` on the same database died writing its 260th step's metrics. BEGIN IMMEDIATE waits
        for the lock instead (busy timeout), and then nothing can go stale."""
        if self.db.conn.in_transaction:
            with self.db.atomic():
                yield self
            return
        self.db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self.db.conn.execute("COMMIT")
        except BaseException:  # the body, or COMMIT itself: never leave the transaction open (as atomic() does)
            self.db.conn.rollback()
            raise

    def add(self, kind: str, records: Iterable[Any], prov: Provenance | None = None,
            *, validated: bool = False) -> AddResult:
        """Insert records of one kind in one transaction. Duplicates (same content id) are skipped.

        Raises ValueError on the first invalid record unless `validated` says they already are."""
        prov = prov or Provenance()
        now = time.time()
        rows, seen, repeats = [], set(), 0
        for rec in records:
            data = rec if validated else validate_record(kind, rec)
            rid = record_id(kind, data)
            if rid in seen:
                repeats += 1
                continue
            seen.add(rid)
            text = canonical_json(data)
            rows.append({"id": rid, "kind": kind, "split": split_of(rid), "data": text, "n_chars": len(text),
                         "run_id": prov.run_id, "source": prov.source, "backend": prov.backend,
                         "model": prov.model, "template": prov.template, "seed": prov.seed, "topic": prov.topic,
                         "document": prov.document, "created_at": now})
        result = AddResult(duplicates=repeats, ids=[r["id"] for r in rows])
        if not rows:
            return result
        with self.writing():  # one transaction per batch (a savepoint inside a caller's transaction)
            existing = self.existing_ids([r["id"] for r in rows])
            fresh = [r for r in rows if r["id"] not in existing]
            if fresh:
                self.db["records"].insert_all(fresh, batch_size=500)
        result.inserted = len(fresh)
        result.duplicates += len(rows) - len(fresh)
        return result

    def existing_ids(self, ids: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(f"select id from records where id in ({marks})", chunk))
        return found

    def add_failure(self, reason: str, raw: str | None = None, *, kind: str | None = None,
                    run_id: str | None = None, seed: int | None = None) -> None:
        with self.writing():
            self.db["failures"].insert({"run_id": run_id, "kind": kind, "reason": reason, "raw": raw,
                                        "seed": seed, "created_at": time.time()})

    # -- reading --------------------------------------------------------------------------------------
    def records(self, kind: str, split: str | None = None, limit: int | None = None) -> list[dict]:
        """Records of `kind` (optionally one split) in a stable order (by id)."""
        where, args = "kind = ?", [kind]
        if split is not None:
            where += " and split = ?"
            args.append(split)
        sql = f"select data from records where {where} order by id"
        if limit is not None:
            sql += f" limit {int(limit)}"
        return [json.loads(row[0]) for row in self.db.execute(sql, args)]

    def iter_rows(self, kind: str | None = None, split: str | None = None,
                  limit: int | None = None) -> Iterator[dict]:
        """Stream stored rows (id, kind, split, source, topic, data as a dict) ordered by kind, then id."""
        where, args = self._where(kind, split)
        sql = f"select id, kind, split, source, topic, data from records{where} order by kind, id"
        if limit is not None:
            sql += f" limit {int(limit)}"
        for rid, k, sp, source, topic, data in self.db.execute(sql, args):
            yield {"id": rid, "kind": k, "split": sp, "source": source, "topic": topic, "data": json.loads(data)}

    def stats(self) -> dict:
        """Plain numbers for `instar data stats`: counts by kind x split and by source, lengths, failures."""
        q = self.db.execute
        lengths = {}
        for (kind,) in q("select distinct kind from records order by kind").fetchall():
            sizes = [r[0] for r in q("select n_chars from records where kind = ? order by n_chars", [kind])]
            lengths[kind] = {"min": sizes[0], "median": sizes[len(sizes) // 2],
                             "p90": sizes[min(len(sizes) - 1, int(len(sizes) * 0.9))], "max": sizes[-1]}
        return {
            "by_split": q("select kind, split, count(*) from records group by kind, split").fetchall(),
            "by_source": q("select kind, coalesce(source, '-'), coalesce(model, '-'), count(*) from records "
                           "group by 1, 2, 3 order by 1, 4 desc").fetchall(),
            "lengths": lengths,  # characters of the stored canonical JSON, per kind
            "failures": q("select coalesce(kind, '-'), reason, count(*) from failures group by 1, 2 "
                          "order by 3 desc, 1, 2").fetchall(),
        }

    @staticmethod
    def _where(kind: str | None, split: str | None, procedural: bool | None = None) -> tuple[str, list]:
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if split is not None:
            where.append("split = ?")
            args.append(split)
        if procedural is not None:
            where.append("coalesce(source, '') " + ("=" if procedural else "!=") + " 'procedural'")
        return (" where " + " and ".join(where) if where else ""), args

    def count(self, kind: str | None = None, split: str | None = None, procedural: bool | None = None) -> int:
        """Stored records, optionally of one kind and split; `procedural` True counts only what instar built itself
        (source 'procedural': SFT math conversations, corpus requests, procedural pairs and problems), False only
        the rest (a model wrote it, or it was imported)."""
        where, args = self._where(kind, split, procedural)
        return self.db.execute("select count(*) from records" + where, args).fetchone()[0]

    def require(self, kind: str, split: str, minimum: int = 1) -> list[dict]:
        """Records of a split, or a clear error saying how to get them."""
        rows = self.records(kind, split)
        if len(rows) < minimum:
            where = f" in {self.path}" if self.path else ""
            raise InstarError(f"need at least {minimum} {kind!r} records in split {split!r}{where}, found "
                              f"{len(rows)}: run `instar generate` or `instar data import` first")
        return rows

"""Import and export JSONL: one JSON object per line, in the shapes users and TRL already know.

    result = import_jsonl(store, "data.jsonl")                 # kind inferred from each line's fields
    result = import_jsonl(store, "pairs.jsonl", kind="preference")
    n = export_jsonl(store, "math.jsonl", kind="math", split="train")
    kind, records = read_records("heldout.jsonl")              # `instar eval`: one kind, every line valid

Shapes read (-> the kind stored):
    {"text"}                                     -> text
    {"messages"}                                 -> messages
    {"instruction", "input"?, "output"} (Alpaca) -> messages: user = instruction (+ blank line + input), assistant = output
    {"prompt", "chosen", "rejected"}             -> preference; prompt a string (one user turn) or messages; chosen and
                                                    rejected strings or one-message assistant lists (TRL conversational)
    {"question" | "prompt", "answer", ...}       -> math; a numeric answer is kept as its string ("42")
Export writes each record in its stored, canonical shape, so export then import gives the same ids.

Nothing is dropped silently: every non-blank line ends up inserted, a duplicate of a stored record, or invalid.
Invalid lines are kept in the result (line number + one-line reason) and as `failures` rows (reason prefixed
`import:`, raw line cut to 2,000 characters, linked to the import's run). Lines go in in batches of 500, one
transaction each (records and failures together), so a killed import leaves whole batches and re-running it
finishes the job: content-hash ids make the re-inserts no-ops.

Simplifications: a line over 8 MiB is rejected unparsed (a valid record is at most ~1.3 MB of JSON); the result
keeps the first 1,000 invalid lines (the count is exact, and every one is in `failures`); a re-run logs its
invalid lines again, under its own run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from instar.datasets.runs import finish_run, start_run
from instar.datasets.store import SPLITS, Provenance, Store, validate_record
from instar.errors import InputError, InstarError
from instar.schemas.records import KINDS

BATCH_LINES = 500  # lines per transaction: ~10 ms of work, so a kill loses at most one small batch
MAX_LINE_BYTES = 8 * 1024 * 1024
RAW_LIMIT = 2_000  # characters of a bad line kept in `failures`
KEEP_ERRORS = 1_000


@dataclass
class ImportResult:
    path: str
    run_id: str | None = None
    lines: int = 0  # non-blank lines read; = inserted + duplicates + invalid
    blank: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    by_kind: Counter = field(default_factory=Counter)  # valid lines per kind (inserted or duplicate)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason), first KEEP_ERRORS


# ---------------------------------------------------------------------------------------------------------
# one line -> (kind, validated record)

def infer_kind(obj: dict) -> str:
    if "messages" in obj:
        return "messages"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "instruction" in obj and "output" in obj:
        return "messages"  # Alpaca
    if "answer" in obj and ("question" in obj or "prompt" in obj):
        return "math"
    if "text" in obj:
        return "text"
    fields = ", ".join(sorted(obj)[:8]) or "none"
    raise ValueError(f"cannot tell the kind from its fields ({fields}); expected text, messages, "
                     "prompt+chosen+rejected, question+answer or instruction+output")


def _as_completion(name: str, value):
    """TRL's conversational form writes a completion as `[{"role": "assistant", "content": ...}]`."""
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
            return value[0].get("content")
        raise ValueError(f"{name}: expected a string or a single assistant message")
    return value


def to_record(kind: str, obj: dict) -> dict:
    """Map an accepted input shape onto the stored shape of `kind`; validation happens after."""
    obj = dict(obj)
    if kind == "messages" and "messages" not in obj and "instruction" in obj:
        instruction, extra, output = obj.pop("instruction"), obj.pop("input", None), obj.pop("output", None)
        for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: must be a string")
        user = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
        obj["messages"] = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif kind == "preference":
        if isinstance(obj.get("prompt"), str):
            obj["prompt"] = [{"role": "user", "content": obj["prompt"]}]
        for name in ("chosen", "rejected"):
            if name in obj:
                obj[name] = _as_completion(name, obj[name])
    elif kind == "math":
        if "question" not in obj and "prompt" in obj:
            obj["question"] = obj.pop("prompt")
        answer = obj.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            obj["answer"] = str(int(answer)) if float(answer).is_integer() else str(answer)
    return obj


class KindError(ValueError):
    """A line whose kind is known but whose fields are not valid for it (the kind goes into `failures`)."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind


def parse_line(raw: bytes, kind: str | None = None) -> tuple[str, dict]:
    """Decode, parse, map and validate one line; raise ValueError with a one-line reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        obj = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON: {e.msg.removesuffix(' at')} at column {e.colno}") from None
    except RecursionError:
        raise ValueError("bad JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    kind = kind or infer_kind(obj)
    try:
        return kind, validate_record(kind, to_record(kind, obj))
    except ValueError as e:
        raise KindError(str(e), kind) from None


def read_lines(f: BinaryIO) -> Iterator[tuple[int, bytes, int]]:
    """(line number, bytes, size); a line over MAX_LINE_BYTES yields only its head and is never held whole."""
    number = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        size = len(line)
        if size > MAX_LINE_BYTES and not line.endswith(b"\n"):
            line = line[:RAW_LIMIT * 4]
            while chunk := f.readline(1 << 20):  # skip the rest of the line, counting it
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        yield number, line, size


def read_records(path: str | Path, kind: str | None = None) -> tuple[str, list[dict]]:
    """(kind, validated records) of a file that must be whole and of one kind (`instar eval` scores it as given):
    the first invalid line, or a line of another kind, stops with `path:line: reason`."""
    _check_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise InstarError(f"data file not found: {path}")
    records: list[dict] = []
    with open(path, "rb") as f:
        for number, raw, size in read_lines(f):
            if not raw.strip():
                continue
            try:
                if size > MAX_LINE_BYTES:
                    raise ValueError(f"line is {size:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit")
                line_kind, record = parse_line(raw, kind)
            except ValueError as e:
                raise InstarError(f"{path}:{number}: {str(e).splitlines()[0] if str(e) else 'invalid'}") from None
            if kind is not None and line_kind != kind:
                raise InstarError(f"{path}:{number}: a {line_kind} record in a file of {kind} records (one kind "
                                  "per file)")
            kind = line_kind
            records.append(record)
    if not records:
        raise InstarError(f"{path} holds no records")
    return kind, records


# ---------------------------------------------------------------------------------------------------------
# import / export

def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise InstarError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")


def import_jsonl(store: Store, path: str | Path, kind: str | None = None) -> ImportResult:
    """Import every valid line of a JSONL file; report and keep every invalid one. See the module docstring."""
    _check_kind(kind)
    path = Path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty: nothing to import")
    result = ImportResult(path=str(path))
    result.run_id = start_run(store, kind="import", stage="import", config={"path": str(path), "kind": kind})
    prov = Provenance(source="import", run_id=result.run_id)
    status = "failed"
    try:
        with open(path, "rb") as f:
            batch: list[tuple[int, bytes, int]] = []
            for item in read_lines(f):
                batch.append(item)
                if len(batch) >= BATCH_LINES:
                    _import_batch(store, batch, kind, prov, result)
                    batch = []
            _import_batch(store, batch, kind, prov, result)
        status = "done"
    except OSError as e:
        raise InstarError(f"cannot read {path}: {e}") from None
    finally:
        summary = {k: getattr(result, k) for k in ("lines", "blank", "inserted", "duplicates", "invalid")}
        finish_run(store, result.run_id, status=status, summary={**summary, "errors": result.errors[:100]})
    return result


def _import_batch(store: Store, batch: list[tuple[int, bytes, int]], kind: str | None, prov: Provenance,
                  result: ImportResult) -> None:
    """Parse a batch of lines, then write its records and failures in one transaction."""
    valid: dict[str, list[dict]] = {}
    failures: list[tuple[str | None, str, str]] = []
    for number, raw, size in batch:
        if not raw.strip():
            result.blank += 1
            continue
        result.lines += 1
        try:
            if size > MAX_LINE_BYTES:
                raise ValueError(f"line is {size:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit")
            line_kind, record = parse_line(raw, kind)
        except ValueError as e:
            reason = str(e).splitlines()[0] if str(e) else "invalid"
            result.invalid += 1
            if len(result.errors) < KEEP_ERRORS:
                result.errors.append((number, reason))
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            failures.append((getattr(e, "kind", kind), f"import: {reason}", text[:RAW_LIMIT]))
            continue
        valid.setdefault(line_kind, []).append(record)
        result.by_kind[line_kind] += 1
    if not valid and not failures:
        return
    with store.writing():
        for line_kind, records in valid.items():
            added = store.add(line_kind, records, prov, validated=True)
            result.inserted += added.inserted
            result.duplicates += added.duplicates
        for line_kind, reason, text in failures:
            store.add_failure(reason, text, kind=line_kind, run_id=prov.run_id)


def _in_field_order(kind: str, data: dict) -> dict:
    """Stored JSON has sorted keys; write the schema's order instead (question before answer, role before content)."""
    ordered = {k: data[k] for k in KINDS[kind].model_fields if k in data}
    for key in ("messages", "prompt"):
        if isinstance(ordered.get(key), list):
            ordered[key] = [{"role": m["role"], "content": m["content"]} for m in ordered[key]]
    return ordered


def export_jsonl(store: Store, path: str | Path, kind: str | None = None, split: str | None = None) -> int:
    """Write records (all kinds unless `kind`) as JSONL; return how many. The file appears whole or not at all."""
    _check_kind(kind)
    if split is not None and split not in SPLITS:
        raise InstarError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise InstarError(f"folder does not exist: {path.parent}")
    if path.is_dir():
        raise InstarError(f"--out is a directory: {path}")
    part = path.with_name(path.name + ".part")
    n = 0
    try:
        with open(part, "w", encoding="utf-8") as f:
            for row in store.iter_rows(kind, split):
                f.write(json.dumps(_in_field_order(row["kind"], row["data"]), ensure_ascii=False) + "\n")
                n += 1
        part.replace(path)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise InstarError(f"cannot write {path}: {e}") from None
    return n

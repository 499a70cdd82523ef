"""Every piece of rich rendering: consoles, the progress bar, the step line, tables, the report card.

One shape for terminal output (STYLE rule 11): one `Progress` per long loop, events printed above it with
`progress.console.log`, a fixed-field step line, errors on the stderr console.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)


def make_progress(con: Console | None = None) -> Progress:
    """The one progress bar: description, bar, n/N, elapsed, remaining, and a free-text field `info`."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=con or console, transient=False)


def step_line(step: int, total: int, values: dict[str, float]) -> str:
    """`step 00042/01000 | loss 2.3141 | lr 3.0e-04 | tok/s 9,812` — fixed fields, stable widths."""
    width = max(5, len(str(total)))
    parts = [f"step {step:0{width}d}/{total:0{width}d}"]
    for name, v in values.items():
        parts.append(f"{name} {format_value(name, v)}")
    return " | ".join(parts)


def format_value(name: str, v: float) -> str:
    if v is None:
        return "-"
    if name in ("lr",) or (v != 0 and abs(v) < 1e-3):
        return f"{v:.1e}"
    if name.endswith("/s") or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4f}"


# -- data: `instar data stats / show / import` ----------------------------------------------------------
def _table(title: str, *columns: str) -> "Table":
    from rich.table import Table

    table = Table(title=title, title_justify="left", title_style="bold")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 or not name else "right")
    return table


def render_stats(store, con: Console | None = None) -> None:
    """Counts by kind x split and by source; length distributions; failures by kind and reason."""
    con = con or console
    stats = store.stats()
    if not stats["by_split"] and not stats["failures"]:
        where = f" in {store.path}" if store.path else ""
        con.print(f"no records yet{where}: run `instar generate` or `instar data import FILE`")
        return
    counts: dict[str, dict[str, int]] = {}
    for kind, split, n in stats["by_split"]:
        counts.setdefault(kind, {})[split] = n
    table = _table("records by kind and split", "kind", "train", "val", "test", "total")
    for kind, row in sorted(counts.items()):
        table.add_row(kind, *(f"{row.get(s, 0):,}" for s in ("train", "val", "test")), f"{sum(row.values()):,}")
    con.print(table)
    table = _table("records by source", "kind", "source", "model", "records")
    for kind, source, model, n in stats["by_source"]:
        table.add_row(kind, source, model, f"{n:,}")
    con.print(table)
    table = _table("length (characters of stored JSON)", "kind", "min", "median", "p90", "max")
    for kind, q in stats["lengths"].items():
        table.add_row(kind, *(f"{q[k]:,}" for k in ("min", "median", "p90", "max")))
    con.print(table)
    if stats["failures"]:
        table = _table("failures by kind and reason", "kind", "reason", "count")
        table.columns[1].justify = "left"
        for kind, reason, n in stats["failures"][:20]:
            table.add_row(kind, reason[:100], f"{n:,}")
        con.print(table)
        if len(stats["failures"]) > 20:
            con.print(f"... and {len(stats['failures']) - 20:,} more distinct reasons")
    else:
        con.print("failures: none")
    render_quality(store, con)


def render_quality(store, con: Console | None = None, rows: dict | None = None) -> None:
    """The data-quality table (acceptance, distinct-2, near duplicates, words) and topic coverage, per kind."""
    from instar.generate.quality import quality

    con = con or console
    rows = quality(store) if rows is None else rows
    if not rows:
        return
    table = _table("data quality", "kind", "records", "acceptance", "distinct-2", "near dups", "words p10/med/p90",
                   "top failure reasons")
    table.columns[-1].justify = "left"
    for kind, k in rows.items():
        table.add_row(*quality_cells(k))
    con.print(table)
    for line in coverage_lines(rows):
        con.print(line, markup=False, highlight=False)


def quality_cells(k) -> list[str]:
    """One kind's quality numbers as table cells (the stats table and the report card share them)."""
    acc = f"{k.acceptance:.0%}" if k.acceptance is not None else "-"
    words = "/".join(str(k.words[p]) for p in ("p10", "median", "p90")) if k.words else "-"
    reasons = ", ".join(f"{r} {n}" for r, n in k.failures.most_common(3))
    return [k.kind, f"{k.records:,}", acc, f"{k.distinct_2:.2f}", f"{k.near_duplicates:.1%}", words, reasons]


def coverage_lines(rows: dict) -> list[str]:
    """`messages topics: 12 covered, records per topic 1-9 (most: volcanoes 9, ...)`, per kind with provenance."""
    lines = []
    for kind, k in rows.items():
        for label, counts in (("topics", k.topics), ("documents", k.documents)):
            if counts:
                top = ", ".join(f"{t} {n}" for t, n in counts.most_common(5))
                lines.append(f"{kind} {label}: {len(counts):,} covered, records per {label[:-1]} "
                             f"{min(counts.values())}-{max(counts.values())} (most: {top})")
    return lines


def _record_body(kind: str, data: dict) -> "Text":
    from rich.text import Text

    body = Text()
    if kind == "text":
        body.append(data["text"])
    elif kind == "messages":
        for m in data["messages"]:
            body.append(f"{m['role']}: ", style="bold").append(m["content"] + "\n")
    elif kind == "preference":
        for m in data["prompt"]:
            body.append(f"{m['role']}: ", style="bold").append(m["content"] + "\n")
        body.append("chosen: ", style="bold green").append(data["chosen"] + "\n")
        body.append("rejected: ", style="bold red").append(data["rejected"])
    else:
        body.append("question: ", style="bold").append(data["question"] + "\n")
        if data.get("solution"):
            body.append("solution: ", style="bold").append(data["solution"] + "\n")
        body.append("answer: ", style="bold").append(data["answer"])
    body.rstrip()
    body.truncate(1500, overflow="ellipsis")
    return body


def render_records(store, kind: str | None = None, split: str | None = None, limit: int = 5,
                   con: Console | None = None) -> None:
    """Up to `limit` records of each kind (or of `kind`), one panel each, titled kind · split · id."""
    from rich.panel import Panel

    from instar.schemas.records import KINDS

    con = con or console
    if kind is not None and kind not in KINDS:
        from instar.errors import InstarError

        raise InstarError(f"unknown kind {kind!r}: expected one of {', '.join(KINDS)}")
    shown = 0
    for k in [kind] if kind else list(KINDS):
        for row in store.iter_rows(k, split, limit=limit):
            extra = f" · {row['data']['family']} · difficulty {row['data']['difficulty']}" if k == "math" else ""
            con.print(Panel(_record_body(k, row["data"]), title=f"{k} · {row['split']} · {row['id']}{extra}",
                            title_align="left"))
            shown += 1
    if not shown:
        con.print(f"no {kind or ''} records{' in split ' + split if split else ''}".replace("  ", " "))


def render_import(result, con: Console | None = None) -> None:
    """Counts, then the first invalid lines with their line numbers and reasons."""
    con = con or console
    kinds = ", ".join(f"{k} {n:,}" for k, n in sorted(result.by_kind.items())) or "none"
    con.print(f"[bold]{result.path}[/]: {result.lines:,} lines read ({kinds}), "
              f"[green]{result.inserted:,} inserted[/], {result.duplicates:,} already stored, "
              f"[{'red' if result.invalid else 'green'}]{result.invalid:,} invalid[/]"
              + (f", {result.blank:,} blank" if result.blank else ""), highlight=False)
    if not result.lines:
        con.print("no records: the file has only blank lines")
    for number, reason in result.errors[:10]:
        con.print(f"  line {number}: {reason}", markup=False, highlight=False, soft_wrap=True)
    if result.invalid > 10:
        con.print(f"  ... and {result.invalid - 10:,} more invalid lines "
                  f"(all kept as failures of run {result.run_id}; see `instar data stats`)", highlight=False)


def render_document_import(result, con: Console | None = None) -> None:
    """Files read, documents cut, inserted; then each file that could not be read, with its reason."""
    con = con or console
    con.print(f"[bold]{result.path}[/]: {result.files:,} files read, {result.documents:,} documents, "
              f"[green]{result.inserted:,} inserted[/], {result.duplicates:,} already stored, "
              f"[{'red' if result.bad else 'green'}]{len(result.bad):,} unreadable files[/]", highlight=False)
    for file, reason in result.bad[:10]:
        con.print(f"  {file}: {reason}", markup=False, highlight=False, soft_wrap=True)


# -- generate -------------------------------------------------------------------------------------------------
def generate_info(values: dict[str, float]) -> str:
    """The progress bar's live counts: `accepted 12 | rejected 3 | duplicates 1 | tok/s 48`."""
    return " | ".join(f"{k} {v:,.0f}" for k, v in values.items())


def generate_event(reason: str, outcome) -> str:
    """The first rejection of a kind, with the start of what the model said."""
    raw = " ".join((getattr(outcome, "raw", None) or "").split())
    return f"rejected ({reason}): {raw[:100]}{'...' if len(raw) > 100 else ''}"


def render_generate(result, con: Console | None = None) -> None:
    """One summary line for a generate run, then its rejection reasons, most frequent first."""
    con = con or console
    if result.status == "nothing to do":
        con.print(f"{result.kind}: {result.before:,} records stored, target {result.target:,}: nothing to do")
        return
    now = result.before + result.accepted
    con.print(f"[bold]{result.kind}[/]: {now:,}/{result.target:,} stored "
              f"([green]+{result.accepted:,}[/], {result.rejected:,} rejected, {result.duplicates:,} duplicates, "
              f"{result.tokens:,} tokens in {result.seconds:,.1f} s) run {result.run_id} {result.status}",
              highlight=False)
    for reason, n in result.reasons.most_common(8):
        con.print(f"  {n:5,}  {reason}", markup=False, highlight=False)
    if result.status == "stopped":
        con.print("[yellow]stopped early[/]: too many rejections for this target (raise --set max_attempts=N, "
                  "or use a stronger model)")


# -- train: `instar train STAGE`, `instar eval` -----------------------------------------------------------
def render_train(summary: dict, con: Console | None = None) -> None:
    """Start -> end of each held-out metric of a finished stage, and where its model is."""
    con = con or console
    if summary.get("already_done"):
        con.print(f"[yellow]{summary['stage']} already finished[/] in {summary['config']['out']} "
                  f"(run {summary['run_id']}); delete that folder or set another `out` to train again")
    con.print(f"[bold]{summary['stage']}[/] · run {summary['run_id']}", highlight=False)
    table = _table("", "metric", "start", "end")
    for name, end in summary.get("end", {}).items():
        table.add_row(name, format_value(name, summary.get("start", {}).get(name)), format_value(name, end))
    con.print(table)
    con.print(f"model: {summary['config']['out']}/model", highlight=False)


def render_eval(result: dict, as_json: bool = False, con: Console | None = None) -> None:
    import json

    con = con or console
    if as_json:
        print(json.dumps(result))  # plain stdout: machine-readable, no rich markup or wrapping
        return
    con.print(f"[bold]eval[/] · {result['kind']} · {result['n']:,} records", highlight=False)
    table = _table("", "metric", "value")
    for name, value in result.items():
        if isinstance(value, dict):  # math: accuracy per form
            for k, v in value.items():
                table.add_row(f"{name}: {k}", format_value(name, v))
        elif isinstance(value, str):  # math: the prompt form the model was asked in
            table.add_row(name, value)
        elif name not in ("kind", "n") and not isinstance(value, list):  # lists (math answers) are for --json
            table.add_row(name, f"{value:,}" if isinstance(value, int) else format_value(name, value))
    con.print(table)


# -- grpo: sampled completions ----------------------------------------------------------------------------
def grpo_samples_table(rows: list[dict], title: str) -> "Table":
    """prompt | completion | reward | advantage, one row per sampled completion (GRPO's sample log)."""
    table = _table(title, "prompt", "completion", "reward", "advantage")
    table.columns[1].justify = "left"
    for r in rows:
        table.add_row(r["prompt"], r["completion"], f"{r['reward']:.2f}", f"{r['advantage']:+.2f}")
    return table


# -- ppo: sampled responses -------------------------------------------------------------------------------
def ppo_samples_table(rows: list[dict], title: str) -> "Table":
    """prompt | response | reward, one row per rollout (PPO's sample log)."""
    table = _table(title, "prompt", "response", "reward")
    table.columns[1].justify = "left"
    for r in rows:
        table.add_row(r["prompt"], r["completion"], f"{r['reward']:.3f}")
    return table

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

"""The report card: what each stage did to the model, drawn only from the stored run rows.

    instar report [RUN]        # RUN: a pipeline or stage run id; default the latest pipeline run

Sources, and nothing else (STYLE rule 11: no second logging path): the `runs` rows (status, times, and each
stage's `summary` with its held-out `start`/`end` metrics), the `metrics` rows (curves) and the `samples`
rows tagged `{"tag": "report", "when": "start"|"end"}` (every stage's answers to the same fixed prompts), and
the `records`/`failures` tables for the data-quality section (`generate.quality`).
Stage 0 — the random-init model — is the first stage's "start" answers and numbers.

Two renderings of one `Card`: the rich terminal version and a self-contained HTML file (matplotlib PNGs,
Agg backend, embedded as base64) written next to the run. It lives here rather than in report.py because
the HTML and plotting are two thirds of it and report.py is shared by every area.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from instar.datasets import runs
from instar.datasets.store import Store
from instar.errors import InstarError
from instar.report import coverage_lines, quality_cells, render_quality

STAGE_ORDER = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")
STAGE_LABELS = {"pretrain": "1 pretrain", "sft": "2 SFT", "reward": "3 reward model", "ppo": "3 PPO",
                "dpo": "3 DPO", "grpo": "4 GRPO"}
# Known held-out numbers: label, and whether lower is better. Unknown keys are shown as they are named.
METRICS = {"val_loss": ("val loss", True), "val_bpb": ("val bits/byte", True), "loss": ("loss", True),
           "pair_accuracy": ("pair accuracy", False), "margin": ("reward margin", False),
           "reward_mean": ("policy reward", False), "kl": ("KL to reference", True),
           "reward_accuracy": ("DPO reward accuracy", False), "reward_margin": ("DPO reward margin", False),
           "accuracy": ("math accuracy", False), "pass_rate": ("pass rate", False),
           "step_accuracy": ("math: worked steps right", False)}
# The external yardsticks (train/yardsticks.py: hand-written arithmetic, chat prompts and text in instar/evalsets,
# which no stage trains on), shown in their own table, "what generalises", one column per model; label and
# whether lower is better (None: neither).
EXTERNAL = {"ext_math_acc": ("external arithmetic: accuracy", False),
            "ext_math_format": ("external arithmetic: answer-line rate", False),
            "ext_math_steps": ("external arithmetic: worked steps right", False),
            "ext_rg_acc": ("reasoning-gym arithmetic: accuracy", False),
            "ext_chat_drill": ("chat prompts: math-drill replies", True),
            "ext_chat_rep3": ("chat prompts: repeated 3-grams", True),
            "ext_chat_distinct2": ("chat prompts: distinct bigrams", False),
            "ext_chat_tokens": ("chat prompts: reply tokens", None),
            "ext_chat_stop": ("chat prompts: replies that stop", False),
            "ext_chat_reward": ("chat prompts: reward-model score", False),
            "ext_chat_bpb": ("chat prompts: reference replies, bits/byte", True),
            "ext_text_bpb": ("hand-written text: bits/byte", True),
            "ext_cont_distinct": ("continuations: distinct words", False),
            "ext_cont_rep3": ("continuations: repeated 3-grams", True)}
METRICS.update(EXTERNAL)
# Curves worth a plot, most telling first; any other logged series follows up to MAX_CURVES per stage.
CURVE_PRIORITY = ("loss", "val_loss", "val_bpb", "reward_mean", "accuracy", "pair_accuracy", "kl", "pass_rate")
SKIP_CURVES = ("lr", "tok/s", "tokens_per_s", "step_s", "sec_per_step", "grad_norm")
MAX_CURVES = 6


@dataclass
class StageCard:
    run_id: str
    stage: str
    status: str
    seconds: float | None
    data: dict = field(default_factory=dict)
    start: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)
    answers: dict[str, dict[str, str]] = field(default_factory=dict)  # prompt -> {"start": ..., "end": ...}
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    memory: str = ""  # the stage's peak memory, e.g. "612 MB RAM, 2,410 MB GPU"

    @property
    def label(self) -> str:
        return STAGE_LABELS.get(self.stage, self.stage)


@dataclass
class Card:
    run: dict
    stages: list[StageCard]
    data_quality: dict = field(default_factory=dict)  # kind -> generate.quality.KindQuality, of the whole store

    def prompts(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.stages:
            seen.update(dict.fromkeys(s.answers))
        return list(seen)

    def generalises(self) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
        """The external yardsticks as (column labels, [(metric, value per column)]): the first stage that
        measured them at its start ("before"), then every stage's end. A stage's model is the next one's start,
        so a number the next stage measured at its start (the SFT model's chat replies scored by the reward model
        when PPO starts; the PPO model's arithmetic when GRPO starts) fills its column where the stage itself did
        not measure it."""
        measured = [s for s in self.stages if any(k in EXTERNAL for k in [*s.start, *s.end])]
        if not measured:
            return [], []
        first = measured[0]
        cols = [("0 random init" if first.stage == "pretrain" else f"before {first.label}", first.start)]
        cols += [(s.label, {**(measured[i + 1].start if i + 1 < len(measured) else {}), **s.end})
                 for i, s in enumerate(measured)]
        keys = [k for k in EXTERNAL if any(k in values for _, values in cols)]
        return [c for c, _ in cols], [(k, [values.get(k) for _, values in cols]) for k in keys]

    def answer_rows(self, prompt: str) -> list[tuple[str, str]]:
        """(who, answer) for one prompt: stage 0 (the first stage's start), then every stage's end."""
        rows = []
        with_answers = [s for s in self.stages if prompt in s.answers]
        if with_answers and "start" in with_answers[0].answers[prompt]:
            first = with_answers[0]
            rows.append(("0 random init" if first.stage == "pretrain" else f"before {first.label}",
                         first.answers[prompt]["start"]))
        rows += [(s.label, s.answers[prompt]["end"]) for s in with_answers if "end" in s.answers[prompt]]
        return rows


# -------------------------------------------------------------------------------------------------------
# Reading the rows


def resolve_run(store: Store, run: str | None = None) -> dict:
    """A run row by id or run directory, or the latest pipeline run (else the latest train run) when None."""
    for marker in ("pipeline.json", "run.json"):  # a pipeline or stage directory names its run
        if run and (Path(run) / marker).is_file():
            run = json.loads((Path(run) / marker).read_text(encoding="utf-8")).get("run_id") or run
            break
    if run:
        row = runs.get_run(store, run)
        if row is None:
            raise InstarError(f"no run {run!r} in {store.path or 'the database'} (see `instar report` for the latest)")
        return row
    for kind in ("pipeline", "train"):
        rows = runs.list_runs(store, kind=kind)
        if rows:
            return runs.get_run(store, rows[-1]["id"])
    raise InstarError(f"no runs in {store.path or 'the database'} yet: run `instar run` or `instar train STAGE`")


def stage_runs(store: Store, run: dict) -> list[dict]:
    """The stage runs a card covers: a pipeline's children (latest per stage, in stage order) or the run itself."""
    if run["kind"] != "pipeline":
        return [run]
    latest = {}
    for child in runs.child_runs(store, run["id"]):
        if child["kind"] == "train":
            latest[child["stage"]] = runs.get_run(store, child["id"])
    return sorted(latest.values(), key=lambda r: (STAGE_ORDER.index(r["stage"]) if r["stage"] in STAGE_ORDER
                                                  else len(STAGE_ORDER), r["started_at"] or 0))


def resolve_model(store: Store, run: str | None = None) -> str:
    """What `export` and `chat` load: a path or 'embedded-smollm2' as given, else a run's model directory.

    A pipeline run means its last stage with a finished model (the reward model is a scorer, not a chat
    model, so it is skipped)."""
    if run and (run == "embedded-smollm2" or (Path(run) / "config.json").is_file()
                or (Path(run) / "model" / "config.json").is_file()):
        return run
    row = resolve_run(store, run)
    rows = [r for r in stage_runs(store, row) if r["stage"] != "reward"] if row["kind"] == "pipeline" else [row]
    done = [r for r in rows if r.get("out_dir") and (Path(r["out_dir"]) / "model" / "config.json").exists()]
    if not done:
        raise InstarError(f"run {row['id']} has no finished model yet (a run directory with model/)")
    return done[-1]["out_dir"]


def stage_card(store: Store, row: dict) -> StageCard:
    summary = row.get("summary") or {}
    seconds = (row["finished_at"] or time.time()) - row["started_at"] if row.get("started_at") else None
    card = StageCard(run_id=row["id"], stage=row["stage"], status=row["status"], seconds=seconds,
                     data=summary.get("data") or {}, start=numeric(summary.get("start")),
                     end=numeric(summary.get("end")), memory=memory_text(summary))
    for sample in runs.run_samples(store, row["id"]):
        extra = json.loads(sample["extra"]) if sample.get("extra") else {}
        if extra.get("tag") == "report" and extra.get("when") in ("start", "end") and sample["prompt"]:
            card.answers.setdefault(sample["prompt"], {})[extra["when"]] = sample["completion"] or ""
    names = [n for n in runs.metric_names(store, row["id"]) if n not in SKIP_CURVES and n not in EXTERNAL]
    names.sort(key=lambda n: CURVE_PRIORITY.index(n) if n in CURVE_PRIORITY else len(CURVE_PRIORITY))
    for name in names:
        series = runs.metric_series(store, row["id"], name)
        if len(series) >= 2:
            card.curves[name] = series
        if len(card.curves) == MAX_CURVES:
            break
    return card


def memory_text(summary: dict) -> str:
    """Peak memory from a stage summary: the process's peak RSS, and CUDA's peak allocation when on a GPU."""
    parts = [f"{summary[k]:,.0f} MB {what}" for k, what in (("peak_rss_mb", "RAM"), ("peak_cuda_mb", "GPU"))
             if isinstance(summary.get(k), (int, float))]
    return ", ".join(parts)


def numeric(values: dict | None) -> dict[str, float]:
    return {k: float(v) for k, v in (values or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_card(store: Store, run: str | None = None) -> Card:
    from instar.generate.quality import quality

    row = resolve_run(store, run)
    return Card(run=row, stages=[stage_card(store, r) for r in stage_runs(store, row)], data_quality=quality(store))


def html_path(card: Card, store: Store) -> Path:
    """Next to the run: `<out_dir>/report.html`, else beside the database."""
    if card.run.get("out_dir"):
        return Path(card.run["out_dir"]) / "report.html"
    base = Path(store.path).parent if store.path else Path(".")
    return base / f"report-{card.run['id']}.html"


# -------------------------------------------------------------------------------------------------------
# Shared formatting


def metric_label(name: str) -> str:
    return METRICS.get(name, (name.replace("_", " "), None))[0]


def change(name: str, start: float | None, end: float | None) -> tuple[str, bool | None]:
    """('-0.512', True) — the signed change, and whether it moved the right way (None when unknown)."""
    if start is None or end is None:
        return "", None
    lower_better = METRICS.get(name, (None, None))[1]
    delta = end - start
    better = None if lower_better is None or delta == 0 else (delta < 0) == lower_better
    return f"{delta:+.4g}", better


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def sparkline(series: list[tuple[int, float]], width: int = 24) -> str:
    if len(series) < 2:
        return ""
    values = [v for _, v in series]
    if len(values) > width:  # evenly spaced picks, always keeping the last point
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[0 if hi == lo else round((v - lo) / (hi - lo) * 7)] for v in values)


# -------------------------------------------------------------------------------------------------------
# Terminal


def render_terminal(card: Card, console, html_file: Path | None = None, width: int = 240) -> None:
    """The rich version: header, held-out numbers with curves, answers to the fixed prompts by stage."""
    from rich.panel import Panel
    from rich.table import Table

    run = card.run
    total = sum(s.seconds or 0 for s in card.stages)
    console.print(Panel(f"[bold]{run['id']}[/]  {run['kind']}  status [bold]{run['status']}[/]  "
                        f"{len(card.stages)} stage(s)  {duration(total)}{pipeline_line(card)}",
                        title="instar report card"))
    numbers = Table(title="Held-out numbers, before -> after each stage", title_justify="left")
    for col in ("stage", "metric", "before", "after", "change", "curve"):
        numbers.add_column(col, justify="right" if col in ("before", "after", "change") else "left")
    for s in card.stages:
        keys = [k for k in dict.fromkeys([*s.start, *s.end]) if k not in EXTERNAL]
        curve = sparkline(next(iter(s.curves.values()))) if s.curves else ""
        for i, k in enumerate(keys):
            text, better = change(k, s.start.get(k), s.end.get(k))
            style = {True: "green", False: "red"}.get(better, "")
            numbers.add_row(s.label if i == 0 else "", metric_label(k), fmt(s.start.get(k)), fmt(s.end.get(k)),
                            f"[{style}]{text}[/]" if style else text,
                            f"{next(iter(s.curves))} {curve}" if i == 0 and curve else "")
        if not keys:
            numbers.add_row(s.label, f"[dim]{s.status}, no summary[/]", "", "", "", "")
        if s.memory:
            numbers.add_row("", "peak memory", "", s.memory, "", "")
        numbers.add_section()
    console.print(numbers)
    cols, rows = card.generalises()
    if rows:
        ext = Table(title="What generalises: hand-written arithmetic, chat prompts and text no stage trains on "
                    "(instar/evalsets)", title_justify="left")
        ext.add_column("metric")
        for c in cols:
            ext.add_column(c, justify="right")
        for k, values in rows:
            ext.add_row(metric_label(k), *(fmt(v) for v in values))
        console.print(ext)
    if line := teacher_line(card):
        console.print(f"[dim]{line}[/]")
    render_quality(None, console, card.data_quality)
    for prompt in card.prompts():
        table = Table(title=f"[bold]{prompt}[/]", title_justify="left", show_header=False, expand=True)
        table.add_column("who", style="cyan", no_wrap=True, width=16)
        table.add_column("answer", overflow="fold", ratio=1)
        for who, answer in card.answer_rows(prompt):
            table.add_row(who, clip(answer, width))
        console.print(table)
    if html_file:
        console.print(f"curves and the full card: [link=file://{Path(html_file).resolve()}]{html_file}[/]")


def teacher_line(card: Card) -> str:
    """The embedded teacher's score on the external arithmetic, the reference line under the student's rows
    (measured by bench/bench_teacher_math.py and shipped with the set); empty when no stage measured it."""
    from importlib import resources

    if not any("ext_math_acc" in {**s.start, **s.end} for s in card.stages):
        return ""
    source = resources.files("instar.evalsets").joinpath("arithmetic.teacher.json")
    if not source.is_file():
        return ""
    t = json.loads(source.read_text(encoding="utf-8"))
    return (f"reference, external arithmetic: the embedded teacher ({t['model']}) answers "
            f"{t['bare']['accuracy']:.1%} asked the bare question, {t['instruction']['accuracy']:.1%} with the "
            f"answer-line instruction ({t['problems']} problems, greedy)")


def pipeline_line(card: Card) -> str:
    """A pipeline's dataset sizes and time per phase, from its summary (empty for a single stage run)."""
    if card.run.get("kind") != "pipeline":  # a stage's summary `data` holds other things (its base model...)
        return ""
    summary = card.run.get("summary") or {}
    data = ", ".join(f"{k} {v:,}" for k, v in (summary.get("data") or {}).items())
    secs = ", ".join(f"{k} {duration(v)}" for k, v in (summary.get("seconds") or {}).items())
    return (f"\ndata: {data}" if data else "") + (f"\ntime: {secs}" if secs else "")


def clip(text: str, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -------------------------------------------------------------------------------------------------------
# HTML


def plot_png(stage: StageCard) -> str:
    """One PNG (base64) with a small panel per curve of this stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(stage.curves)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, stage.curves.items()):
        ax.plot([s for s, _ in series], [v for _, v in series], marker="." if len(series) < 30 else None)
        ax.set_title(metric_label(name), fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;width:100%}td,th{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#080}.bad{color:#b00}pre{white-space:pre-wrap;margin:0;font-size:90%}img{max-width:100%}"""


def write_html(card: Card, path: Path) -> Path:
    """A self-contained HTML report card (images embedded), written to `path`."""
    e = html.escape
    run = card.run
    parts = [f"<!doctype html><meta charset='utf-8'><title>instar report {e(run['id'])}</title><style>{CSS}</style>",
             f"<h1>instar report card</h1><p><b>{e(run['id'])}</b> · {e(run['kind'])} · status {e(run['status'])}"
             f" · {len(card.stages)} stage(s) · {duration(sum(s.seconds or 0 for s in card.stages))}</p>"
             f"<p>{e(pipeline_line(card)).replace(chr(10), '<br>')}</p>",
             "<h2>Held-out numbers</h2><table><tr><th>stage</th><th>metric</th><th>before</th><th>after</th>"
             "<th>change</th><th>data</th></tr>"]
    for s in card.stages:
        keys = [k for k in dict.fromkeys([*s.start, *s.end]) if k not in EXTERNAL] or [None]
        data = ", ".join(f"{k} {v}" for k, v in s.data.items() if not isinstance(v, (dict, list)))
        for i, k in enumerate(keys):
            text, better = change(k, s.start.get(k), s.end.get(k)) if k else ("", None)
            cls = {True: "good", False: "bad"}.get(better, "")
            parts.append(f"<tr><td>{e(s.label) if i == 0 else ''}</td><td>{e(metric_label(k)) if k else e(s.status)}"
                         f"</td><td class=num>{fmt(s.start.get(k))}</td><td class=num>{fmt(s.end.get(k))}</td>"
                         f"<td class='num {cls}'>{text}</td><td>{e(data) if i == 0 else ''}</td></tr>")
        if s.memory:
            parts.append(f"<tr><td></td><td>peak memory</td><td></td><td class=num>{e(s.memory)}</td><td></td>"
                         "<td></td></tr>")
    parts.append("</table>")
    cols, rows = card.generalises()
    if rows:
        parts.append("<h2>What generalises</h2><p>Hand-written arithmetic, chat prompts and text that no stage "
                     "trains on (<code>instar/evalsets/</code>, measured by <code>train/yardsticks.py</code>).</p>"
                     "<table><tr><th>metric</th>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        for k, values in rows:
            parts.append(f"<tr><td>{e(metric_label(k))}</td>" + "".join(f"<td class=num>{fmt(v)}</td>" for v in values)
                         + "</tr>")
        parts.append("</table>")
    if line := teacher_line(card):
        parts.append(f"<p><i>{e(line)}</i></p>")
    if card.data_quality:  # the data every stage learned from: how much of it, how varied, how clean
        head = ("kind", "records", "acceptance", "distinct-2", "near dups", "words p10/med/p90", "top failure reasons")
        parts.append("<h2>Data quality</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
        for k in card.data_quality.values():
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in quality_cells(k)) + "</tr>")
        parts.append("</table>" + "".join(f"<p>{e(line)}</p>" for line in coverage_lines(card.data_quality)))
    prompts = card.prompts()
    if prompts:
        parts.append("<h2>The same prompts, stage by stage</h2>")
    for prompt in prompts:
        parts.append(f"<h3>{e(prompt)}</h3><table>")
        for who, answer in card.answer_rows(prompt):
            parts.append(f"<tr><th style='width:12em'>{e(who)}</th><td><pre>{e(answer)}</pre></td></tr>")
        parts.append("</table>")
    curves = [s for s in card.stages if s.curves]
    if curves:
        parts.append("<h2>Curves</h2>")
    for s in curves:
        parts.append(f"<h3>{e(s.label)} <small>({e(s.run_id)})</small></h3>"
                     f"<img alt='{e(s.label)} curves' src='data:image/png;base64,{plot_png(s)}'>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def report(store: Store, run: str | None, console, html_out: Path | None = None) -> Path:
    """Build the card for `run`, write its HTML, render it on `console`; return the HTML path."""
    card = build_card(store, run)
    path = write_html(card, html_out or html_path(card, store))
    render_terminal(card, console, path)
    return path

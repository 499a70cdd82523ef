"""The `instar` command: a thin Typer shell. Each command parses, calls one library function, renders.

Errors a user can cause arrive as `InstarError` and leave as one line on stderr with a non-zero exit
code (2 for config mistakes); heavy libraries are imported inside the commands, so `--help` is fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from instar.errors import InstarError

app = typer.Typer(help="Grow a small language model through every stage of its training, offline.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect, import and export the dataset store.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DbOpt = Annotated[Optional[Path], typer.Option("--db", envvar="INSTAR_DB",
                                               help="SQLite database (default: ./instar.db).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: key=value.")]
KindOpt = Annotated[Optional[str], typer.Option("--kind", "-k", help="text, messages, preference or math.")]


def open_store(db: Path | None):
    from instar.datasets.store import Store

    return Store.open(db)


def main() -> None:
    """Entry point that turns user mistakes into one line and an exit code."""
    from rich.markup import escape
    from typer.exceptions import TyperException  # base of the (vendored) click usage errors

    from instar import runtime
    from instar.report import err_console

    runtime.start(sys.argv[1:])  # before torch or llama.cpp loads OpenMP
    try:
        code = app(standalone_mode=False)  # returns the code of a `typer.Exit`, and 130 on Ctrl-C
    except InstarError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # one line
        sys.exit(e.exit_code)
    except TyperException as e:  # unknown option, missing argument, bad value: usage line + exit 2
        show = getattr(e, "show", None)
        show() if show else err_console.print(f"error: {escape(e.format_message())}")
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    if code == 130:
        err_console.print("[yellow]interrupted[/]: run the same command to resume (from the last checkpoint, if any)")
    sys.exit(code if type(code) is int else 0)


def _version(value: bool) -> None:
    if value:
        from instar import __version__

        print(f"instar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Grow a small language model through every stage of its training, offline."""


# -- data ---------------------------------------------------------------------------------------------
@data_app.command("stats")
def data_stats(db: DbOpt = None) -> None:
    """Counts by kind, split and source; length distributions; failures by reason."""
    from instar import report

    report.render_stats(open_store(db))


@data_app.command("show")
def data_show(kind: KindOpt = None, limit: Annotated[int, typer.Option(help="How many records.")] = 5,
              split: Annotated[Optional[str], typer.Option(help="train, val or test.")] = None,
              db: DbOpt = None) -> None:
    """Print a few stored records."""
    from instar import report

    report.render_records(open_store(db), kind=kind, split=split, limit=limit)


@data_app.command("import")
def data_import(path: Annotated[Path, typer.Argument(help="A JSONL file, or documents: a .txt/.md/.html/.pdf file "
                                                     "or a folder of them (pretraining text).")],
                kind: KindOpt = None, db: DbOpt = None) -> None:
    """Import JSONL records, or documents cut into pretraining text; bad lines and files are reported."""
    from instar import report
    from instar.datasets.documents import import_documents, is_documents
    from instar.datasets.jsonl import import_jsonl

    if is_documents(path, kind):
        report.render_document_import(import_documents(open_store(db), path))
        return
    result = import_jsonl(open_store(db), path, kind=kind)
    report.render_import(result)
    if not result.inserted and not result.duplicates:  # nothing valid in the file
        raise typer.Exit(1)


@data_app.command("export")
def data_export(out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
                kind: KindOpt = None,
                split: Annotated[Optional[str], typer.Option(help="train, val or test.")] = None,
                db: DbOpt = None) -> None:
    """Export records as JSONL, one object per line, in the shapes `data import` reads."""
    from instar import report
    from instar.datasets.jsonl import export_jsonl

    n = export_jsonl(open_store(db), out, kind=kind, split=split)
    report.console.print(f"wrote {n:,} records to {out}")


# -- run ------------------------------------------------------------------------------------------------
@app.command("run")
def run_cmd(config: ConfigOpt = None, set_: SetOpt = None, db: DbOpt = None) -> None:
    """Grow a model end to end: data, stages 0-4, report card, export. Re-run the same command to resume."""
    from instar import report
    from instar.pipeline_run import load_pipeline_config, run_pipeline

    run_pipeline(load_pipeline_config(config, set_ or []), open_store(db), report.console)


# -- generate ---------------------------------------------------------------------------------------------
@app.command("generate")
def generate_cmd(
        kind: Annotated[str, typer.Argument(help="corpus, instructions, preferences or math.")],
        count: Annotated[Optional[int], typer.Option("--count", "-n", help="Top the store up to N records of KIND from this source (instar's procedural ones count only for --source procedural).")] = None,
        backend: Annotated[Optional[str], typer.Option(help="embedded (default), llamacpp, ollama or openai.")] = None,
        model: Annotated[Optional[str], typer.Option(help="GGUF path (llamacpp) or model name (ollama, openai).")] = None,
        host: Annotated[Optional[list[str]], typer.Option(help="Server URL (openai: ending in /v1); repeat to "
                                                          "spread load.")] = None,
        topic: Annotated[Optional[list[str]], typer.Option(help="What the items are about; repeat for several.")] = None,
        topics: Annotated[Optional[str], typer.Option("--topics", help="A file of topics, one per line.")] = None,
        from_: Annotated[Optional[str], typer.Option("--from", help="instructions: questions and answers grounded "
                                                     "in these documents (a file or folder: .txt .md .html .pdf).")] = None,
        source: Annotated[Optional[str], typer.Option(help="math: llm (default), procedural or rephrase.")] = None,
        seed: Annotated[Optional[int], typer.Option(help="Base seed (default 0).")] = None,
        concurrency: Annotated[Optional[int], typer.Option(help="Items in flight (default: 8 to a server, 8 per core in-process).")] = None,
        temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature.")] = None,
        config: ConfigOpt = None, set_: SetOpt = None, db: DbOpt = None) -> None:
    """Generate records of one kind with a local LLM until the store holds --count of them."""
    from instar import report
    from instar.generate.pipeline import config_from_options, generate

    cfg = config_from_options(config, set_, kind=kind, count=count, backend=backend, model=model, hosts=host,
                              topics=topic, topics_file=topics, documents=from_, source=source, seed=seed,
                              concurrency=concurrency, temperature=temperature)
    report.render_generate(generate(open_store(db), cfg))


# -- train ------------------------------------------------------------------------------------------------
@app.command("train")
def train_cmd(stage: Annotated[str, typer.Argument(help="pretrain, sft, reward, ppo, dpo or grpo.")],
              config: ConfigOpt = None, set_: SetOpt = None, db: DbOpt = None) -> None:
    """Train one stage; re-running the same command resumes from the run directory's checkpoint."""
    from instar import report
    from instar.train import run_stage

    report.render_train(run_stage(stage, config, set_ or [], open_store(db)))


@app.command("eval")
def eval_cmd(checkpoint: Annotated[str, typer.Argument(help="Run directory, HF model directory or embedded-smollm2.")],
             data: Annotated[Path, typer.Option("--data", "-d", help="JSONL file of text, messages or math records, or "
                                                "a packaged yardstick: arithmetic, reasoning_gym, forms.")],
             json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
             batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 8,
             max_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
             samples: Annotated[int, typer.Option(help="Math: also K sampled replies per question: pass@K, "
                                                  "majority@K, sample accuracy (0 = greedy only).")] = 0,
             temperature: Annotated[float, typer.Option(help="Sampling temperature for --samples.")] = 0.7) -> None:
    """Score a checkpoint on a held-out JSONL file (text: loss + bits/byte; messages: assistant loss; math: pass@1)."""
    from instar import report
    from instar.train.evaluate import evaluate_file

    report.render_eval(evaluate_file(checkpoint, data, batch_size=batch_size, max_len=max_len, samples=samples,
                                     temperature=temperature), as_json=json_)


# -- report, export, chat -----------------------------------------------------------------------------
RunArg = Annotated[Optional[str], typer.Argument(help="Run id or run directory [default: the latest run].")]


@app.command("report")
def report_cmd(run: RunArg = None,
               html: Annotated[Optional[Path], typer.Option(help="HTML file [default: next to the run].")] = None,
               db: DbOpt = None) -> None:
    """The report card: held-out numbers, answers to fixed prompts and curves, from the stored runs."""
    from instar import report
    from instar.report_card import report as report_card

    report_card(open_store(db), run, report.console, html)


@app.command("export")
def export_cmd(out: Annotated[Path, typer.Option("--out", "-o", help="GGUF file or folder to write.")],
               run: RunArg = None,
               fmt: Annotated[str, typer.Option("--format", "-f", help="hf or gguf.")] = "gguf",
               dtype: Annotated[str, typer.Option(help="GGUF tensor type: f16 or f32.")] = "f16",
               db: DbOpt = None) -> None:
    """Export a run's model: a Hugging Face directory, or a GGUF file + Ollama Modelfile."""
    from instar import report
    from instar.export import export
    from instar.report_card import resolve_model
    from instar.train.models import model_dir

    for path in export(model_dir(resolve_model(open_store(db), run)), fmt, out, dtype):
        report.console.print(f"wrote {path}")


@app.command("chat")
def chat_cmd(run: RunArg = None,
             temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.7,
             max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 200,
             system: Annotated[Optional[str], typer.Option(help="A system prompt.")] = None,
             db: DbOpt = None) -> None:
    """Chat in the terminal with any stage's model (`/reset` forgets, `/exit` or Ctrl-D quits)."""
    from instar import report
    from instar.chat import chat
    from instar.report_card import resolve_model

    chat(resolve_model(open_store(db), run), sys.stdin, report.console, max_new_tokens=max_tokens,
         temperature=temperature, system=system)


if __name__ == "__main__":
    main()

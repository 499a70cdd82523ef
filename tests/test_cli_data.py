"""`instar --help`, `--version` and `instar data {import,show,stats,export}` through the real entry point.

Most tests call `instar.cli.main()` in-process (fast) with a patched argv; one runs `python -m instar.cli` in a
subprocess to check that a user mistake really reaches the terminal as one line with no traceback.
"""

import json
import subprocess
import sys

import pytest
import typer

from instar import __version__
from instar.cli import SetOpt, ConfigOpt, app, main
from instar.config import StrictConfig, load_config


def run(monkeypatch, capsys, *args):
    """Run `instar ARGS...`; return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["instar", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal width; keep lines whole for asserts
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [{"text": "A short story about a fox."},
            {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"prompt": "Pick.", "chosen": "Yes.", "rejected": "No."},
            {"question": "What is 6*7?", "answer": "42"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    return path


def test_help_and_version(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--help")
    assert code == 0 and "data" in out
    code, out, _ = run(monkeypatch, capsys, "data", "--help")
    assert code == 0 and all(name in out for name in ("stats", "show", "import", "export"))
    code, out, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"instar {__version__}"


def test_import_show_stats_export(monkeypatch, capsys, tmp_path, jsonl):
    db = tmp_path / "cli.db"
    code, out, _ = run(monkeypatch, capsys, "data", "import", jsonl, "--db", db)
    assert code == 0
    assert "4 inserted" in out and "1 invalid" in out and "line 5: bad JSON" in out

    code, out, _ = run(monkeypatch, capsys, "data", "show", "--kind", "math", "--limit", "3", "--db", db)
    assert code == 0 and "What is 6*7?" in out and "42" in out and "fox" not in out

    code, out, _ = run(monkeypatch, capsys, "data", "stats", "--db", db)
    assert code == 0
    for expected in ("records by kind and split", "preference", "import", "length", "failures by kind and reason",
                     "import: bad JSON"):
        assert expected in out, expected

    out_file = tmp_path / "out.jsonl"
    code, out, _ = run(monkeypatch, capsys, "data", "export", "--out", out_file, "--db", db)
    assert code == 0 and "wrote 4 records" in out
    assert len(out_file.read_text().splitlines()) == 4
    code, out, _ = run(monkeypatch, capsys, "data", "export", "--out", out_file, "--kind", "text", "--db", db)
    assert code == 0 and [json.loads(x) for x in out_file.read_text().splitlines()] == [
        {"text": "A short story about a fox."}]

    # INSTAR_DB works like --db.
    monkeypatch.setenv("INSTAR_DB", str(db))
    code, out, _ = run(monkeypatch, capsys, "data", "import", jsonl)
    assert code == 0 and "4 already stored" in out


def test_stats_on_an_empty_database(monkeypatch, capsys, tmp_path):
    code, out, _ = run(monkeypatch, capsys, "data", "stats", "--db", tmp_path / "new.db")
    assert code == 0 and "no records yet" in out


@pytest.mark.parametrize("args, message, exit_code", [
    (["data", "import", "{tmp}/missing.jsonl"], "error: file not found", 2),
    (["data", "import", "{tmp}/empty.jsonl"], "empty", 2),
    (["data", "import", "{tmp}/bad.jsonl"], None, 1),  # no valid line: the report, then exit 1
    (["data", "import", "{tmp}/bad.jsonl", "--kind", "tweets"], "unknown kind 'tweets'", 1),
    (["data", "export", "--out", "{tmp}/nodir/out.jsonl"], "folder does not exist", 1),
    (["data", "export", "--out", "{tmp}/o.jsonl", "--split", "dev"], "unknown split 'dev'", 1),
    (["data", "stats", "--db", "{tmp}"], "database path is a directory", 1),
    (["data", "stats", "--db", "{tmp}/notadb.db"], "cannot open database", 1),
    (["data", "show", "--kind", "poems"], "unknown kind 'poems'", 1),
])
def test_user_mistakes_are_one_line_errors(monkeypatch, capsys, tmp_path, args, message, exit_code):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_text('{"colour": "blue"}\n')
    (tmp_path / "notadb.db").write_text("plain text, not sqlite " * 50)
    monkeypatch.setenv("INSTAR_DB", str(tmp_path / "default.db"))
    code, out, err = run(monkeypatch, capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == exit_code
    if message is None:
        assert "line 1: cannot tell the kind" in out and "Traceback" not in out + err
    else:
        assert message in one_line_error(err)


def test_usage_errors_exit_2_without_traceback(monkeypatch, capsys):
    for args in (["data", "bogus"], ["data", "import"], ["data", "show", "--limit", "many"], ["--nope"]):
        code, out, err = run(monkeypatch, capsys, *args)
        assert code == 2 and "Traceback" not in out + err and "Error" in err, args


class DemoConfig(StrictConfig):
    lr: float = 3e-4
    steps: int = 10


@pytest.fixture
def config_command():
    """A throwaway command that loads a config, so the CLI's config-error path is tested on its own."""
    @app.command("config-demo")
    def config_demo(config: ConfigOpt = None, set: SetOpt = None) -> None:
        cfg = load_config(DemoConfig, config, set)
        typer.echo(cfg.model_dump_json())

    yield
    app.registered_commands.pop()


def test_config_errors_exit_2_with_one_line(monkeypatch, capsys, tmp_path, config_command):
    code, out, _ = run(monkeypatch, capsys, "config-demo", "--set", "lr=1e-3", "--set", "steps=5")
    assert code == 0 and json.loads(out) == {"lr": 1e-3, "steps": 5}
    cases = [(["--set", "epochs=3"], "unknown key 'epochs'"),
             (["--set", "steps=lots"], "steps: Input should be a valid integer"),
             (["--set", "noequals"], "--set expects key=value"),
             (["--config", tmp_path / "missing.toml"], "config file not found")]
    for args, message in cases:
        code, _, err = run(monkeypatch, capsys, "config-demo", *args)
        assert code == 2 and message in one_line_error(err), args


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "instar.cli", "data", "import", str(tmp_path / "nope.jsonl"),
                           "--db", str(tmp_path / "x.db")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == "" and one_line_error(proc.stderr).startswith("error: file not found")

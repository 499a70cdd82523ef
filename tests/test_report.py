"""The report card renders from run rows filled in by hand: no training, no model."""

import base64
import io

import pytest
from rich.console import Console

from instar.datasets import runs
from instar.errors import InstarError

PROMPTS = ["What is an LLM?", "What is 7 + 5?"]
STAGES = {  # stage -> (start metrics, end metrics, answer at end)
    "pretrain": ({"val_loss": 6.2154, "val_bpb": 3.9021}, {"val_loss": 3.1077, "val_bpb": 1.8765}, "once upon a time"),
    "sft": ({"val_loss": 3.4012}, {"val_loss": 2.2049}, "An LLM is a language model."),
    "reward": ({"pair_accuracy": 0.5}, {"pair_accuracy": 0.8125}, None),
    "ppo": ({"reward_mean": -0.3131, "kl": 0.0}, {"reward_mean": 0.4242, "kl": 0.0567}, "An LLM is a large model."),
    "grpo": ({"accuracy": 0.125}, {"accuracy": 0.375}, "12"),
}


def fill(store, out_dir=None):
    """A finished pipeline run with five stage runs, as `instar run` would leave it."""
    pid = runs.start_run(store, kind="pipeline", stage="pipeline", config={}, out_dir=out_dir)
    for stage, (start, end, answer) in STAGES.items():
        rid = runs.start_run(store, kind="train", stage=stage, config={}, out_dir=f"runs/{stage}", parent_id=pid)
        for step in range(0, 50, 10):  # a falling loss curve
            runs.log_metrics(store, rid, step, {"loss": 5.0 - step / 20, "lr": 1e-3})
        runs.log_metrics(store, rid, 0, start)
        runs.log_metrics(store, rid, 50, end)
        if answer:
            for p in PROMPTS:
                if stage == "pretrain":
                    runs.log_samples(store, rid, 0, [{"prompt": p, "completion": "zq zq xv", "tag": "report",
                                                      "when": "start"}])
                runs.log_samples(store, rid, 50, [{"prompt": p, "completion": answer, "tag": "report",
                                                   "when": "end"}])
            runs.log_samples(store, rid, 50, [{"prompt": "rollout", "completion": "not a report sample"}])
        runs.finish_run(store, rid, summary={"stage": stage, "run_id": rid, "config": {}, "data": {"train": 100},
                                             "start": start, "end": end})
    runs.finish_run(store, pid, summary={"stages": list(STAGES), "data": {"text": 1234, "messages": 56},
                                         "seconds": {"data": 300.0, "pretrain": 45.0}})
    return pid


def render(store, run=None, tmp_path=None):
    from instar.report_card import report

    con = Console(file=io.StringIO(), width=200, color_system=None)
    path = report(store, run, con, html_out=tmp_path / "card.html" if tmp_path else None)
    return con.file.getvalue(), path


def test_card_from_rows_contains_numbers_answers_and_plots(store, tmp_path):
    pid = fill(store, out_dir=str(tmp_path / "pipe"))
    text, path = render(store)  # default: the latest pipeline run
    assert pid in text
    for start, end, _ in STAGES.values():
        for v in [*start.values(), *end.values()]:
            assert f"{v:.4g}" in text
    assert "val bits/byte" in text and "math accuracy" in text and "policy reward" in text
    assert "data: text 1,234, messages 56" in text and "time: data 5.0 min, pretrain 45 s" in text
    assert "What is an LLM?" in text and "0 random init" in text and "zq zq xv" in text
    assert "An LLM is a language model." in text and "not a report sample" not in text
    assert path == tmp_path / "pipe" / "report.html"
    page = path.read_text()
    assert page.count("data:image/png;base64,") == len(STAGES)
    png = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3.108" in page and "0.375" in page and "An LLM is a large model." in page


def test_card_answers_follow_stage_order(store, tmp_path):
    from instar.report_card import build_card

    card = build_card(store, fill(store))
    assert [s.stage for s in card.stages] == list(STAGES)
    who = [w for w, _ in card.answer_rows("What is 7 + 5?")]
    assert who == ["0 random init", "1 pretrain", "2 SFT", "3 PPO", "4 GRPO"]


def test_improvement_direction_is_marked(store):
    from instar.report_card import change

    assert change("val_loss", 3.0, 2.0) == ("-1", True)
    assert change("accuracy", 0.5, 0.25) == ("-0.25", False)
    assert change("kl", 0.0, 0.1)[1] is False
    assert change("something_new", 1.0, 2.0)[1] is None


def test_single_stage_run_and_interrupted_stage(store, tmp_path):
    rid = runs.start_run(store, kind="train", stage="sft", config={}, out_dir=None)
    runs.log_metrics(store, rid, 0, {"loss": 3.0})  # one point: no curve, no crash
    text, path = render(store, rid, tmp_path)
    assert rid in text and "running" in text and "no summary" in text
    assert path.exists() and "data:image/png" not in path.read_text()


def test_run_directory_names_its_run(store, tmp_path):
    import json

    from instar.report_card import resolve_run

    pid = fill(store)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "pipeline.json").write_text(json.dumps({"run_id": pid}))
    assert resolve_run(store, str(tmp_path / "pipe"))["id"] == pid


def test_unknown_and_missing_runs_are_clear_errors(store, tmp_path):
    with pytest.raises(InstarError, match="no runs"):
        render(store, None, tmp_path)
    fill(store)
    with pytest.raises(InstarError, match="no run 'nope'"):
        render(store, "nope", tmp_path)


def test_report_command_reads_the_database_alone(db_path, tmp_path):
    from typer.testing import CliRunner

    from instar.cli import app
    from instar.datasets.store import Store

    pid = fill(Store.open(db_path), out_dir=str(tmp_path / "pipe"))
    result = CliRunner().invoke(app, ["report", "--db", str(db_path)])
    assert result.exit_code == 0, result.output
    assert pid in result.output and "What is an LLM?" in result.output
    assert (tmp_path / "pipe" / "report.html").exists()

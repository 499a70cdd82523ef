"""`instar run` end to end with configs/ci.toml, through the CLI in subprocesses: real generation with the
embedded SmolLM2 GGUF, every stage, the report card, GGUF + HF export; then a run SIGKILLed in the middle of
a later stage and started again; then the report rendered from a copy of the database alone.

The database is seeded with templated records first (tests/train_fixtures.py) so every split has rows
whatever the 135M teacher writes; the teacher then tops each LLM-written kind up by two records. Budget:
about 2-3 minutes on an idle 2-core machine (generation ~30 s, each pipeline ~40-60 s).
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import conversations, documents

from instar.datasets import runs
from instar.datasets.store import Provenance, Store
from instar.generate.pairs import split_by_prompt

CI = Path(__file__).resolve().parents[1] / "configs" / "ci.toml"
STAGES = ["pretrain", "sft", "reward", "ppo", "grpo"]
N_DOCS, N_CONVS = 60, 30


def instar(args, cwd, timeout=600):
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "instar.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_args(db, out, *extra):
    # Seeded records count toward the targets: ask the teacher for two more of each LLM-written kind.
    return ["run", "--config", str(CI), "--db", str(db), "--set", f"out={out}",
            "--set", f"data.corpus={N_DOCS + 2}", "--set", f"data.instructions={N_CONVS + 2}", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    store = Store.open(work / "instar.db")
    store.add("text", [{"text": t} for t in documents(N_DOCS)], Provenance(source="import"))
    store.add("messages", conversations(N_CONVS), Provenance(source="import"))
    return work


@pytest.fixture(scope="module")
def ci_run(work):
    proc = instar(run_args(work / "instar.db", work / "runs" / "ci"), cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ci_config_runs_every_stage_end_to_end(work, ci_run):
    out = work / "runs" / "ci"
    store = Store.open(work / "instar.db")
    # Generation really used the embedded teacher (a weak one: we ask for attempts, not acceptances).
    generated = store.db.execute("select count(*) from runs where kind = 'generate'").fetchone()[0]
    assert generated >= 2
    assert store.db.execute("select count(*) from records where backend = 'embedded'").fetchone()[0] + \
        store.db.execute("select count(*) from failures where kind in ('text', 'messages')").fetchone()[0] > 0
    held_out = split_by_prompt(store.records("preference"), "val")  # the reward model and PPO split by prompt
    assert held_out and store.count("math") >= 4
    # One pipeline row, done, with the five stage runs as children; each stage finished with a summary.
    pipe = runs.list_runs(store, kind="pipeline")
    assert len(pipe) == 1 and pipe[0]["status"] == "done"
    children = runs.child_runs(store, pipe[0]["id"])
    assert [c["stage"] for c in children] == STAGES and all(c["status"] == "done" for c in children)
    for stage in STAGES:
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["start"] and summary["end"], stage
    # Report card and both exports.
    assert "report card" in ci_run.stdout and "4 GRPO" in ci_run.stdout and "What generalises" in ci_run.stdout
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "export" / "Modelfile").read_text().startswith("FROM ./model.gguf")
    assert (out / "export" / "hf" / "config.json").exists()


def test_exported_gguf_runs_in_llama_cpp(work, ci_run):
    from llama_cpp import Llama

    llm = Llama(model_path=str(work / "runs" / "ci" / "export" / "model.gguf"), n_ctx=128, verbose=False)
    out = llm.create_chat_completion([{"role": "user", "content": "What is 7 + 5?"}], max_tokens=8, temperature=0)
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_killed_run_resumes_without_redoing_finished_stages(work, ci_run):
    db, out = work / "instar.db", work / "runs" / "kill"
    # A slower SFT (many steps, a checkpoint every 2) so the kill lands inside it.
    args = run_args(db, out, "--set", "train.sft.max_steps=400", "--set", "train.sft.save_every=2")
    proc = subprocess.Popen([sys.executable, "-m", "instar.cli", *args], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "sft" / "checkpoint" / "state.pt").exists():
        assert proc.poll() is None, "the pipeline ended before SFT wrote a checkpoint"
        assert time.time() < deadline, "no SFT checkpoint within 300 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "sft" / "summary.json").exists()
    pretrain_mtime = (out / "pretrain" / "summary.json").stat().st_mtime
    sft_run = json.loads((out / "sft" / "run.json").read_text())["run_id"]
    pipe_run = json.loads((out / "pipeline.json").read_text())["run_id"]

    again = instar(args, cwd=work)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "pretrain: already finished" in again.stdout
    assert "resuming sft" in again.stdout
    assert (out / "pretrain" / "summary.json").stat().st_mtime == pretrain_mtime
    assert json.loads((out / "sft" / "summary.json").read_text())["run_id"] == sft_run
    store = Store.open(db)
    assert runs.get_run(store, pipe_run)["status"] == "done"
    assert [c["stage"] for c in runs.child_runs(store, pipe_run)] == STAGES  # one row per stage, none redone
    # The generate runs are not repeated: every target was already met.
    assert "accepted" not in again.stdout


def test_report_renders_from_the_database_alone(work, ci_run, tmp_path):
    # No run directories next to this copy. The backup API copies what still sits in the WAL file too
    # (a plain file copy missed the last commits whenever a checkpoint had not run yet).
    with sqlite3.connect(work / "instar.db") as src, sqlite3.connect(tmp_path / "copy.db") as dst:
        src.backup(dst)
    proc = instar(["report", "--db", str(tmp_path / "copy.db"), "--html", str(tmp_path / "card.html")],
                  cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pipe = runs.list_runs(Store.open(tmp_path / "copy.db"), kind="pipeline")[-1]
    assert pipe["id"] in proc.stdout and "val loss" in proc.stdout and "What is 7 + 5?" in proc.stdout
    assert "data:image/png;base64," in (tmp_path / "card.html").read_text()


# --- fast checks of the pipeline's pieces (no training) -----------------------------------------------------
def test_pipeline_config_errors_name_the_key():
    from instar.errors import ConfigError
    from instar.pipeline_run import load_pipeline_config, stage_configs

    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_pipeline_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match=r"\[train.sft\]: unknown key 'bogus'"):
        stage_configs(load_pipeline_config(None, ["train.sft.bogus=1"]))
    with pytest.raises(ConfigError, match="unknown stage table"):
        stage_configs(load_pipeline_config(None, ["train.rlhf.lr=1"]))
    with pytest.raises(ConfigError, match="not a stage of this plan"):
        load_pipeline_config(None, ["stage3=dpo", "stop_after=ppo"]).stages()


def test_stages_are_chained_through_run_directories():
    from instar.pipeline_run import load_pipeline_config, stage_configs

    cfgs = stage_configs(load_pipeline_config(CI, ["out=x", "train.grpo.model=elsewhere"]))
    assert list(cfgs) == STAGES
    assert (cfgs["pretrain"].model, cfgs["sft"].model, cfgs["reward"].model) == ("scratch", "x/pretrain", "x/sft")
    assert (cfgs["ppo"].model, cfgs["ppo"].reward_model) == ("x/sft", "x/reward")
    assert cfgs["grpo"].model == "elsewhere" and cfgs["grpo"].out == "x/grpo"  # a stage table wins
    dpo = stage_configs(load_pipeline_config(CI, ["out=x", "stage3=dpo"]))
    assert list(dpo) == ["pretrain", "sft", "dpo", "grpo"] and dpo["grpo"].model == "x/dpo"


def test_math_sft_excludes_grpo_held_out_problems(store, tmp_path):
    import io

    from rich.console import Console

    from instar.pipeline_run import load_pipeline_config, sft_math, stage_configs
    from instar.train.grpo import Problems

    cfg = load_pipeline_config(None, [f"out={tmp_path}", "data.math_sft=200"])
    grpo = stage_configs(cfg)["grpo"]
    n = sft_math(store, cfg, grpo, Console(file=io.StringIO()))
    held = {r["question"] for r in Problems(grpo, store).heldout}
    asked = {m["messages"][0]["content"] for m in store.records("messages")}
    assert n == store.count("messages") > 50 and not asked & held


def test_a_plan_that_stops_before_grpo_asks_math_as_the_full_plan_does(store, tmp_path):
    """`stop_after = "sft"` leaves GRPO out of the plan; the SFT math must still follow [train.grpo] (the bare
    question and its families), not GRPO's own defaults (the instruction suffix, all seven families)."""
    import io

    from rich.console import Console

    from instar.pipeline_run import load_pipeline_config, sft_math

    cfg = load_pipeline_config(None, [f"out={tmp_path}", "data.math_sft=100", "stop_after=sft"])
    sft_math(store, cfg, None, Console(file=io.StringIO()))
    questions = [m["messages"][0]["content"] for m in store.records("messages")]
    assert questions and not any("Answer: <number>" in q for q in questions)

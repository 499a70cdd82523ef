"""`instar run` from a base model: `student.model` = a model directory, `student.pretrain = false`.

A tiny random Qwen2 (q/k/v biases; not one of instar's Llama presets) goes through every later stage of
configs/ci.toml — SFT, reward model + PPO, GRPO — in one `instar run`, then out as a qwen2 GGUF that
llama.cpp runs. The store is seeded so no teacher is needed (no corpus: nothing to pretrain on).
"""

import pytest

from instar.datasets import runs
from instar.datasets.store import Provenance, Store
from test_base_models import save_tiny
from test_run_e2e import CI
from test_train_errors import cli
from train_fixtures import conversations


def test_pipeline_from_a_base_model_skips_pretraining_when_asked():
    from instar.errors import ConfigError
    from instar.pipeline_run import load_pipeline_config, stage_configs

    cfgs = stage_configs(load_pipeline_config(CI, ["out=x", "student.model=/m", "student.pretrain=false"]))
    assert list(cfgs) == ["sft", "reward", "ppo", "grpo"]
    assert (cfgs["sft"].model, cfgs["reward"].model, cfgs["ppo"].model, cfgs["grpo"].model) == \
        ("/m", "x/sft", "x/sft", "x/ppo")
    with_cpt = stage_configs(load_pipeline_config(CI, ["out=x", "student.model=/m"]))
    assert list(with_cpt)[:2] == ["pretrain", "sft"] and with_cpt["pretrain"].model == "/m"
    with pytest.raises(ConfigError, match="student.pretrain = false needs a base model"):
        load_pipeline_config(CI, ["student.pretrain=false"]).stages()


def test_instar_run_from_a_qwen2_directory(tmp_path, monkeypatch, capsys):
    from llama_cpp import Llama

    save_tiny(tmp_path / "qwen", "qwen2")
    db = tmp_path / "instar.db"
    Store.open(db).add("messages", conversations(120), Provenance(source="import"))
    sets = ["out=" + str(tmp_path / "runs"), "student.model=" + str(tmp_path / "qwen"), "student.pretrain=false",
            "data.corpus=0", "data.instructions=100", "data.math=0", "export=['gguf']"]
    code, err = cli(monkeypatch, capsys, "run", "--config", str(CI), "--db", str(db),
                    *[a for s in sets for a in ("--set", s)])
    assert code == 0, err[-2000:]
    store = Store.open(db)
    (pipe,) = runs.list_runs(store, kind="pipeline")
    children = runs.child_runs(store, pipe["id"])
    assert [c["stage"] for c in children] == ["sft", "reward", "ppo", "grpo"]
    assert all(c["status"] == "done" for c in children) and pipe["status"] == "done"
    llm = Llama(model_path=str(tmp_path / "runs" / "export" / "model.gguf"), n_ctx=128, verbose=False)
    assert llm.metadata["general.architecture"] == "qwen2"
    out = llm.create_chat_completion([{"role": "user", "content": "What is 7 + 5?"}], max_tokens=4, temperature=0)
    assert out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("model, message", [("{tmp}/nowhere", "model not found"),
                                            ("{tmp}", "neither a finished run directory")])
def test_instar_run_checks_the_base_model_before_generating_anything(tmp_path, monkeypatch, capsys, model, message):
    """A wrong `student.model` is one line and exit 2 before the teacher writes a record (it used to surface only
    when stage 1 loaded it, after the data)."""
    db = tmp_path / "instar.db"
    code, err = cli(monkeypatch, capsys, "run", "--config", str(CI), "--db", str(db), "--set",
                    "student.model=" + model.replace("{tmp}", str(tmp_path)), "--set", f"out={tmp_path / 'runs'}")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    store = Store.open(db)
    assert store.count() == 0 and not runs.list_runs(store)

"""Every kind of ending, every stage: a run interrupted anywhere and resumed with the same command ends with the
same parameters and the same metric curves as an uninterrupted one, and the runs table says how each run ended.

Interrupts are injected by wrapping the function that runs at the named point (`train_fixtures.on_call`):
mid-rollout (`generate`), mid-update (`loop.optimizer_step`), mid-eval (`Session.evaluate`) and mid-checkpoint
(the weights file written, the state not yet). "sigint" sends this process a real SIGINT (a first Ctrl-C);
"raise" raises KeyboardInterrupt on the spot (a second Ctrl-C); "crash" raises RuntimeError. Everything runs in
fp32 on tiny models, where a resumed run is exact: parameters equal to 1e-6 and metrics to 1e-5 (in practice
bitwise). One real subprocess per kind of ending (SIGINT, SIGKILL) checks the CLI's side.
"""

import pytest
import torch

from instar.datasets import runs
from instar.datasets.store import Store
from instar.train import load_stage_config, loop, run_stage
from test_pref_world import make_world
from train_fixtures import FAST, assert_same_run, fill_store, on_call

PRETRAIN = FAST + ["max_steps=8", "save_every=3", "eval_every=4", "warmup=2", "dtype=fp32", "batch_size=4",
                   "max_len=32"]


def status(store, out) -> str:
    import json
    from pathlib import Path

    run_id = json.loads((Path(out) / "run.json").read_text())["run_id"]
    return runs.get_run(store, run_id)["status"]


def checkpoint_step(out) -> int | None:
    from pathlib import Path

    path = Path(out) / "checkpoint" / "state.pt"
    return int(torch.load(path, weights_only=True)["step"]) if path.exists() else None


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("text") / "instar.db")
    fill_store(store, n_docs=150, n_convs=150)
    return store


@pytest.fixture(scope="module")
def pretrain_whole(text_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "whole"
    return run_stage("pretrain", None, PRETRAIN + [f"out={out}"], text_store), out


# --- the bugs of issue 12, one test each -------------------------------------------------------------------
def test_ctrl_c_during_eval_checkpoints_the_step_just_finished(text_store, pretrain_whole, tmp_path, monkeypatch):
    """Bug 1: the eval after step 4 was interrupted; the checkpoint said step 3 but held step 4's weights."""
    whole, whole_out = pretrain_whole
    out = tmp_path / "split"
    on_call(monkeypatch, loop.Session, "evaluate", 3, "raise")  # calls 1-2: the start measure (held-out, yardsticks)
    with pytest.raises(KeyboardInterrupt):
        run_stage("pretrain", None, PRETRAIN + [f"out={out}"], text_store)
    monkeypatch.undo()
    assert checkpoint_step(out) == 4 and status(text_store, out) == "interrupted"
    resumed = run_stage("pretrain", None, PRETRAIN + [f"out={out}"], text_store)
    assert_same_run(text_store, whole, resumed, whole_out, out)
    assert runs.get_run(text_store, resumed["run_id"])["status"] == "done"


@pytest.fixture(scope="module")
def pref_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("pref"), n=200)


def planted_scorer(tok):
    from test_pref_stages import planted_scorer as scorer

    return scorer(tok)


PPO = ["max_steps=4", "batch_size=8", "mini_batch_size=4", "ppo_epochs=2", "max_new_tokens=6", "eval_batches=1",
       "lr=1e-2", "warmup=1", "dtype=fp32", "log_every=1", "save_every=2", "eval_every=2", "temperature=1.0",
       "kl_target=0.5", "no_eos_penalty=0.5", "length_coef=0.2"]  # the guards' state must resume exactly too


def run_ppo(store, base, out, extra=()):
    from instar.train import train_stage
    from instar.train.models import load_model

    cfg = load_stage_config("ppo", None, [f"model={base}", f"out={out}", *PPO, *extra])
    return train_stage("ppo", cfg, store, scorer=planted_scorer(load_model(base)[1]))


def test_ppo_ctrl_c_mid_update_never_checkpoints_a_half_updated_policy(pref_world, tmp_path, monkeypatch):
    """Bug 2: Ctrl-C inside the PPO update (4 optimizer steps per rollout batch here) saved a half-updated policy
    as if the step had not started."""
    store, base = pref_world
    whole = run_ppo(store, base, tmp_path / "whole")
    on_call(monkeypatch, loop, "optimizer_step", 4 * 2 + 2, "raise")  # step 3, its 2nd minibatch update
    with pytest.raises(KeyboardInterrupt):
        run_ppo(store, base, tmp_path / "split")
    monkeypatch.undo()
    assert checkpoint_step(tmp_path / "split") == 2  # the last whole step's checkpoint, nothing half-done
    resumed = run_ppo(store, base, tmp_path / "split")
    assert_same_run(store, whole, resumed, tmp_path / "whole", tmp_path / "split")


GRPO = ['families=["arithmetic"]', "difficulty=1", "eval_difficulty=1", "curriculum=false", 'instruction=""',
        "max_new_tokens=6", "batch_size=2", "group_size=4", "eval_problems=4", "sample_tokens=4", "dtype=fp32",
        "log_every=1", "warmup=0", "lr=1e-2"]


def test_grpo_ctrl_c_leaves_a_checkpoint_to_resume_from(pref_world, tmp_path, monkeypatch):
    """Bug 3: Ctrl-C after a few GRPO steps printed "progress so far is saved" and saved nothing."""
    from instar.train import grpo

    store, base = pref_world
    on_call(monkeypatch, grpo, "generate", 3, "raise")  # step 3's rollout (evals generate through evaluate.py)
    with pytest.raises(KeyboardInterrupt):
        run_stage("grpo", None, [f"model={base}", f"out={tmp_path}/g", "max_steps=6", "save_every=0",
                                 "eval_every=0", *GRPO], store)
    assert checkpoint_step(tmp_path / "g") == 2
    assert status(store, tmp_path / "g") == "interrupted"


def test_grpo_step_without_any_signal_and_no_clipping_runs(pref_world, tmp_path):
    """Bug 4: grad_clip = 0 and a batch whose groups are all uninformative (a model that solves nothing) died with
    "stack expects a non-empty TensorList". A random model never writes "Answer: N": every reward is 0."""
    store, base = pref_world
    summary = run_stage("grpo", None, [f"model={base}", f"out={tmp_path}/g", "max_steps=2", "grad_clip=0",
                                       "eval_every=0", *GRPO], store)
    assert runs.metric_series(store, summary["run_id"], "skipped_groups") == [(1, 1.0), (2, 1.0)]


def test_stage_runs_under_instar_run_record_how_they_ended(tmp_path, monkeypatch):
    """Bug 5: `instar run` called the stage modules directly, so a stage that failed or was interrupted stayed
    `running` in the runs table forever."""
    from instar.pipeline_run import load_pipeline_config, run_pipeline
    from instar.report import console

    store = Store.open(tmp_path / "instar.db")
    fill_store(store, n_docs=150, n_convs=150)
    sets = [f"out={tmp_path}/runs", "stop_after=sft", "data.corpus=0", "data.instructions=0", "data.preferences=0",
            "data.math_sft=0", "export=[]", "train.pretrain.max_steps=2", "train.pretrain.max_len=32",
            "train.sft.max_steps=2", "train.sft.max_len=64"]
    for action, expected in (("crash", "failed"), ("raise", "interrupted")):
        calls = on_call(monkeypatch, loop, "optimizer_step", 1, action)
        with pytest.raises(RuntimeError if action == "crash" else KeyboardInterrupt):
            run_pipeline(load_pipeline_config(None, sets), store, console)
        monkeypatch.undo()
        assert len(calls) == 1
        (pipe,) = runs.list_runs(store, kind="pipeline")
        stage_runs = runs.child_runs(store, pipe["id"])
        assert pipe["status"] == expected and [r["status"] for r in stage_runs][-1] == expected, stage_runs
        assert not [r for r in runs.list_runs(store, kind="train") if r["status"] == "running"]
    summary = run_pipeline(load_pipeline_config(None, sets), store, console)
    assert runs.get_run(store, summary["run_id"])["status"] == "done"
    assert [r["status"] for r in runs.child_runs(store, summary["run_id"])][-2:] == ["done", "done"]


# --- every stage, every kind of ending, one after another in the same run -------------------------------------
def ending(monkeypatch, point: str, n: int, action: str) -> list:
    """Arm an interrupt at the n-th call at `point`: update, eval, checkpoint, or STAGE.generate (a rollout)."""
    import safetensors.torch

    from instar.train import stage_module

    if point == "update":
        return on_call(monkeypatch, loop, "optimizer_step", n, action)
    if point == "eval":
        return on_call(monkeypatch, loop.Session, "evaluate", n, action)
    if point == "checkpoint":  # the weights are written, the state is not
        return on_call(monkeypatch, safetensors.torch, "save_file", n, action, after=True)
    return on_call(monkeypatch, stage_module(point.split(".")[0]), "generate", n, action)


def interrupted(store, out, train, script, monkeypatch) -> dict:
    """Run `train(out)` once per (point, n, action) of `script`, each ended there, then to the end."""
    for point, n, action in script:
        calls = ending(monkeypatch, point, n, action)
        with pytest.raises(RuntimeError if action == "crash" else KeyboardInterrupt):
            train(out)
        monkeypatch.undo()
        assert len(calls) >= n, (point, n, action)
        assert status(store, out) == ("failed" if action == "crash" else "interrupted"), (point, n, action)
    summary = train(out)
    assert runs.get_run(store, summary["run_id"])["status"] == "done"
    return summary


def test_pretrain_resumes_exactly_after_every_kind_of_ending(text_store, pretrain_whole, tmp_path, monkeypatch):
    whole, whole_out = pretrain_whole
    script = [("update", 2, "sigint"),       # mid-update: the step finishes, then the checkpoint (step 2)
              ("eval", 1, "raise"),          # the eval after step 4: checkpoint 4, the eval redone on resume
              ("update", 2, "raise"),        # mid-update, at once: back to the checkpoint of step 4
              ("checkpoint", 1, "sigint"),   # mid-checkpoint (step 6): written again, whole
              ("update", 1, "crash")]        # a crash in step 7: `failed`, back to step 6
    resumed = interrupted(text_store, tmp_path / "split",
                          lambda out: run_stage("pretrain", None, PRETRAIN + [f"out={out}"], text_store), script,
                          monkeypatch)
    assert_same_run(text_store, whole, resumed, whole_out, tmp_path / "split")


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory):
    from instar.train.models import save_model
    from train_fixtures import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("base")
    save_model(tiny_model(tok), tok, path / "model")
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_sft_resumes_exactly(text_store, sft_base, tmp_path, monkeypatch, lora):
    sets = FAST + [f"model={sft_base}", "max_steps=6", "save_every=2", "eval_every=3", "dtype=fp32", "batch_size=4",
                   "max_len=48", "lr=3e-3", f"lora={str(lora).lower()}", "lora_r=4"]
    train = lambda out: run_stage("sft", None, sets + [f"out={out}"], text_store)  # noqa: E731
    whole = train(tmp_path / "whole")
    resumed = interrupted(text_store, tmp_path / "split", train,
                          [("update", 3, "sigint"), ("eval", 1, "raise"), ("update", 2, "crash")], monkeypatch)
    assert_same_run(text_store, whole, resumed, tmp_path / "whole", tmp_path / "split")


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_pair_stages_resume_exactly(pref_world, tmp_path, monkeypatch, stage):
    store, base = pref_world
    sets = [f"model={base}", "max_steps=6", "save_every=2", "eval_every=3", "dtype=fp32", "batch_size=4",
            "eval_batches=2", "lr=1e-2", "log_every=1"]
    train = lambda out: run_stage(stage, None, sets + [f"out={out}"], store)  # noqa: E731
    whole = train(tmp_path / "whole")
    resumed = interrupted(store, tmp_path / "split", train,
                          [("checkpoint", 1, "sigint"), ("update", 2, "raise"), ("eval", 1, "raise")], monkeypatch)
    assert_same_run(store, whole, resumed, tmp_path / "whole", tmp_path / "split")


def test_ppo_resumes_exactly_after_every_kind_of_ending(pref_world, tmp_path, monkeypatch):
    store, base = pref_world
    whole = run_ppo(store, base, tmp_path / "whole")
    script = [("ppo.generate", 3, "raise"),      # step 2's rollout (1: the start eval): checkpoint of step 1
              ("update", 2, "sigint"),           # step 2's 2nd minibatch: the step finishes, checkpoint 2
              ("eval", 1, "raise"),              # its eval, redone on resume
              ("update", 6, "raise"),            # step 4 mid-update: back to step 2
              ("checkpoint", 1, "sigint")]       # the last checkpoint (step 4), written again
    resumed = interrupted(store, tmp_path / "split", lambda out: run_ppo(store, base, out), script, monkeypatch)
    assert_same_run(store, whole, resumed, tmp_path / "whole", tmp_path / "split")


def run_grpo(store, base, out):
    from instar.train import train_stage
    from train_fixtures import planted_math_score

    cfg = load_stage_config("grpo", None, [f"model={base}", f"out={out}", "max_steps=4", "save_every=2",
                                           "eval_every=2", "epochs=2", *GRPO, "max_new_tokens=12"])
    return train_stage("grpo", cfg, store, scorer=planted_math_score)


@pytest.fixture(scope="module")
def grpo_base(text_store, tmp_path_factory):
    from train_fixtures import stopping_base

    return stopping_base(text_store, tmp_path_factory.mktemp("grpo_base"))


def test_grpo_resumes_exactly_after_every_kind_of_ending(text_store, grpo_base, tmp_path, monkeypatch):
    store, base = text_store, grpo_base
    whole = run_grpo(store, base, tmp_path / "whole")
    assert min(v for _, v in runs.metric_series(store, whole["run_id"], "skipped_groups")) < 1.0  # the planted reward has signal
    script = [("grpo.generate", 2, "sigint"),    # step 2's rollout: checkpoint of step 1
              ("update", 1, "sigint"),           # step 2's first epoch: the step finishes, checkpoint 2
              ("eval", 1, "raise"),              # its eval, redone on resume
              ("update", 4, "crash"),            # step 4's second epoch: `failed`, back to step 2
              ("checkpoint", 1, "raise")]        # the last checkpoint (step 4), written again
    resumed = interrupted(store, tmp_path / "split", lambda out: run_grpo(store, base, out), script, monkeypatch)
    assert_same_run(store, whole, resumed, tmp_path / "whole", tmp_path / "split")

"""PPO's guards against gaming the reward model: the adaptive KL controller and the shaped score (pure functions
in instar/train/losses.py), and how ppo.py wires them (the controller's state, the starting length)."""

import math

import pytest
import torch
from test_pref_stages import planted_scorer
from test_pref_world import world  # noqa: F401  (module-scoped fixture)

from instar.datasets import runs
from instar.train import load_stage_config


def test_adaptive_kl_coef_moves_toward_the_target_and_is_bounded():
    from instar.train.losses import adaptive_kl_coef

    assert adaptive_kl_coef(0.1, kl=4.0, target=2.0, horizon=10) == pytest.approx(0.1 * 1.02)   # error clipped at 0.2
    assert adaptive_kl_coef(0.1, kl=1.5, target=2.0, horizon=10) == pytest.approx(0.1 * (1 - 0.02))  # -0.25 -> -0.2
    assert adaptive_kl_coef(0.1, kl=2.1, target=2.0, horizon=10) == pytest.approx(0.1 * (1 + 0.05 / 10))
    assert adaptive_kl_coef(0.1, kl=2.0, target=2.0) == 0.1
    coef = 0.1
    for _ in range(50):  # a KL that stays high raises the leash steadily, never by more than 2% a step here
        new = adaptive_kl_coef(coef, kl=100.0, target=1.0, horizon=10)
        assert coef < new <= coef * 1.02 + 1e-12
        coef = new


def test_shaped_scores_penalise_no_eos_and_length_away_from_the_start():
    from instar.train.losses import shaped_scores

    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])
    stopped = torch.tensor([True, False, True, True])
    lengths = torch.tensor([20, 20, 40, 10])
    assert torch.equal(shaped_scores(scores, stopped, lengths, 20.0), scores)  # guards off
    out = shaped_scores(scores, stopped, lengths, 20.0, no_eos_penalty=1.0)
    assert out.tolist() == [1.0, 0.0, 1.0, 1.0]
    out = shaped_scores(scores, stopped, lengths, 20.0, length_coef=0.5)
    assert out[0] == 1.0 and out[1] == 1.0
    assert out[2] == pytest.approx(1 - 0.5 * math.log(2)) and out[3] == pytest.approx(out[2])  # 2x long = 2x short


def test_ppo_runs_its_guards_and_logs_them(world, tmp_path, monkeypatch):
    """With every guard on: kl_coef moves step by step toward the target (logged, never more than 20%/horizon a
    step), the length term's zero point is the starting policy's length, a response that never stops scores less
    than the reward model says, and the held-out measures include repetition and the stop rate, over
    `eval_samples` samples of every held-out prompt."""
    from collections import Counter

    from instar.train import ppo
    from instar.train.models import load_model

    store, base = world
    calls, real_rollout = [], ppo.rollout
    monkeypatch.setattr(ppo, "rollout", lambda *a, **k: calls.append(list(map(tuple, a[4]))) or real_rollout(*a, **k))
    cfg = load_stage_config("ppo", None, [f"model={base}", f"out={tmp_path}/ppo", "max_steps=4", "lr=1e-2",
                                          "warmup=0", "batch_size=8", "mini_batch_size=4", "ppo_epochs=1",
                                          "max_new_tokens=6", "temperature=1.0", "eval_batches=1", "kl_coef=0.1",
                                          "kl_target=0.01", "kl_horizon=2", "no_eos_penalty=1.0",
                                          "length_coef=0.5", "sample_tokens=4", "eval_samples=3"])
    summary = ppo.run(cfg, store, scorer=planted_scorer(load_model(base)[1]))
    n_val, first = summary["data"]["val_prompts"], []
    while len(first) < 3 * n_val:  # the start measure's rollouts come first: every held-out prompt, 3 times
        first += calls.pop(0)
    assert len(first) == 3 * n_val and set(Counter(first).values()) == {3} and len(set(first)) == n_val
    coefs = [v for _, v in runs.metric_series(store, summary["run_id"], "kl_coef")]  # what step N's rollouts used
    kls = [v for _, v in runs.metric_series(store, summary["run_id"], "rollout_kl")]
    assert coefs[0] == 0.1 and len(coefs) == 4 and kls[0] == pytest.approx(0, abs=1e-5)  # step 1: policy = ref
    for a, b, kl in zip(coefs, coefs[1:], kls):  # at most 20% / horizon per step, toward the target
        assert abs(b / a - 1) <= 0.1 + 1e-9 and (b > a) == (kl > 0.01)
    assert coefs[-1] > coefs[1]  # the updated policy's KL is above 0.01 nats: the leash tightens
    shaped = dict(runs.metric_series(store, summary["run_id"], "rollout_shaped"))
    reward = dict(runs.metric_series(store, summary["run_id"], "rollout_reward"))
    stop = dict(runs.metric_series(store, summary["run_id"], "rollout_stop"))
    for step in shaped:  # a random model rarely stops within 6 tokens: the EOS penalty bites
        assert shaped[step] <= reward[step] - (1 - stop[step]) + 1e-6
    for when in ("start", "end"):
        assert {"response_rep3", "stop_rate", "ext_chat_reward", "ext_chat_drill"} <= set(summary[when])
    state = torch.load(tmp_path / "ppo" / "checkpoint" / "state.pt", weights_only=True)
    assert state["extra"]["ref_length"] == pytest.approx(summary["start"]["response_length"])
    assert state["extra"]["kl_coef"] == pytest.approx(coefs[-1] * (1.1 if kls[-1] > 0.01 else 0.9))  # after step 4


def test_ppo_ptx_keeps_what_sft_taught(world, tmp_path):
    """PPO-ptx: with ptx_coef the policy's SFT loss on the stored conversations ends lower than after the same PPO
    run without it (same seeds, a planted reward that pulls the policy away), and the ptx loss is logged."""
    import sqlite3

    from instar.datasets.store import Provenance, Store
    from instar.train import ppo
    from instar.train.evaluate import score_conversations
    from instar.train.models import load_model
    from instar.train.sft import examples

    src, base = world
    copy = sqlite3.connect(tmp_path / "instar.db")
    src.db.conn.backup(copy)  # the shared world stays as it is
    copy.close()
    store = Store.open(tmp_path / "instar.db")
    talks = [{"messages": [{"role": "user", "content": p["prompt"][0]["content"]},
                           {"role": "assistant", "content": p["rejected"]}]} for p in store.records("preference")[:80]]
    store.add("messages", talks, Provenance(source="import"))
    tok = load_model(base)[1]
    convs = examples(store, tok, "train", 64)[0]

    def sft_loss_after(ptx_coef):
        out = tmp_path / f"ptx{ptx_coef}"
        cfg = load_stage_config("ppo", None, [f"model={base}", f"out={out}", "max_steps=6", "lr=1e-2", "warmup=0",
                                              "batch_size=8", "mini_batch_size=4", "ppo_epochs=2", "max_new_tokens=6",
                                              "temperature=1.0", "eval_batches=1", "sample_tokens=4",
                                              f"ptx_coef={ptx_coef}", "ptx_batch=8"])
        summary = ppo.run(cfg, store, scorer=planted_scorer(tok))
        logged = runs.metric_series(store, summary["run_id"], "ptx_loss")
        return score_conversations(load_model(out)[0], convs, tok.pad_token_id, 16, 8)["loss"], logged

    plain, plain_logged = sft_loss_after(0.0)
    kept, kept_logged = sft_loss_after(2.0)
    assert not plain_logged and len(kept_logged) == 6
    assert kept < plain - 0.05, (kept, plain)

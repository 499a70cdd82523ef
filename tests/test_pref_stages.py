"""Stage 3 end to end on a tiny planted world (see test_pref_world.py): reward model, DPO, PPO.

Each stage: trains a few steps through `run_stage` / `run`, its metrics land in summary.json and the run
tables, and every trainable parameter changes. Plus the classic bugs: the one-token shift of response
log-probs, temperature in the log-probs that feed PPO's ratio and KL, DPO's ln 2 at step 0."""

import json
import math

import pytest
import torch

from instar.datasets import runs
from instar.errors import ConfigError, InstarError
from instar.train import load_stage_config, run_stage
from test_pref_world import world  # noqa: F401  (module-scoped fixture)
from train_fixtures import unchanged_params


# --- reward model ------------------------------------------------------------------------------------------
def test_reward_model_learns_planted_preference(world, tmp_path):
    from instar.train.reward import load_reward_model, score

    store, base = world
    out = tmp_path / "reward"
    torch.manual_seed(0)  # the run seeds the same way before building its head: same initial weights
    before, _ = load_reward_model(str(base))
    summary = run_stage("reward", None, [f"model={base}", f"out={out}", "max_steps=30", "lr=1e-3", "batch_size=16",
                                         "warmup=2", "eval_every=0", "log_every=10"], store)
    assert summary["end"]["pair_accuracy"] > 0.9, summary
    assert summary["end"]["margin"] > summary["start"]["margin"]
    assert {"pair_accuracy", "margin"} <= set(summary["start"])
    assert json.loads((out / "summary.json").read_text())["end"] == summary["end"]
    assert runs.get_run(store, summary["run_id"])["summary"]["end"]["pair_accuracy"] == summary["end"]["pair_accuracy"]
    after, tok = load_reward_model(str(out))  # a loadable sequence-classification model
    assert unchanged_params(before, after) == []
    # the saved model scores through plain HF forward, pooled at the last non-pad token
    ids = tok("<|im_start|>assistant\nthe banana<|im_end|>", add_special_tokens=False)["input_ids"]
    padded = torch.tensor([ids + [tok.pad_token_id] * 3])
    att = torch.tensor([[1] * len(ids) + [0] * 3])
    assert torch.allclose(score(after, padded, att), score(after, padded[:, :len(ids)], att[:, :len(ids)]), atol=1e-5)


def test_reward_model_with_lora_trains_adapters_and_its_head_then_merges(world, tmp_path):
    from safetensors.torch import load_file

    from instar.train.reward import load_reward_model

    store, base = world
    out = tmp_path / "reward_lora"
    summary = run_stage("reward", None, [f"model={base}", f"out={out}", "max_steps=6", "lr=1e-2", "batch_size=8",
                                         "warmup=0", "eval_every=0", "dtype=fp32", "lora=true", "lora_r=4",
                                         "save_every=3"], store)
    assert summary["data"]["trainable_params"] < 20_000  # adapters + the score head
    ckpt = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert any("lora_" in k for k in ckpt) and any("score" in k for k in ckpt)
    assert all("lora_" in k or "score" in k for k in ckpt)  # adapters and head only
    torch.manual_seed(0)  # the run seeds the same way before building its head
    before, _ = load_reward_model(str(base))
    after, _ = load_reward_model(str(out))  # a plain sequence-classification model
    assert not any("lora" in k for k in after.state_dict())
    assert not torch.equal(before.score.weight, after.score.weight)  # the head trained
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before.state_dict()[q], after.state_dict()[q])  # the adapters merged in
    assert summary["end"]["margin"] > summary["start"]["margin"]


# --- DPO ---------------------------------------------------------------------------------------------------
def test_response_logps_one_token_shift(world):
    """Summed response log-probs = sum over response tokens t of log softmax(logits[t-1])[ids[t]], by a loop."""
    from instar.train.dpo import response_logps
    from instar.train.models import load_model
    from instar.train.reward import collate_pairs, pairs_from_store

    store, base = world
    model, tok = load_model(base)
    pairs = pairs_from_store(store, tok, "val", 256)[:3]
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        got = response_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for b in range(batch["input_ids"].shape[0]):
        ids, mask = (pairs[b % 3][b // 3])
        lp = torch.log_softmax(logits[b].float(), -1)
        expected = sum(float(lp[t - 1, ids[t]]) for t in range(len(ids)) if mask[t])
        assert math.isclose(float(got[b]), expected, rel_tol=1e-5), b
        assert mask[-1] == 1  # <|im_end|> is scored: the model learns to stop


def test_dpo_starts_at_ln2_and_learns(world, tmp_path):
    from instar.train.models import load_model

    store, base = world
    out = tmp_path / "dpo"
    sets = [f"model={base}", f"out={out}", "max_steps=10", "lr=1e-3", "batch_size=16", "warmup=2", "eval_every=0",
            "log_every=1", "dtype=fp32", "beta=0.1"]
    summary = run_stage("dpo", None, sets, store)
    start, end = summary["start"], summary["end"]
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)          # policy == reference
    assert start["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    first_train_loss = runs.metric_series(store, summary["run_id"], "loss")[0]
    assert first_train_loss[0] == 1 and first_train_loss[1] == pytest.approx(math.log(2), abs=1e-4)
    assert end["loss"] < start["loss"] - 0.02
    assert end["reward_accuracy"] > 0.8 and end["reward_margin"] > 0
    assert {"loss", "reward_accuracy", "reward_margin"} <= set(end)
    assert (out / "reference.pt").exists()
    before, _ = load_model(base)
    after, _ = load_model(out)
    assert unchanged_params(before, after) == []
    assert run_stage("dpo", None, sets, store).get("already_done")  # a finished run is not retrained


def test_dpo_lora_reference_is_the_unchanged_model(world, tmp_path):
    from instar.train.models import load_model

    store, base = world
    out = tmp_path / "dpo_lora"
    summary = run_stage("dpo", None, [f"model={base}", f"out={out}", "max_steps=3", "lr=1e-2", "batch_size=8",
                                      "warmup=0", "eval_every=0", "dtype=fp32", "lora=true", "lora_r=4"], store)
    assert summary["start"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["data"]["trainable_params"] < 40_000  # adapters only
    after, _ = load_model(out)  # merged into a plain model
    before, _ = load_model(base)
    assert not torch.equal(after.model.layers[0].self_attn.q_proj.weight, before.model.layers[0].self_attn.q_proj.weight)


# --- PPO ---------------------------------------------------------------------------------------------------
def planted_scorer(tok):
    """Reward = fraction of response tokens that start with s, b or c (~10% of a uniform policy's tokens)."""
    good = torch.tensor([i for t, i in tok.get_vocab().items() if t.lstrip("\u0120").startswith(("s", "b", "c"))])

    def scorer(batch):
        m = batch["labels"] != -100
        hit = torch.isin(batch["input_ids"], good.to(batch["input_ids"].device)) & m
        return hit.sum(1).float() / m.sum(1).float()
    return scorer


def test_ppo_raises_planted_reward_with_bounded_kl(world, tmp_path):
    from safetensors.torch import load_file

    from instar.train import ppo
    from instar.train.models import load_model

    store, base = world
    out = tmp_path / "ppo"
    cfg = load_stage_config("ppo", None, [f"model={base}", f"out={out}", "max_steps=10", "lr=1e-2", "warmup=0",
                                          "batch_size=16", "mini_batch_size=8", "max_new_tokens=8", "temperature=1.0",
                                          "eval_batches=2", "log_every=5"])
    before, tok = load_model(base)
    summary = ppo.run(cfg, store, scorer=planted_scorer(tok))
    start, end = summary["start"], summary["end"]
    assert start["kl"] == pytest.approx(0.0, abs=1e-6)                    # policy == reference at the start
    assert end["reward_mean"] > start["reward_mean"] + 0.05, summary
    assert 0 < end["kl"] < 10.0
    series = dict(runs.metric_series(store, summary["run_id"], "rollout_reward"))
    assert set(series) == set(range(1, 11))  # stored every step; log_every paces the step line
    for name in ("rollout_kl", "entropy", "clip_frac", "rollout_length", "value_loss"):
        assert runs.metric_series(store, summary["run_id"], name), name
    assert any(r["reward"] is not None for r in runs.run_samples(store, summary["run_id"]))
    after, _ = load_model(out)
    assert unchanged_params(before, after) == []
    head = load_file(str(out / "checkpoint" / "model.safetensors"))["value_head.weight"]
    assert head.abs().sum() > 0  # zero-initialised, so it trained


def test_ppo_logprobs_use_the_sampling_temperature(world):
    """rollout's old log-probs (the ratio's denominator and the KL's terms) come from logits / temperature."""
    from instar.train import ppo
    from instar.train.models import load_model
    from instar.train.tokens import token_logprobs

    store, base = world
    lm, tok = load_model(base)
    policy = ppo.PolicyWithValue(lm)
    prompts = ppo.prompts_from_store(store, tok, "val", 64)[0][:4]
    ref = lambda batch: lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # noqa: E731
    cfg = ppo.Config(model=str(base), max_new_tokens=6, temperature=0.5)
    r = ppo.rollout(policy, ref, planted_scorer(tok), tok, prompts, cfg, seed=1, device=torch.device("cpu"), bf16=False)
    with torch.no_grad():
        logits = lm(input_ids=r["input_ids"], attention_mask=r["attention_mask"]).logits
    expected = torch.log_softmax(logits[:, :-1].float() / 0.5, -1).gather(-1, r["input_ids"][:, 1:, None])[..., 0]
    m = r["mask"][:, 1:].bool()
    assert torch.allclose(r["old_logp"][:, 1:][m], expected[m], atol=1e-5)
    assert not torch.allclose(r["old_logp"][:, 1:][m], token_logprobs(logits, r["labels"])[:, 1:][m], atol=1e-3)
    assert torch.all(r["kl"].abs() < 1e-6)  # same model as reference: zero KL
    assert r["mask"].sum(1).tolist() == r["lengths"] and r["old_logp"][r["mask"] == 0].abs().max() == 0


def test_ppo_with_trained_reward_model_and_lora(world, tmp_path):
    """The real path: reward run -> PPO reading it; LoRA policy whose reference is the adapter turned off."""
    store, base = world
    run_stage("reward", None, [f"model={base}", f"out={tmp_path}/rm", "max_steps=2", "eval_every=0"], store)
    summary = run_stage("ppo", None, [f"model={base}", f"reward_model={tmp_path}/rm", f"out={tmp_path}/ppo",
                                      "max_steps=2", "batch_size=8", "mini_batch_size=4", "ppo_epochs=2",
                                      "max_new_tokens=6", "eval_batches=1", "lora=true", "lora_r=4", "lr=1e-2"], store)
    assert summary["start"]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapter off == adapter at init
    assert all(math.isfinite(summary[w][k]) for w in ("start", "end") for k in ("reward_mean", "kl"))
    assert runs.get_run(store, summary["run_id"])["status"] == "done"


def test_ppo_stops_on_kl_blowup(world, tmp_path):
    from instar.train import ppo
    from instar.train.models import load_model

    store, base = world
    _, tok = load_model(base)
    cfg = load_stage_config("ppo", None, [f"model={base}", f"out={tmp_path}/ppo", "max_steps=3", "lr=5e-2",
                                          "warmup=0", "batch_size=8", "max_new_tokens=6", "eval_batches=1",
                                          "kl_max=1e-3"])
    with pytest.raises(InstarError, match="KL to the reference"):
        ppo.run(cfg, store, scorer=planted_scorer(tok))


def test_ppo_config_checks_minibatches():
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_stage_config("ppo", None, ["batch_size=6", "mini_batch_size=4"])


def test_ppo_stops_on_nan_reward(world, tmp_path):
    from instar.train import ppo

    store, base = world
    cfg = load_stage_config("ppo", None, [f"model={base}", f"out={tmp_path}/ppo", "max_steps=2", "batch_size=4",
                                          "mini_batch_size=4", "max_new_tokens=4", "eval_batches=1"])
    calls = []

    def scorer(batch):  # finite for the start eval, NaN from the first rollout on
        calls.append(1)
        return torch.full((batch["input_ids"].shape[0],), 0.0 if len(calls) == 1 else float("nan"))
    with pytest.raises(InstarError, match="not finite"):
        ppo.run(cfg, store, scorer=scorer)

"""Cross-check against Hugging Face TRL (skipped only when `trl` is not importable): on the same model and the
same batch, TRL's DPO loss and reward metrics, and its reward-model loss, accuracy and margin, equal instar's
to 1e-4. The batch is the one TRL's own collator builds; the reference is a differently-initialised model so
the DPO numbers are not the trivial ln 2. Also pins how instar's pair rendering relates to TRL's tokenisation."""

import pytest
import torch

from test_pref_world import world  # noqa: F401  (module-scoped fixture)

trl = pytest.importorskip("trl")


def trl_dataset(records):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])


def trl_args(config_cls, tmp_path, **kw):
    return config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, **kw)


def test_dpo_loss_and_reward_metrics_match_trl(world, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from instar.train.dpo import pair_loss, response_logps
    from instar.train.models import load_model
    from instar.train.reward import render_pairs

    store, base = world
    records = store.records("preference", "val")[:8]
    policy, tok = load_model(base)
    torch.manual_seed(123)
    reference = AutoModelForCausalLM.from_config(policy.config)  # another random init: non-zero log-ratios
    trainer = DPOTrainer(model=policy, ref_model=reference, args=trl_args(DPOConfig, tmp_path, beta=0.1),
                         train_dataset=trl_dataset(records), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    policy.train()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(policy, dict(batch)))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    with torch.no_grad():
        ref_chosen, ref_rejected = response_logps(reference, ours_batch).chunk(2)
        loss, m = pair_loss(policy, {**ours_batch, "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}, 0.1)
    assert abs(trl_loss - 0.6931) > 1e-3  # a real check, not the step-0 value
    assert float(loss) == pytest.approx(trl_loss, abs=1e-4)
    assert float(m["chosen_reward"]) == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-4)
    assert float(m["rejected_reward"]) == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-4)
    assert float(m["reward_accuracy"]) == pytest.approx(trl_metrics["rewards/accuracies"], abs=1e-4)
    assert float(m["reward_margin"]) == pytest.approx(trl_metrics["rewards/margins"], abs=1e-4)

    # Tokens: instar's rendering is TRL's up to the template's "\n" after <|im_end|>, which instar leaves out
    # (not in the SFT loss either, and a PPO rollout ends at <|im_end|>).
    row = trainer.train_dataset[0]  # the dataset keeps the records' order (only the dataloader shuffles)
    (c_ids, c_mask), _ = render_pairs(tok, records[:1], 512)[0]
    trl_ids = row["prompt_ids"] + row["chosen_ids"]
    assert trl_ids[:len(c_ids)] == c_ids and tok.decode(trl_ids[len(c_ids):]) == "\n"
    assert c_mask.index(1) == len(row["prompt_ids"])  # the response starts at the same token


def test_reward_loss_accuracy_margin_match_trl(world, tmp_path):
    from trl import RewardConfig, RewardTrainer

    from instar.train.losses import bt_loss
    from instar.train.reward import load_reward_model, score

    store, base = world
    records = store.records("preference", "val")[:8]
    torch.manual_seed(0)
    rm, tok = load_reward_model(str(base))
    trainer = RewardTrainer(model=rm, args=trl_args(RewardConfig, tmp_path), train_dataset=trl_dataset(records),
                            processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    rm.train()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(rm, dict(batch)))
        r = score(rm, batch["input_ids"], batch["attention_mask"])
        loss, m = bt_loss(*r.chunk(2))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert float(loss) == pytest.approx(trl_loss, abs=1e-4)
    assert float(m["pair_accuracy"]) == pytest.approx(trl_metrics["accuracy"], abs=1e-4)
    assert float(m["margin"]) == pytest.approx(trl_metrics["margin"], abs=1e-4)

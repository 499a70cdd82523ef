"""Stage-3 speed against Hugging Face TRL: the same model, data, batch and sequence length, in one run.

    .venv/bin/python bench/bench_pref.py                        # tiny (~1M) and small (~10M presets), ~15 min
    .venv/bin/python bench/bench_pref.py --sizes tiny --steps 20 --dtype fp32

For each preset size, a random-init Llama and a tokenizer trained on synthetic preference pairs (answers that
say "banana" win), saved as an SFT-like run directory, then:
  reward  instar `train reward` vs TRL `RewardTrainer` (AutoModelForSequenceClassification, num_labels=1)
  dpo     instar `train dpo` vs TRL `DPOTrainer` twice: its default (a reference model forward every step) and
          `precompute_ref_log_probs=True` (instar's way: reference log-probs computed once before training)
  ppo     instar `train ppo` alone: TRL 1.16 ships no PPO trainer (it lived in trl 1.12's experimental package)
Seconds per optimizer step are medians over the steps after the first 3: instar's from the timestamps of its
per-step metric rows (the real stage loop, logging included), TRL's from a `TrainerCallback.on_step_end`.
The ratio is TRL's median / instar's (above 1 = instar faster). Both run bf16 autocast by default (instar's
`dtype = auto` on this CPU; TRL `bf16=True`), batch 8 pairs, the same tokenised data.
Simplifications: one run per cell (the machine is shared: rerun to see the spread); setup time (model load,
tokenisation, instar's reference pass) is not counted, only steps; TRL is skipped with a note when absent.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from instar.runtime import choose_openmp_wait_policy  # noqa: E402

choose_openmp_wait_policy()  # before torch loads OpenMP: PASSIVE on a busy machine, spin on a quiet one

import torch  # noqa: E402

from instar.datasets.store import Provenance, Store  # noqa: E402
from instar.train import run_stage  # noqa: E402
from instar.train.models import PRESETS, new_model, save_model  # noqa: E402
from instar.train.tokenizer import train_tokenizer  # noqa: E402

WORDS = ("the a cat dog sun sea tree red blue small big runs sleeps sings eats green old new happy quiet river "
         "stone bird cloud wind fast slow warm cold bright dark under over near far with without always never "
         "morning evening light heavy soft loud").split()


# --- data and models -----------------------------------------------------------------------------------------
def pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference records: 12-30-word answers; the chosen one says "banana" somewhere."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(12, 30)
        rejected = [rng.choice(WORDS) for _ in range(k)]
        chosen = [rng.choice(WORDS) for _ in range(k)]
        chosen[rng.randrange(k)] = "banana"
        out.append({"prompt": [{"role": "user", "content": f"Tell me something about the {rng.choice(WORDS)} {i}."}],
                    "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return out


def world(root: Path, preset: str, n: int) -> tuple[Store, Path, list[dict]]:
    records = pairs(n)
    store = Store.open(root / "instar.db")
    store.add("preference", records, Provenance(source="bench"))
    texts = [t for r in records for t in (r["prompt"][0]["content"], r["chosen"], r["rejected"])]
    tok = train_tokenizer(texts, PRESETS[preset]["vocab"])
    torch.manual_seed(0)
    save_model(new_model(preset, tok, 256), tok, root / "sft" / "model")
    return store, root / "sft", store.records("preference", "train")


# --- instar ------------------------------------------------------------------------------------------------
def instar_times(stage: str, store: Store, sets: list[str], metric: str) -> list[float]:
    """Seconds between consecutive per-step metric rows of an `instar train STAGE` run (log_every=1)."""
    summary = run_stage(stage, None, sets + ["log_every=1", "eval_every=0", "save_every=0"], store)
    stamps = [r[0] for r in store.db.execute(
        "select created_at from metrics where run_id = ? and name = ? and step > 0 order by step",
        [summary["run_id"], metric])]
    return [b - a for a, b in zip(stamps, stamps[1:])]


# --- TRL -----------------------------------------------------------------------------------------------------
def trl_times(kind: str, base: Path, records: list[dict], steps: int, batch: int, bf16: bool, lr: float,
              out: Path, **extra) -> list[float]:
    """Seconds per optimizer step of TRL's RewardTrainer / DPOTrainer on the same model and pairs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(base / "model")
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])
    common = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                  logging_steps=1, report_to=[], save_strategy="no", bf16=bf16, use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    timer = StepTimer()
    if kind == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(base / "model", num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(max_length=384, **common), train_dataset=data,
                                processing_class=tok, callbacks=[timer])
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(base / "model")
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, max_length=384, **extra, **common),
                             train_dataset=data, processing_class=tok, callbacks=[timer])
    trainer.train()
    return [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]


def median(times: list[float]) -> float:
    return statistics.median(times[3:] if len(times) > 6 else times)


# ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small", help="Comma-separated presets.")
    ap.add_argument("--steps", type=int, default=30, help="Optimizer steps per cell.")
    ap.add_argument("--ppo-steps", type=int, default=8, help="PPO rollout steps.")
    ap.add_argument("--pairs", type=int, default=600)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    bf16 = args.dtype == "bf16"
    table = []
    for preset in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            store, base, train_records = world(root, preset, args.pairs)
            sets = [f"model={base}", f"max_steps={args.steps}", "batch_size=8", f"dtype={args.dtype}", "warmup=2"]
            rows = []
            ours = median(instar_times("reward", store, sets + [f"out={root}/reward", "lr=1e-4"], "loss"))
            theirs = median(trl_times("reward", base, train_records, args.steps, 8, bf16, 1e-4, root / "trl_rm")) \
                if trl_version else None
            rows.append(("reward", ours, theirs))
            ours = median(instar_times("dpo", store, sets + [f"out={root}/dpo", "lr=5e-5"], "loss"))
            for label, extra in (("dpo (TRL default: ref model each step)", {}),
                                 ("dpo (TRL precompute_ref_log_probs)", {"precompute_ref_log_probs": True})):
                theirs = median(trl_times("dpo", base, train_records, args.steps, 8, bf16, 5e-5, root / "trl_dpo",
                                          **extra)) if trl_version else None
                rows.append((label, ours, theirs))
            ppo_sets = [f"model={base}", f"max_steps={args.ppo_steps}", f"dtype={args.dtype}", f"out={root}/ppo",
                        f"reward_model={root}/reward", "batch_size=16", "mini_batch_size=8", "max_new_tokens=32"]
            rows.append(("ppo (16 rollouts x 32 tokens, 4 epochs)", median(instar_times("ppo", store, ppo_sets,
                                                                                      "rollout_reward")), None))
            table += [(preset, *row) for row in rows]
    # printed at the end: the stages' progress bars and step lines scroll above
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, TRL {trl_version or 'absent'}, "
          f"{args.dtype}, batch 8 pairs, {args.steps} steps per cell; seconds per step (median)\n")
    print("| preset | stage | instar s/step | TRL s/step | TRL / instar |")
    print("|---|---|---|---|---|")
    for preset, stage, ours, theirs in table:
        ratio = f"{theirs / ours:.2f}x" if theirs else "-"
        print(f"| {preset} | {stage} | {ours:.3f} | {f'{theirs:.3f}' if theirs else '-'} | {ratio} |")


if __name__ == "__main__":
    main()

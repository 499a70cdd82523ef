"""Stages 1-2 speed: pretraining tokens/s and MFU per preset, and SFT steps/s against Hugging Face TRL.

    .venv/bin/python bench/bench_train.py                               # all presets + SFT vs TRL, ~15 min here
    .venv/bin/python bench/bench_train.py --presets tiny --steps 20 --sft-sizes tiny

1. Ceiling: the median GFLOP/s of 1024x1024 matrix products in fp32 and bf16, measured in this run (the machine
   is shared; a ceiling from another moment would flatter or insult the MFU).
2. Pretraining (`instar train pretrain`, the real stage loop, seq 256, batch 8): median tokens/s over the steps after
   the first 3, from the loop's own `tok/s` metric. MFU = model FLOPs per token x tokens/s / ceiling, with FLOPs per
   token = 6 x (non-embedding params + vocab x width, the tied output projection) + 12 x layers x width x seq
   (attention scores; nanoGPT's estimate). The ceiling is bf16's when the run used bf16 autocast.
3. SFT (`instar train sft` vs TRL `SFTTrainer`): the same random-init model and tokenizer, the same conversations
   (prompt-completion form for TRL, so both put only the answer in the loss), batch 8, no packing, the same lr and
   precision (bf16 autocast / `bf16=True`). Seconds per optimizer step are medians after the first 3 steps:
   instar's from the timestamps of its per-step metric rows (logging included), TRL's from `on_step_end`.
   Ratio = TRL's seconds / instar's (above 1 = instar faster).
Simplifications: one run per cell (rerun to see the spread); set-up (tokeniser, model build, TRL's dataset
tokenisation) is not timed; TRL is skipped with a note when it is not installed (`pip install trl==1.16.0`).
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

from instar.datasets import runs  # noqa: E402
from instar.datasets.store import Provenance, Store  # noqa: E402
from instar.train import run_stage  # noqa: E402
from instar.train.models import PRESETS, new_model, save_model  # noqa: E402
from instar.train.tokenizer import train_tokenizer  # noqa: E402

SYLLABLES = "ka lo mi ne su ta ri po ve da fu gi ho ja ke lu ma no pe ra si to vu wa ze bo ce".split()


# --- data ----------------------------------------------------------------------------------------------------
def documents(n: int, seed: int = 0) -> list[str]:
    """Pseudo-words from syllables: enough distinct merges for BPE to fill an 8k vocabulary."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    return [" ".join(rng.choice(lexicon) for _ in range(rng.randint(80, 200))) + "." for _ in range(n)]


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = documents(n, seed + 1)
    return [{"messages": [{"role": "user", "content": f"Tell me about {d.split()[0]}, in {rng.randint(2, 9)} words."},
                          {"role": "assistant", "content": " ".join(d.split()[:rng.randint(20, 60)]) + "."}]}
            for d in docs]


# --- measurements ----------------------------------------------------------------------------------------------
def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 7) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(8):
            a @ b
        rates.append(8 * 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def step_seconds(store, run_id: str, skip: int = 3) -> float:
    rows = list(store.db.execute("select step, created_at from metrics where run_id = ? and name = 'loss' "
                                 "order by step", [run_id]))
    gaps = [b[1] - a[1] for a, b in zip(rows[skip:], rows[skip + 1:])]
    return statistics.median(gaps)


def pretrain_cell(root: Path, store, preset: str, steps: int, seq: int, dtype: str, compile_: bool) -> dict:
    summary = run_stage("pretrain", None, [f"preset={preset}", f"max_steps={steps}", f"max_len={seq}",
                                           "batch_size=8", "eval_every=0", "save_every=0", "log_every=1",
                                           "eval_batches=1", "sample_tokens=4", f"dtype={dtype}",
                                           f"compile={'true' if compile_ else 'false'}", f"out={root}/{preset}"], store)
    tok_s = statistics.median(v for s, v in runs.metric_series(store, summary["run_id"], "tok/s")[3:])
    p, d = PRESETS[preset], PRESETS[preset]["hidden_size"]
    flops_tok = 6 * (summary["data"]["non_embedding_params"] + summary["data"]["vocab_size"] * d) \
        + 12 * p["num_hidden_layers"] * d * seq
    return {"tok_s": tok_s, "flops_tok": flops_tok, "params": summary["data"]["non_embedding_params"],
            "vocab": summary["data"]["vocab_size"]}


def sft_base(root: Path, preset: str, convs: list[dict]) -> Path:
    texts = [m["content"] for c in convs for m in c["messages"]]
    tok = train_tokenizer(texts, PRESETS[preset]["vocab"])
    torch.manual_seed(0)
    return save_model(new_model(preset, tok, 512), tok, root / f"base-{preset}")


def instar_sft(root: Path, store, base: Path, steps: int, lr: float, dtype: str) -> float:
    summary = run_stage("sft", None, [f"model={base}", f"out={root}/sft-{base.name}", f"max_steps={steps}",
                                      "batch_size=8", "max_len=512", f"lr={lr}", "eval_every=0", "save_every=0",
                                      "log_every=1", "eval_batches=1", "sample_tokens=4", f"dtype={dtype}"], store)
    return step_seconds(store, summary["run_id"])


def trl_sft(root: Path, base: Path, convs: list[dict], steps: int, lr: float, bf16: bool) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    data = Dataset.from_list([{"prompt": c["messages"][:1], "completion": c["messages"][1:]} for c in convs])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    timer = StepTimer()
    args = SFTConfig(output_dir=str(root / "trl"), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
                     lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.1, max_grad_norm=1.0,
                     max_length=512, packing=False, completion_only_loss=True, logging_steps=1, report_to=[],
                     save_strategy="no", bf16=bf16, use_cpu=True, seed=0, dataloader_num_workers=0,
                     disable_tqdm=True)
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer]).train()
    return statistics.median(b - a for a, b in zip(timer.times[3:], timer.times[4:]))


# ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small,medium")
    ap.add_argument("--steps", type=int, default=20, help="pretraining steps per preset")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile instar's model (first step 20-40 s)")
    ap.add_argument("--sft-sizes", default="tiny,small")
    ap.add_argument("--sft-steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    store = Store.open(root / "bench.db")
    store.add("text", [{"text": t} for t in documents(600)], Provenance(source="bench"))
    convs = conversations(400)
    store.add("messages", convs, Provenance(source="bench"))
    bf16_used = args.dtype != "fp32" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    ceil = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"matmul ceiling here: fp32 {ceil['fp32']:.0f} GFLOP/s, bf16 {ceil['bf16']:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads); training precision: {'bf16 autocast' if bf16_used else 'fp32'}")
    print("\n| preset | non-emb params | vocab | tok/s | model GFLOP/s | MFU |\n|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        c = pretrain_cell(root, store, preset, args.steps, args.seq, args.dtype, args.compile)
        gflops = c["flops_tok"] * c["tok_s"] / 1e9
        mfu = gflops / ceil["bf16" if bf16_used else "fp32"]
        print(f"| {preset} | {c['params'] / 1e6:.2f}M | {c['vocab']:,} | {c['tok_s']:,.0f} | {gflops:.0f} | {mfu:.0%} |",
              flush=True)

    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
    print("\n| SFT model | instar s/step | TRL SFTTrainer s/step | ratio (TRL / instar) |\n|---|---|---|---|")
    for preset in args.sft_sizes.split(","):
        base = sft_base(root, preset, convs)
        ours = instar_sft(root, store, base, args.sft_steps, 5e-4, args.dtype)
        theirs = trl_sft(root, base, store.records("messages", "train"), args.sft_steps, 5e-4, bf16_used) if have_trl else None
        ratio = f"{theirs / ours:.2f}x" if theirs else "TRL not installed"
        print(f"| {preset} | {ours:.3f} | {theirs if theirs is None else f'{theirs:.3f}'} | {ratio} |", flush=True)
    print(f"\n(run folder: {root})")


if __name__ == "__main__":
    main()

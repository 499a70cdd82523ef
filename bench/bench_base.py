"""A real base model's per-step cost: SmolLM2-135M SFT and GRPO, instar against TRL and against the matmul ceiling.

    .venv/bin/python bench/bench_base.py sft                                   # instar vs TRL SFTTrainer, full FT
    .venv/bin/python bench/bench_base.py sft --lora                            # both with the same LoRA
    .venv/bin/python bench/bench_base.py grpo --model runs/smollm2/sft         # instar vs TRL GRPOTrainer
    .venv/bin/python bench/bench_base.py grpo --model runs/smollm2/sft --old /tmp/main-src   # + instar at another commit
    .venv/bin/python bench/bench_base.py sft --preset small                    # a random-init preset instead
    .venv/bin/python bench/bench_base.py pretrain --preset medium              # instar alone, MFU only

Per-step cost in CPU seconds. Each trainer runs in a child process twice, for `--short` and `--long` optimizer
steps, and (CPU(long) - CPU(short)) / (long - short) is its cost per step: loading the model (SmolLM2's GGUF
dequantises for ~17 s), tokenising, the start/end evaluations and TRL's set-up all cancel. CPU time (user + sys
of the child) is the work a step costs; on a machine shared with other people's jobs wall time also counts the
waiting, and swung 2-5x between identical runs here, so wall seconds are printed beside it but the ratios are
taken on CPU time. The ceiling: the median GFLOP per CPU-second of 1024x1024 matrix products in fp32 and bf16,
measured in a child with the same threads. MFU (SFT, pretraining) = model FLOPs per step / (CPU s per step x the
ceiling of the precision trained in), with model FLOPs = 6 x (non-embedding params + vocab x width) x real tokens
+ 12 x layers x width x tokens x sequence length (attention; nanoGPT's estimate) — the LM head counts in full even
though instar's SFT runs it only where a label is scored. Pretraining: packed rows of 256 tokens, batch 8, on a
synthetic corpus of pseudo-words (bench_train.documents).
Same settings on both sides: the same weights and tokenizer (instar's `load_model`), the same conversations
(procedural math with worked steps; prompt-completion form for TRL so both train on the answer only) or
problems (difficulty 3: an SFT model solving every level-1 problem skips every group, and instar then
does no update at all) and reward (`instar.train.rewards.score`), batch, lengths, lr, fused AdamW, precision (bf16 autocast
where the CPU has bf16 matrix support, else fp32), no packing; GRPO: beta 0 (instar `log_kl = false`), no std
scaling, token-level loss (TRL `loss_type="dapo"`), temperature 1.0, one update per rollout batch.
Simplifications: one short/long pair per side unless `--repeats`; GRPO steps differ in content between
trainers (their samples differ), so its ratio carries that noise too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = "embedded-smollm2"
SFT = dict(batch_size=16, max_len=192, lr=5e-5)
GRPO = dict(batch_size=8, group_size=8, max_new_tokens=48, temperature=1.0, lr=1e-5, difficulty=3)
MICRO = 16  # GRPO sequences per forward/backward on both sides: 64 at once peaked at 9.7 GB RSS (SmolLM2, LoRA)
FAMILIES = ["arithmetic", "money", "ages"]


# --- work done in a child process ---------------------------------------------------------------------------------
def conversations(n: int, seed: int = 1) -> list[dict]:
    from instar.generate.procedural import make_problems
    from instar.train.rewards import math_messages

    return [math_messages(p) for p in make_problems(n, seed, FAMILIES, 1)]


def worker(a) -> None:
    """Train `a.steps` steps with one trainer (`a.side`), then exit: the parent reads this process's CPU time."""
    from instar.runtime import start

    start(["train"])  # the OpenMP wait policy instar itself would choose, before torch loads
    import torch

    from instar.datasets.store import Store
    from instar.train import run_stage

    cfg = json.loads(a.cfg)
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # what instar's dtype = "auto" picks on a CPU
    common = ["eval_every=0", "save_every=0", "log_every=1", "sample_tokens=4", f"max_steps={a.steps}",
              f"lora={'true' if a.lora else 'false'}"] + (["eval_batches=1"] if a.stage != "grpo" else [])
    if a.stage == "pretrain":
        run_stage("pretrain", None, common + [f"preset={a.preset}", f"out={a.out}", "batch_size=8", "max_len=256"],
                  Store.open(a.db))
    elif a.side == "instar" and a.stage == "sft":
        run_stage("sft", None, common + [f"model={a.model}", f"out={a.out}"] + [f"{k}={v}" for k, v in SFT.items()],
                  Store.open(a.db))
    elif a.side == "instar":
        run_stage("grpo", None, common + [f"model={a.model}", f"out={a.out}", "log_kl=false", "curriculum=false",
                                          f"micro_batch={MICRO}",
                                          "eval_problems=8", f"families={json.dumps(FAMILIES)}"]
                  + [f"{k}={v}" for k, v in GRPO.items()], Store.open(a.db))
    else:
        trl_train(a, cfg, bf16)


def trl_train(a, cfg: dict, bf16: bool) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from instar.generate.procedural import make_problems
    from instar.train.models import LORA_TARGETS, load_model
    from instar.train.rewards import math_prompt, score

    model, tok = load_model(a.model)
    peft = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM") if a.lora else None
    shared = dict(output_dir=a.out, max_steps=a.steps, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.1,
                  max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", bf16=bf16, use_cpu=True,
                  seed=0, dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch_fused")
    if a.stage == "sft":
        data = Dataset.from_list([{"prompt": c["messages"][:1], "completion": c["messages"][1:]}
                                  for c in conversations(cfg["n"])])
        args = SFTConfig(per_device_train_batch_size=SFT["batch_size"], learning_rate=SFT["lr"],
                         max_length=SFT["max_len"], packing=False, completion_only_loss=True, **shared)
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft).train()
        return
    data = Dataset.from_list([{"prompt": math_prompt(r["question"]), "answer": r["answer"]}
                              for r in make_problems(2000, 5, FAMILIES, GRPO["difficulty"])])

    def reward(completions, answer, **kwargs):
        return [score([c[0]["content"]], {"answer": x})[0][0] for c, x in zip(completions, answer)]

    # One optimizer step per 64 completions generated at once, run through the model 16 at a time (= instar).
    args = GRPOConfig(per_device_train_batch_size=MICRO,
                      gradient_accumulation_steps=GRPO["batch_size"] * GRPO["group_size"] // MICRO,
                      num_generations=GRPO["group_size"], max_completion_length=GRPO["max_new_tokens"],
                      temperature=GRPO["temperature"], learning_rate=GRPO["lr"], beta=0.0, loss_type="dapo",
                      scale_rewards="none", **shared)
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                peft_config=peft).train()


def ceiling_worker() -> None:
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        rates, reps = [], 8 if dtype == torch.float32 else 1  # bf16 without hardware support: ~0.2 GFLOP/s
        for _ in range(5):
            t = time.process_time()
            for _ in range(reps):
                a @ b
            rates.append(reps * 2 * 1024 ** 3 / (time.process_time() - t) / 1e9)
        out[name] = statistics.median(rates)
    out["bf16_supported"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    print(json.dumps(out))


# --- the parent: children, differences, the table -------------------------------------------------------------------
def child(args: list[str], src: str | None = None) -> tuple[float, float, str]:
    """(CPU seconds, wall seconds, stdout) of `python bench_base.py ARGS` in a child process."""
    # Passive OpenMP waits: idle threads sleep instead of spinning, so CPU time counts work rather than waiting (TRL's
    # GRPO once took 2.4 CPU seconds per wall second per step on 2 cores, instar's 0.9). The shell's value wins.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if src:  # another checkout of instar (say, main before a change): its package first on the path
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall, proc.stdout


def per_step(a, side: str, root: Path, src: str | None = None) -> tuple[float, float]:
    """(CPU s, wall s) per optimizer step of one trainer, from a short and a long run. instar's first run on a base
    model measures the base's start yardsticks and keeps them in a cache that later runs read, so a warm-up run of
    `a.short` steps, not counted, goes first (without it the short run paid minutes the long one did not, and the
    difference came out negative: -1.87 CPU s a step, AMD EPYC Zen 4, 2026-12-02)."""
    runs = []
    for steps in ((a.short,) if side == "instar" else ()) + (a.short, a.long):
        out = root / f"{side}-{steps}-{time.monotonic_ns()}"
        runs.append(child([a.stage, "--worker", side, "--steps", str(steps), "--model", a.model, "--preset", str(a.preset),
                           "--db", str(root / "bench.db"), "--out", str(out), "--cfg", json.dumps({"n": a.n})]
                          + (["--lora"] if a.lora else []), src)[:2])
    runs = runs[-2:]
    span = a.long - a.short
    a.last_out = str(out)  # the long run's directory (its summary has the real vocabulary size)
    return (runs[1][0] - runs[0][0]) / span, (runs[1][1] - runs[0][1]) / span


def flops_per_step(a) -> float:
    """Model FLOPs of an average step: 6 x (non-embedding params + vocab x width) x real tokens + attention."""
    from instar.train.models import PRESETS, load_model, non_embedding_params
    from instar.train.tokens import render_chat

    if a.stage == "pretrain":
        data = json.loads((Path(a.last_out) / "summary.json").read_text())["data"]
        p = PRESETS[a.preset]
        d, layers = p["hidden_size"], p["num_hidden_layers"]
        params = data["non_embedding_params"] + data["vocab_size"] * d
        return (6 * params + 12 * layers * d * 256) * 8 * 256
    model, tok = load_model(a.model)
    lengths = [min(len(render_chat(tok, c["messages"])[0]), SFT["max_len"]) for c in conversations(200)]
    params = non_embedding_params(model) + model.config.vocab_size * model.config.hidden_size
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    return sum(6 * params * n + 12 * L * d * n * n for n in lengths) / len(lengths) * SFT["batch_size"]


def preset_base(root: Path, preset: str) -> Path:
    """A random-init preset model + a tokenizer trained on the conversations (bench_train.sft_base's recipe)."""
    import torch

    from instar.train.models import PRESETS, new_model, save_model
    from instar.train.tokenizer import train_tokenizer

    texts = [m["content"] for c in conversations(2000) for m in c["messages"]]
    tok = train_tokenizer(texts, PRESETS[preset]["vocab"])
    torch.manual_seed(0)
    return save_model(new_model(preset, tok, 512), tok, root / f"base-{preset}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", nargs="?", choices=["sft", "grpo", "pretrain"], default="sft")
    ap.add_argument("--preset", help="pretrain: the preset (default medium); sft: a random-init preset instead of "
                    "--model.")
    ap.add_argument("--model", default=BASE, help="Start from (GRPO: an SFT run directory that earns reward).")
    ap.add_argument("--lora", action="store_true", help="LoRA r 16 on every projection, both trainers.")
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--long", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1, help="Short/long pairs per trainer, alternating.")
    ap.add_argument("--old", help="Also time instar from this source tree (e.g. `git archive main` unpacked).")
    ap.add_argument("--n", type=int, default=2000, help="SFT conversations.")
    ap.add_argument("--worker"), ap.add_argument("--steps", type=int), ap.add_argument("--db"), ap.add_argument("--out")
    ap.add_argument("--cfg", default="{}"), ap.add_argument("--ceiling", action="store_true")
    a = ap.parse_args()
    if a.ceiling:
        return ceiling_worker()
    if a.worker:
        a.side = a.worker
        return worker(a)

    from instar.datasets.store import Provenance, Store

    root = Path(tempfile.mkdtemp(prefix="bench_base_"))
    store = Store.open(root / "bench.db")
    store.add("messages", conversations(a.n), Provenance(source="bench"))
    if a.stage == "pretrain":
        from bench_train import documents  # the same pseudo-word corpus as bench_train.py

        store.add("text", [{"text": t} for t in documents(600)], Provenance(source="bench"))
        a.preset = a.preset or "medium"
    if a.stage == "sft" and a.preset:
        a.model = str(preset_base(root, a.preset))
    ceiling = json.loads(child(["--ceiling"])[2])
    precision = "bf16" if ceiling["bf16_supported"] else "fp32"
    print(f"ceiling: fp32 {ceiling['fp32']:.1f}, bf16 {ceiling['bf16']:.1f} GFLOP per CPU-second; training in "
          f"{precision}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    sides = [("instar", None)] + ([("trl", None)] if a.stage != "pretrain" else []) + \
        ([("instar@old", a.old)] if a.old else [])
    results: dict[str, list[tuple[float, float]]] = {s: [] for s, _ in sides}
    for rep in range(a.repeats):
        for side, src in sides:
            results[side].append(per_step(a, side.split("@")[0], root, src))
            print(f"  {side} #{rep + 1}: {results[side][-1][0]:.2f} CPU s/step, {results[side][-1][1]:.1f} wall s/step"
                  f" (load {os.getloadavg()[0]:.1f})", flush=True)
    cpu = {s: statistics.median(c for c, _ in r) for s, r in results.items()}
    flops = flops_per_step(a) if a.stage != "grpo" else None
    if a.stage == "grpo":  # instar skips groups whose rewards are all equal: say how many it learned from
        rows = store.db.execute("select name, avg(value) from metrics where name in ('skipped_groups', "
                                "'completion_len', 'pass_rate') group by name").fetchall()
        print("instar GRPO steps, mean over every run: " + ", ".join(f"{n} {v:.2f}" for n, v in rows))
    what = a.preset if a.stage == "pretrain" else a.model
    print(f"\n| {a.stage}{' LoRA' if a.lora else ''} on {what} | CPU s/step | wall s/step | "
          f"{'MFU | ' if flops else ''}TRL / this |\n|---|---|---|{'---|' if flops else ''}---|")
    for side, r in results.items():
        mfu = f"{flops / cpu[side] / 1e9 / ceiling[precision]:.0%} | " if flops else ""
        vs = f"{cpu['trl'] / cpu[side]:.2f}x" if "trl" in cpu else "-"
        print(f"| {side} | {cpu[side]:.2f} | {statistics.median(w for _, w in r):.1f} | {mfu}{vs} |")
    print(f"\n(run folder: {root})")


if __name__ == "__main__":
    main()

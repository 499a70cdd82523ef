"""Stage-4 GRPO against Hugging Face TRL's GRPOTrainer: steps/s and held-out accuracy against training time.

    .venv/bin/python bench/bench_grpo.py                      # ~6 min on 2 cores: world, then 3 x (instar, TRL)
    .venv/bin/python bench/bench_grpo.py --steps 20 --every 5 --repeats 1
    .venv/bin/python bench/bench_grpo.py --steps 20 --every 20 --batch 16 --group 16   # `instar run`'s step shape

The world is the one `tests/test_grpo.py` trains on (a ~1M-param tiny preset taken through `instar train
pretrain` and `sft` on single-digit sums whose replies end 40% in `Answer: N` and 60% in "The answer is N."),
rebuilt here so the benchmark does not import the tests. Both trainers then start from the same SFT directory
with the same prompts (the bare question as one user turn, rendered by the same chat template), the same reward
(`instar.train.rewards.score`: correctness 1.0 + format 0.1), group size 8, 8 prompts per step (`--group`,
`--batch`), 24 new tokens,
temperature 0.7, lr 1e-4 constant-then-cosine as each trainer does it, bf16 autocast, beta 0 and no std scaling
(TRL `scale_rewards="none"`, `loss_type="dapo"`: the formulation instar implements). instar runs with
`log_kl=false` so neither side pays for a reference forward.
Timing: seconds per step are medians after the first 3 steps — instar's from its own `sec_per_step` metric rows,
TRL's from a callback's on_step_begin/on_step_end. Held-out greedy pass@1 (the same 59 problems, the same
`evaluate.evaluate_math`) every `--every` steps; evaluation time is excluded from both clocks.
Each side runs `--repeats` times, alternating, because single runs on the shared 2-core box swung the ratio
from 0.6x to 1.4x. OpenMP's wait policy is chosen as `instar train` chooses it (spin on a quiet machine, PASSIVE on a
busy one; `instar.runtime.choose_openmp_wait_policy`) and holds for both trainers: they share the process. Simplifications: TRL scores truncated
completions by their text (instar gives them 0), which matters little here (completions stop after ~11 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from instar.runtime import choose_openmp_wait_policy  # noqa: E402

choose_openmp_wait_policy()  # before torch loads OpenMP: PASSIVE on a busy machine, spin on a quiet one
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from instar.datasets import runs  # noqa: E402
from instar.datasets.store import Provenance, Store  # noqa: E402
from instar.generate.procedural import make_problems  # noqa: E402
from instar.train import run_stage  # noqa: E402
from instar.train.evaluate import evaluate_math  # noqa: E402
from instar.train.grpo import Config, Problems  # noqa: E402
from instar.train.rewards import format_answer, score  # noqa: E402

FAMILIES = ["arithmetic", "money"]
SHARED = dict(batch_size=8, group_size=8, max_new_tokens=24, temperature=0.7, lr=1e-4)


def build_world(path: Path) -> tuple[Store, Path, list[dict]]:
    """(store, SFT run dir, held-out problems) — the same recipe as tests/test_grpo.py's fixture."""
    store = Store.open(path / "instar.db")
    heldout = Problems(Config(families=FAMILIES, eval_difficulty=1, eval_problems=64), None).heldout
    held = {r["question"] for r in heldout}
    recs = {r["question"]: r for r in make_problems(1000, seed=11, families=FAMILIES, difficulty=1)
            if r["question"] not in held}
    rng = random.Random(0)
    convs = []
    for r in recs.values():
        last = format_answer(r["answer"]) if rng.random() < 0.4 else f"The answer is {r['answer']}."
        convs.append({"messages": [{"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": f"{r['solution']}\n{last}"}]})
    store.add("text", [{"text": c["messages"][0]["content"] + "\n" + c["messages"][1]["content"]} for c in convs],
              Provenance(source="procedural"))
    store.add("messages", convs, Provenance(source="procedural"))
    fast = ["eval_every=0", "save_every=0", "log_every=50", "sample_tokens=8", "eval_batches=2", "batch_size=16",
            "max_len=64"]
    run_stage("pretrain", None, [f"out={path}/pt", "max_steps=40"] + fast, store)
    run_stage("sft", None, [f"model={path}/pt", f"out={path}/sft", "max_steps=150", "lr=1e-3"] + fast, store)
    return store, path / "sft", heldout


def run_instar(store, sft: Path, out: Path, steps: int, every: int) -> dict:
    sets = [f"model={sft}", f"out={out}", f"max_steps={steps}", f"eval_every={every}", "save_every=0", "log_kl=false",
            'families=["arithmetic", "money"]', "difficulty=1", "eval_difficulty=1", "curriculum=false",
            'instruction=""', "eval_problems=64", "log_every=5", "sample_tokens=8"]
    sets += [f"{k}={v}" for k, v in SHARED.items()]
    summary = run_stage("grpo", None, sets, store)
    secs = [v for _, v in runs.metric_series(store, summary["run_id"], "sec_per_step")]
    clock = [sum(secs[:s]) for s in range(len(secs) + 1)]
    acc = [(s, clock[s], v) for s, v in runs.metric_series(store, summary["run_id"], "accuracy")]
    return {"sec_per_step": statistics.median(secs[3:]), "accuracy": acc}


def run_trl(sft: Path, out: Path, heldout: list[dict], problems: list[dict], steps: int, every: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(sft / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(sft / "model")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                              for r in problems])

    def reward(completions, answer, **kwargs):
        return [score([c[0]["content"]], {"answer": a})[0][0] for c, a in zip(completions, answer)]

    def accuracy(m) -> float:
        was = m.training
        m.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = evaluate_math(m, tok, heldout, SHARED["max_new_tokens"], instruction="")["accuracy"]
        m.train(was)
        return value

    class Clock(TrainerCallback):
        def __init__(self):
            self.secs, self.acc, self.t0 = [], [(0, 0.0, accuracy(model))], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.secs.append(time.perf_counter() - self.t0)
            if state.global_step % every == 0 or state.global_step == steps:
                self.acc.append((state.global_step, sum(self.secs), accuracy(model)))

    clock = Clock()
    args = GRPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=SHARED["batch_size"] * SHARED["group_size"],
                      num_generations=SHARED["group_size"], max_completion_length=SHARED["max_new_tokens"],
                      temperature=SHARED["temperature"], learning_rate=SHARED["lr"], beta=0.0, loss_type="dapo",
                      scale_rewards="none", bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                      logging_steps=5, seed=0, lr_scheduler_type="cosine", warmup_steps=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[clock])
    trainer.train()
    return {"sec_per_step": statistics.median(clock.secs[3:]), "accuracy": clock.acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="instar/TRL pairs, run alternately.")
    ap.add_argument("--batch", type=int, default=SHARED["batch_size"], help="Problems per step.")
    ap.add_argument("--group", type=int, default=SHARED["group_size"], help="Completions per problem.")
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    a = ap.parse_args()
    SHARED.update(batch_size=a.batch, group_size=a.group)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        store, sft, heldout = build_world(tmp)
        print(f"world built in {time.perf_counter() - t:.0f} s; {len(heldout)} held-out problems")
        train = [r for r in make_problems(4000, seed=5, families=FAMILIES, difficulty=1)
                 if r["question"] not in {h["question"] for h in heldout}]
        try:
            import trl  # noqa: F401
            have_trl = True
        except ImportError:
            have_trl = False
            print("TRL is not installed (pip install trl==1.16.0): instar only")
        results: list[dict] = []
        for rep in range(a.repeats):  # alternate the two so a burst of load on the shared box hits both
            results.append({"instar": run_instar(store, sft, tmp / f"instar{rep}", a.steps, a.every)})
            if have_trl:
                results[-1]["trl"] = run_trl(sft, tmp / f"trl{rep}", heldout, train, a.steps, a.every)
    print(f"\n{'':10} {'s/step':>8} {'steps/s':>8}   held-out pass@1 at (step, train seconds)")
    for rep, res in enumerate(results):
        for name, r in res.items():
            curve = "  ".join(f"{s}:{acc:.2f}@{sec:.0f}s" for s, sec, acc in r["accuracy"])
            print(f"{name + ' #' + str(rep + 1):10} {r['sec_per_step']:8.3f} {1 / r['sec_per_step']:8.2f}   {curve}")
    if have_trl:
        ratios = [res["trl"]["sec_per_step"] / res["instar"]["sec_per_step"] for res in results]
        print(f"\ninstar steps/s / TRL's, per repeat: {', '.join(f'{x:.2f}x' for x in ratios)}; "
              f"median {statistics.median(ratios):.2f}x")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

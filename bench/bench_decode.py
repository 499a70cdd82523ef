"""Rollout decoding: `instar.train.sampling.generate` (a plain KV-cache loop) against Hugging Face `model.generate`.

    .venv/bin/python bench/bench_decode.py                    # tiny preset, 64 rollouts x 48 new tokens (~1 min)
    .venv/bin/python bench/bench_decode.py --world --new 24  # bench_grpo's SFT model and prompts (~2 min)

The GRPO rollout shape: 8 prompts x 8 completions, temperature 0.7, bf16 autocast as the stages run it, plus
greedy. A random-init model never emits a stop token early, so every row runs the full `--new` tokens (the
worst case for instar's loop, which drops stopped rows from the batch); `--world` instead trains bench_grpo's
small SFT model, whose answers stop after ~11 tokens, and uses its GRPO prompts. Each timing is the median of
`--repeats` alternating calls; the script first checks that greedy and seeded sampling are token-for-token HF's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from instar.runtime import choose_openmp_wait_policy  # noqa: E402

choose_openmp_wait_policy()  # before torch loads OpenMP: PASSIVE on a busy machine, spin on a quiet one
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from instar.train.models import new_model  # noqa: E402
from instar.train.sampling import generate  # noqa: E402
from instar.train.tokenizer import train_tokenizer  # noqa: E402
from instar.train.tokens import render_chat, stop_ids  # noqa: E402


def hf_generate(model, tok, prompts, max_new_tokens, temperature, seed):
    """The same call through HF `generate` (what `common.generate` did before), returning new token ids."""
    P = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    att = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tok), pad_token_id=pad)
    if temperature > 0:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model.generate(input_ids=ids, attention_mask=att, **kw)[:, P:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--world", action="store_true", help="bench_grpo's SFT model and prompts instead of random init")
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if a.world:
        import tempfile
        from pathlib import Path

        from bench_grpo import FAMILIES, build_world

        from instar.generate.procedural import make_problems
        from instar.train.evaluate import math_prompt_ids
        from instar.train.models import load_model

        _, sft, _ = build_world(Path(tempfile.mkdtemp()))
        model, tok = load_model(sft)
        rows = make_problems(8, seed=5, families=FAMILIES, difficulty=1)
        prompts = [p for p in math_prompt_ids(tok, rows, "") for _ in range(8)]
    else:
        texts = [f"question {i}: what is {i} plus {i + 3}? the cat sees a red ball" for i in range(40)]
        tok = train_tokenizer(texts * 5, vocab_size=1024)
        torch.manual_seed(0)
        model = new_model(a.preset, tok, max_len=256)
        prompts = [render_chat(tok, [{"role": "user", "content": texts[i][:10 + 4 * i]}],
                               add_generation_prompt=True)[0] for i in range(8) for _ in range(8)]
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ours = generate(model, tok, prompts, a.new).completion_ids
            theirs = hf_generate(model, tok, prompts, a.new, 0.0, 0)
            s_ours = generate(model, tok, prompts, a.new, 0.7, seed=3).completion_ids
            s_theirs = hf_generate(model, tok, prompts, a.new, 0.7, 3)
        print(f"{'bf16' if bf16 else 'fp32'}: greedy identical to HF generate: {torch.equal(ours, theirs)}; "
              f"seeded T=0.7 sample identical: {torch.equal(s_ours, s_theirs)}")
    timings = []
    for name, T in (("greedy", 0.0), ("T=0.7", 0.7)):
        t_ours, t_hf = [], []
        for r in range(a.repeats):  # alternate so a burst of load on the shared box hits both
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t = time.perf_counter()
                generate(model, tok, prompts, a.new, T, seed=r)
                t_ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                hf_generate(model, tok, prompts, a.new, T, r)
                t_hf.append(time.perf_counter() - t)
        timings.append((name, statistics.median(t_ours), statistics.median(t_hf)))
    lengths = generate(model, tok, prompts, a.new, 0.7, seed=0).completion_mask.sum(1).float()
    print(f"T=0.7 completion lengths: mean {lengths.mean():.1f}, max {lengths.max():.0f} of {a.new}")
    print(f"\n{a.preset}, {len(prompts)} rollouts x {a.new} new tokens, bf16 autocast, median of {a.repeats}")
    print(f"{'':8} {'instar s':>9} {'HF s':>9} {'speed-up':>9}")
    for name, ours, hf in timings:
        print(f"{name:8} {ours:9.3f} {hf:9.3f} {hf / ours:8.2f}x")


if __name__ == "__main__":
    main()

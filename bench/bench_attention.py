"""PyTorch's attention kernels on CPU: flash vs plain ("math") for one forward+backward of the instar presets.

    .venv/bin/python bench/bench_attention.py          # ~1 min on 2 cores

Why it exists: `common.attention_kernel` picks the math kernel for sequences up to SHORT_ATTENTION tokens under
CPU bf16 autocast. This prints, per preset shape, batch x length and dtype, the median seconds of a full
forward+backward (loss on all tokens) under each kernel and the ratio flash / math (> 1 = math faster).
Random-init Llama models of the presets' widths (vocab 2,000); nothing is trained.
"""

from __future__ import annotations

import statistics
import time

from instar.runtime import choose_openmp_wait_policy

choose_openmp_wait_policy()  # before torch loads OpenMP: PASSIVE on a busy machine, spin on a quiet one

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from instar.train.models import PRESETS  # noqa: E402

SHAPES = [(64, 24), (64, 49), (16, 128), (16, 256)]  # (batch, tokens): GRPO/PPO rollouts ... pretraining rows


def seconds(model, ids: torch.Tensor, backend: SDPBackend, bf16: bool, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t = time.perf_counter()
        with sdpa_kernel(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"{'preset':8} {'batch x len':>12} {'dtype':>5} {'flash s':>8} {'math s':>8} {'flash/math':>10}")
    for name in ("tiny", "small"):
        p = PRESETS[name]
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=2000, hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
            num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
            num_key_value_heads=p["num_attention_heads"], max_position_embeddings=512))
        for B, T in SHAPES:
            ids = torch.randint(0, 2000, (B, T))
            for bf16 in (True, False):
                f = seconds(model, ids, SDPBackend.FLASH_ATTENTION, bf16)
                m = seconds(model, ids, SDPBackend.MATH, bf16)
                print(f"{name:8} {f'{B} x {T}':>12} {'bf16' if bf16 else 'fp32':>5} {f:8.4f} {m:8.4f} {f / m:9.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()

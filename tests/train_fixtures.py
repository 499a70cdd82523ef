"""Tiny offline corpora, tokenizers and models for the trainer tests (imported by tests/test_train_*.py).

Everything is built in the test: a templated English corpus (so a 1M-param model's loss falls within
tens of steps), a byte-level BPE tokenizer trained on it in ~0.1 s, and a random-init tiny Llama.
"""

from __future__ import annotations

import random

NAMES = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "her brother"]
VERBS = ["sees", "likes", "finds", "draws", "wants", "paints"]
OBJECTS = ["a red ball", "the blue sea", "some bread", "a green tree", "the big house", "an apple"]


def documents(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(rng.randint(3, 8))) for _ in range(n)]


def conversations(n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        out.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return out


def fill_store(store, n_docs: int = 300, n_convs: int = 300) -> None:
    from instar.datasets.store import Provenance

    store.add("text", [{"text": t} for t in documents(n_docs)], Provenance())
    store.add("messages", conversations(n_convs), Provenance())


def tiny_tokenizer(vocab_size: int = 400):
    from instar.train.tokenizer import train_tokenizer

    return train_tokenizer(documents(200) + [c["messages"][1]["content"] for c in conversations(100)], vocab_size)


def tiny_model(tok, seed: int = 0):
    import torch

    from instar.train.models import new_model

    torch.manual_seed(seed)
    return new_model("tiny", tok, max_len=128)


# Fast settings for a few-step run: small rows, fp32 off the clock, no mid-run checkpoints.
FAST = ["batch_size=8", "max_len=64", "log_every=1", "eval_batches=2", "sample_tokens=8"]


def unchanged_params(before, after) -> list[str]:
    """Names of the parameters equal in `before` and `after` (a smoke test wants this empty)."""
    import torch

    a = dict(after.named_parameters())
    return [n for n, p in before.named_parameters() if torch.equal(p, a[n])]


def on_call(monkeypatch, owner, name: str, n: int, action: str = "raise", after: bool = False) -> list:
    """Make the n-th call (1-based) of `owner.name` end the run the way `action` says, then (for "sigint") go on:
    "raise"  -> KeyboardInterrupt right there (a second Ctrl-C, or any interrupt that cannot wait),
    "crash"  -> RuntimeError right there (a bug or a dead disk: the run must show `failed`),
    "sigint" -> a real SIGINT to this process, as a first Ctrl-C lands (the loop decides when to stop).
    With `after`, the real function runs first (e.g. a checkpoint's weights are written, its state is not).
    Returns the list of calls so far (its length is the call count)."""
    import os
    import signal

    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs) if after else None
        if len(calls) == n:
            if action == "raise":
                raise KeyboardInterrupt("simulated")
            if action == "crash":
                raise RuntimeError("simulated crash")
            os.kill(os.getpid(), signal.SIGINT)
        return out if after else real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def final_weights(out) -> dict:
    """The finished run's model/ tensors."""
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model" / "model.safetensors"))


def curves(store, run_id: str, skip=("tok/s", "sec_per_step", "s/step", "peak_rss_mb")) -> dict:
    """{metric: {step: value}} of a run, every metric but the timings; a step logged twice fails the test."""
    from instar.datasets import runs

    out = {}
    for name in runs.metric_names(store, run_id):
        if name in skip:
            continue
        series = runs.metric_series(store, run_id, name)
        assert len({s for s, _ in series}) == len(series), f"{name}: a replayed step was logged twice"
        out[name] = dict(series)
    return out


def assert_same_run(store, whole: dict, resumed: dict, out_whole, out_resumed, tol: float = 1e-6) -> None:
    """Same final parameters and the same metric curves (fp32: equal to `tol`, in practice bitwise)."""
    import pytest
    import torch

    a, b = final_weights(out_whole), final_weights(out_resumed)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), k
    ca, cb = curves(store, whole["run_id"]), curves(store, resumed["run_id"])
    assert sorted(ca) == sorted(cb)
    for name in ca:
        assert sorted(ca[name]) == sorted(cb[name]), name
        for step in ca[name]:
            assert cb[name][step] == pytest.approx(ca[name][step], abs=10 * tol), (name, step)
    assert samples(store, whole["run_id"]) == samples(store, resumed["run_id"])


def samples(store, run_id: str) -> list[tuple]:
    """A run's sample rows (report answers, rollouts) as comparable tuples, rewards rounded to 1e-4."""
    from instar.datasets import runs

    rows = runs.run_samples(store, run_id)
    return sorted((r["step"], r["prompt"], r["completion"], None if r["reward"] is None else round(r["reward"], 4),
                   r["extra"]) for r in rows)


def planted_math_score(completions: list[str], row: dict) -> tuple[list[float], list[bool]]:
    """A reward a random-init model can earn (GRPO tests): the share of characters in "sbc" (~3 in 26 by chance),
    in place of `rewards.score`'s correct answers, which such a model never writes."""
    rewards = [sum(c in "sbc" for c in t) / max(len(t), 1) for t in completions]
    return rewards, [r > 0.3 for r in rewards]


def stopping_base(store, root) -> str:
    """A tiny model taught for 30 SFT steps to answer briefly and stop (GRPO tests: a truncated completion earns
    nothing, and a random model never stops). `store` must hold `messages` records (fill_store). ~7 s."""
    from pathlib import Path

    from instar.train import run_stage
    from instar.train.models import save_model

    root = Path(root)
    tok = tiny_tokenizer()
    save_model(tiny_model(tok), tok, root / "random" / "model")
    run_stage("sft", None, FAST + [f"model={root}/random", f"out={root}/stops", "max_steps=30", "lr=3e-3",
                                   "eval_every=0", "save_every=0", "max_len=48", "log_every=100"], store)
    return str(root / "stops")

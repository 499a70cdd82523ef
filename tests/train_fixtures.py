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

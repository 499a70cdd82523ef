"""What stages 1 and 2 train on: the chat text added to pretraining, and the SFT sampler that fixes the share of
math in every batch."""

import pytest
from train_fixtures import FAST, conversations, tiny_model, tiny_tokenizer

from instar.datasets.store import Provenance


def drills(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {a} + 2?"},
                          {"role": "assistant", "content": f"{a} + 2 = {a + 2}\nAnswer: {a + 2}"}]} for a in range(n)]


def test_pretraining_adds_chat_conversations_but_not_math(store):
    from instar.train.pretrain import chat_documents

    store.add("messages", conversations(60), Provenance(source="import"))
    store.add("messages", drills(30), Provenance(source="procedural"))
    docs = chat_documents(store, "train")
    assert len(docs) == sum(1 for r in store.records("messages", "train") if "Answer:" not in r["messages"][-1]["content"])
    assert docs and all("Answer:" not in d for d in docs)
    assert all(d.startswith("What is ") and "\n" in d and " plus " in d for d in docs)  # user turn, newline, reply


def test_sft_examples_put_chat_first_then_math(store):
    from instar.train.sft import examples

    store.add("messages", conversations(40), Provenance(source="import"))
    store.add("messages", drills(40), Provenance(source="procedural"))
    tok = tiny_tokenizer()
    rendered, n_math, form = examples(store, tok, "train", 256)
    rows = store.records("messages", "train")
    assert form == ""  # the drills ask the bare question
    assert n_math == sum("Answer:" in r["messages"][-1]["content"] for r in rows) > 0 and len(rendered) == len(rows)
    assert all("Answer:" in tok.decode(ids) for ids, _ in rendered[-n_math:])
    assert not any("Answer:" in tok.decode(ids) for ids, _ in rendered[:-n_math])


@pytest.mark.parametrize("share", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_mix_sampler_holds_the_math_share_exactly_and_is_pure(share):
    from instar.train.sft import MixSampler

    n_chat, n_math, B = 7, 50, 16
    s = MixSampler(n_chat + n_math, n_math, B, share, seed=3)
    batches = [s.batch(i) for i in range(40)]
    assert all(len(b) == B for b in batches)
    maths = sum(j >= n_chat for b in batches for j in b)
    assert abs(maths - share * B * 40) < 1  # floor() differences telescope: exact up to rounding once
    chats = [j for b in batches for j in b if j < n_chat]
    if chats:  # every chat conversation is used, epoch after epoch (reshuffled)
        assert set(chats) == set(range(n_chat)) and max(chats.count(j) for j in range(n_chat)) - \
            min(chats.count(j) for j in range(n_chat)) <= 1
    assert MixSampler(n_chat + n_math, n_math, B, share, seed=3).batch(17) == batches[17]  # resume: pure in i


def test_mix_sampler_without_a_share_or_a_kind_is_the_plain_sampler():
    from instar.train.sft import MixSampler
    from instar.train.tokens import Sampler

    plain = Sampler(30, 8, 1)
    for share, n_math in ((None, 10), (0.5, 0), (0.5, 30)):
        assert [MixSampler(30, n_math, 8, share, 1).batch(i) for i in range(5)] == [plain.batch(i) for i in range(5)]


def test_sft_with_a_math_share_trains_on_that_mix(store, tmp_path, monkeypatch):
    """The stage wires it: the summary counts the math, and a share of 0 never shows the model a drill."""
    from instar.train import run_stage, sft
    from instar.train.models import save_model

    store.add("messages", conversations(120), Provenance(source="import"))
    store.add("messages", drills(60), Provenance(source="procedural"))
    tok = tiny_tokenizer()
    save_model(tiny_model(tok), tok, tmp_path / "base" / "model")
    seen, real = [], sft.collate_buckets

    def spy(seqs, masks, pad):
        seen.extend(tok.decode(s) for s in seqs)
        return real(seqs, masks, pad)
    monkeypatch.setattr(sft, "collate_buckets", spy)
    summary = run_stage("sft", None, FAST + [f"model={tmp_path}/base", f"out={tmp_path}/sft", "max_steps=3",
                                             "math_share=0", "eval_every=0", "sample_tokens=2"], store)
    assert summary["data"]["train_math"] == sum("Answer:" in r["messages"][-1]["content"]
                                                for r in store.records("messages", "train")) > 0
    assert len(seen) == 3 * 8 and not any("Answer:" in t for t in seen)

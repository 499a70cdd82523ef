"""Procedural preference pairs and the by-prompt split (instar/generate/pairs.py)."""

import random

import pytest
from train_fixtures import conversations

from instar.datasets.store import Provenance


def drills(n: int = 5) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                          {"role": "assistant", "content": f"{a} + 1 = {a + 1}\nAnswer: {a + 1}"}]} for a in range(n)]


def test_procedural_pairs_are_chat_only_and_mix_swapped_damaged_and_drilled(store):
    from instar.generate.pairs import procedural_pairs, split_by_prompt

    store.add("messages", conversations(12), Provenance(source="import"))
    store.add("messages", drills(), Provenance(source="procedural"))
    assert procedural_pairs(store, 60, 0) == 60
    assert procedural_pairs(store, 60, 0) == 0  # a top-up: the target is already met
    pairs = store.records("preference")
    assert split_by_prompt(pairs, "train") and split_by_prompt(pairs, "val")
    answers = {c["messages"][-1]["content"] for c in conversations(12)}
    for pair in pairs:  # prompts are chat only: a math prompt's swapped number is no preference PPO should chase
        assert pair["chosen"] in answers and pair["chosen"] != pair["rejected"]
        assert "Answer:" not in pair["chosen"] and "+" not in pair["prompt"][0]["content"]
    swapped = sum(p["rejected"] in answers for p in pairs)
    drilled = sum("Answer:" in p["rejected"] for p in pairs)
    assert 20 <= swapped <= 40 and 1 <= drilled <= 15  # about half swapped; every fifth broken one a drill


def test_damage_breaks_an_answer_four_ways():
    from instar.generate.pairs import damage

    text = "The cat sat on the mat because it was warm there."
    looped, repeated, shuffled, cut = (damage(text, how, random.Random(0)) for how in range(4))
    assert looped.split()[0] == "The" and len(looped.split()) >= len(text.split()) and looped != text
    assert looped.count(" ".join(looped.split()[:2])) >= 2
    top = max(set(repeated.split()), key=repeated.split().count)
    assert repeated.split().count(top) >= len(text.split()) and len(repeated.split()) >= len(text.split())
    assert sorted(shuffled.split()) == sorted(text.split()) and shuffled != text
    assert text.startswith(cut) and 1 <= len(cut.split()) < len(text.split())


def test_split_by_prompt_keeps_every_prompt_on_one_side():
    from instar.generate.pairs import HELD_OUT, held_out_prompts, prompt_key, split_by_prompt

    records = [{"prompt": [{"role": "user", "content": f"question {q}"}], "chosen": f"yes {k}", "rejected": f"no {k}"}
               for q in range(200) for k in range(3)]
    train, val = split_by_prompt(records, "train"), split_by_prompt(records, "val")
    assert len(train) + len(val) == len(records)
    train_keys, val_keys = ({prompt_key(r["prompt"]) for r in side} for side in (train, val))
    assert not train_keys & val_keys
    assert abs(len(val_keys) - 200 * HELD_OUT / 100) < 15  # ~20% of the prompts, with all three pairs each
    assert all(sum(prompt_key(r["prompt"]) == k for r in val) == 3 for k in val_keys)
    # Stable when the dataset grows: a prompt held out among 200 stays held out among 300.
    more = records + [{"prompt": [{"role": "user", "content": f"extra {q}"}], "chosen": "a", "rejected": "b"}
                      for q in range(100)]
    assert val_keys <= held_out_prompts(more)


def test_split_by_prompt_always_holds_one_out_of_a_handful():
    from instar.generate.pairs import held_out_prompts, split_by_prompt

    two = [{"prompt": [{"role": "user", "content": c}], "chosen": "a", "rejected": "b"} for c in ("hi", "hey")]
    assert len(held_out_prompts(two)) == 1 and len(split_by_prompt(two, "val")) == 1
    assert held_out_prompts(two[:1]) == set()  # one prompt cannot be split


def test_reward_ppo_and_dpo_refuse_a_store_with_one_prompt(store, tmp_path):
    from instar.errors import InstarError
    from instar.generate.pairs import stored_split
    from instar.pipeline_run import check_splits
    from instar.train import run_stage

    store.add("preference", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": f"a{i}", "rejected": "b"}
                             for i in range(30)], Provenance(source="import"))
    assert len(stored_split(store, "train")) == 30
    with pytest.raises(InstarError, match="too few distinct prompts"):
        stored_split(store, "val")
    with pytest.raises(InstarError, match="80/20 by prompt"):  # `instar run` says so before any training
        check_splits(store, ["ppo"])
    for stage in ("reward", "ppo", "dpo"):  # before a run row or directory is made
        with pytest.raises(InstarError, match="too few distinct prompts"):
            run_stage(stage, None, [f"out={tmp_path}/{stage}", f"model={tmp_path}/none"], store)
        assert not (tmp_path / stage).exists()


def test_swapped_answers_stay_on_their_side_of_the_prompt_split(store):
    """A held-out conversation's answer is never a training pair's rejected answer, nor the reverse."""
    from instar.generate.pairs import procedural_pairs, prompt_key, split_by_prompt

    convs = [{"messages": [{"role": "user", "content": f"Tell me about thing {i}."},
                           {"role": "assistant", "content": f"Thing {i} is a fine thing number {i}."}]}
             for i in range(40)]
    store.add("messages", convs, Provenance(source="import"))
    procedural_pairs(store, 1000, 0)
    pairs = store.records("preference")
    answer_of = {prompt_key(c["messages"][:-1]): c["messages"][-1]["content"] for c in convs}
    val = split_by_prompt(pairs, "val")
    val_answers = {answer_of[prompt_key(p["prompt"])] for p in val}
    train = split_by_prompt(pairs, "train")
    assert val and train and not val_answers & {p["rejected"] for p in train}
    assert not {p["chosen"] for p in train} & {p["rejected"] for p in val}


def test_documents_become_continuation_requests_with_their_own_pairs(store):
    from instar.generate.pairs import continuation, procedural_pairs

    doc = "Anna had never flown before. She held the armrests tightly as the engines roared and the ground fell away."
    assert continuation(doc) == [{"role": "user", "content": "Continue this text: Anna had never flown before."},
                                 {"role": "assistant", "content": doc.split(". ", 1)[1]}]
    assert continuation("One sentence only.") is None and continuation("Short. Too short to continue.") is None
    store.add("text", [{"text": f"Doc {i} starts here. " + " ".join(f"word{i}x{k}" for k in range(20)) + "."}
                       for i in range(10)], Provenance(source="import"))
    store.add("messages", conversations(5), Provenance(source="import"))
    procedural_pairs(store, 400, 0)
    prompts = [p["prompt"][0]["content"] for p in store.records("preference")]
    assert any(p.startswith("Continue this text: Doc ") for p in prompts) and any(p.startswith("What is") for p in prompts)


def test_corpus_documents_become_requests_about_their_topics(store):
    """generate/requests.py: PER_DOCUMENT conversations per document with a topic (imported text has none), the
    document as the answer, in different wordings, stored once however often the pipeline resumes; the wording
    varies across documents."""
    from instar.generate.requests import PER_DOCUMENT, REQUESTS, TEMPLATE, topic_requests

    docs = [(f"Document {i} about the sea and its waves, told in short sentences.", f"topic {i % 3}") for i in range(12)]
    for text, topic in docs:
        store.add("text", [{"text": text}], Provenance(source="embedded", topic=topic))
    store.add("text", [{"text": "An imported page without a topic at all."}], Provenance(source="import"))
    assert PER_DOCUMENT == 2 and topic_requests(store, 0) == 24 and topic_requests(store, 0) == 24
    convs = [r["data"]["messages"] for r in store.iter_rows("messages")]
    assert len(convs) == 24 and all(r["source"] == "procedural" for r in store.iter_rows("messages"))
    topic_of = dict(docs)
    assert {c[1]["content"] for c in convs} == set(topic_of)
    for request, answer in ((c[0]["content"], c[1]["content"]) for c in convs):
        assert request in {f.format(topic=topic_of[answer]) for f in REQUESTS}
    assert len({c[0]["content"].rsplit(" about ", 1)[0] for c in convs}) > 2
    assert all(len({c[0]["content"] for c in convs if c[1]["content"] == text}) == 2 for text, _ in docs)
    assert store.db.execute("select count(*) from records where template = ?", [TEMPLATE]).fetchone()[0] == 24


def test_corpus_documents_are_continued_from_their_first_sentences(store):
    """generate/requests.py: the user gives a document's first sentences (after an opener, or bare), the assistant
    writes the rest, PER_DOCUMENT times per document of two or more sentences, stored once however often the
    pipeline resumes; `corpus_chat` = topic requests + continuations."""
    from instar.generate.requests import CONTINUE, CONTINUE_TEMPLATE, PER_DOCUMENT, continuations, corpus_chat

    docs = [" ".join(f"Sentence {j} of document {i} about tides{'?' if j % 3 else '.'}" for j in range(2 + i % 4))
            for i in range(12)]
    for text in docs:
        store.add("text", [{"text": text}], Provenance(source="embedded", topic="tides"))
    store.add("text", [{"text": "One sentence only, with a topic."}], Provenance(source="embedded", topic="tides"))
    store.add("text", [{"text": "Imported. Two sentences, no topic."}], Provenance(source="import"))
    assert continuations(store, 0) == continuations(store, 0) == 12 * PER_DOCUMENT
    convs = [r["data"]["messages"] for r in store.iter_rows("messages")]
    assert len(convs) == 12 * PER_DOCUMENT
    openers = set()
    for user, assistant in ((c[0]["content"], c[1]["content"]) for c in convs):
        opener = next(o for o in sorted(CONTINUE, key=len, reverse=True) if user.startswith(o))
        openers.add(opener)
        assert f"{user[len(opener):]} {assistant}" in docs and assistant.startswith("Sentence ")
    assert len(openers) > 3
    assert store.db.execute("select count(*) from records where template = ?",
                            [CONTINUE_TEMPLATE]).fetchone()[0] == 12 * PER_DOCUMENT
    assert corpus_chat(store, 0) == (13 + 12) * PER_DOCUMENT  # + the requests (the one-sentence document has those)

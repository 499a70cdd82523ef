"""Preference pairs without a judge, and the by-prompt split the reward model, PPO and DPO read them through.

    procedural_pairs(store, 1200, seed=0)     -> pairs added from the stored chat conversations and documents
    damage("The cat sat on the mat.", 0, rng) -> "The cat The cat The cat ..." (a broken copy of an answer)
    continuation(document)                    -> [user "Continue this text: <first sentence>", assistant <the rest>]
    held_out_prompts(records)                 -> the prompt keys whose pairs are held out (about 20%)
    split_by_prompt(records, "val")           -> the pairs whose prompt is held out
    stored_split(store, "val")                -> the same from the store, or a clear error when that side is empty

Why a second split: the store splits records by their own content hash, so the pairs of one prompt land on
both sides and a "held-out" pair's prompt (and chosen answer) was also trained on. The reward model and PPO
must be scored on prompts they never saw (issue 14), so they read the pairs through `split_by_prompt`: a
prompt's pairs are all train or all val, decided by a hash of the prompt alone (stable when the dataset grows).
Deliberately simple: the prompt split ignores the store's own splits of `preference` records (nothing
downstream reads them), and the SFT stage may have seen a held-out prompt's conversation (it is the reward
model and PPO that must not).
"""

from __future__ import annotations

import hashlib
import random

from instar.datasets.store import Provenance, canonical_json, record_id
from instar.errors import InstarError

HELD_OUT = 20  # percent of prompts whose pairs are held out: 40 conversations -> ~8 prompts, not the ~2 of 5%
DAMAGES = 4    # ways `damage` breaks an answer
PARTNERS = 16  # swapped partners and broken copies per conversation: up to 2 x 16 pairs each


# ---------------------------------------------------------------------------------------------------------
# Procedural pairs


def procedural_pairs(store, target: int, seed: int) -> int:
    """Top the store's `preference` records up to `target` with pairs built from the stored chat conversations
    (the embedded 135M judge tied in 11 of 13 tries). Chosen is always a conversation's own last answer;
    rejected alternates between
    - swapped: another, randomly drawn chat conversation's answer ("answers THIS prompt"), drawn from the same
      side of the by-prompt split — else a held-out conversation's answer would be trained on as "rejected" for
      other prompts, and the reward model learns that exactly the held-out answers are bad (measured on the lang
      branch: held-out pair accuracy 0.53 -> 0.45 while training, below chance);
    - damaged: the same answer with a failure a small model makes (`damage`): a phrase looping, one word
      repeated, words shuffled, or cut off mid-sentence — so the reward model also learns fluent and finished
      over broken, the failure a policy finds first when it games the reward model;
    - drilled: a math drill's reply ("3 + 4 = 7 / Answer: 7") to a chat prompt, when the store holds math
      conversations — the failure of an SFT model swamped by math, which PPO should then move away from.
    The corpus documents join the chat conversations as "continue this text" requests (`continuation`): with
    only the ~31 train-side chats' answers as chosen, the reward model memorised them (100% on train, chance on
    held-out prompts); three times as many distinct chosen texts made it learn what broken looks like (held-out
    prompts: drill 0.93, cut 0.86, shuffled 0.75, looping 0.73, swapped 0.47; lang branch, 1M params).
    Math conversations never give a prompt: PPO's prompts come from these pairs, and PPO on math prompts with a
    reward that cannot check arithmetic cost 0.18 pass@1 (0.39 -> 0.21, measured) that stage 4 had to win back.
    Returns how many pairs were added."""
    from instar.train.rewards import extract_answer

    convs, drills = [], []
    for r in store.records("messages"):
        (drills if extract_answer(r["messages"][-1]["content"]) is not None else convs).append(r["messages"])
    convs += [c for c in map(continuation, (r["text"] for r in store.records("text"))) if c]
    need = target - store.count("preference", procedural=True)
    if need <= 0 or len(convs) < 2:
        return 0
    rng = random.Random(seed)
    side = [is_held_out(prompt_key(c[:-1])) for c in convs]
    candidates = []
    for conv, held in zip(convs, side):
        answer = conv[-1]["content"]
        partners = [j for j, h in enumerate(side) if h == held]
        for k, j in enumerate(rng.sample(partners, min(PARTNERS, len(partners)))):
            broken = (drills[rng.randrange(len(drills))][-1]["content"] if drills and k % (DAMAGES + 1) == DAMAGES
                      else damage(answer, k % DAMAGES, rng))
            for rejected in (convs[j][-1]["content"], broken):
                if rejected.strip() and rejected != answer:
                    candidates.append({"prompt": conv[:-1], "chosen": answer, "rejected": rejected})
    candidates = list({record_id("preference", c): c for c in candidates}.values())  # distinct pairs only
    rng.shuffle(candidates)
    return store.add("preference", candidates[:need],
                     Provenance(source="procedural", template="pairs-v3", seed=seed)).inserted


def continuation(document: str) -> list[dict] | None:
    """A document as a request and its answer: "Continue this text: <first sentence>" -> the rest of it (None when
    the document is one sentence or the rest is under 12 words)."""
    first, sep, rest = document.strip().partition(". ")
    if not sep or len(rest.split()) < 12:
        return None
    return [{"role": "user", "content": f"Continue this text: {first}."}, {"role": "assistant", "content": rest}]


def damage(text: str, how: int, rng) -> str:
    """A broken copy of `text`: 0 = its first few words looping, 1 = one of its words repeated over and over,
    2 = its words shuffled, 3 = cut mid-sentence. The broken copy is as long as the answer or longer (0, 1),
    or shorter (3), so length alone never tells the reward model which side is which."""
    words = text.split()
    if how == 0:
        phrase = words[:rng.randint(2, 5)]
        return " ".join((phrase * (len(words) // max(len(phrase), 1) + 1))[:max(len(words), 2 * len(phrase))])
    if how == 1:
        return " ".join(words[:rng.randint(0, 3)] + [rng.choice(words)] * max(len(words), 6))
    if how == 2:
        return " ".join(rng.sample(words, len(words)))
    return " ".join(words[:max(1, int(len(words) * rng.uniform(0.2, 0.6)))])


# ---------------------------------------------------------------------------------------------------------
# The by-prompt split


def prompt_key(prompt: list[dict]) -> str:
    """A stable key of a pair's prompt turns (role and content of each)."""
    return hashlib.sha256(canonical_json({"prompt": prompt}).encode()).hexdigest()[:20]


def is_held_out(key: str) -> bool:
    """Whether a prompt (by `prompt_key`) is on the held-out side: its hash falls in the first HELD_OUT percent."""
    return int(key[:8], 16) % 100 < HELD_OUT


def held_out_prompts(records: list[dict]) -> set[str]:
    """Keys of the prompts whose pairs are held out (`is_held_out`). When none is (a handful of prompts), the one
    with the smallest hash, so a val side always exists; a single prompt cannot be split (the empty set)."""
    keys = sorted({prompt_key(r["prompt"]) for r in records}, key=lambda k: int(k[:8], 16))
    held = {k for k in keys if is_held_out(k)}
    return held or (set(keys[:1]) if len(keys) > 1 else set())


def split_by_prompt(records: list[dict], split: str) -> list[dict]:
    """The pairs whose prompt is held out (`split = "val"`) or not (`"train"`), from records of every split."""
    held = held_out_prompts(records)
    return [r for r in records if (prompt_key(r["prompt"]) in held) == (split == "val")]


def stored_split(store, split: str) -> list[dict]:
    """`split_by_prompt` over every stored pair; an InstarError saying what to raise when that side is empty."""
    records = split_by_prompt(store.records("preference"), split)
    if not records:
        raise InstarError(f"no {split} preference pairs by prompt: {store.count('preference')} stored pairs hold too "
                          f"few distinct prompts to hold {HELD_OUT}% out (raise data.instructions, or generate more "
                          "pairs)")
    return records

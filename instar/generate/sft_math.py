"""The math half of SFT: procedural problems stored as conversations that end in the reward's answer line.

    records = math_sft_records(3000, seed=1, families=["arithmetic", "story"])   # messages records
    math_conversations(store, 3000, seed=0, families=[...], instruction="", exclude=held_out_questions)

Each conversation is one problem asked the way GRPO and `instar eval` ask it (`rewards.math_prompt`: the bare
question, or the question + `instruction`) and answered with worked steps, one operation a line, then
"Answer: N" (`arithmetic.worked_steps`, `rewards.math_messages`). Levels follow LEVEL_WEIGHTS, a curriculum in
proportions: most problems are of the forms a small model can learn first (one- and two-digit sums and
differences), fewer of the long chains and three-digit ones.

Never stored for training: GRPO's held-out problems (`exclude`, so stage 4's before/after stays a held-out
number) and any question of the external yardstick `instar/evalsets/arithmetic.jsonl` (whose templates
differ anyway; checked here too, so a template added later cannot leak it). How many of these conversations
SFT sees next to the chat conversations is the pipeline's mixing setting, not this module's.
"""

from __future__ import annotations

from instar.generate.procedural import make_problems

# Share of problems per level. Levels 1-2 carry the single-digit facts every other form (and every column) is
# built from. Measured on the tiny preset, 900 SFT steps (docs/measurements.md "Stage 4"): .2/.3/.25/.15/.1 without columns ->
# level-1 pass@1 0.39, external 2.5%; .4/.35/.12/.08/.05 with columns -> level 1 0.52 by step 500, external 6.1%
# at 900. With magnitudes and signed level 2 (v4), the same data, pretrain and 2 seeds each, quiet Zen 3: these
# weights vs .4/.35/.12/.08/.05 -> external 0.191/0.140 vs 0.169/0.122 (+2 points in both seeds), drill replies to
# the hand-written chat prompts 0.40/0.58 vs 0.61/0.76 (fewer "What is 3 + 4?"-like questions to mistake short
# chat prompts for), answer-line rate 0.97/0.94 vs 0.98/0.90.
LEVEL_WEIGHTS = {1: 0.25, 2: 0.3, 3: 0.2, 4: 0.17, 5: 0.08}
TEMPLATE = "math-sft-v9"  # provenance tag: v1 = one phrasing per family, answer without steps; v2 = steps
# without the question restated in symbols first; v3 = signed steps without the magnitudes line first; v4 = no
# question framed in a preamble or suffix (arithmetic.FRAMED); v5 = no times table at level 1, products on one line,
# no grouping or sharing stories; v6 = a negative second number always in brackets in the question ("7 + (-9)"),
# never said in words ("7 plus -9"), never negative in the level-5 widened forms; v7 = symbols always typed with
# spaces ("47 + 36", never "47+36"), no request for the answer's form after a question ("End with the answer.");
# v8 = every adding-and-taking-away story told by a template of arithmetic.STORIES (none `composed_story`)


def math_sft_records(count: int, seed: int, families: list[str], instruction: str = "",
                     exclude: set[str] = frozenset(), weights: dict[int, float] | None = None) -> list[dict]:
    """Up to `count` distinct conversations (fewer when small levels run out of distinct problems)."""
    from instar.evalsets import external_questions
    from instar.train.rewards import math_messages

    weights = weights or LEVEL_WEIGHTS
    banned = set(exclude) | external_questions()
    total = sum(weights.values())
    records, seen = [], set()
    for level, w in sorted(weights.items()):
        n, kept = round(count * w / total), 0
        # Each level draws from its own seed stream; twice the need covers duplicates at small levels.
        for p in make_problems(2 * n, seed * 7919 + level, families, level):
            if kept == n:
                break
            if p["question"] not in banned and p["question"] not in seen:
                seen.add(p["question"])
                records.append(math_messages(p, instruction))
                kept += 1
    return records


def math_conversations(store, count: int, seed: int, families: list[str], instruction: str = "",
                       exclude: set[str] = frozenset(), console=None) -> int:
    """Store `count` math conversations (idempotent: the store dedupes); return how many of them it holds."""
    from instar.datasets.store import Provenance

    records = math_sft_records(count, seed + 1, families, instruction, exclude)
    added = store.add("messages", records, Provenance(source="procedural", template=TEMPLATE, seed=seed))
    if console is not None:
        console.print(f"math conversations for SFT: {added.inserted} added, {added.duplicates} already stored "
                      f"({len(exclude)} held-out problems excluded)")
    return len(added.ids)

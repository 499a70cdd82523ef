"""External yardsticks: data instar did not generate and no training path reads.

    rows = arithmetic()              # 278 hand-written problems: {"question", "answer", "solution", "family", ...}
    external_questions()             # their questions, which the math SFT set refuses to store

`arithmetic.jsonl` was written for this purpose by hand: 80 sentence templates (none of them in
`instar/generate/arithmetic.py` or `procedural.py`; `tests/test_arithmetic.py` checks both that no template
there can emit one of these questions and that the number-masked templates do not overlap) filled with numbers
drawn once by a seeded script that is not part of the package. `solution` holds the expression each answer
was computed from with exact fractions; the test re-computes every answer with the safe evaluator.
Forms (`family`): two_digit (44), three_digit (20), negatives (42), parentheses (41), chains of 3-5 terms (48),
short word problems (60), products and quotients (23). It is read by the evaluation only: `instar eval RUN
--data arithmetic`, the report card's "what generalises" rows, and the GRPO stage's external score.

    reasoning_gym()                  # 200 problems from reasoning-gym's generators, in their phrasings

`reasoning_gym.jsonl` is the same kind of yardstick written by a well-kept library instead of by hand
(`bench/evalset_reasoning_gym.py` made it, seed 2026; reasoning-gym is not a dependency): sums, differences,
brackets and negation in its "Calculate -42 - 93." / "Solve ..." / "State the final answer to the following
arithmetic problem: 4 + 3 =" forms, one-digit products, chains of 2-5 terms, three-digit sums. The stages score it
beside the hand-written set (`evaluate.external_arithmetic`: the report card's "reasoning-gym arithmetic" row), and
`instar eval RUN --data reasoning_gym` scores any model on it.

    forms                            # `instar eval RUN --data forms`: the hand-written questions written other ways

`forms.jsonl` rewrites questions of `arithmetic.jsonl` the other ways people write them (`bench/evalset_forms.py`,
deterministic): the symbols without spaces ("47+36 = ?"), small numbers in words ("Subtract fourteen from
eight."), and a request for the answer's form after the question ("... End with a last line 'Answer:
<number>'."); `family` names the way. Only `instar eval` reads it.

    chat_prompts()                   # 62 hand-written chat prompts, none about arithmetic
    chat_references()                # the same prompts, each with a hand-written reference reply
    text_paragraphs()                # 36 hand-written paragraphs of everyday prose

`chat.jsonl` ({"prompt", "reply"} per line) and `text.txt` were written by hand for instar too, unlike the
teacher's pools in `instar/generate/prompts.py` (tests/test_yardsticks.py checks that no pool entry occurs in a
prompt): everyday requests, questions, rewrites, advice and facts; none asks for arithmetic, so a reply that is
arithmetic or ends with an "Answer:" line is the model drilling math where it should talk. The reference replies
are what a helpful assistant would say, in a sentence or three of plain English; the stages score how likely
their model finds them (bits per byte) beside its own greedy replies. The stages measure themselves on these
sets at their start and end (`instar/train/yardsticks.py`). In `text.txt` lines starting with "#" are comments
and paragraphs are separated by blank lines.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

EVALSETS = {"arithmetic": "arithmetic.jsonl", "reasoning_gym": "reasoning_gym.jsonl", "forms": "forms.jsonl"}


def path(name: str):
    """The packaged file of an evalset, as a Traversable (`instar eval --data NAME` resolves it)."""
    return resources.files("instar.evalsets").joinpath(EVALSETS[name])


@lru_cache(maxsize=None)
def _rows(name: str) -> tuple:
    text = path(name).read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def arithmetic() -> list[dict]:
    return [dict(r) for r in _rows("arithmetic")]


def reasoning_gym() -> list[dict]:
    return [dict(r) for r in _rows("reasoning_gym")]


def external_questions() -> set[str]:
    """The questions of every external arithmetic set, which no training set may hold."""
    return {r["question"] for name in EVALSETS for r in _rows(name)}


def _lines(name: str) -> list[str]:
    text = resources.files("instar.evalsets").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if not line.startswith("#")]


@lru_cache(maxsize=None)
def chat_references() -> tuple[tuple[str, str], ...]:
    text = resources.files("instar.evalsets").joinpath("chat.jsonl").read_text(encoding="utf-8")
    return tuple((r["prompt"], r["reply"]) for r in map(json.loads, filter(str.strip, text.splitlines())))


def chat_prompts() -> tuple[str, ...]:
    return tuple(p for p, _ in chat_references())


@lru_cache(maxsize=None)
def text_paragraphs() -> tuple[str, ...]:
    return tuple(p.strip() for p in "\n".join(_lines("text.txt")).split("\n\n") if p.strip())

"""Math in the teacher's words: the LLM rephrases a procedural problem, instar keeps the numbers and the answer.

    instar generate math -n 500 --source rephrase                 # the embedded teacher, or any backend
    draft = math_rephrase(random.Random(7), ask)                   # a recipe like those in recipes.py

The procedural families (procedural.py, arithmetic.py) say each problem in sentence patterns written by hand;
a teacher can say it in words no template has. The division of labour keeps the data verifiable: instar draws
the problem (family `arithmetic` or `story`, level 1-5 from the item's seed) and computes its answer and
worked steps; the teacher only rewrites the question. A rewrite is kept only if it says exactly the same
numbers in the same order (a dropped, added, changed, reordered or spelled-out number is the failure
"rephrase: numbers changed"), differs from the original ("rephrase: unchanged"), and passes the pipeline's
usual validation, filters and duplicate checks; failures are stored with their reasons like every recipe's.

What the check cannot see: a rewrite that keeps the numbers but changes the question ("how many are left"
-> "how many in all"). The answer stays the procedural one, so such a record teaches a wrong sum; keep the
share measured (bench/README.md: the embedded teacher's acceptance rate and a hand count of changed
meanings) before training on many of them.
"""

from __future__ import annotations

import random
import re

from pydantic import Field

from instar.generate.procedural import make_problem
from instar.generate.recipes import Ask, Draft, Rejected
from instar.generate.safe_eval import parse_number
from instar.schemas.outputs import Output

FAMILIES = ("arithmetic", "story")
SYSTEM = "You rewrite short math questions in your own words for a school worksheet."
PROMPT = ("Rewrite this math question in different words. Keep every number exactly as written, in the same "
          "order, and ask for the same thing.\n\nQuestion: {question}")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")


class Rephrasing(Output):
    question: str = Field(min_length=10, max_length=400, description="The rewritten question, with the same numbers.")


def numbers(text: str) -> list:
    """The numbers a text says, in order ("-5", "1,200", "3.5"), as exact values; a minus glued to a digit counts."""
    return [parse_number(n.rstrip(",")) for n in _NUMBER.findall(text)]


def math_rephrase(rng: random.Random, ask: Ask) -> Draft:
    problem = make_problem(rng.choice(FAMILIES), rng, rng.randint(1, 5))
    prompt = PROMPT.format(question=problem.question)
    new = ask(SYSTEM, prompt, Rephrasing).question.strip()
    if numbers(new) != numbers(problem.question):
        raise Rejected("rephrase: numbers changed", ask.raw())
    if new.lower() == problem.question.lower():
        raise Rejected("rephrase: unchanged", ask.raw())
    record = problem.record() | {"question": new}
    return Draft("math", record, prompt)

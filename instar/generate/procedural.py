"""Procedural math problems: no LLM, seeded, exact answers, a difficulty dial from 1 (trivial) to 5.

    make_problems(100, seed=0)                                   -> 100 valid `math` records
    make_problems(50, seed=1, families=["linear"], difficulty=3)
    make_problem("percent", random.Random(7), 2)                 -> Problem(question, answer, expr, ...)

Families: arithmetic (multi-step), percent, rate (unit rates), ages, money, linear (simple equations).
Difficulty 1 is truly easy so a tiny model can learn it (arithmetic level 1 is single-digit addition);
each level adds digits, steps, or non-integer answers. GRPO's curriculum moves along this dial.

Every answer is computed with `Fraction` arithmetic on the chosen numbers, never by evaluating text. Each
problem also keeps `expr`, an arithmetic expression a test can feed to `safe_eval` to check the answer
independently; `expr` is not stored (math records have no such field), the worked `solution` is.

Problem i of a seed is drawn from its own `Random(f"{seed}:{i}")`, so `make_problems(10, s)` is a prefix of
`make_problems(20, s)` and topping a dataset up never reshuffles it. Small levels have few distinct problems
(there are 100 single-digit sums): callers that need distinct problems deduplicate, as the store does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction as F
from typing import Callable

from instar.errors import InstarError
from instar.generate.arithmetic import arithmetic_problem, expression, solution, story_problem, tree_of, value
from instar.generate.safe_eval import format_number

MAX_DIFFICULTY = 5
HELDOUT_SEED = -1  # held-out problems come from this seed; training seeds are >= 0. A shared seed once leaked:
                   # seed 1's SFT set on seed 0's database held seed 0's held-out problems (GRPO started at 0.74, not ~0.5).
NAMES = ["Tom", "Ann", "Sam", "Mia", "Leo", "Zoe", "Ben", "Eva", "Max", "Ivy"]
ITEMS = ["pens", "apples", "books", "cups", "stickers", "balls", "cards", "shells"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: F
    expr: str  # an arithmetic expression equal to `answer`, for independent checks with safe_eval
    solution: str
    family: str
    difficulty: int

    def record(self) -> dict:
        return {"question": self.question, "answer": format_number(self.answer), "solution": self.solution,
                "family": self.family, "difficulty": self.difficulty, "verified_by": "procedural"}


def _money(x: F) -> str:
    """$12 or $4.50: cents only when there are some."""
    return f"${x.numerator}" if x.denominator == 1 else f"${float(x):.2f}"


# ---------------------------------------------------------------------------------------------------------
# Families: (rng, difficulty) -> (question, answer, expr). Answers are Fractions computed from the numbers.

def arithmetic(rng: random.Random, d: int) -> tuple[str, F, str]:
    """Expressions in many phrasings (arithmetic.py): sums, differences, negatives, brackets, chains, products."""
    question, tree = arithmetic_problem(rng, d)
    return question, value(tree), expression(tree)


def story(rng: random.Random, d: int) -> tuple[str, F, str]:
    """Short word problems of one to three steps (arithmetic.py), some with answers below zero."""
    question, tree = story_problem(rng, d)
    return question, value(tree), expression(tree)


def percent(rng: random.Random, d: int) -> tuple[str, F, str]:
    if d <= 3:
        p = rng.choice([10, 50, 100]) if d == 1 else rng.randrange(10, 100, 10) if d == 2 else rng.randrange(5, 100, 5)
        n = rng.randrange(10, 110, 10) if d == 1 else rng.randrange(10, 210, 10) if d == 2 else rng.randint(20, 400)
        return f"What is {p}% of {n}?", F(n * p, 100), f"{n} * {p} / 100"
    if d == 4:
        price, p = rng.randrange(10, 210, 10), rng.randrange(5, 55, 5)
        item = rng.choice(["shirt", "lamp", "bike", "game"])
        q = f"A {item} costs ${price}. It is on sale for {p}% off. What is the sale price in dollars?"
        return q, F(price) - F(price * p, 100), f"{price} - {price} * {p} / 100"
    while True:  # "what percent": pick a whole-number percent and a total that makes the part whole
        total, p = rng.choice([20, 25, 40, 50, 80, 120, 200, 250, 400]), rng.randint(1, 99)
        part = F(total * p, 100)
        if part.denominator == 1:
            break
    return f"What percent of {total} is {part}?", F(p), f"{part} / {total} * 100"


def rate(rng: random.Random, d: int) -> tuple[str, F, str]:
    if d == 1:
        r, t = rng.randint(2, 10), rng.randint(2, 5)
        return (f"A car goes {r * t} km in {t} hours. How many km does it go each hour?", F(r),
                f"{r * t} / {t}")
    if d == 2:
        n, p, item = rng.randint(2, 9), rng.randint(2, 12), rng.choice(ITEMS)
        return (f"{n} {item} cost ${n * p}. How many dollars does one cost?", F(p), f"{n * p} / {n}")
    if d == 3:
        r, t, t2 = rng.randint(2, 12), rng.randint(2, 6), rng.randint(2, 12)
        return (f"A machine makes {r * t} toys in {t} minutes. How many toys does it make in {t2} minutes?",
                F(r * t2), f"{r * t} / {t} * {t2}")
    if d == 4:
        a, b, c = rng.randint(2, 30), rng.choice([2, 4, 5, 8]), rng.randint(2, 20)  # answers terminate
        return (f"A tap fills {a} liters in {b} minutes. How many liters does it fill in {c} minutes?",
                F(a * c, b), f"{a} / {b} * {c}")
    n, m, item = rng.randint(2, 6), rng.randint(2, 15), rng.choice(ITEMS)
    total = n * F(rng.randrange(25, 500, 25), 100)  # a whole number of cents per item
    return (f"{n} {item} cost {_money(total)}. How many dollars do {m} {item} cost?", total / n * m,
            f"{format_number(total)} / {n} * {m}")


def ages(rng: random.Random, d: int) -> tuple[str, F, str]:
    a_name, b_name = rng.sample(NAMES, 2)
    if d == 1:
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        return (f"{a_name} is {a} years old. {b_name} is {b} years older. How old is {b_name}?", F(a + b),
                f"{a} + {b}")
    if d == 2:
        a, b, n = rng.randint(10, 40), rng.randint(1, 9), rng.randint(2, 10)
        return (f"{a_name} is {a} years old. {b_name} is {b} years younger. How old will {b_name} be in "
                f"{n} years?", F(a - b + n), f"{a} - {b} + {n}")
    if d == 3:
        a, k, n = rng.randint(3, 12), rng.randint(2, 4), rng.randint(2, 10)
        return (f"{a_name} is {a} years old. Their father is {k} times as old. How old will the father be in "
                f"{n} years?", F(a * k + n), f"{a} * {k} + {n}")
    if d == 4:
        a, b, x = rng.randint(5, 15), rng.randint(25, 45), rng.randint(1, 15)
        total = a + b + 2 * x
        return (f"{a_name} is {a} and {b_name} is {b}. In how many years will the sum of their ages be "
                f"{total}?", F(x), f"({total} - {a} - {b}) / 2")
    s, x = rng.randint(3, 15), rng.randint(1, 20)
    m = 2 * s + x  # m + x = 2 (s + x)  =>  x = m - 2 s
    return (f"A mother is {m} and her son is {s}. In how many years will she be twice as old as him?", F(x),
            f"{m} - 2 * {s}")


def money(rng: random.Random, d: int) -> tuple[str, F, str]:
    name = rng.choice(NAMES)
    if d == 1:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{name} has ${a} and gets ${b} more. How many dollars does {name} have?", F(a + b), f"{a} + {b}"
    if d == 2:
        a = rng.randint(10, 50)
        b = rng.randint(1, a)
        return f"{name} has ${a} and spends ${b}. How many dollars are left?", F(a - b), f"{a} - {b}"
    if d == 3:
        n, p, item = rng.randint(2, 9), rng.randint(1, 9), rng.choice(ITEMS)
        paid = rng.choice([x for x in (10, 20, 50, 100) if x >= n * p])
        return (f"{name} buys {n} {item} at ${p} each and pays with ${paid}. How many dollars of change "
                f"does {name} get?", F(paid - n * p), f"{paid} - {n} * {p}")
    if d == 4:
        n, m = rng.randint(2, 6), rng.randint(2, 9)
        x, y = F(rng.randrange(100, 1000, 25), 100), F(rng.randrange(25, 300, 25), 100)
        return (f"Notebooks cost {_money(x)} and pencils cost {_money(y)}. How many dollars do {n} notebooks "
                f"and {m} pencils cost?", n * x + m * y, f"{n} * {format_number(x)} + {m} * {format_number(y)}")
    a, b, w = rng.randint(3, 25), rng.randint(0, 50), rng.randint(2, 20)
    goal = b + a * w
    return (f"{name} has ${b} and saves ${a} each week. After how many weeks will {name} have exactly "
            f"${goal}?", F(w), f"({goal} - {b}) / {a}")


def linear(rng: random.Random, d: int) -> tuple[str, F, str]:
    if d == 1:
        x, a = rng.randint(0, 9), rng.randint(1, 9)
        return f"Solve for x: x + {a} = {x + a}", F(x), f"{x + a} - {a}"
    if d == 2:
        x, a = rng.randint(1, 12), rng.randint(2, 9)
        return f"Solve for x: {a}x = {a * x}", F(x), f"{a * x} / {a}"
    if d == 3:
        x, a, b = rng.randint(1, 15), rng.randint(2, 9), rng.randint(1, 30)
        return f"Solve for x: {a}x + {b} = {a * x + b}", F(x), f"({a * x + b} - {b}) / {a}"
    if d == 4:
        x, c = rng.randint(-10, 15), rng.randint(1, 6)
        a, b = c + rng.randint(1, 5), rng.randint(1, 30)
        rhs = a * x - b - c * x  # a x - b = c x + rhs
        sign, mag = ("+", rhs) if rhs >= 0 else ("-", -rhs)
        return (f"Solve for x: {a}x - {b} = {c}x {sign} {mag}", F(x), f"({rhs} + {b}) / ({a} - {c})")
    a, b = rng.randint(2, 9), rng.randint(1, 30)
    c = b + rng.choice([k for k in range(1, 60) if k % a])  # (c - b) / a is never whole
    return f"Solve for x: {a}x + {b} = {c}", F(c - b, a), f"({c} - {b}) / {a}"


FAMILIES: dict[str, Callable[[random.Random, int], tuple[str, F, str]]] = {
    "arithmetic": arithmetic, "story": story, "percent": percent, "rate": rate, "ages": ages, "money": money,
    "linear": linear,
}


# ---------------------------------------------------------------------------------------------------------
# Entry points

def make_problem(family: str, rng: random.Random, difficulty: int) -> Problem:
    question, answer, expr = FAMILIES[family](rng, difficulty)
    return Problem(question, answer, expr, solution(tree_of(expr)), family, difficulty)


def make_problems(count: int, seed: int, families: list[str] | None = None,
                  difficulty: int | None = None) -> list[dict]:
    """`count` valid `math` records; family and (unless given) difficulty are drawn per problem."""
    return [p.record() for p in make_problem_objects(count, seed, families, difficulty)]


def heldout_problems(count: int, families: list[str] | None = None, difficulty: int | None = None) -> list[dict]:
    """GRPO's held-out problems (distinct questions, in order): drawn from HELDOUT_SEED whatever a run's seed is,
    so the SFT math set of any seed can exclude them (sft_math.py) and stage 4's before/after stays held out."""
    return list({r["question"]: r for r in make_problems(count, HELDOUT_SEED, families, difficulty)}.values())


def make_problem_objects(count: int, seed: int, families: list[str] | None = None,
                         difficulty: int | None = None) -> list[Problem]:
    families = list(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise InstarError(f"unknown math family {unknown[0]!r} (expected one of {', '.join(FAMILIES)})")
    if difficulty is not None and not 1 <= difficulty <= MAX_DIFFICULTY:
        raise InstarError(f"difficulty must be 1..{MAX_DIFFICULTY}, got {difficulty}")
    problems = []
    for i in range(count):
        rng = random.Random(f"{seed}:{i}")
        family = rng.choice(families)
        level = difficulty if difficulty is not None else rng.randint(1, MAX_DIFFICULTY)
        problems.append(make_problem(family, rng, level))
    return problems

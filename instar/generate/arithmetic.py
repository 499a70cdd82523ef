"""Arithmetic in many phrasings and forms, with worked steps: the procedural `arithmetic` and `story` families.

    rng = random.Random(3)
    q, tree = arithmetic_problem(rng, level=3)    # "Please work out 41 - (17 + 9).", ("-", 41, ("+", 17, 9, True), False)
    value(tree), expression(tree)                 # Fraction(15), "41 - (17 + 9)"
    worked_steps(tree)                            # ["17 + 9 = 26", "41 - 26 = 15"]
    q, tree = story_problem(rng, level=2)         # a short word problem and the expression it asks for

A problem is an expression tree — an int leaf, or (op, left, right, parenthesised) — drawn at a level, then
said in one of many phrasings: as symbols ("What is 23 + 48 - 9?"), in words ("Take 9 away from 23."), as a
chain of instructions ("Begin with 23. Add 48, then subtract 9."), or as a short story (of adding and taking
away — half by a template of `STORIES`, half put together from parts by `composed_story` — or of equal groups
and equal shares: `GROUPS`, `SHARES`). Forms by level
(the curriculum's dial, 1 = what a ~1M-param model learns first):

    1  a + b or a - b, single digits, never below zero; the times table (a * b, single digits: TIMES_TABLE)
    2  two-digit operands (one or both); three single-digit terms; single-digit products and the quotients they
       make (56 / 7); a one-digit sum or difference with a sign (4 - 9, -3 + 5, 6 - (-2): the signed facts, done
       on magnitudes, learned early)
    3  negative operands and results; parentheses; three-digit sums; two-digit x one-digit; exact quotients
    4  chains of 3-5 terms of one or two digits (may go below zero); two bracketed groups; c x (a +- b)
    5  any of the above with operands up to three digits

The reply a model is taught (`worked_steps`) is one line per operation, innermost first, left to right —
"23 + 48 = 71", "71 - 9 = 62" — then "Answer: 62": the seed's "defined series of steps". A sum or difference
with a two- or three-digit operand is first done in columns, units first ("3 + 8 = 11", "2 + 4 + 1 = 7",
then "23 + 48 = 71"; see `columns`), and so is a product by a one-digit number ("23 * 7": "3 * 7 = 21",
"2 * 7 = 14", "14 + 2 = 16", then "23 * 7 = 161"; see `product_columns`), so every operation a model must learn
is a single-digit fact (or a carry added). An operation with a negative operand or result is first done on
the magnitudes ("9 - 4 = 5", then "4 - 9 = -5"; see `magnitudes`), so the signed ones need no facts of their
own either. A negative right operand is written in brackets ("8 - (-5) = 13") so every step reads one way.
The step lines restate the problem as arithmetic, so a model that learned to parse a phrasing and to add two
numbers can answer phrasings it never saw; GRPO's reward checks only the final answer line. A product or
quotient is also asked with "x", "×" or "÷" as people type them; its steps always read "*" and "/". Likewise a
negative second number is asked as "7 + (-9)", "7 + -9" or "7 plus -9" and restated as "7 + (-9)", and a sixth
of the symbolic questions type their symbols without spaces ("47+36", "(3+1)*3=") and are restated spaced. Some
questions end with a request for the answer's form ("End with the answer.", `FORM_REQUESTS`): the reply is the same.

Phrasings are hand-written here and nowhere else; `instar/evalsets/arithmetic.jsonl` (the external yardstick)
was written separately in other words, and `tests/test_arithmetic.py` checks that no template of this module
can produce one of its questions. Deliberately simple: integers only (the other families in procedural.py
cover decimals, fractions and percent), no number words (a quarter of the small numbers said in words, "What
is seven plus five?", taught the tiny student that a question without a digit can be math: drill replies to the
hand-written chat prompts 0.34 -> 0.57, external arithmetic 0.371 -> 0.295; one SFT run each, docs/measurements.md "Stage 4"),
English only.
"""

from __future__ import annotations

import random
import re
import zlib
from fractions import Fraction as F
from typing import Union

from instar.generate.safe_eval import format_number

Tree = Union[int, F, tuple]  # a number, or (op, left, right, parenthesised) with op in "+-*/"
NAMES = ["Tom", "Ann", "Sam", "Mia", "Leo", "Zoe", "Ben", "Eva", "Max", "Ivy", "Raj", "Lin", "Ada", "Kai", "Uma",
         "Joe", "Nia", "Eli", "Ruth", "Oscar"]


# ---------------------------------------------------------------------------------------------------------
# Trees: value, text, steps

def value(t: Tree) -> F:
    return _steps(t)[1]


def _operand(x: F, right: bool) -> str:
    s = format_number(x)
    return f"({s})" if right and x < 0 else s


def expression(t: Tree, right: bool = False) -> str:
    """Plain text the safe evaluator reads: '41 - (17 + 9)', '-4 + (-9)'."""
    if not isinstance(t, tuple):
        return _operand(F(t), right)
    s = f"{expression(t[1])} {t[0]} {expression(t[2], True)}"
    return f"({s})" if t[3] else s


def worked_steps(t: Tree) -> list[str]:
    """One 'x op y = z' line per operation, innermost and leftmost first."""
    return _steps(t)[0]


def _steps(t: Tree) -> tuple[list[str], F]:
    if not isinstance(t, tuple):
        return [], F(t)
    (left, a), (right, b) = _steps(t[1]), _steps(t[2])
    op, z = t[0], _apply(t[0], a, b)
    line = f"{_operand(a, False)} {op} {_operand(b, True)} = {format_number(z)}"
    plain = magnitudes(a, op, b)
    if plain is None:
        return left + right + columns(a, op, b) + [line], z
    x, hop, y = plain
    helper = f"{format_number(x)} {hop} {format_number(y)} = {format_number(_apply(hop, x, y))}"
    return left + right + columns(x, hop, y) + [helper, line], z


def _apply(op: str, a: F, b: F) -> F:
    return a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b


def magnitudes(a: F, op: str, b: F) -> tuple[F, str, F] | None:
    """The same operation on magnitudes when a sign is involved (a negative operand or result), else None:
    4 - 9 -> 9 - 4 (the line after it says "4 - 9 = -5"); -5 - 7 -> 5 + 7; 8 - (-5) -> 8 + 5; -3 + 3 -> 3 - 3;
    -3 * 4 -> 3 * 4. A sum or difference becomes a sum, or bigger minus smaller, of numbers >= 0: with it the
    signed forms need only the unsigned facts and a sign rule (which magnitude is bigger, which sign it had),
    where without it each of the ~200 signed single-digit facts was its own fact to learn and the ~1M model,
    seeing each a few times, got none of them (measured: "What is 4 - 9?" right 0 of 45 after SFT)."""
    if op in "*/":
        return (abs(a), op, abs(b)) if a < 0 or b < 0 else None
    if a >= 0 and b >= 0 and _apply(op, a, b) >= 0:
        return None  # a plain sum, or bigger minus smaller
    s = b if op == "+" else -b  # the second term with its sign
    if (a >= 0) == (s >= 0):
        return abs(a), "+", abs(s)
    return max(abs(a), abs(s)), "-", min(abs(a), abs(s))


def columns(a: F, op: str, b: F) -> list[str]:
    """Column steps for a sum or difference of whole numbers >= 0 with a two- or three-digit operand, units
    first, each one single-digit fact (a carry is "+ 1"; a borrow shows as the top digit + 10):
    48 + 37 -> ["8 + 7 = 15", "4 + 3 + 1 = 8"]; 52 - 37 -> ["12 - 7 = 5", "4 - 3 = 1"] (bigger minus smaller).
    A product with one one-digit factor goes digit by digit (`product_columns`). [] for anything else (signs:
    see `magnitudes`; fractions, one digit, quotients), which keeps its one line.
    Why: with "48 + 37 = 85" alone a ~1M model must learn every sum of two-digit numbers as its own fact; in
    columns it needs the 100 single-digit facts, and every column drills them."""
    if a.denominator != 1 or b.denominator != 1 or min(a, b) < 0:
        return []
    x, y = int(a), int(b)
    if op == "*":
        return product_columns(x, y)
    if op not in "+-" or max(x, y) < 10:
        return []
    if op == "-" and x < y:
        return []  # a negative result: its columns are those of `magnitudes`' bigger minus smaller
    xs, ys = str(x)[::-1], str(y)[::-1]
    lines, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        dx, dy = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else None
        if dy is None and not carry:
            continue  # a digit only the longer number has, nothing carried: it is copied
        dy = dy or 0
        if op == "+":
            total = dx + dy + carry
            lines.append(f"{dx} + {dy}{' + 1' if carry else ''} = {total}")
            carry = total // 10
        else:
            top = dx - carry
            carry = int(top < dy)
            lines.append(f"{top + 10 * carry} - {dy} = {top + 10 * carry - dy}")
    return lines


def product_columns(x: int, y: int) -> list[str]:
    """A many-digit whole number times a one-digit one, digit by digit from the units, each line one fact, the
    carry added on a line of its own: 23 * 7 -> ["3 * 7 = 21", "2 * 7 = 14", "14 + 2 = 16"] (then "23 * 7 = 161"
    reads the units digits off as the columns of a sum do); 7 * 23 -> ["7 * 3 = 21", "7 * 2 = 14", "14 + 2 = 16"].
    [] for two one-digit factors (a fact) and two many-digit ones; `columns` passes only whole numbers >= 0."""
    if max(x, y) < 10 or min(x, y) >= 10:
        return []
    big, d = (x, y) if x >= 10 else (y, x)
    lines, carry = [], 0
    for digit in map(int, reversed(str(big))):
        p = digit * d
        lines.append(f"{digit} * {d} = {p}" if big == x else f"{d} * {digit} = {p}")
        if carry:
            lines.append(f"{p} + {carry} = {p + carry}")
        carry = (p + carry) // 10
    return lines


def solution(t: Tree) -> str:
    """The worked reply without its answer line; a bare number when there is nothing to work out.

    With more than one step the reply first restates the question in symbols ("65 + 87", "(7 + 5) - 3"): the
    words are read once, and every column and step below reads digits from that line instead of finding them
    in a sentence it has never seen. Measured (tiny preset, 900 SFT steps, docs/measurements.md "Stage 4"): external two-digit
    problems 0.02 -> 0.30, the whole external set 6.1% -> 10.1%."""
    lines, z = _steps(t)
    if len(lines) > 1:
        lines = [expression(t)] + lines
    return "\n".join(lines) or format_number(z)


def tree_of(expr: str) -> Tree:
    """The tree of a plain + - * / expression with number literals (the `expr` the other procedural families
    keep), so their worked solutions come out as steps too: '120 * 30 / 100' -> two steps."""
    import ast

    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def walk(node: ast.AST, top: bool) -> Tree:
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return (ops[type(node.op)], walk(node.left, False), walk(node.right, False), not top)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand, top)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return F(str(node.value))
        raise ValueError(f"not a plain arithmetic expression: {expr!r}")

    return walk(ast.parse(expr, mode="eval").body, True)


# ---------------------------------------------------------------------------------------------------------
# Drawing trees at a level

def _num(rng: random.Random, digits: int, lo1: int = 0) -> int:
    return rng.randint(lo1, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _chain(nums: list[int], ops: list[str]) -> Tree:
    t: Tree = nums[0]
    for op, x in zip(ops, nums[1:]):
        t = (op, t, x, False)
    return t


def _nonneg_chain(rng: random.Random, nums: list[int]) -> Tree:
    """Left-to-right +/- chain whose running total never drops below zero."""
    ops, total = [], nums[0]
    for x in nums[1:]:
        op = rng.choice("+-") if total >= x else "+"
        total += x if op == "+" else -x
        ops.append(op)
    return _chain(nums, ops)


def _signed(rng: random.Random, digits: int) -> int:
    x = _num(rng, digits, 1)
    return -x if rng.random() < 0.5 else x


def _signed_pair(rng: random.Random) -> Tree:
    """A one-digit sum or difference with a sign in it: 4 - 9, -3 + 5, -2 - 6, 6 - (-2), 7 + (-9)."""
    a, b = _num(rng, 1, 1), _num(rng, 1, 1)
    shape = rng.randrange(4)
    if shape == 0:  # a small number minus a bigger one (0 - 1 when both are 1)
        return ("-", min(a, b) - (a == b), max(a, b), False)
    if shape == 1:
        return (rng.choice("+-"), -a, b, False)
    return (rng.choice("+-"), a, -b, False) if shape == 2 else (rng.choice("+-"), -a, -b, False)


# Share of level 1 that is the times table (single-digit products). Without it the one-digit products were ~4% of
# the SFT math (~20 sightings of each fact over the default SFT) and the student got 1 of the external yardstick's
# 23 products and quotients right: it restated them ("8 * 7 = 54") without knowing the facts.
TIMES_TABLE = 0.3


def draw_tree(rng: random.Random, level: int) -> Tree:
    """An expression of the form the level calls for (see the module docstring)."""
    if level <= 1:
        if rng.random() < TIMES_TABLE:
            return ("*", _num(rng, 1, 2), _num(rng, 1, 2), False)
        return _nonneg_chain(rng, [_num(rng, 1), _num(rng, 1)])
    if level == 2:
        kind = rng.random()
        if kind < 0.42:
            d = rng.choice([(2, 2), (2, 1), (1, 2), (2, 2)])
            return _nonneg_chain(rng, [_num(rng, d[0]), _num(rng, d[1], 1)])
        if kind < 0.6:
            return _nonneg_chain(rng, [_num(rng, 1, 1) for _ in range(3)])
        if kind < 0.72:
            return ("*", _num(rng, 1, 2), _num(rng, 1, 2), False)
        if kind < 0.82:  # a times-table fact backwards: 56 / 7
            b = _num(rng, 1, 2)
            return ("/", b * _num(rng, 1, 1), b, False)
        return _signed_pair(rng)
    if level == 3:
        kind = rng.randrange(6)
        d = rng.choice([1, 2])
        if kind == 0:  # a negative operand or result
            a, b = _signed(rng, d), _signed(rng, rng.choice([1, 2]))
            return (rng.choice("+-"), a, b, False)
        if kind == 1:  # a small number minus a bigger one
            a = _num(rng, d, 1)
            return ("-", a, a + _num(rng, rng.choice([1, 2]), 1), False)
        if kind == 2:  # one bracketed pair
            a, b, c = (_num(rng, d, 1) for _ in range(3))
            inner = (rng.choice("+-"), b, c, True)
            return (rng.choice("+-"), a, inner, False) if rng.random() < 0.5 else (rng.choice("+-"), inner, a, False)
        if kind == 3:  # three-digit sums and differences
            a, b = _num(rng, 3), _num(rng, rng.choice([2, 3]))
            return ("+", a, b, False) if rng.random() < 0.5 else ("-", max(a, b), min(a, b), False)
        if kind == 4:
            return ("*", _num(rng, 2), _num(rng, 1, 2), False)
        b, q = _num(rng, 1, 2), _num(rng, 1, 1)
        return ("/", b * q, b, False)
    if level == 4:
        kind = rng.randrange(4)
        if kind <= 1:
            n = rng.randint(3, 5)
            nums = [_num(rng, rng.choice([1, 2]), 1) for _ in range(n)]
            return _chain(nums, [rng.choice("+-") for _ in nums[1:]])
        if kind == 2:
            a, b, c, e = (_num(rng, rng.choice([1, 2]), 1) for _ in range(4))
            return (rng.choice("+-"), (rng.choice("+-"), a, b, True), (rng.choice("+-"), c, e, True), False)
        inner = (rng.choice("+-"), _num(rng, 1, 1), _num(rng, 1, 1), True)
        return ("*", _num(rng, 1, 2), inner, False) if rng.random() < 0.5 else ("*", inner, _num(rng, 1, 2), False)
    # level 5: the level-3/4 forms with wider operands and signs
    t = draw_tree(rng, rng.choice([3, 4]))
    return _widen(rng, t)


def _widen(rng: random.Random, t: Tree) -> Tree:
    """Swap some leaves of +/- nodes for two- or three-digit numbers, some of them negative."""
    if isinstance(t, int):
        return t
    op, a, b, p = t
    if op not in "+-":
        return t
    if isinstance(a, int) and rng.random() < 0.6:
        a = _num(rng, rng.choice([2, 3])) * (-1 if rng.random() < 0.15 else 1)
    if isinstance(b, int) and rng.random() < 0.6:
        b = _num(rng, rng.choice([2, 3])) * (-1 if rng.random() < 0.15 else 1)
    return (op, _widen(rng, a), _widen(rng, b), p)


# ---------------------------------------------------------------------------------------------------------
# Phrasings. {e}: the expression; {a}, {b}: operands of a binary problem. Written for this module only.

SYMBOLIC = [
    "What is {e}?", "What's {e}?", "How much is {e}?", "Please calculate {e}.", "Can you work out {e}?",
    "Solve {e}.", "{e} equals what?", "Find {e}.", "Give the result of {e}.", "What do you get from {e}?",
    "Determine the value of {e}.", "Tell me what {e} is.", "Quick question: what is {e}?",
    "Do the arithmetic: {e}", "I need the result of {e}.", "Work this out: {e}", "{e} = ",
    "What number is {e}?", "Help me compute {e}.", "Figure out {e}.", "Result of {e}?", "Find the result: {e}",
    "Simplify the expression {e}.", "Could you calculate {e} for me?", "What does {e} come to?",
]
PLUS = [
    "What is {a} plus {b}?", "Add {a} to {b}. What is the result?", "What is the sum of {a} and {b}?",
    "Please add {a} and {b}.", "If you add {b} to {a}, what do you get?", "{a} plus {b} makes what?",
    "What do you get when you add {a} and {b}?", "Sum {a} and {b}.", "What is {a} increased by {b}?",
    "Put {a} and {b} together. How many is that?", "Find {a} and {b} added together.",
    "What number is {a} more than {b}?", "How much is {a} and {b} altogether?", "Combine {a} and {b}. What total do you get?",
    "Count on {b} from {a}. Where do you stop?", "What is {b} added to {a}?",
]
MINUS = [
    "What is {a} minus {b}?", "Take {b} from {a}. What is left?", "What is {a} take away {b}?",
    "Please subtract {b} from {a}.", "If you subtract {b} from {a}, what do you get?", "{a} minus {b} makes what?",
    "What is the difference between {a} and {b}?", "What remains when {b} is taken from {a}?",
    "What is {a} decreased by {b}?", "Remove {b} from {a}. How many are left?", "How much is {a} less {b}?",
    "What number is {b} smaller than {a}?", "Count back {b} from {a}. Where do you stop?",
    "Subtract {b} from {a} and give the result.", "Go down {b} from {a}. What number do you reach?",
]
TIMES = [
    "What is {a} times {b}?", "What is {a} multiplied by {b}?", "Please multiply {a} and {b}.",
    "What is the product of {a} and {b}?", "How much is {a} lots of {b}?", "{a} groups of {b} make how many?",
    "Multiply {a} and {b} together.", "What do you get if you multiply {a} by {b}?", "{a} times {b} makes what?",
    "Work out {a} multiplied by {b}.", "Calculate the product of {a} and {b}.", "Can you multiply {a} by {b}?",
    "If you have {a} groups of {b}, how many is that?", "Find {a} times {b}.", "Give the product of {a} and {b}.",
]
DIVIDE = [
    "What is {a} divided by {b}?", "Please divide {a} by {b}.", "Share {a} equally into {b} parts. How big is each?",
    "How many times does {b} go into {a}?", "What is {a} split into {b} equal parts?",
    "What do you get when you divide {a} by {b}?", "{a} divided by {b} makes what?", "Can you divide {a} by {b}?",
    "Split {a} into groups of {b}. How many groups are there?", "What is the quotient of {a} and {b}?",
    "Work out {a} divided by {b}.", "If {a} is split into {b} equal parts, how big is each part?",
    "How many lots of {b} are there in {a}?", "Divide {a} into {b} equal shares. How much is one share?",
]
# Phrasings that speak of counts ("how many are left"): not for a negative operand or result; phrasings that step
# along the number line by the second number ("count back 2 from 6"): not for a negative second number.
COUNTING = ("left", "remain", "difference", "How many")
STEPPING = ("Count", "Go down", "smaller", "more than")
_BRACKETED_NEGATIVE = re.compile(r"\((-\d+)\)")
CHAIN_START = ["Begin with {a}.", "Start at {a}.", "Take the number {a}.", "Think of {a}.", "Your number is {a}."]
CHAIN_STEP = {"+": ["add {x}", "plus {x}", "add on {x}", "increase it by {x}", "count up {x}"],
              "-": ["subtract {x}", "minus {x}", "take away {x}", "decrease it by {x}", "count down {x}"]}
CHAIN_END = ["What is the result?", "What number do you have now?", "Where do you finish?", "What do you get?",
             "What is the final number?"]


# Symbols typed without spaces ("47+36", "(3+1)*3=", "7+-9"): a sixth of the symbolic questions (~5% of all),
# picked by a checksum of the question (`_picked`), not drawn from the rng, so the problems drawn stay exactly
# those drawn without it and a comparison differs in this only. The reply restates the question spaced, as it
# writes "x" as "*". Without any the student answered 0.0-1.8% of the external questions typed so (README
# "Stage 4", "Written other ways"); with a sixth or a third alike ~26%.
_SPACED_OPERATOR = re.compile(r" ([-+*/x×÷=]) ")


def _picked(way: str, text: str, share: int) -> int | None:
    """A checksum of `text` for the questions (one in `share`) that get `way`, else None."""
    crc = zlib.crc32(f"{way}:{text}".encode())
    return crc // share if crc % share == 0 else None


def _spoken(t: Tree) -> str:
    """'12 plus 5 minus 3' for a +/- chain."""
    if isinstance(t, int):
        return str(t)
    return f"{_spoken(t[1])} {'plus' if t[0] == '+' else 'minus'} {t[2]}"


def _is_chain(t: Tree) -> bool:
    """A left-to-right +/- chain of non-negative leaves, no brackets."""
    if isinstance(t, int):
        return t >= 0
    return t[0] in "+-" and not t[3] and isinstance(t[2], int) and t[2] >= 0 and _is_chain(t[1])


def _chain_terms(t: Tree) -> tuple[int, list[tuple[str, int]]]:
    if isinstance(t, int):
        return t, []
    first, rest = _chain_terms(t[1])
    return first, rest + [(t[0], t[2])]


# Words around a question, as people write them: with FRAMED of the phrasings wrapped in one or both, the words
# next to the numbers stop predicting the reply, and finding and copying the expression is what is learned.
# No greetings or thanks: those open the everyday chat prompts the student must NOT answer with a drill.
# Measured (the Quickstart data with continuations, its 20,000 math conversations regenerated with and without,
# default SFT, seeds 0/1/2, Zen 3): external arithmetic 0.140/0.018/0.022 -> 0.097/0.072/0.061 (the worst seed
# no longer fails to copy "Compute 31 + 16." into its first line), answer line 0.97/0.93/0.92 -> 0.99/0.96/0.99,
# drill replies to the hand-written chat prompts 0.31/0.16/0.29 -> 0.16/0.18/0.15.
PREAMBLES = ["Quick one:", "Here is a question.", "Math question:", "I have a sum for you.", "Homework help:",
             "Try this one.", "Next problem.", "Let's see.", "One more:", "My teacher asked this.", "I'm stuck on this.",
             "For practice:", "A small puzzle:", "Here's one.", "I wonder about this.", "Test yourself:"]
SUFFIXES = ["Show your steps.", "Be careful.", "Take your time.", "I want to check my answer.", "It's for school.",
            "No rush.", "Go step by step.", "Can you do it?", "I think it is easy.", "Write the working."]
FRAMED = 0.35
# Requests for the reply's form, as people add them: a third of the suffixes (`_picked`). The reply is the same
# worked steps and answer line. Without any, the student answered ~20% of the external questions with "End with
# a last line 'Answer: <number>'." after them (~40% bare); with these ~29% (docs/measurements.md "Stage 4").
FORM_REQUESTS = ["Put the answer on the last line.", "End with the answer.", "Give the final answer at the end.",
                 "Finish with a line 'Answer: <number>'.", "Write the answer last, as a number.",
                 "The last line should be the answer."]


def phrase(rng: random.Random, t: Tree) -> str:
    """One phrasing of `t`, drawn among those that fit its shape; FRAMED of them inside a preamble and/or suffix."""
    text = _phrase(rng, t)
    if rng.random() >= FRAMED:
        return text
    frame = rng.choice(["pre", "post", "both"])
    pre = rng.choice(PREAMBLES) + " " if frame != "post" else ""
    post = " " + rng.choice(SUFFIXES) if frame != "pre" else ""
    if post and (k := _picked("form", text, 3)) is not None:
        post = " " + FORM_REQUESTS[k % len(FORM_REQUESTS)]
    return f"{pre}{text.strip()}{post}"


def _phrase(rng: random.Random, t: Tree) -> str:
    e = expression(t)
    choices = ["symbolic"] * 3
    binary = not isinstance(t, int) and isinstance(t[1], int) and isinstance(t[2], int)
    if binary:
        choices += ["binary"] * 4
    if _is_chain(t) and not binary:
        choices += ["spoken", "steps", "steps"]
    kind = rng.choice(choices)
    if kind == "binary":
        pool = {"+": PLUS, "-": MINUS, "*": TIMES, "/": DIVIDE}[t[0]]
        if value(t) < 0 or t[1] < 0 or t[2] < 0:  # "how many are left" and "the difference" assume counts
            pool = [p for p in pool if not any(w in p for w in COUNTING)]
        if t[2] < 0:  # and "count back -2 from 6" reads as nonsense
            pool = [p for p in pool if not any(w in p for w in STEPPING)]
        return rng.choice(pool).format(a=t[1], b=t[2])
    if kind == "spoken":
        return rng.choice(["What is {s}?", "Work out {s}.", "How much is {s}?", "{s} makes what?"]).format(s=_spoken(t))
    if kind == "steps":
        first, rest = _chain_terms(t)
        said = [rng.choice(CHAIN_STEP[op]).format(x=x) for op, x in rest]
        body = ", then ".join(said) if rng.random() < 0.5 else ". ".join(s[0].upper() + s[1:] for s in said)
        body = body[0].upper() + body[1:]
        return f"{rng.choice(CHAIN_START).format(a=first)} {body}. {rng.choice(CHAIN_END)}"
    if ("*" in e or "/" in e) and rng.random() < 0.5:  # products and quotients as people type them too
        e = e.replace("*", rng.choice(["x", "×"])).replace("/", "÷")
    if "(-" in e and rng.random() < 0.5:  # and a negative number after a sign without its brackets: 7 + -9
        e = _BRACKETED_NEGATIVE.sub(r"\1", e)
    text = rng.choice(SYMBOLIC).format(e=e)
    return _SPACED_OPERATOR.sub(r"\1", text) if _picked("compact", text, 6) is not None else text


def arithmetic_problem(rng: random.Random, level: int) -> tuple[str, Tree]:
    t = draw_tree(rng, level)
    return phrase(rng, t), t


# ---------------------------------------------------------------------------------------------------------
# Stories: (text with {n} the name, {a} {b} {c} numbers, shape). Shapes: "a+b", "a-b", "a+b-c", "a-b+c",
# "a+b+c", "a-b-c"; numbers are drawn so every count stays whole and non-negative, except in SIGNED stories.

STORIES = [
    ("{n} has {a} crayons and finds {b} more. How many crayons does {n} have now?", "a+b"),
    ("There are {a} ducks in a pond. {b} more ducks land. How many ducks are in the pond?", "a+b"),
    ("{n} baked {a} cookies in the morning and {b} in the afternoon. How many cookies did {n} bake?", "a+b"),
    ("A garden has {a} roses and {b} tulips. How many flowers are in the garden?", "a+b"),
    ("{n} ran {a} laps yesterday and {b} laps today. How many laps is that in total?", "a+b"),
    ("A train carries {a} people. {b} more get on at the station. How many people are on the train?", "a+b"),
    ("{n} had {a} coins and was given {b} coins. How many coins does {n} have?", "a+b"),
    ("A team won {a} games last year and {b} games this year. How many games did it win in both years?", "a+b"),
    ("{n} has {a} balloons. {b} of them pop. How many balloons are left?", "a-b"),
    ("A tree had {a} apples. {n} picked {b} of them. How many apples are still on the tree?", "a-b"),
    ("There were {a} cupcakes on a plate and the children ate {b}. How many cupcakes are left?", "a-b"),
    ("{n} had {a} dollars and spent {b} dollars on lunch. How many dollars does {n} have left?", "a-b"),
    ("A parking lot had {a} cars. {b} cars drove away. How many cars are in the lot now?", "a-b"),
    ("{n} needs {a} points to win and has {b} points. How many more points does {n} need?", "a-b"),
    ("A book has {a} pages. {n} has read {b} pages. How many pages are left to read?", "a-b"),
    ("{n} is {a} centimeters tall and {n}'s little brother is {b} centimeters shorter. How tall is the brother "
     "in centimeters?", "a-b"),
    ("{n} had {a} cards, got {b} more from a friend, then gave {c} away. How many cards does {n} have?", "a+b-c"),
    ("A bakery made {a} rolls, sold {c} in the morning, then baked {b} more. How many rolls does it have?", "a-c+b"),
    ("A school bus has {a} children. At one stop {b} children get on, and at the next {c} get off. How many "
     "children are on the bus?", "a+b-c"),
    ("{n} saved {a} dollars in May, {b} dollars in June and {c} dollars in July. How much did {n} save?", "a+b+c"),
    ("A jar has {a} sweets. {n} eats {b} and a friend eats {c}. How many sweets are left?", "a-b-c"),
    ("A shelf holds {a} plates. {c} plates break and {b} new plates are added. How many plates are on the shelf?",
     "a-c+b"),
    ("{n} collected {a} shells, then {b} more, then lost {c} on the way home. How many shells does {n} have?",
     "a+b-c"),
    ("A farm has {a} hens, {b} ducks and {c} geese. How many birds does it have?", "a+b+c"),
]
SIGNED = [  # stories whose answers can be negative
    ("It is {a} degrees in the morning. By night the temperature falls {b} degrees. What is the temperature at "
     "night?", "a-b"),
    ("It is -{a} degrees outside. The temperature goes up by {b} degrees. What is the temperature now?", "-a+b"),
    ("A diver is {a} meters below the surface, at -{a} meters. She swims down {b} more meters. What is her "
     "position in meters?", "-a-b"),
    ("{n} has {a} dollars in the bank and pays a bill of {b} dollars. What is the balance in dollars?", "a-b"),
    ("A lift is on floor {a} and goes down {b} floors. Which floor is it on now? (Floors below ground are "
     "negative.)", "a-b"),
    ("In a game {n} has {a} points and loses {b} points. What is {n}'s score now?", "a-b"),
]


GROUPS = [  # a * b: equal groups (one-step stories at levels 1-2; b has one digit)
    ("{n} has {a} bags with {b} marbles in every bag. How many marbles does {n} have?", "a*b"),
    ("A box holds {b} eggs. How many eggs are there in {a} full boxes?", "a*b"),
    ("There are {a} tables in a room and {b} chairs around each table. How many chairs are in the room?", "a*b"),
    ("{n} buys {a} packs of stickers. Each pack has {b} stickers. How many stickers did {n} buy?", "a*b"),
    ("Each of {a} friends brings {b} oranges to a picnic. How many oranges are at the picnic?", "a*b"),
    ("A bus has {a} rows with {b} seats in each row. How many seats does the bus have?", "a*b"),
    ("{n} reads {b} pages every day for {a} days. How many pages does {n} read?", "a*b"),
]
SHARES = [  # (a * b) / a: sharing into equal parts, or how many groups (b has one digit)
    ("{n} shares {c} grapes equally between {a} friends. How many grapes does each friend get?", "c/a"),
    ("{c} pupils stand in {a} equal rows. How many pupils are in each row?", "c/a"),
    ("{n} puts {c} stamps into {a} albums, the same number in each album. How many stamps are in each album?",
     "c/a"),
    ("A farmer packs {c} potatoes into sacks of {a}. How many sacks does the farmer fill?", "c/a"),
    ("{n} has {c} dollars and each ticket costs {a} dollars. How many tickets can {n} buy?", "c/a"),
]
GROUPING = 0.3  # share of the one-step stories (levels 1-2) that multiply or share

# Stories put together from parts (`composed_story`): half of the adding-and-taking-away stories are told this
# way instead of by a template above, so the cue words ("more", "gives away", "left", "together") come in
# thousands of sentence shapes, with other people and things, and the student cannot learn the stories by heart.
MORE_NAMES = ["Hana", "Pedro", "Aisha", "Lukas", "Mei", "Yusuf", "Sofia", "Ravi", "Chloe", "Kofi", "Ines",
              "Mateo", "Freya", "Arjun", "Leila", "Nils", "Rosa", "Tomas", "Yara", "Bruno"]
THINGS = ["marbles", "stickers", "pencils", "stamps", "shells", "apples", "oranges", "cookies", "cards", "coins",
          "beads", "toy cars", "buttons", "crayons", "pebbles", "feathers", "candles", "keys", "cups", "bottles",
          "eggs", "potatoes", "carrots", "socks", "ribbons", "tickets", "photos", "comics", "sweets", "nuts",
          "plums", "paper boats", "postcards", "seeds", "bricks"]
PLACES = ["box", "jar", "basket", "bag", "drawer", "bowl", "backpack", "tin"]
# (present, past) of each part; {n} is the story's person, {m} another, {x} the number, {t} the things.
START = [("{n} has {x} {t}", "{n} had {x} {t}"), ("{n} starts with {x} {t}", "{n} started with {x} {t}"),
         ("{n} keeps {x} {t} in a {p}", "{n} kept {x} {t} in a {p}"), ("{n} owns {x} {t}", "{n} owned {x} {t}"),
         ("there are {x} {t} in {n}'s {p}", "there were {x} {t} in {n}'s {p}")]
GAIN = [("{n} finds {x} more", "{n} found {x} more"), ("{n} buys {x} more", "{n} bought {x} more"),
        ("{n} gets {x} more from {m}", "{n} got {x} more from {m}"),
        ("{m} gives {n} {x} more", "{m} gave {n} {x} more"), ("{n} wins {x} more", "{n} won {x} more"),
        ("{n} collects another {x}", "{n} collected another {x}"), ("{n} is given {x} more", "{n} was given {x} more"),
        ("{n} adds {x} more", "{n} added {x} more")]
LOSS = [("{n} loses {x}", "{n} lost {x}"), ("{n} gives {x} to {m}", "{n} gave {x} to {m}"),
        ("{n} gives away {x}", "{n} gave away {x}"), ("{n} sells {x}", "{n} sold {x}"),
        ("{n} uses {x}", "{n} used {x}"), ("{n} trades {x} to {m}", "{n} traded {x} to {m}"),
        ("{x} of them get lost", "{x} of them got lost"), ("{m} takes {x} of them", "{m} took {x} of them")]
ASK = ["How many {t} does {n} have now?", "How many {t} does {n} end up with?", "How many {t} does {n} have in "
       "the end?", "How many {t} are there now?", "What is the number of {t} {n} has now?", "How many does {n} have "
       "now?"]
ASK_LEFT = ["How many {t} does {n} have left?", "How many {t} are left?", "How many {t} remain?"]
PAIRS = {  # two people: the shape's numbers in order, then the question
    "a+b": ["{n} has {a} {t} and {m} has {b}. How many {t} do they have together?",
            "{n} has {a} {t}. {m} has {b} more than {n}. How many {t} does {m} have?",
            "{n} and {m} collect {t}. {n} has {a} and {m} has {b}. How many do they have in all?"],
    "a-b": ["{n} has {a} {t} and {m} has {b}. How many more {t} does {n} have than {m}?",
            "{n} has {a} {t}. {m} has {b} fewer than {n}. How many {t} does {m} have?",
            "{n} has {a} {t}, which is {b} more than {m}. How many {t} does {m} have?"],
    "a+b+c": ["{n} has {a} {t}, {m} has {b} and {k} has {c}. How many {t} do the three have together?"],
}


def composed_story(rng: random.Random, shape: str, a: int, b: int, c: int) -> str:
    """The +/- story `shape` with the numbers a, b, c, told from parts: a start, a gain or a loss per further
    term (in the shape's order), and a question; or, for some shapes, two or three people compared or counted
    together. Present or past tense throughout; the sentences apart or joined with "then"."""
    n, m, k = rng.sample(NAMES + MORE_NAMES, 3)
    fill = {"n": n, "m": m, "k": k, "t": rng.choice(THINGS), "p": rng.choice(PLACES), "a": a, "b": b, "c": c}
    if shape in PAIRS and rng.random() < 0.4:
        return rng.choice(PAIRS[shape]).format(**fill)
    past = rng.random() < 0.5
    terms = shape.replace("-", " -").replace("+", " +").split()
    parts = [rng.choice(START)[past].format(**fill, x=fill[terms[0]])]
    for term in terms[1:]:
        pool = GAIN if term[0] == "+" else LOSS
        parts.append(rng.choice(pool)[past].format(**fill, x=fill[term[1:]]))
    ask = rng.choice(ASK_LEFT if terms[-1][0] == "-" and rng.random() < 0.5 else ASK).format(**fill)
    if parts[0].startswith(n) and rng.random() < 0.5:  # "Mei had 12 shells, found 5 more, then lost 4."
        # the name is left out where the sentence before was about the same person
        rest = [p.removeprefix(n + " ") if q.startswith(n) else p for q, p in zip(parts, parts[1:])]
        story = ", ".join([parts[0], *rest[:-1]]) + ", then " + rest[-1] + "."
    else:
        story = ". ".join(parts) + "."
    return f"{story[0].upper()}{story[1:]} {ask}"


def _story_tree(shape: str, a: int, b: int, c: int) -> Tree:
    if shape == "a*b":
        return ("*", a, b, False)
    if shape == "c/a":
        return ("/", c, a, False)
    terms = {"a": a, "b": b, "c": c, "-a": -a}
    parts = shape.replace("-", " -").replace("+", " +").split()
    t: Tree = terms[parts[0]]
    for p in parts[1:]:
        t = (p[0], t, terms[p[1:]], False)
    return t


def story_problem(rng: random.Random, level: int) -> tuple[str, Tree]:
    """A short word problem: level 1 one step with single digits; 2 one step, two digits; 3 two steps;
    4 signed stories (answers below zero); 5 two steps with up to three digits."""
    digits = {1: [1], 2: [1, 2, 2], 3: [1, 2], 4: [1, 2], 5: [2, 3]}[min(level, 5)]
    pool = SIGNED if level == 4 else [s for s in STORIES if (len(s[1]) == 3) == (level <= 2)]
    if level <= 2 and rng.random() < GROUPING:
        pool = GROUPS + SHARES
    text, shape = rng.choice(pool)
    a, b, c = (_num(rng, rng.choice(digits), 1) for _ in range(3))
    if shape in ("a*b", "c/a"):  # b has one digit (>= 2), so the product is worked digit by digit; a quotient
        a, b = _num(rng, rng.choice(digits) if shape == "a*b" else 1, 2), _num(rng, 1, 2)  # is a fact backwards
        c = a * b
    elif pool is not SIGNED:  # keep every count whole and non-negative along the way
        if shape == "a-b":
            a, b = max(a, b), min(a, b)
        elif shape in ("a+b-c", "a-c+b"):
            c = rng.randint(1, a + b if shape == "a+b-c" else a)
        elif shape == "a-b-c":
            a = a + b + c
    name = rng.choice(NAMES)
    question = text.format(n=name, a=a, b=b, c=c)
    told = None if pool is SIGNED or shape in ("a*b", "c/a") else _picked("compose", question, 2)
    if told is not None:  # a checksum, not the rng: the problems drawn stay the same either way
        question = composed_story(random.Random(told), shape, a, b, c)
    return question, _story_tree(shape, a, b, c)

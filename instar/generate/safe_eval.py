"""The safe evaluator: exact arithmetic on untrusted text, and the one way instar compares numeric answers.

    safe_eval("(12 + 3) * 4 / 6")   -> Fraction(10, 1)
    parse_number("1,234")           -> Fraction(1234, 1)
    format_number(Fraction(7, 2))   -> "3.5"
    answers_match("3.50", "7/2")    -> True

`safe_eval` parses with `ast` (mode="eval") and walks the tree itself; nothing is ever passed to `eval`.
Allowed: ASCII decimal literals (`12`, `3.5`, `.5`; no exponents, underscores, hex, complex), the binary
operators + - * / // % **, unary + and -, parentheses, and calls to abs, round, min, max with positional
arguments. Everything else (names, attributes, subscripts, lambdas, comprehensions, strings, keywords, any
other call) is refused with `UnsafeExpression`, a ValueError whose message is one line.

Arithmetic is exact (`fractions.Fraction`), so `0.1 + 0.2` is exactly `3/10`. Every cost is bounded before it
is paid: the text (200 characters), AST depth (20), operation count (50), literal size (15 digits), every
intermediate value (|x| and its denominator below 10**18), and exponents (an integer in -64..64 whose result
stays in range — checked from bit lengths before computing, so `9**9**9` is refused instantly). With those
bounds every evaluation finishes in microseconds, so no timer is needed.

Number formats (what `parse_number` accepts, documented once here):
- an optional sign, digits with optional proper thousands commas (`1,234,567`), an optional decimal part;
- a fraction `a/b` of two such integers (`7/2`, `-7/2`);
- an optional leading `$` and an optional trailing `%`. The `%` is read as a unit label, like `$`:
  `"12%"` is 12, because percentage answers are stored as the number of percent ("What percent ...? 12").
- surrounding whitespace and one trailing period are ignored. Anything else (words, exponents, two numbers,
  Unicode digits) gives None.

Canonical form (`format_number`): integers as `42`; a value with a terminating decimal expansion of at most
6 places as a short decimal (`3.5`, `-0.125`); anything else as a reduced fraction (`7/3`).
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 20
MAX_OPS = 50
MAX_LITERAL_DIGITS = 15
MAX_VALUE = 10**18  # bound on |value| and on the denominator of every intermediate result
MAX_EXPONENT = 64
MAX_DECIMALS = 6

FUNCTIONS = {"abs", "round", "min", "max"}
_LITERAL = re.compile(r"(\d+(\.\d*)?|\.\d+)")
_NUMBER = re.compile(r"[+-]?\$?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[+-]?\$?\.\d+")
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")


class UnsafeExpression(ValueError):
    """Raised for anything the evaluator refuses or cannot compute; the message is one line."""


# ---------------------------------------------------------------------------------------------------------
# Evaluation

def safe_eval(expr: str) -> Fraction:
    """Evaluate an arithmetic expression exactly, or raise UnsafeExpression saying why not."""
    if not isinstance(expr, str):
        raise UnsafeExpression("expression must be a string")
    text = expr.strip()
    if not text:
        raise UnsafeExpression("empty expression")
    if len(text) > MAX_CHARS:
        raise UnsafeExpression(f"expression longer than {MAX_CHARS} characters")
    if not text.isascii():  # also refuses Unicode digits such as '١٢', which Python's parser would accept
        raise UnsafeExpression("non-ASCII character in expression")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise UnsafeExpression(f"not an arithmetic expression ({type(e).__name__})") from None
    _check_shape(tree.body, text)
    return _eval(tree.body, text)


def _check_shape(root: ast.AST, text: str) -> None:
    """Depth and operation-count bounds, checked on the whole tree before anything is computed."""
    ops, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise UnsafeExpression(f"expression nested deeper than {MAX_DEPTH}")
        if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Call)):
            ops += 1
            if ops > MAX_OPS:
                raise UnsafeExpression(f"more than {MAX_OPS} operations")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**"}


def _eval(node: ast.AST, text: str) -> Fraction:
    if isinstance(node, ast.Constant):
        return _literal(node, text)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand, text)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, text), _eval(node.right, text)
        return _bounded(_binop(_BINOPS[type(node.op)], left, right))
    if isinstance(node, ast.Call):
        return _bounded(_call(node, text))
    raise UnsafeExpression(f"{type(node).__name__} is not allowed")


def _literal(node: ast.Constant, text: str) -> Fraction:
    if type(node.value) not in (int, float):  # bool, str, bytes, complex, None, Ellipsis
        raise UnsafeExpression(f"{type(node.value).__name__} literal is not allowed")
    source = ast.get_source_segment(text, node) or ""
    if not _LITERAL.fullmatch(source):  # 1e9, 1_000, 0x10, 10j
        raise UnsafeExpression(f"number literal {source[:20]!r} is not plain decimal")
    if len(source.replace(".", "")) > MAX_LITERAL_DIGITS:
        raise UnsafeExpression(f"number literal longer than {MAX_LITERAL_DIGITS} digits")
    return Fraction(source)


def _binop(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op in ("/", "//", "%") and b == 0:
        raise UnsafeExpression("division by zero")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if op == "//":
        return Fraction(a // b)
    if op == "%":
        return a % b
    return _power(a, b)


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        raise UnsafeExpression("exponent must be an integer")
    e = int(exp)
    if abs(e) > MAX_EXPONENT:
        raise UnsafeExpression(f"exponent {e} outside -{MAX_EXPONENT}..{MAX_EXPONENT}")
    if base == 0 and e < 0:
        raise UnsafeExpression("division by zero")
    # The result's numerator and denominator have about bit_length * |e| bits; refuse before computing.
    bits = max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(e)
    if bits > MAX_VALUE.bit_length() + 1 and abs(base) != 1:
        raise UnsafeExpression("power result too large")
    return base**e


def _call(node: ast.Call, text: str) -> Fraction:
    name = node.func.id if isinstance(node.func, ast.Name) else None
    if name not in FUNCTIONS:
        raise UnsafeExpression("only abs, round, min and max may be called")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise UnsafeExpression(f"{name}() takes plain positional arguments only")
    args = [_eval(a, text) for a in node.args]
    if name == "abs" and len(args) == 1:
        return abs(args[0])
    if name in ("min", "max") and len(args) >= 1:
        return min(args) if name == "min" else max(args)
    if name == "round" and len(args) in (1, 2):
        if len(args) == 1:
            return Fraction(round(args[0]))  # Python's rule: halves round to even
        digits = args[1]
        if digits.denominator != 1 or not 0 <= digits <= MAX_DECIMALS:
            raise UnsafeExpression(f"round() digits must be an integer in 0..{MAX_DECIMALS}")
        return Fraction(round(args[0], int(digits)))
    raise UnsafeExpression(f"{name}() called with {len(args)} arguments")


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) >= MAX_VALUE * value.denominator or value.denominator >= MAX_VALUE:
        raise UnsafeExpression("intermediate value too large")
    return value


# ---------------------------------------------------------------------------------------------------------
# Numbers as text

def parse_number(text: str) -> Fraction | None:
    """Read one number in the formats documented at the top of this file; None for anything else."""
    if not isinstance(text, str) or len(text) > 64 or not text.isascii():
        return None
    s = text.strip().removesuffix(".").strip()
    s = s.removesuffix("%").strip()
    m = _FRACTION.fullmatch(s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den != 0 else None
    if not _NUMBER.fullmatch(s):
        return None
    return Fraction(s.replace("$", "").replace(",", ""))


def format_number(x: Fraction) -> str:
    """Canonical text: `42`, `3.5`, `-0.125` (terminating within 6 places), else a reduced fraction `7/3`."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    for places in range(1, MAX_DECIMALS + 1):
        scaled = x * 10**places
        if scaled.denominator == 1:
            sign = "-" if x < 0 else ""
            digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
            return f"{sign}{digits[:-places]}.{digits[-places:]}"
    return f"{x.numerator}/{x.denominator}"


def answers_match(given: str, expected: str, rel_tol: float = 1e-6) -> bool:
    """True when both parse as numbers and agree within `rel_tol` (relative to the larger magnitude).

    Exact values compare exactly first, so `7/2` matches `3.5`; the tolerance only forgives rounding
    such as `0.3333333` for `1/3`. Text that does not parse never matches (we do not guess)."""
    a, b = parse_number(given), parse_number(expected)
    if a is None or b is None:
        return False
    if a == b:
        return True
    return abs(a - b) <= Fraction(rel_tol) * max(abs(a), abs(b))

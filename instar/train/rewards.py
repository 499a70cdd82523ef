"""Verifiable rewards for math: the answer format, its parser, and reward functions `(completions, **row) -> list[float]`;
and the rule that scores a reply to a question that is not math (`is_drill`, `chat_score`).

    extract_answer("3 + 4 = 7\\nAnswer: 7")                       -> "7"
    correctness_reward(["...\\nAnswer: 7", "Answer: 8"], answer="7") -> [1.0, 0.0]
    score(completions, row)                                      -> (rewards, correct flags)
    checked_steps("7 + 8 = 15\\n4 + 8 + 1 = 12\\nAnswer: 125")   -> [(8, 10, None), (23, 24, 24)]

The answer format (documented once, here): the completion's LAST non-empty line is `Answer: <number>`, where
<number> is one number as `safe_eval.parse_number` reads it (`42`, `-3.5`, `1,234`, `7/2`, `$12`, `12%`; a
trailing period is fine). The `Answer:` prefix is matched case-insensitively. Anything else is "no answer":
no answer line, two or more answer lines (a hedge such as "Answer: 3 / Answer: 4" must not win), text after
the answer line, words next to the number ("Answer: 42 apples"), an unparseable or over-long number. Strict on
purpose: a loose parser is what a policy learns to exploit, and the format reward teaches the exact form.

Rewards: correctness 1.0 when the extracted number equals the stored answer (`answers_match`: exact
fractions, relative tolerance 1e-6; model text is never evaluated), plus a small format reward
(FORMAT_BONUS = 0.1) for any well-formed answer line — enough to pull a tiny model into the format when all
its answers are wrong, small enough never to outweigh being right. Evaluation (`instar eval`, GRPO's held-out
pass@1) calls the same functions; pass@1 counts correctness only.
"""

from __future__ import annotations

import re

from instar.generate.safe_eval import UnsafeExpression, answers_match, format_number, parse_number, safe_eval

ANSWER_PREFIX = "Answer:"
FORMAT_BONUS = 0.1
INSTRUCTION = "End with a last line 'Answer: <number>'."  # appended to questions (GRPO `instruction` key)
_ANSWER_LINE = re.compile(r"^\s*answer\s*:(.*)$", re.IGNORECASE)


def extract_answer(completion: str) -> str | None:
    """The number text on the completion's single, final `Answer:` line, or None (see the module docstring)."""
    lines = [line for line in completion.splitlines() if line.strip()]
    hits = [i for i, line in enumerate(lines) if _ANSWER_LINE.match(line)]
    if len(hits) != 1 or hits[0] != len(lines) - 1:
        return None
    value = _ANSWER_LINE.match(lines[-1]).group(1).strip()
    return value.removesuffix(".") if parse_number(value) is not None else None


def format_answer(answer: str) -> str:
    """The line a correct completion ends with."""
    return f"{ANSWER_PREFIX} {answer}"


# --- reward functions: (completions, **row) -> list[float], one value per completion ----------------------
def correctness_reward(completions: list[str], answer: str, **row) -> list[float]:
    out = []
    for c in completions:
        given = extract_answer(c)
        out.append(1.0 if given is not None and answers_match(given, answer) else 0.0)
    return out


def format_reward(completions: list[str], **row) -> list[float]:
    return [FORMAT_BONUS if extract_answer(c) is not None else 0.0 for c in completions]


REWARD_FUNCS = [correctness_reward, format_reward]


def score(completions: list[str], row: dict) -> tuple[list[float], list[bool]]:
    """(total reward per completion, correct per completion) for one math record `row`."""
    parts = [fn(completions, **row) for fn in REWARD_FUNCS]
    totals = [sum(values) for values in zip(*parts)]
    correct = [c == 1.0 for c in parts[0]]
    return totals, correct


# --- replies to questions that are not math -----------------------------------------------------------------
# A drill: an "Answer:" line anywhere, a line that is only a label and a number (a math-swamped model's
# mangled answer line, "er: -11", measured after SFT), or an arithmetic statement ("1 + 5 = 6", "12 x 3 = 36").
_DRILL_LINE = re.compile(r"^\s*answer\s*:|^\s*\w*\s*:\s*-?[\d.,/]+\s*$", re.IGNORECASE | re.MULTILINE)
_SUM = re.compile(r"\d\s*[-+*/x×÷]\s*\d+(?:\.\d+)?\s*=")
CHAT_MIN_WORDS = 3  # a chat reward for a reply of fewer words would pay for saying nothing


def is_drill(reply: str) -> bool:
    """True for a math drill's reply: an `Answer:` line anywhere, a line of a label and a number only ("er: -11"),
    or an arithmetic statement ("3 + 4 = 7")."""
    return bool(_DRILL_LINE.search(reply) or _SUM.search(reply))


def chat_score(completions: list[str], row: dict) -> tuple[list[float], list[bool]]:
    """GRPO's reward for replies to a question that is not math (`grpo.Config.chat_prompts`), as `score` gives it
    for math: 1.0 for a reply of at least CHAT_MIN_WORDS words that is not a drill (`is_drill`), else 0. A rule,
    not a judge: it says nothing of a reply's quality, only that a question about tide pools is not answered
    with a sum, which a student whose SFT batches were four-fifths math often does (README, "What generalises")."""
    ok = [len(c.split()) >= CHAT_MIN_WORDS and not is_drill(c) for c in completions]
    return [float(x) for x in ok], ok


# --- worked steps, checked one by one -----------------------------------------------------------------------
_STEP_LINE = re.compile(r"^(?P<lhs>[\d.()+\-*/ ]*\d[\d.()]* *[-+*/] *[\d.()+\-*/ ]*) = (?P<rhs>-?\d+(?:\.\d+)?)$")


def checked_steps(text: str) -> list[tuple[int, int, int | None]]:
    """Every worked step of `text` that computation can check: a whole line `<arithmetic> = <number>` ("7 + 8 =
    15", "(4 + 9) - 7 = 6", "-5 - 7 = -12") ended by a newline, as (start, good, bad) character positions: the
    result starts at `start`, is right up to `good`, and `bad` is its first wrong character (None when the result
    is right). "4 + 8 = 13": the "1" is right, the "3" is bad; "2 + 8 = 1": the newline is bad (a digit is
    missing). The left side is evaluated by `safe_eval` (parsed, never run); a line cut off without its newline,
    or whose left side the evaluator refuses, is not a step. Where a small model's arithmetic fails is mostly here
    (a wrong one-digit fact inside a right procedure), so `evaluate_math` reports the share of right steps
    (`step_accuracy`; the external rows' `ext_math_steps`) and GRPO the share in its rollouts (`step_right`)."""
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        start, pos = pos, pos + len(line)
        m = _STEP_LINE.match(line.rstrip("\n")) if line.endswith("\n") else None
        if m is None:
            continue
        try:
            value = safe_eval(m["lhs"])
        except UnsafeExpression:
            continue
        begin, written, expected = start + m.start("rhs"), m["rhs"], format_number(value)
        if parse_number(written) == value:
            out.append((begin, begin + len(written), None))
            continue
        same = next((i for i, (x, y) in enumerate(zip(written, expected)) if x != y), min(len(written), len(expected)))
        out.append((begin, begin + same, begin + same))
    return out


def step_accuracy(texts: list[str]) -> float | None:
    """The share of the worked steps in `texts` whose result is right (`checked_steps`); None when none has a step."""
    right = [bad is None for text in texts for _, _, bad in checked_steps(text)]
    return sum(right) / len(right) if right else None


# --- prompts and SFT targets in the same format -------------------------------------------------------------
def math_prompt(question: str, instruction: str = INSTRUCTION) -> list[dict]:
    """The chat turn a math question is asked with (GRPO rollouts, evaluation)."""
    content = f"{question} {instruction}".strip() if instruction else question
    return [{"role": "user", "content": content}]


PROMPT_FILE = "math_prompt.json"  # in a pipeline's directory: the prompt form its math conversations used


def save_prompt_form(directory, instruction: str) -> None:
    """Keep the math prompt form with a pipeline's runs, so `instar eval` asks its models their way."""
    import json
    from pathlib import Path

    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / PROMPT_FILE).write_text(json.dumps({"instruction": instruction}) + "\n")


def prompt_form_of(conversations: list[list[dict]]) -> str | None:
    """The prompt form math conversations were written in: INSTRUCTION when most of their questions (the user turn
    before the last reply) end with it, else "" (the bare question); None for no conversations."""
    questions = [m[-2]["content"] for m in conversations if len(m) >= 2 and m[-2]["role"] == "user"]
    if not questions:
        return None
    return INSTRUCTION if 2 * sum(q.rstrip().endswith(INSTRUCTION) for q in questions) > len(questions) else ""


def load_prompt_form(directory) -> str | None:
    import json
    from pathlib import Path

    path = Path(directory) / PROMPT_FILE
    return json.loads(path.read_text()).get("instruction") if path.is_file() else None


def math_messages(record: dict, instruction: str = INSTRUCTION) -> dict:
    """A `messages` record teaching the format: worked solution (when known), then the answer line."""
    body = record.get("solution") or ""
    reply = f"{body}\n{format_answer(record['answer'])}".strip()
    return {"messages": math_prompt(record["question"], instruction) + [{"role": "assistant", "content": reply}]}

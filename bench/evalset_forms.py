"""Write `instar/evalsets/forms.jsonl`: the hand-written external questions written the other ways people write them.

    .venv/bin/python bench/evalset_forms.py                  # rewrites the file (deterministic: no randomness)
    instar eval runs/instar/grpo --data forms --json         # any model on it; "by_family" has one score per form

Each row is a question of `arithmetic.jsonl` (hand-written, never trained on) rewritten one way, its answer
unchanged; `family` says which:

- `unspaced`: the symbols typed without spaces ("47 + 36 = ?" -> "47+36 = ?", "Compute (5 + 1) * 5." ->
  "Compute (5+1)*5."): every question with an expression in symbols (109);
- `words`: every number said in words ("Subtract 14 from 8." -> "Subtract fourteen from eight."): the questions
  in words (no symbols: nobody writes "four - nine") whose numbers are all between 0 and 20, none negative;
- `instructed`: every third question with a request for the answer's form after it, in the words instar's own
  `instar eval` uses for a run that keeps no prompt form ("... End with a last line 'Answer: <number>'.",
  `train.rewards.INSTRUCTION`), which no training question contains.

The procedural math SFT set (`generate/arithmetic.py`) asks some of its own questions in the first two ways and
with other requests of form; this file measures whether that carries over to questions it never saw. Like the
other sets, its questions are refused by the math SFT set (`evalsets.external_questions`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SETS = Path(__file__).resolve().parent.parent / "instar" / "evalsets"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
SPACED_OPERATOR = re.compile(r"(?<=[\d)]) ([-+*/]) (?=[-\d(])")


def unspaced(question: str) -> str | None:
    tight = SPACED_OPERATOR.sub(r"\1", question)
    return tight if tight != question else None


def in_words(question: str) -> str | None:
    numbers = re.findall(r"-?\d+", question)
    if not numbers or any(n.startswith("-") or int(n) > 20 for n in numbers) or re.search(r"[+*/=()×÷]| - ", question):
        return None
    said = re.sub(r"\d+", lambda m: WORDS[int(m.group())], question)
    return re.sub(r"(^|[.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), said)  # "Three fly away."


def rows() -> list[dict]:
    from instar.evalsets import arithmetic
    from instar.train.rewards import INSTRUCTION

    source = arithmetic()
    out = []
    for family, rewrite in (("unspaced", unspaced), ("words", in_words)):
        for row in source:
            if (question := rewrite(row["question"])) is not None:
                out.append({**row, "question": question, "family": family})
    for row in source[::3]:
        out.append({**row, "question": f"{row['question']} {INSTRUCTION}", "family": "instructed"})
    return out


if __name__ == "__main__":
    data = rows()
    (SETS / "forms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    counts = {f: sum(r["family"] == f for r in data) for f in ("unspaced", "words", "instructed")}
    print(f"wrote {len(data)} rows to {SETS / 'forms.jsonl'}: {counts}")

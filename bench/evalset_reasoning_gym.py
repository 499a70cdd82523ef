"""Write `instar/evalsets/reasoning_gym.jsonl`: arithmetic from reasoning-gym's generators, a second external yardstick.

    pip install reasoning-gym                     # not a dependency of instar: only this script needs it
    .venv/bin/python bench/evalset_reasoning_gym.py          # rewrites the file (same seed: the same 200 problems)
    instar eval runs/instar/grpo --data reasoning_gym        # any model on it

The hand-written set (`arithmetic.jsonl`) is phrased by people; this one by a well-kept library of verifiable
problem generators (reasoning-gym's `basic_arithmetic` and `chain_sum`), in their phrasings ("Calculate -5 * -6.",
"State the final answer to the following arithmetic problem: 4 + 3 =", the natural style), with the scope of
instar's curriculum: 2-4 terms of 1-2 digits with + and -, brackets and negation; one-digit products among
sums; chains of 2-5 terms; two-term sums of three digits. No division (reasoning-gym's quotients are exact, but instar's student is taught few).
Made with reasoning-gym 0.1.25 (seeds 2026 + 10,000 x the row of PLAN). Seed 2026 feeds no training path (instar's own generators draw from their own seeded rngs, and the math SFT set
refuses every question of this file). Each row keeps the library's expression as `solution`;
`tests/test_arithmetic.py` recomputes every answer from it with instar's safe evaluator.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 2026
TARGET = Path(__file__).resolve().parent.parent / "instar" / "evalsets" / "reasoning_gym.jsonl"
# (dataset, family label, count, config)
PLAN = [
    ("basic_arithmetic", "rg_simple", 60, dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2,
                                                  operators=("+", "-"), format_style="simple")),
    ("basic_arithmetic", "rg_natural", 50, dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2,
                                                   operators=("+", "-"), format_style="natural")),
    ("basic_arithmetic", "rg_products", 30, dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1,
                                                    operators=("+", "-", "*"), format_style="simple")),
    ("chain_sum", "rg_chain", 40, dict(min_terms=2, max_terms=5, min_digits=1, max_digits=2)),
    ("chain_sum", "rg_three_digit", 20, dict(min_terms=2, max_terms=2, min_digits=3, max_digits=3)),
]


def rows() -> list[dict]:
    import reasoning_gym

    out, seen = [], set()
    for offset, (name, family, count, config) in enumerate(PLAN):
        data = reasoning_gym.create_dataset(name, size=4 * count, seed=SEED + 10_000 * offset, **config)
        kept = 0
        for item in data:
            if kept == count:
                break
            if item["question"] in seen or not data.score_answer(item["answer"], item):
                continue
            seen.add(item["question"])
            out.append({"question": item["question"], "answer": str(item["answer"]),
                        "solution": item["metadata"]["expression"], "family": family})
            kept += 1
    return out


def main() -> None:
    problems = rows()
    TARGET.write_text("".join(json.dumps(r) + "\n" for r in problems), encoding="utf-8")
    print(f"{len(problems)} problems -> {TARGET}")


if __name__ == "__main__":
    main()

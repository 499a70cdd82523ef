"""One short function per record kind: (rng, ask) -> Draft, or raise Rejected(reason, raw).

    ask = Ask(backend, seed=7, temperature=0.8, max_tokens=400)
    draft = RECIPES["instructions"](random.Random(7), ask)       # Draft(kind="messages", record={...})

The rng picks from the diversity pools in prompts.py, or from the user's topics (`ask.topics`, `--topic`);
`ask.passage` set (`--from PATH`) makes instructions grounded question-answer pairs. `ask` sends one request, parses the reply into an
outputs.py model and raises `Rejected` with a categorical reason for every way a reply can be unusable
(truncated, empty, invalid JSON, wrong fields). Validation against records.py, filters, deduplication and
storage happen in pipeline.py, the same for every kind.

Preferences: two candidates made differently (careful persona at temperature 0.3, hasty at 1.0), then the
judge scores both in both orders. Kept only if both orders prefer the same candidate by at least
`MIN_MARGIN` points; a zero difference is a tie, opposite signs are position bias ("inconsistent").
Instructions: half the items (`QUESTION_SHARE`) a short question about the topic, opened by a drawn word and held by
its schema to one sentence ending in "?", answered in prose; the rest a request of a drawn task type.
Grounded instructions: the teacher reads one passage of the user's documents and writes a question that makes
sense without it and the answer; `filters.grounding` rejects an answer the passage does not support.
Math (LLM source): the model must give an arithmetic expression; instar evaluates it with the safe
evaluator and keeps the problem only if it equals the model's stated answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pydantic import ValidationError

from instar.datasets.documents import Passage
from instar.datasets.store import format_error
from instar.generate import filters
from instar.generate import prompts as P
from instar.generate.backends import Backend, BackendError
from instar.generate.procedural import make_problems
from instar.generate.safe_eval import UnsafeExpression, format_number, parse_number, safe_eval
from instar.schemas.outputs import (Document, GroundedPair, Instruction, InstructionPair, Output, QuestionPair, Reply,
                                    Verdict, WordProblem, describe, json_schema)

QUESTION_SHARE = 0.5  # of the instructions (no --from): a short question and its answer (prompts.QUESTION_PAIR)
MIN_MARGIN = 2  # judge points (1-10 scale) by which the chosen response must win in BOTH orders


class Rejected(Exception):
    """This item produced no record: `reason` is categorical (for counting), `raw` is what the model said."""

    def __init__(self, reason: str, raw: str | None = None):
        super().__init__(reason)
        self.reason, self.raw = reason, raw


@dataclass
class Draft:
    kind: str  # the record kind in the store: text, messages, preference, math
    record: dict
    prompt: str = ""  # the request that produced it, for the echo filter
    raw: str = ""  # what the model said, kept if a later check rejects the record
    topic: str | None = None  # provenance: what the item was asked to be about
    document: str | None = None  # provenance: "file#passage" it is grounded in


def extract_json(text: str) -> str:
    """Free decoding wraps JSON in prose or code fences: take the outermost {...}."""
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if 0 <= start < end else text


@dataclass
class Ask:
    """One backend plus this item's sampling settings; counts tokens across the item's requests."""

    backend: Backend
    seed: int
    temperature: float = 0.8
    max_tokens: int = 400
    tokens: int = 0
    raws: list[str] = field(default_factory=list)
    topics: Sequence[str] = ()  # the user's topics; empty = the built-in pools
    passage: Passage | None = None  # the user's document passage this item is grounded in

    def topic(self, rng: random.Random, pool: Sequence[str] = P.TOPICS) -> str:
        """This item's subject: one of the user's topics when given, else one of the built-in `pool`."""
        return rng.choice(self.topics or pool)

    def __call__(self, system: str, user: str, output: type[Output], temperature: float | None = None,
                 seed_offset: int = 0):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"{user}\n\n{describe(output)}"}]
        try:
            gen = self.backend.chat(messages, schema=json_schema(output), max_tokens=self.max_tokens,
                                    temperature=self.temperature if temperature is None else temperature,
                                    seed=self.seed + seed_offset)
        except BackendError as e:
            raise Rejected(f"backend: {e}", self.raw()) from None
        self.tokens += gen.completion_tokens
        self.raws.append(gen.text)
        if gen.finish_reason == "length":
            raise Rejected("truncated (max tokens)", self.raw())
        if gen.finish_reason == "context":
            raise Rejected("truncated (prompt fills the context window)", self.raw())
        if gen.finish_reason != "stop":  # a refusal, a content filter, a tool call: not the reply asked for
            raise Rejected(f"stopped: {gen.finish_reason}", self.raw())
        if not gen.text.strip():  # e.g. a thinking model that spent its budget on thinking
            raise Rejected("empty content", self.raw())
        try:
            return output.model_validate_json(extract_json(gen.text))
        except ValidationError as e:
            kind = e.errors()[0]["type"]
            if kind.startswith("json"):
                raise Rejected("invalid json", self.raw()) from None
            raise Rejected(f"schema mismatch: {format_error(e).split(':')[0]}", self.raw()) from None

    def raw(self) -> str:
        """Everything the model said for this item, for the failure row."""
        return self.raws[-1] if len(self.raws) == 1 else json.dumps(self.raws, ensure_ascii=False)


def exchange(user: str, assistant: str) -> dict:
    """A `messages` record of one turn each: what every instructions recipe stores."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# -- one function per kind ------------------------------------------------------------------------------------
def corpus(rng: random.Random, ask: Ask) -> Draft:
    style, topic = rng.choice(P.STYLES), ask.topic(rng)
    prompt = P.CORPUS.format(style=style, topic=topic, audience=rng.choice(P.AUDIENCES))
    doc = ask(P.SYSTEM_WRITER, prompt, Document)
    return Draft("text", {"text": doc.text}, prompt, topic=topic)


def instructions(rng: random.Random, ask: Ask) -> Draft:
    if ask.passage is not None:
        return grounded(rng, ask)
    topic = ask.topic(rng)
    if rng.random() < QUESTION_SHARE:
        prompt = P.QUESTION_PAIR.format(topic=topic, word=rng.choice(P.QUESTION_WORDS))
        qa = ask(P.SYSTEM_TEACHER, prompt, QuestionPair)
        return Draft("messages", exchange(qa.question, qa.answer), prompt, topic=topic)
    prompt = P.INSTRUCTION_PAIR.format(topic=topic, task=rng.choice(P.TASK_TYPES))
    pair = ask(P.SYSTEM_TEACHER, prompt, InstructionPair)
    return Draft("messages", exchange(pair.instruction, pair.response), prompt, topic=topic)


def grounded(rng: random.Random, ask: Ask) -> Draft:
    """A question about one passage of the user's documents, answered from that passage only."""
    passage = ask.passage
    prompt = P.GROUNDED.format(name=passage.file.rsplit("/", 1)[-1], passage=passage.text,
                               kind=rng.choice(P.QUESTION_KINDS))
    pair = ask(P.SYSTEM_READER, prompt, GroundedPair)
    reason = filters.grounding(pair.question, pair.answer, passage.text)
    if reason:
        raise Rejected(reason, ask.raw())
    return Draft("messages", exchange(pair.question, pair.answer), pair.question,
                 document=passage.ref)


def preferences(rng: random.Random, ask: Ask) -> Draft:
    topic = ask.topic(rng)
    prompt = P.INSTRUCTION_ONLY.format(topic=topic, task=rng.choice(P.TASK_TYPES))
    instruction = ask(P.SYSTEM_TEACHER, prompt, Instruction).instruction
    (sys_a, temp_a), (sys_b, temp_b) = P.CAREFUL, P.HASTY
    a = ask(sys_a, instruction, Reply, temperature=temp_a, seed_offset=1).response
    b = ask(sys_b, instruction, Reply, temperature=temp_b, seed_offset=2).response
    if a.strip() == b.strip():
        raise Rejected("identical candidates", ask.raw())
    # Judge at temperature 0 in both orders; diff = score(a) - score(b) as seen from each order.
    first = ask(P.SYSTEM_JUDGE, P.JUDGE.format(instruction=instruction, first=a, second=b), Verdict, 0.0, 3)
    second = ask(P.SYSTEM_JUDGE, P.JUDGE.format(instruction=instruction, first=b, second=a), Verdict, 0.0, 4)
    d1, d2 = first.score_1 - first.score_2, second.score_2 - second.score_1
    if d1 == 0 or d2 == 0:
        raise Rejected("judge tie", ask.raw())
    if (d1 > 0) != (d2 > 0):
        raise Rejected("judge inconsistent", ask.raw())
    if min(abs(d1), abs(d2)) < MIN_MARGIN:
        raise Rejected("judge margin too small", ask.raw())
    score_a, score_b = (first.score_1 + second.score_2) / 2, (first.score_2 + second.score_1) / 2
    (chosen, sc), (rejected, sr) = sorted([(a, score_a), (b, score_b)], key=lambda x: -x[1])
    return Draft("preference", {"prompt": [{"role": "user", "content": instruction}], "chosen": chosen,
                                "rejected": rejected, "score_chosen": sc, "score_rejected": sr,
                                "margin": sc - sr}, instruction, topic=topic)


def math_llm(rng: random.Random, ask: Ask) -> Draft:
    setting = ask.topic(rng, P.MATH_SETTINGS)
    prompt = P.MATH.format(setting=setting, operation=rng.choice(P.MATH_OPERATIONS))
    wp = ask(P.SYSTEM_MATH, prompt, WordProblem)
    try:
        value = safe_eval(wp.expression)
    except (UnsafeExpression, ArithmeticError):
        raise Rejected("math: expression refused", ask.raw()) from None
    if parse_number(wp.answer) != value:  # the schema's pattern already made `answer` a plain number
        raise Rejected("math: answer does not match expression", ask.raw())
    return Draft("math", {"question": wp.question, "answer": format_number(value),
                          "solution": f"{wp.expression} = {format_number(value)}", "family": "llm",
                          "verified_by": "safe_eval"}, prompt, topic=setting)


def math_procedural(rng: random.Random, ask: Ask) -> Draft:
    """No model: one procedural problem from this item's seed."""
    return Draft("math", make_problems(1, seed=ask.seed)[0])


RECIPES: dict[str, Callable[[random.Random, Ask], Draft]] = {
    "corpus": corpus, "instructions": instructions, "preferences": preferences, "math": math_llm,
}
KIND_OF = {"corpus": "text", "instructions": "messages", "preferences": "preference", "math": "math"}

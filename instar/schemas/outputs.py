"""What the generating LLM must return, one small pydantic model per request.

These models are used three ways: their JSON schema constrains decoding (llama.cpp grammar, Ollama
`format`), their `Field(description=...)` texts ARE the prompt's description of the reply (see
`describe`), and `model_validate_json` checks what came back. Every string has a `max_length` because a
135M model under a grammar without one may never close a string (docs/measured-facts.md); `min_length` turns
"technically JSON but empty" into a schema failure instead of a record.

Scores are an enum of 1..10 rather than an integer with bounds: llama-cpp-python's schema converter
ignores `minimum`/`maximum`, but honours `enum`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Score = Literal[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Document(Output):
    text: str = Field(min_length=80, max_length=1200, description=(
        "The whole document: several sentences of plain, simple English that a young reader understands."))


class Instruction(Output):
    instruction: str = Field(min_length=10, max_length=300, description=(
        "One clear request a user might send to an assistant, written as the user would write it."))


class InstructionPair(Output):
    instruction: str = Field(min_length=10, max_length=300, description=(
        "One clear request a user might send to an assistant, written as the user would write it."))
    response: str = Field(min_length=20, max_length=1200, description=(
        "The assistant's helpful, correct and complete answer to that request."))


class QuestionPair(Output):
    question: str = Field(min_length=10, max_length=160, pattern=r'^[A-Z][^?"\\\n]{8,150}[?]$', description=(
        "One short question a curious person might ask, ending with a question mark."))
    answer: str = Field(min_length=20, max_length=600, description=(
        "The assistant's answer in two or three clear sentences of plain English."))


class GroundedPair(Output):
    question: str = Field(min_length=10, max_length=300, description=(
        "A question a reader might ask, understandable without the passage."))
    answer: str = Field(min_length=10, max_length=800, description=(
        "The answer, using only facts stated in the passage."))


class Reply(Output):
    response: str = Field(min_length=10, max_length=1200, description="Your answer to the request.")


class Verdict(Output):
    score_1: Score = Field(description="How good response 1 is, from 1 (useless or wrong) to 10 (perfect).")
    score_2: Score = Field(description="How good response 2 is, from 1 (useless or wrong) to 10 (perfect).")


class WordProblem(Output):
    question: str = Field(min_length=20, max_length=400, description=(
        "A short math word problem that asks for one number."))
    # Patterns (which the grammar enforces) keep a small model from writing prose where a number belongs.
    # `[.]`, not `\\.`: llama.cpp's GBNF parser rejects the escape the converter would emit.
    expression: str = Field(pattern=r"^[-0-9(][0-9+*/(). -]{0,59}$", description=(
        "One arithmetic expression that computes the answer, using only numbers, + - * / and parentheses, "
        "for example (12 + 8) * 3."))
    answer: str = Field(pattern=r"^-?[0-9]{1,9}([.][0-9]{1,4})?$", description=(
        "The answer as a number only, for example 60."))


def describe(model: type[Output]) -> str:
    """The reply format as prompt text, built from the field descriptions."""
    lines = ["Reply with only a JSON object with these fields:"]
    for name, field in model.model_fields.items():
        lines.append(f'- "{name}": {field.description}')
    return "\n".join(lines)


def json_schema(model: type[Output]) -> dict:
    """The schema sent to the backend (pydantic's, which both llama.cpp and Ollama accept)."""
    return model.model_json_schema()

"""What instar stores and trains on, in TRL's vocabulary so users and tools recognise the shapes.

    text        {"text": "..."}                                             a pretraining document
    messages    {"messages": [{"role": ..., "content": ...}, ...]}           a conversation (SFT)
    preference  {"prompt": [messages], "chosen": "...", "rejected": "..."}   a judged pair (reward/PPO/DPO)
    math        {"question": "...", "answer": "42", ...}                     a verified problem (GRPO)

Every string is NFC-normalised; control characters other than newline and tab are refused (a record
carrying them is usually a broken decode, not data), and so are unpaired surrogates. Unknown fields are errors. Validation messages
name the field, e.g. `messages.2.content: must not be empty`.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_TEXT = 20_000  # characters in one document or turn; generated data is far shorter
MAX_TURNS = 64

_ALLOWED_CONTROL = {"\n", "\t"}


def clean_text(value: str) -> str:
    """NFC-normalise, turn CRLF into LF, refuse other control characters, strip outer whitespace."""
    value = unicodedata.normalize("NFC", value).replace("\r\n", "\n").replace("\r", "\n")
    for ch in value:
        category = unicodedata.category(ch)
        if category == "Cc" and ch not in _ALLOWED_CONTROL:
            raise ValueError(f"contains control character U+{ord(ch):04X}")
        if category == "Cs":  # a lone surrogate from a JSON "\ud800" escape; SQLite cannot store it
            raise ValueError(f"contains an unpaired surrogate U+{ord(ch):04X}")
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(clean_text)]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_TEXT)


class Message(Record):
    role: Literal["system", "user", "assistant"]
    content: Text


def check_conversation(messages: list[Message], *, final: Literal["assistant", "user"]) -> None:
    """Optional system first, then user/assistant alternating from user, ending with `final`."""
    turns = messages[1:] if messages and messages[0].role == "system" else messages
    if not turns:
        raise ValueError("needs at least one user turn")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise ValueError(f"turn {i} is {m.role!r}, expected {expected!r} (roles must alternate)")
    if turns[-1].role != final:
        raise ValueError(f"must end with a {final} turn")


class TextRecord(Record):
    text: Text


class MessagesRecord(Record):
    messages: list[Message] = Field(min_length=2, max_length=MAX_TURNS)

    @model_validator(mode="after")
    def _shape(self):
        check_conversation(self.messages, final="assistant")
        return self


class PreferenceRecord(Record):
    prompt: list[Message] = Field(min_length=1, max_length=MAX_TURNS)
    chosen: Text
    rejected: Text
    score_chosen: float | None = None  # the judge's scores and margin, when known
    score_rejected: float | None = None
    margin: float | None = None

    @model_validator(mode="after")
    def _shape(self):
        check_conversation(self.prompt, final="user")
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected must differ")
        return self


class MathRecord(Record):
    question: Text
    answer: Annotated[str, Field(max_length=64), AfterValidator(clean_text)]  # canonical: "42", "-3.5", "7/2"
    solution: Text | None = None
    family: str = Field(default="other", max_length=64)
    difficulty: int = Field(default=1, ge=1, le=10)
    verified_by: Literal["procedural", "safe_eval", "import"] = "import"


KINDS: dict[str, type[Record]] = {
    "text": TextRecord,
    "messages": MessagesRecord,
    "preference": PreferenceRecord,
    "math": MathRecord,
}

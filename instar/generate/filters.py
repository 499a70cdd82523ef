"""Quality checks on generated records: each returns a reason string (stored with the failure) or None.

    reason = check("messages", record, prompt="Write ...")     # "too short", "refusal", ... or None
    index = NearDuplicates(); index.add(key_text(kind, rec)); index.is_duplicate(text)

The checks are deliberately simple heuristics tuned for small teachers: too short, not English (mostly
non-ASCII letters, or long text without English function words), refusals, echoes of the prompt, and
degenerate repetition (a small model stuck in a loop). Three more catch text that is about the request
rather than an answer to it, each its own reason (seen in default runs of the 135M teacher):
"echoes schema description" (shares a run of 6 words with a field description of outputs.py, e.g. "The
whole document: several sentences of plain, simple English..."), "echoes prompt text" (6 words of a fixed
part of a prompt template), "template placeholder" (`{{response_json}}`, `{response_json}`, `[Your Name]`,
`[location]`, `[Artist_Name]`, `<EMAIL>`)
and "talks about the JSON" (the word JSON, or a field name in quotes, when the request did not mention JSON).

`grounding(question, answer, passage)` is the check on questions about the user's documents: every number in the
answer must occur in the passage, so must every capitalised word that does not start a sentence (a name), and at
least `GROUNDED_OVERLAP` of the answer's content words (not stop words, 3+ letters, a plural "s" ignored) must
occur in the passage; a question that says "the passage"/"the text" cannot stand alone, and one made only of
question words ("What is the answer to this question?") names no subject. Near-duplicates are found with MinHash
over word 3-grams and LSH banding (16 bands x 4 rows: a pair with Jaccard 0.8 collides with probability 0.9998, one
with 0.3 with 0.13); candidates are then confirmed by the signature estimate >= `threshold`.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np

MIN_WORDS = {"text": 20, "messages": 3, "preference": 3, "math": 8}
STOPWORDS = set("the a an and or but to of in on at for with is are was were it he she they you i we this that "
                "be have has had not do does did so as by from can will".split())
REFUSALS = re.compile(r"\b(i'?m sorry|i am sorry|as an ai|as a language model|i cannot (help|assist|provide)|"
                      r"i can'?t (help|assist|provide)|i'?m (unable|not able) to|i am (unable|not able) to)\b")
WORD = re.compile(r"[A-Za-z']+|\S")
ECHO_WORDS = 6  # a run this long shared with instructions is an echo; ordinary prose shares at most 3-4 words
PLACEHOLDER = re.compile(r"\{\{[^{}\n]{0,40}\}\}|\{(response_json|response|instruction|input|output|json|topic|task|"
                         r"style|audience|question|answer|passage|text|context|query|prompt)\}|"
                         r"\[(insert|your|add|enter) [^\]\n]{1,30}\]|<(insert|your) [^>\n]{1,30}>|"
                         r"(?<![\w\]])\[[a-z]{3,20}(_[a-z]{2,20})*\](?!\()|<(?-i:[A-Z]{3,12}(_[A-Z]{2,12})*)>", re.I)
JSON_TALK = re.compile(r'\bjson\b|"(text|instruction|response|question|answer|expression)"\s*:', re.I)
GROUNDED_OVERLAP = 0.6  # share of the answer's content words found in its passage (paraphrase leaves ~0.7-1.0)
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
SELF_REFERENCE = re.compile(r"\b(the|this|that|above|given) (passage|text|document|excerpt|paragraph|article)\b", re.I)
# Words a question can be made of without naming anything: "What is the answer to this question?", "How to answer
# this?", "A question", "What is this?" (all accepted from the 135M teacher on its own corpus before this check).
EMPTY_QUESTION = set("answer question what which who whom whose when where why how this these those there here "
                     "about tell explain describe please something thing".split())


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def too_short(text: str, minimum: int) -> str | None:
    return "too short" if len(text.split()) < minimum else None


def not_english(text: str) -> str | None:
    letters = [c for c in text if c.isalpha()]
    if letters and sum(c.isascii() for c in letters) / len(letters) < 0.9:
        return "not english"
    tokens = [w for w in words(text) if w[0].isalpha()]
    # Code and short answers carry few function words; only judge prose of some length.
    if len(tokens) >= 30 and "```" not in text and sum(w in STOPWORDS for w in tokens) / len(tokens) < 0.05:
        return "not english"
    return None


def refusal(text: str) -> str | None:
    return "refusal" if REFUSALS.search(text[:200].lower()) else None


def echoes(text: str, prompt: str) -> str | None:
    """The output repeats the prompt (start, whole, or nearly every word) instead of answering it."""
    a, b = " ".join(words(text)), " ".join(words(prompt))
    if not a or not b:
        return None
    if a == b or (len(b) >= 30 and a.startswith(b[:60])):
        return "echoes prompt"
    wa, wb = set(a.split()), set(b.split())
    if len(wa) >= 5 and len(wa & wb) / len(wa | wb) > 0.8:
        return "echoes prompt"
    return None


def repetitive(text: str) -> str | None:
    """A loop: under half of the word 3-grams are distinct (normal prose is above 0.9)."""
    w = words(text)
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    return "repetitive" if len(grams) >= 20 and len(set(grams)) / len(grams) < 0.5 else None


def _grams(text: str, n: int = ECHO_WORDS) -> set[tuple[str, ...]]:
    w = [x for x in words(text) if x[0].isalnum()]
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


@functools.cache
def _instruction_grams() -> dict[str, set]:
    """Word 6-grams of every field description (outputs.py) and of the fixed parts of every prompt template."""
    from instar.generate import prompts as P
    from instar.schemas import outputs

    described = set()
    for model in vars(outputs).values():
        if isinstance(model, type) and issubclass(model, outputs.Output):
            for f in model.model_fields.values():
                described |= _grams(f.description or "")
    described |= _grams(outputs.describe(outputs.Output))
    templates = [v for k, v in vars(P).items() if k.isupper() and isinstance(v, str)]
    templates += [v[0] for v in (P.CAREFUL, P.HASTY)]
    fixed = set()
    for t in templates:
        for part in re.split(r"\{[a-z_]+\}", t):
            fixed |= _grams(part)
    return {"echoes schema description": described, "echoes prompt text": fixed - described}


def echoes_instructions(text: str) -> str | None:
    """Text that repeats the request's own wording: a field description or a prompt template."""
    grams = _grams(text)
    for reason, known in _instruction_grams().items():
        if grams & known:
            return reason
    return None


def placeholder(text: str) -> str | None:
    return "template placeholder" if PLACEHOLDER.search(text) else None


def json_talk(text: str, prompt: str) -> str | None:
    """Talk about the reply format ("the JSON object", `"text":`) unless the request itself was about JSON."""
    if "json" in prompt.lower():
        return None
    return "talks about the JSON" if JSON_TALK.search(text) else None


def _content(text: str) -> list[str]:
    return [w.rstrip("s") if len(w) > 4 else w for w in words(text) if len(w) >= 3 and w[0].isalpha()
            and w.replace("'", "") not in STOPWORDS]


def grounding(question: str, answer: str, passage: str) -> str | None:
    """Why an answer is not supported by its passage (see the module docstring), or None."""
    if SELF_REFERENCE.search(question):
        return "question refers to the passage"
    if not [w for w in _content(question) if w not in EMPTY_QUESTION]:
        return "question names no subject"
    numbers = set(NUMBER.findall(passage.replace(",", "")))
    if any(n not in numbers for n in NUMBER.findall(answer.replace(",", ""))):
        return "ungrounded: number not in passage"
    low = passage.lower()
    for sentence in re.split(r"(?<=[.!?:])\s+", answer):
        for word in sentence.split()[1:]:  # a sentence's first word is capitalised anyway
            name = word.strip(".,;:!?\"'()")
            if re.fullmatch(r"[A-Z][a-z]+", name) and name.lower() not in low and name.lower() not in STOPWORDS:
                return "ungrounded: name not in passage"
    said = _content(answer)
    known = set(_content(passage))
    if said and sum(w in known for w in said) / len(said) < GROUNDED_OVERLAP:
        return "ungrounded: content words not in passage"
    return None


def fields(kind: str, record: dict) -> tuple[list[str], str]:
    """The generated texts of a record, and the prompt text they must not echo."""
    if kind == "text":
        return [record["text"]], ""
    if kind == "messages":
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"], users[-1]
    if kind == "preference":
        return [record["chosen"], record["rejected"]], record["prompt"][-1]["content"]
    return [record["question"]], ""


def check(kind: str, record: dict, prompt: str = "") -> str | None:
    """The first reason this record should not be kept, or None. `prompt` is the request that made it."""
    texts, own_prompt = fields(kind, record)
    if own_prompt:  # the request a teacher wrote is judged too: no instructions echoed, no placeholders
        for reason in (echoes_instructions(own_prompt), placeholder(own_prompt)):
            if reason:
                return reason
    for text in texts:
        for reason in (too_short(text, MIN_WORDS[kind]), not_english(text), refusal(text), repetitive(text),
                       echoes(text, own_prompt), echoes(text, prompt), echoes_instructions(text), placeholder(text),
                       json_talk(text, prompt + own_prompt)):
            if reason:
                return reason
    return None


def key_text(kind: str, record: dict) -> str:
    """What two records must not share to count as different: the content a learner would see twice."""
    if kind == "text":
        return record["text"]
    if kind == "messages":
        return "\n".join(m["content"] for m in record["messages"] if m["role"] != "system")
    if kind == "preference":
        return record["prompt"][-1]["content"] + "\n" + record["chosen"]
    return record["question"]


# -- near duplicates ------------------------------------------------------------------------------------------
_PRIME = (1 << 61) - 1
_rng = np.random.default_rng(20240601)  # fixed: signatures must be comparable across runs
_A = _rng.integers(1, 1 << 31, size=64, dtype=np.uint64)
_B = _rng.integers(0, 1 << 31, size=64, dtype=np.uint64)
BANDS, ROWS = 16, 4


def signature(text: str) -> np.ndarray:
    """64 MinHash values over word 3-grams (single words for very short texts)."""
    w = words(text)
    grams = {" ".join(w[i:i + 3]) for i in range(max(1, len(w) - 2))} or {""}
    # 32-bit shingle hashes times 31-bit multipliers stay below 2^63: no overflow in uint64.
    h = np.array([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little") for g in grams],
                 dtype=np.uint64)
    return ((_A[:, None] * h[None, :] + _B[:, None]) % np.uint64(_PRIME)).min(axis=1)


class NearDuplicates:
    """MinHash + LSH index: `is_duplicate(text)` is True when an added text is ~`threshold` Jaccard-similar."""

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self.buckets: dict[tuple, list[int]] = {}
        self.signatures: list[np.ndarray] = []

    def _bands(self, sig: np.ndarray):
        for b in range(BANDS):
            yield (b, sig[b * ROWS:(b + 1) * ROWS].tobytes())

    def is_duplicate(self, text: str) -> bool:
        sig = signature(text)
        seen: set[int] = set()
        for band in self._bands(sig):
            for i in self.buckets.get(band, ()):
                if i not in seen:
                    seen.add(i)
                    if float((self.signatures[i] == sig).mean()) >= self.threshold:
                        return True
        return False

    def add(self, text: str) -> None:
        sig = signature(text)
        self.signatures.append(sig)
        for band in self._bands(sig):
            self.buckets.setdefault(band, []).append(len(self.signatures) - 1)

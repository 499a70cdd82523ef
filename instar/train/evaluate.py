"""Held-out scoring, shared by the stages (start/end metrics) and `instar eval CHECKPOINT --data FILE.jsonl`.

    score_rows(model, rows, tbytes, batch_size)            packed text rows [N, L] -> {"loss", "bpb", "tokens"}
    score_conversations(model, examples, pad_id, batch_size)  (ids, mask) pairs -> {"loss", "tokens"} on assistant tokens
                                                           (with tbytes=token_bytes(tok), also "bpb")
    evaluate_math(model, tok, records)                     greedy pass@1 with GRPO's reward functions
    sample_math(model, tok, records, k=8)                  k samples each: pass@k, majority@k, sample accuracy
    evaluate_file("runs/sft", "val.jsonl") -> {"kind": "messages", "n": 120, "loss": 2.1, "tokens": 9120}
    evaluate_file("runs/instar/grpo", "arithmetic")  -> the packaged external arithmetic set, asked the run's way
    external_arithmetic(model, tok, instruction="")  -> {"ext_math_acc", "ext_math_format", "ext_math_steps", "ext_rg_acc"}

`EVALUATORS` maps a record kind to fn(model, tok, records, opts) -> metrics; a stage adds its kind by
registering one ("math" scores with GRPO's reward functions). Loss is mean next-token cross-entropy in nats. Bits-per-byte is the
summed loss of tokens that stand for text, in bits, over the UTF-8 bytes they stand for (special tokens are
0 bytes and left out, as in nanochat), so it compares models with different tokenizers.
The file is read by `datasets.jsonl.read_records`, the same shapes `instar data import` reads (Alpaca, TRL
preference pairs, {"prompt", "answer"} math...), one kind per file; it is scored whole, in the order given;
nothing is stored.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from instar.errors import InstarError
from instar.train.rewards import INSTRUCTION, extract_answer, math_prompt, score, step_accuracy
from instar.train.sampling import generate, stopped
from instar.train.tokens import collate, label_count, pack_documents, render_chat, token_bytes, token_logprobs


# --- scoring primitives ----------------------------------------------------------------------------------
@torch.no_grad()
def score_rows(model, rows: torch.Tensor, tbytes: torch.Tensor, batch_size: int = 8,
               max_batches: int | None = None) -> dict:
    """Loss and bpb of packed rows [N, L] (every token after the first in each row is scored)."""
    device = next(model.parameters()).device
    nll_sum, n_tok, bits_nll, n_bytes = 0.0, 0, 0.0, 0.0
    for b, i in enumerate(range(0, rows.shape[0], batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        ids = rows[i:i + batch_size].to(device)
        nll = -token_logprobs(model(input_ids=ids).logits, ids)[:, 1:]        # [B, L-1]
        nbytes = tbytes.to(device)[ids[:, 1:]]                                # [B, L-1]
        nll_sum += float(nll.sum())
        n_tok += nll.numel()
        bits_nll += float((nll * (nbytes > 0)).sum())
        n_bytes += float(nbytes.sum())
    return {"loss": nll_sum / max(n_tok, 1), "bpb": bits_nll / math.log(2) / max(n_bytes, 1.0), "tokens": n_tok}


@torch.no_grad()
def score_conversations(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                        max_batches: int | None = None, tbytes: torch.Tensor | None = None) -> dict:
    """Mean loss over assistant tokens (mask == 1) of rendered conversations; with `tbytes` (`token_bytes`) also
    their bits per byte, special tokens (the end of turn) left out as in `score_rows`."""
    device = next(model.parameters()).device
    nll_sum, n_tok, bits_nll, n_bytes = 0.0, 0, 0.0, 0.0
    for b, i in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        chunk = examples[i:i + batch_size]
        batch = collate([e[0] for e in chunk], [e[1] for e in chunk], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"].to(device)
        lp = token_logprobs(logits, labels)
        nll_sum += -float(lp.sum())
        n_tok += label_count(labels)
        if tbytes is not None:
            nbytes = tbytes.to(device)[labels.clamp(min=0)] * (labels != -100)          # [B, L]
            bits_nll += -float((lp * (nbytes > 0)).sum())
            n_bytes += float(nbytes.sum())
    out = {"loss": nll_sum / max(n_tok, 1), "tokens": n_tok}
    return {**out, "bpb": bits_nll / math.log(2) / max(n_bytes, 1.0)} if tbytes is not None else out


def render_examples(tok, conversations: list[list[dict]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """render_chat each conversation, truncate to max_len, drop those left with no assistant token."""
    out = []
    for messages in conversations:
        ids, mask = render_chat(tok, messages)
        ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]):
            out.append((ids, mask))
    return out


def math_prompt_ids(tok, records: list[dict], instruction: str) -> list[list[int]]:
    """The chat-rendered prompt of each math record's question (+ `instruction`), ready for `generate`."""
    return [render_chat(tok, math_prompt(r["question"], instruction), add_generation_prompt=True)[0] for r in records]


@torch.no_grad()
def evaluate_math(model, tok, records: list[dict], max_new_tokens: int = 48, instruction: str = INSTRUCTION,
                  batch_size: int = 64, answers: bool = False) -> dict:
    """Greedy pass@1 on math records with the training reward functions: accuracy, format rate, reward mean, and
    `step_accuracy`, the share of worked steps whose result is right (`rewards.step_accuracy`; absent when no
    reply has a step)."""
    rewards, correct, given = [], [], []
    for i in range(0, len(records), batch_size):
        rows = records[i:i + batch_size]
        gen = generate(model, tok, math_prompt_ids(tok, rows, instruction), max_new_tokens, temperature=0.0)
        for row, text, ok in zip(rows, gen.texts, stopped(gen, tok).tolist()):
            r, c = score([text], row) if ok else ([0.0], [False])  # truncated: no reward, as in training
            rewards.append(r[0])
            correct.append(c[0])
            given.append({"question": row["question"], "answer": row["answer"], "completion": text, "correct": c[0]})
    n, steps = max(len(records), 1), step_accuracy([g["completion"] for g in given])
    out = {"accuracy": sum(correct) / n, "format_rate": sum(r > 0 for r in rewards) / n, "reward_mean": sum(rewards) / n,
           **({"step_accuracy": steps} if steps is not None else {})}
    return {**out, "answers": given} if answers else out


@torch.no_grad()
def sample_math(model, tok, records: list[dict], k: int, temperature: float = 0.7, max_new_tokens: int = 48,
                instruction: str = INSTRUCTION, batch_size: int = 64, seed: int = 0) -> tuple[dict, list[int]]:
    """`k` sampled completions per math record, scored with the training reward functions: ({"pass_at_k": some
    sample right, "majority_at_k": the most given answer right (self-consistency; ties go to the answer given
    first), "sample_accuracy": the share of samples right}, right samples per record). What reinforcement
    learning can reach from a model: GRPO learns from groups like these, so a problem no sample gets right carries
    it no signal, and greedy pass@1 far below pass@k is room it may take. Reproducible: batch i samples with seed
    `seed + i`."""
    per_prompt = max(1, batch_size // k)
    right, any_right, voted = [], 0, 0
    for i in range(0, len(records), per_prompt):
        rows = records[i:i + per_prompt]
        prompts = math_prompt_ids(tok, rows, instruction)
        gen = generate(model, tok, [p for p in prompts for _ in range(k)], max_new_tokens, temperature,
                       seed=seed + i)
        ended = stopped(gen, tok).tolist()
        for j, row in enumerate(rows):
            texts = [t for t, ok in zip(gen.texts[j * k:(j + 1) * k], ended[j * k:(j + 1) * k]) if ok]
            correct = score(texts, row)[1] if texts else []
            answers = [extract_answer(t) for t in texts]
            votes = Counter(a for a in answers if a is not None)
            top = max(votes, key=votes.get) if votes else None  # max keeps the first of equal counts
            right.append(sum(correct))
            any_right += any(correct)
            voted += any(ok and a == top for a, ok in zip(answers, correct))
    n = max(len(records), 1)
    return ({"pass_at_k": any_right / n, "majority_at_k": voted / n, "sample_accuracy": sum(right) / (n * k)},
            right)


# --- per-kind dispatch -----------------------------------------------------------------------------------
# A reply's token budget for math questions (report card rows and `instar eval`): the worked steps of a 5-term chain
# of two-digit numbers with negative partial results run to ~225 tokens before the answer line (the tiny student,
# measured). At 160, 15 of 278 external replies were cut off mid-procedure and counted as "no answer line".
EXTERNAL_MATH_TOKENS = 256


@dataclass
class EvalOptions:
    batch_size: int = 8
    max_len: int = 512
    instruction: str = ""  # math: the prompt form (`math_prompt_form`)
    samples: int = 0  # math: also `samples` sampled completions per question (`sample_math`)
    temperature: float = 0.7  # ... at this temperature (the default run's GRPO rollouts')


def eval_text(model, tok, records: list[dict], opts: EvalOptions) -> dict:
    rows = pack_documents(tok, [r["text"] for r in records], opts.max_len)
    return score_rows(model, rows, token_bytes(tok), opts.batch_size)


def eval_messages(model, tok, records: list[dict], opts: EvalOptions) -> dict:
    examples = render_examples(tok, [r["messages"] for r in records], opts.max_len)
    if not examples:
        raise InstarError("no conversation has an assistant token within max_len")
    return score_conversations(model, examples, tok.pad_token_id, opts.batch_size)


def eval_math(model, tok, records: list[dict], opts: EvalOptions) -> dict:
    """Greedy pass@1 with GRPO's own reward functions, asked in the model's own prompt form; the answers it
    gave and the accuracy of each form (`family`) come back too."""
    tokens = min(opts.max_len, EXTERNAL_MATH_TOKENS)
    out = evaluate_math(model, tok, records, max_new_tokens=tokens, instruction=opts.instruction,
                        batch_size=opts.batch_size, answers=True)
    out = {"prompt_form": opts.instruction or "bare question", **out, "by_family": by_family(records, out["answers"])}
    if opts.samples > 0:
        sampled, right = sample_math(model, tok, records, opts.samples, opts.temperature, tokens, opts.instruction,
                                     max(opts.batch_size, opts.samples))
        for given, n in zip(out["answers"], right):
            given["samples_right"] = n
        out = {**out, "samples": opts.samples, "temperature": opts.temperature, **sampled,
               "pass_at_k_by_family": by_family(records, [{"correct": n > 0} for n in right])}
    return out


def by_family(records: list[dict], answers: list[dict]) -> dict[str, float]:
    groups: dict[str, list[bool]] = {}
    for r, a in zip(records, answers):
        groups.setdefault(r.get("family", "other"), []).append(a["correct"])
    return {k: round(sum(v) / len(v), 3) for k, v in groups.items()}


# --- the external arithmetic yardstick and the prompt form a run was trained with -----------------------
def external_arithmetic(model, tok, instruction: str = "", batch_size: int = 64) -> dict[str, float]:
    """Greedy pass@1 and answer-line rate on `instar/evalsets/arithmetic.jsonl` (hand-written, never trained
    on), and pass@1 on `reasoning_gym.jsonl` (written by a library of generators): the report card's "what
    generalises" rows for math. ~15 s for the ~1M preset on 2 cores."""
    from instar.evalsets import arithmetic, reasoning_gym

    m = evaluate_math(model, tok, arithmetic(), EXTERNAL_MATH_TOKENS, instruction, batch_size)
    rg = evaluate_math(model, tok, reasoning_gym(), EXTERNAL_MATH_TOKENS, instruction, batch_size)
    return {"ext_math_acc": m["accuracy"], "ext_math_format": m["format_rate"], "ext_rg_acc": rg["accuracy"],
            **({"ext_math_steps": m["step_accuracy"]} if "step_accuracy" in m else {})}


def math_prompt_form(checkpoint: str | Path, base: str | Path | None = None) -> str:
    """The instruction a run's math questions were asked with ("" = the bare question), found where the run
    kept it: its own config (`instruction`, GRPO), else its own record (`math_prompt.json`, written by SFT from
    the form of its math conversations), else the pipeline's beside it (written by `instar run` with the SFT math
    set), else the model it started from (`base` for a run that has no summary yet), recursively. Models instar
    did not train (a Hugging Face directory, embedded-smollm2) get the default instruction."""
    from instar.train.rewards import load_prompt_form

    path = Path(checkpoint)
    for _ in range(16):  # a chain of stage runs; 16 bounds a cycle of hand-edited configs
        summary = path / "summary.json"
        config = json.loads(summary.read_text()).get("config", {}) if summary.is_file() else {}
        if "instruction" in config:
            return config["instruction"]
        kept = next((f for f in (load_prompt_form(path), load_prompt_form(path.parent)) if f is not None), None)
        if kept is not None:
            return kept
        model, base = config.get("model") or base, None
        if not model or not Path(model).is_dir():
            break
        path = Path(model)
    return INSTRUCTION


EVALUATORS: dict[str, Callable] = {"text": eval_text, "messages": eval_messages, "math": eval_math}


def evaluate_file(checkpoint: str | Path, data: str | Path, kind: str | None = None, batch_size: int = 8,
                  max_len: int = 512, device: str = "auto", samples: int = 0, temperature: float = 0.7) -> dict:
    """Score a model (run dir, HF dir or embedded-smollm2) on a JSONL file: {"kind", "n", metrics...}; math
    records also with `samples` sampled completions each at `temperature` (0: greedy only)."""
    from instar.datasets.jsonl import read_records
    from instar.train.config import TrainConfig
    from instar.train.models import load_model, resolve_device, use_bf16

    from instar import evalsets

    if str(data) in evalsets.EVALSETS and not Path(data).exists():  # `--data arithmetic`: a packaged yardstick
        data = evalsets.path(str(data))
    kind, records = read_records(data, kind)
    if kind not in EVALUATORS:
        raise InstarError(f"no evaluator for {kind!r} records (have: {', '.join(EVALUATORS)})")
    if samples and kind != "math":
        raise InstarError(f"--samples scores math records; {data} holds {kind!r} records")
    if samples < 0 or (samples and temperature <= 0):
        raise InstarError(f"--samples {samples} at --temperature {temperature}: samples must be >= 0 and the "
                          "temperature above 0 (temperature 0 would sample the greedy answer k times)")
    cfg = TrainConfig(device=device)
    dev = resolve_device(cfg)
    model, tok = load_model(checkpoint, dev)
    model.eval()
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, dev, model)):
        opts = EvalOptions(batch_size, max_len, math_prompt_form(checkpoint) if kind == "math" else "", samples,
                           temperature)
        metrics = EVALUATORS[kind](model, tok, records, opts)
    return {"kind": kind, "n": len(records), **metrics}

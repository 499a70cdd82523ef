"""Export a trained model: a Hugging Face directory, or a GGUF file + Modelfile for llama.cpp and Ollama.

    instar export [RUN] --format hf   --out exported/        # safetensors + tokenizer + chat template
    instar export [RUN] --format gguf --out model.gguf       # + ./Modelfile: `ollama create mymodel -f Modelfile`

The GGUF writer uses only the `gguf` package (llama.cpp's `convert_hf_to_gguf.py` is not installed with
llama-cpp-python, and it rejects a freshly trained tokenizer's pre-tokenizer). It reads the model
directory's files directly — config.json, model.safetensors, tokenizer.json — so no model is instantiated.

What it deliberately supports: the llama, qwen2 and qwen3 architectures (every instar preset, SmolLM2,
Qwen2/2.5, Qwen3 dense models; plain RoPE, no sliding window), a byte-level BPE tokenizer (llama.cpp's `gpt2`
tokenizer model, its pre-tokenizer recognised by its split rule), tensors in f32 or f16 (no quantisation:
run llama.cpp's `llama-quantize` on the result if you need it). Measured on tiny random models of each
architecture: llama.cpp's logits match transformers' to 1.0e-6 .. 2.3e-6 in f32 (with an f32 KV cache) and
2.2e-3 .. 3.1e-3 in f16, and llama.cpp tokenises the chat-templated prompt to the same ids
(tests/test_export.py). The Modelfile spells ChatML when the model's template is ChatML (instar's own,
SmolLM2's, Qwen's); otherwise it leaves the template to Ollama, which reads it from the GGUF.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from instar.errors import InstarError

FORMATS = ("hf", "gguf")

# Files of a Hugging Face model directory worth carrying over (weights, config, tokenizer, chat template).
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")

# Ollama's Go-template form of ChatML; the same template our tokenizer, SmolLM2 and Qwen carry in Jinja form.
MODELFILE_CHATML = '''TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|im_start|>"
'''


def export(model_dir: Path, fmt: str, out: Path, dtype: str = "f16") -> list[Path]:
    """Export the Hugging Face model directory `model_dir`; return the files written."""
    if fmt not in FORMATS:
        raise InstarError(f"unknown export format {fmt!r} (expected one of {', '.join(FORMATS)})")
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise InstarError(f"{model_dir} is not a model directory: {name} is missing")
    if fmt == "hf":
        return export_hf(model_dir, Path(out))
    out = Path(out)
    if out.suffix != ".gguf":  # a folder was given: write model.gguf inside it
        out = out / "model.gguf"
    return [write_gguf(model_dir, out, dtype), write_modelfile(out, read_chat_template(model_dir))]


def export_hf(model_dir: Path, out: Path) -> list[Path]:
    """Copy the final model directory: it already is a loadable Hugging Face directory."""
    if out.exists() and out.resolve() == model_dir.resolve():
        raise InstarError(f"--out is the model directory itself: {out}")
    if not read_chat_template(model_dir):
        raise InstarError(f"{model_dir} has no chat template (tokenizer_config.json or chat_template.jinja)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in HF_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
            written.append(out / name)
    return written


def read_chat_template(model_dir: Path) -> str | None:
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    tc = model_dir / "tokenizer_config.json"
    template = json.loads(tc.read_text(encoding="utf-8")).get("chat_template") if tc.is_file() else None
    return template if isinstance(template, str) else None


# -------------------------------------------------------------------------------------------------------
# GGUF: architecture, metadata, tokenizer, tensors

# transformers model_type -> (llama.cpp architecture, permute q/k rows?). llama.cpp runs llama with "normal"
# RoPE, which rotates adjacent pairs (x[2i], x[2i+1]); transformers rotates halves (x[i], x[i + d/2]), so
# llama's q/k rows are reordered on the way out. qwen2 and qwen3 run with "neox" RoPE — the rotate-half
# layout itself — so their rows go out as they are (llama.cpp's convert_hf_to_gguf.py does the same).
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

# Split regexes of byte-level BPE tokenizers -> the llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that
# applies the same rule. Qwen2 and Qwen3 share one; Llama 3's groups up to three digits.
SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


def permute_qk(w, n_head: int):
    """HF's rotate-half q/k rows -> GGML's interleaved pairs (llama.cpp convert_hf_to_gguf.py `permute`).

    HF rotates (x[i], x[i + d/2]) together; GGML rotates (x[2i], x[2i+1]). Per head, rows [0..d/2) and
    [d/2..d) are interleaved: (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...). Works for weights and biases."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def architecture(cfg: dict) -> tuple[str, bool]:
    """(llama.cpp architecture, permute q/k?) for a config.json, or a one-line error naming what is supported."""
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise InstarError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, got model_type {kind!r} "
                          "(export --format hf, then use llama.cpp's convert_hf_to_gguf.py)")
    if cfg.get("mlp_bias"):
        raise InstarError("GGUF export does not support MLP biases")
    if cfg.get("use_sliding_window"):
        raise InstarError(f"GGUF export does not support {kind}'s sliding-window attention")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise InstarError("GGUF export supports plain RoPE only (no rope scaling)")
    return ARCHITECTURES[kind]


def tokenizer_vocab(model_dir: Path, vocab_size: int):
    """(tokens, token types, merges, special-token ids by role) from tokenizer.json + tokenizer_config.json."""
    import gguf

    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise InstarError(f"GGUF export supports byte-level BPE tokenizers, got {model.get('type')!r}")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise InstarError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    # Embedding rows beyond the tokenizer (vocab padded to a multiple of 64, say) become unused tokens.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    ids = {t: i for i, t in by_id.items()}
    special = {}
    for role in ("bos", "eos", "pad", "unk"):
        name = tc.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        tid = ids.get(name) if name else cfg.get(f"{role}_token_id")
        if isinstance(tid, list):  # config.json may list several eos ids; llama.cpp takes one
            tid = tid[0]
        if tid is not None:
            special[role] = int(tid)
    return tokens, token_types, merges, special, pre_tokenizer_name(tok)


def pre_tokenizer_name(tok: dict) -> str:
    """The llama.cpp pre-tokenizer whose regex matches this tokenizer's split rules.

    llama.cpp's converter recognises a pre-tokenizer by hashing how a known tokenizer splits a test string,
    which fails for any newly trained vocabulary; the split rule itself identifies it whatever the vocabulary.
    A plain ByteLevel pre-tokenizer with the GPT-2 regex is `gpt-2`; SmolLM2's digits-then-ByteLevel is
    `smollm`; a Split regex then a regex-free ByteLevel (Qwen2/3, Llama 3) is looked up in
    SPLIT_PRE_TOKENIZERS. Anything else falls back to `default` (llama.cpp warns; ids given directly still
    run the same network, only llama.cpp's own text tokenisation may differ)."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"), "default")
    return "default"


def write_gguf(model_dir: Path, out: Path, dtype: str = "f16") -> Path:
    """Write `model_dir` (a transformers llama / qwen2 / qwen3 directory) as a GGUF file."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    if dtype not in ("f32", "f16"):
        raise InstarError(f"GGUF dtype must be f32 or f16, got {dtype!r}")
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch, permute = architecture(cfg)
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(model_dir.parent.name if model_dir.name == "model" else model_dir.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // n_head:  # Qwen3 fixes head_dim (128) whatever the width
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)

    tokens, token_types, merges, special, pre = tokenizer_vocab(model_dir, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    for role, tid in special.items():
        getattr(w, f"add_{role}_token_id")(tid)
    w.add_add_bos_token(False)  # our ChatML template writes every special token itself
    template = read_chat_template(model_dir)
    if template:
        w.add_chat_template(template)

    # gguf's own HF -> GGUF name table (the one llama.cpp's converter uses), restricted to the tensors
    # llama.cpp's loader expects for this architecture.
    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names, allowed = gguf.get_tensor_name_map(arch_id, n_layers), set(gguf.MODEL_TENSORS[arch_id])
    state = load_file(str(model_dir / "model.safetensors"))
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when `output` is absent
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        kind, gguf_name = names.get_type_and_name(name, try_suffixes=(".weight", ".bias")) or (None, None)
        if kind not in allowed:
            raise InstarError(f"GGUF export: unexpected tensor {name!r} for the {arch} architecture")
        data = tensor.float().numpy()
        if permute and kind == gguf.MODEL_TENSOR.ATTN_Q:
            data = permute_qk(data, n_head)
        elif permute and kind == gguf.MODEL_TENSOR.ATTN_K:
            data = permute_qk(data, n_kv)
        # Norms and biases stay f32 (llama.cpp expects 1-D tensors in f32); matrices follow `dtype`.
        data = data.astype(np.float16 if dtype == "f16" and data.ndim == 2 else np.float32)
        w.add_tensor(gguf_name, np.ascontiguousarray(data))

    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_modelfile(gguf_path: Path, chat_template: str | None) -> Path:
    """A Modelfile next to the GGUF: `ollama create NAME -f Modelfile` in that folder.

    A ChatML model gets the template spelled out; any other template is left to Ollama, which takes it from
    the GGUF's `tokenizer.chat_template` (a wrong hand-written template would be worse than none)."""
    path = gguf_path.parent / "Modelfile"
    chatml = chat_template is not None and "<|im_start|>" in chat_template
    text = f"FROM ./{gguf_path.name}\n" + (MODELFILE_CHATML if chatml else "") + "PARAMETER temperature 0.7\n"
    path.write_text(text, encoding="utf-8")
    return path

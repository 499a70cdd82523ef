"""Export: the GGUF file runs in llama.cpp with the same logits as the torch model; HF export reloads.

Tiny random models of each supported architecture — llama, qwen2 (q/k/v biases), qwen3 (q/k norms, a
head_dim that is not hidden/heads) — all with GQA so the q/k permutation differs between q and k, and a tiny
byte-level BPE tokenizer from stage 0's trainer, its pre-tokenizer swapped for Qwen's or Llama 3's split
rule where the case says so. Init std 0.08 so logits span about +-2.5; norms and biases are randomised so
a mix-up would show. Tolerance on the max |logit difference| over every position: 1e-4 in f32 with
llama.cpp's KV cache in f32 (measured 1.0e-6 .. 2.3e-6; the default f16 KV cache alone adds ~1e-3; skipping
llama's q/k permutation, or applying it to qwen, gives ~1.0), 2e-2 with f16 weights (measured 2.2e-3 .. 3.1e-3).
Each Split-regex case's prompt tokenises differently under llama.cpp's `gpt-2` pre-tokenizer, so naming the
pre-tokenizer wrongly would fail the ids check.
"""

import json

import pytest

from instar.errors import InstarError

CORPUS = ["The cat sat on the mat. The dog ate the bone.", "What is an LLM? A large language model.",
          "Numbers like 12 and 345 appear too, with punctuation: yes, no! It's 2024.\n\nNew lines."] * 20
# The prompt whose ids llama.cpp must reproduce: digits (split one by one, in threes or whole by the
# pre-tokenizers under test), a contraction, a blank line.
QUESTION = "What's 12 + 345?\n\nIt's 357."

# Pre-tokenizer split rules as tokenizer.json spells them (Qwen2/Qwen3's and Llama 3's).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")


def make_tokenizer(split: str | None = None):
    """Stage 0's byte-level BPE tokenizer (ChatML), optionally with a Split-regex pre-tokenizer instead."""
    from tokenizers import Regex, pre_tokenizers

    from instar.train.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=400)
    if split:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


def make_model_dir(path, arch: str = "llama", tie: bool = False, split: str | None = None, **extra):
    """A random-init causal LM of `arch` + its tokenizer saved as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    tok = make_tokenizer(split)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    torch.manual_seed(0)
    cfg = configs[arch](vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        initializer_range=0.08, **extra)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random-init norms are ones and biases zeros: make both informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def llama_logits(gguf_path, ids):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, n_threads=2, verbose=False,
                type_k=0, type_v=0)  # f32 KV cache (GGML_TYPE_F32): the default f16 cache adds ~1e-3
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)]), llm


CASES = {  # id: (arch, tied embeddings, pre-tokenizer split rule, extra config, dtype, tolerance, llama.cpp pre)
    "llama-f32": ("llama", False, None, {}, "f32", 1e-4, "smollm"),  # stage 0: digits, then ByteLevel
    "llama-tied-llama3-bias": ("llama", True, LLAMA3_SPLIT, {"attention_bias": True}, "f32", 1e-4, "llama-bpe"),
    "llama-f16": ("llama", False, None, {}, "f16", 2e-2, "smollm"),
    "qwen2-tied-f32": ("qwen2", True, QWEN_SPLIT, {}, "f32", 1e-4, "qwen2"),
    "qwen3-f32": ("qwen3", False, QWEN_SPLIT, {"head_dim": 32}, "f32", 1e-4, "qwen2"),
    "qwen3-tied-f16": ("qwen3", True, QWEN_SPLIT, {"head_dim": 32}, "f16", 2e-2, "qwen2"),
}


@pytest.mark.parametrize("case", CASES)
def test_gguf_logits_and_tokens_match_transformers(tmp_path, case):
    import torch

    from instar.export import export

    arch, tie, split, extra, dtype, tol, pre = CASES[case]
    model, tok = make_model_dir(tmp_path / "model", arch, tie, split, **extra)
    files = export(tmp_path / "model", "gguf", tmp_path / "out" / "tiny.gguf", dtype=dtype)
    assert [f.name for f in files] == ["tiny.gguf", "Modelfile"]
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got, llm = llama_logits(files[0], ids)
    diff = abs(got - want).max()
    assert diff < tol, f"max logit difference {diff:.2e} >= {tol}"
    assert llm.metadata["general.architecture"] == arch
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    # llama.cpp's own tokenisation (its pre-tokenizer, special tokens parsed) gives the same ids.
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.token_eos() == tok.eos_token_id
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template


def test_qwen_is_not_permuted_and_llama_is(tmp_path):
    """The RoPE layout is per architecture: permuting Qwen's q/k (or not permuting Llama's) breaks logits."""
    import torch
    from unittest import mock

    from instar import export as ex

    for arch, permuted in (("qwen2", False), ("llama", True)):
        model, tok = make_model_dir(tmp_path / arch, arch, split=QWEN_SPLIT)
        ids = tok("It's 12 cats.")["input_ids"]
        with mock.patch.dict(ex.ARCHITECTURES, {arch: (arch, not permuted)}):
            path = ex.export(tmp_path / arch, "gguf", tmp_path / f"{arch}.gguf", dtype="f32")[0]
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        assert abs(llama_logits(path, ids)[0] - want).max() > 0.05


def test_gguf_tied_export_has_no_output_tensor(tmp_path):
    from gguf import GGUFReader

    from instar.export import export

    make_model_dir(tmp_path / "model", tie=True)
    path = export(tmp_path / "model", "gguf", tmp_path / "out")[0]
    assert path.name == "model.gguf"
    names = {t.name for t in GGUFReader(str(path)).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert {f"blk.1.{n}.weight" for n in ("attn_q", "attn_k", "ffn_down", "ffn_norm")} <= names


def test_modelfile_spells_chatml_only_for_chatml_models(tmp_path):
    from instar.export import export

    make_model_dir(tmp_path / "model")
    export(tmp_path / "model", "gguf", tmp_path / "out" / "m.gguf")
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\n")
    assert "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    # Another template (Llama 3's style here): no hand-written TEMPLATE; Ollama reads the GGUF's own.
    (tmp_path / "model" / "chat_template.jinja").write_text(
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
        "<|eot_id|>{% endfor %}")
    export(tmp_path / "model", "gguf", tmp_path / "out" / "m.gguf")
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text == "FROM ./m.gguf\nPARAMETER temperature 0.7\n"


def test_hf_export_reloads_with_same_logits(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from instar.export import export

    model, tok = make_model_dir(tmp_path / "model")
    export(tmp_path / "model", "hf", tmp_path / "hf")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok2.chat_template == tok.chat_template
    ids = torch.tensor([tok("The cat sat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_export_errors(tmp_path):
    from instar.export import export

    (tmp_path / "empty").mkdir()
    with pytest.raises(InstarError, match="config.json is missing"):
        export(tmp_path / "empty", "gguf", tmp_path / "x.gguf")
    make_model_dir(tmp_path / "model")
    with pytest.raises(InstarError, match="unknown export format"):
        export(tmp_path / "model", "onnx", tmp_path / "x")
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    bad = {"sliding-window": {"use_sliding_window": True},
           "rope scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
           "MLP biases": {"mlp_bias": True}}
    for message, change in bad.items():
        (tmp_path / "model" / "config.json").write_text(json.dumps(cfg | change))
        with pytest.raises(InstarError, match=message) as e:
            export(tmp_path / "model", "gguf", tmp_path / "x.gguf")
        assert "\n" not in str(e.value)
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt2"}))
    with pytest.raises(InstarError, match="supports llama, qwen2, qwen3 models, got model_type 'gpt2'"):
        export(tmp_path / "model", "gguf", tmp_path / "x.gguf")

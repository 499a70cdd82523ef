"""Export: the GGUF file runs in llama.cpp with the same logits as the torch model; HF export reloads.

A tiny random Llama (GQA, so the q/k permutations differ) and a tiny byte-level BPE tokenizer with ChatML
special tokens are built in the test (init std 0.08 so logits span about +-2.5). Tolerance on the max |logit
difference| over every position: 1e-4 in f32 with llama.cpp's KV cache in f32 (measured 1.3e-6; the default
f16 KV cache alone adds ~1e-3; skipping the q/k permutation gives ~1.0), 2e-2 in f16 weights (measured 3e-3).
"""

import json

import pytest

from instar.errors import InstarError

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The cat sat on the mat. The dog ate the bone.", "What is an LLM? A large language model.",
          "Numbers like 12 and 345 appear too, with punctuation: yes, no!"] * 20


def make_model_dir(path, tie: bool = False):
    """A random-init LlamaForCausalLM + BPE tokenizer saved as a Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, initializer_range=0.08)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random-init norms are all ones; make them informative so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


def llama_logits(gguf_path, ids):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, n_threads=2, verbose=False,
                type_k=0, type_v=0)  # f32 KV cache (GGML_TYPE_F32): the default f16 cache adds ~1e-3
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)]), llm


@pytest.mark.parametrize("tie,dtype,tol", [(False, "f32", 1e-4), (True, "f32", 1e-4), (False, "f16", 2e-2)])
def test_gguf_logits_match_torch(tmp_path, tie, dtype, tol):
    import torch

    from instar.export import export

    model, tok = make_model_dir(tmp_path / "model", tie=tie)
    files = export(tmp_path / "model", "gguf", tmp_path / "out" / "tiny.gguf", dtype=dtype)
    assert [f.name for f in files] == ["tiny.gguf", "Modelfile"]
    text = tok.apply_chat_template([{"role": "user", "content": "What is an LLM?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got, llm = llama_logits(files[0], ids)
    diff = abs(got - want).max()
    assert diff < tol, f"max logit difference {diff:.2e} >= {tol}"
    # llama.cpp's own tokenisation (gpt-2 pre-tokenizer, special tokens parsed) gives the same ids.
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    assert llm.token_eos() == tok.eos_token_id
    assert llm.metadata["tokenizer.chat_template"] == CHATML


def test_gguf_tied_export_has_no_output_tensor(tmp_path):
    from gguf import GGUFReader

    from instar.export import export

    make_model_dir(tmp_path / "model", tie=True)
    path = export(tmp_path / "model", "gguf", tmp_path / "out")[0]
    assert path.name == "model.gguf"
    names = {t.name for t in GGUFReader(str(path)).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert {f"blk.1.{n}.weight" for n in ("attn_q", "attn_k", "ffn_down", "ffn_norm")} <= names


def test_modelfile_is_chatml_for_ollama(tmp_path):
    from instar.export import export

    make_model_dir(tmp_path / "model")
    export(tmp_path / "model", "gguf", tmp_path / "out" / "m.gguf")
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\n")
    assert "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_hf_export_reloads_with_same_logits(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from instar.export import export

    model, tok = make_model_dir(tmp_path / "model")
    export(tmp_path / "model", "hf", tmp_path / "hf")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok2.chat_template == CHATML
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
    cfg["model_type"] = "gpt2"
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InstarError, match="supports llama models"):
        export(tmp_path / "model", "gguf", tmp_path / "x.gguf")

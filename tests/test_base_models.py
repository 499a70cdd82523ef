"""Any local transformers causal LM as the student, and the one-line refusals before any weight is read.

Tiny random-init models of architectures other than instar's Llama presets (Qwen3: q/k norms; GPT-2: fused
`c_attn`, learned positions, no RoPE) train through `instar train sft` from their own directory. Bad input
gives one line on stderr and exit code 2: a directory that is not a causal LM (a masked-LM checkpoint, an
encoder-decoder, a model that needs its own code), a model too large for the memory (estimated from the
safetensors headers against the available memory, here patched small). A tokenizer without a chat template
gets ChatML, with `<|im_start|>` / `<|im_end|>` added to a vocabulary that lacks them, and a note says so.
"""

import json

import pytest

from instar.errors import InputError
from instar.train import run_stage
from test_train_errors import cli
from train_fixtures import FAST, fill_store, tiny_tokenizer, unchanged_params


def save_tiny(path, arch: str, tok=None, template: bool = True):
    """A random-init causal LM of `arch` + stage 0's tokenizer (or `tok`) saved as an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config, Qwen3Config

    tok = tok or tiny_tokenizer()
    if not template:
        tok.chat_template = None
    configs = {"qwen3": lambda: Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, max_position_embeddings=256, tie_word_embeddings=True),
               "qwen2": lambda: Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, tie_word_embeddings=True),
               "gpt2": lambda: GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256)}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch]())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_sft_trains_any_causal_lm_from_its_directory(store, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    fill_store(store, n_docs=0, n_convs=200)
    before = save_tiny(tmp_path / "base", arch)
    summary = run_stage("sft", None, FAST + [f"model={tmp_path / 'base'}", f"out={tmp_path}/sft", "max_steps=3",
                                             "eval_every=0", "lr=1e-3"], store)
    assert summary["end"]["val_loss"] == summary["end"]["val_loss"]  # finite, not NaN
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")
    assert after.config.model_type == arch
    assert not unchanged_params(before, after)


def write_config(path, **cfg):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_not_a_causal_lm_is_one_line_exit_2(store, tmp_path, monkeypatch, capsys):
    from instar.train.models import load_model

    fill_store(store, n_docs=0, n_convs=200)
    cases = {
        "holds a BertForMaskedLM, not a causal language model": write_config(
            tmp_path / "bert", model_type="bert", architectures=["BertForMaskedLM"]),
        "model_type 't5' (transformers has no causal-LM class for it)": write_config(
            tmp_path / "t5", model_type="t5", architectures=["T5ForConditionalGeneration"]),
        "needs code shipped with the model (auto_map), which instar never runs": write_config(
            tmp_path / "custom", model_type="my-lm", auto_map={"AutoModelForCausalLM": "modeling_my.MyLM"}),
        "holds a Qwen3Model, not a causal language model": write_config(
            tmp_path / "embedder", model_type="qwen3", architectures=["Qwen3Model"]),
    }
    for message, path in cases.items():
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_model(path)
    code, err = cli(monkeypatch, capsys, "train", "sft", "--db", str(store.path), "--set", f"model={tmp_path / 'bert'}",
                    "--set", f"out={tmp_path}/sft")
    assert code == 2 and "not a causal language model" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_too_large_for_memory_is_refused_before_loading(store, tmp_path, monkeypatch, capsys):
    from instar.train import models

    fill_store(store, n_docs=0, n_convs=200)
    model = save_tiny(tmp_path / "base", "qwen3")
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding is stored once
    assert models.stored_params(tmp_path / "base", {}) == params
    # Full fine-tuning needs 16 bytes/param (+50%, +1 GiB); LoRA and inference 4. Room for LoRA only:
    room = int(params * 4 * 1.5 + (1 << 30)) + 1
    monkeypatch.setattr(models, "available_memory", lambda: room)
    loaded = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(InputError, match=r"too large for this machine's memory: .* for full .* lora = true needs"):
        models.load_model(tmp_path / "base", purpose="full")
    assert not loaded                                           # refused before any weight was read
    code, err = cli(monkeypatch, capsys, "train", "sft", "--db", str(store.path), "--set", f"model={tmp_path / 'base'}",
                    "--set", f"out={tmp_path}/sft")
    assert code == 2 and "too large for this machine's memory" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    models.check_memory(tmp_path / "base", params, "lora", room)  # fits: no error


def test_tokenizer_without_chat_template_gets_chatml(tmp_path, capsys):
    from transformers import AutoTokenizer

    from instar.train.models import load_model
    from instar.train.tokens import render_chat, stop_ids

    # A GPT-2-style vocabulary without ChatML's tokens (stage 0's tokenizer has them: rebuild one without).
    base_tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "tok"))
    save_tiny(tmp_path / "base", "gpt2", tok=base_tok, template=False)
    model, tok = load_model(tmp_path / "base")
    assert "<|im_start|>" in tok.chat_template
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > max(im_start, im_end)
    assert im_end in stop_ids(tok)
    ids, mask = render_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert ids.count(im_start) == 2 and ids.count(im_end) == 2    # one token per turn marker
    assert ids[max(i for i, m in enumerate(mask) if m)] == im_end  # the model learns to stop at <|im_end|>
    err = capsys.readouterr().err
    assert "has no chat template; using ChatML" in err and "<|im_start|> and <|im_end|> added" in err


def save_tiny_tokenizer(path):
    """A byte-level BPE tokenizer with only <|endoftext|> (GPT-2's one special token) and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from train_fixtures import documents

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(documents(100), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path)
    return path

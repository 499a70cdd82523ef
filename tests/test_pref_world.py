"""A tiny world for the stage-3 tests: a planted preference ("answers that say banana win"), a tokenizer
trained on it, a ~70k-param random-init Llama saved as a run directory. Imported by the other test_pref_*
files; its own tests check the pair rendering every stage-3 file relies on."""

import random

import pytest
import torch

KEYWORD = "banana"
WORDS = ("the a cat dog sun sea tree red blue small big runs sleeps sings eats green old new happy quiet "
         "river stone bird cloud wind fast slow warm cold bright dark").split()
TOPICS = ["cats", "the sea", "trees", "birds", "rivers", "the wind", "stones", "clouds", "colours", "music"]


def planted_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference records whose chosen answer contains KEYWORD at a random place and rejected does not."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        rejected = " ".join(words)
        chosen = words[:]
        chosen[rng.randrange(len(chosen))] = KEYWORD
        if rng.random() < 0.5:  # chosen is not just "rejected with one word swapped"
            chosen = [rng.choice(WORDS) for _ in range(len(words) - 1)] + [KEYWORD]
            rng.shuffle(chosen)
        out.append({"prompt": [{"role": "user", "content": f"Tell me about {rng.choice(TOPICS)} {rng.randint(0, 999)}."}],
                    "chosen": " ".join(chosen), "rejected": rejected})
    return out


def tiny_base(path, texts: list[str], seed: int = 0, hidden: int = 64, layers: int = 2):
    """Train a tokenizer on `texts`, build a random-init Llama, save it as a run directory at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from instar.train.models import save_model
    from instar.train.tokenizer import train_tokenizer
    from instar.train.tokens import stop_ids

    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=2 * hidden, vocab_size=len(tok), max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=stop_ids(tok),
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    save_model(model, tok, path / "model")
    return path


def corpus(records: list[dict]) -> list[str]:
    texts = []
    for r in records:
        texts += [r["prompt"][0]["content"], r["chosen"], r["rejected"]]
    return texts


def make_world(path, n: int = 600):
    """(store at path/instar.db with n planted pairs, base run directory path/sft)."""
    from instar.datasets.store import Provenance, Store

    store = Store.open(path / "instar.db")
    records = planted_pairs(n)
    store.add("preference", records, Provenance(source="import"))
    return store, tiny_base(path / "sft", corpus(records))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


# -------------------------------------------------------------------------------------------------------------
def test_pairs_end_at_the_response_end_token(world):
    from instar.train.models import load_model
    from instar.train.reward import render_pairs

    store, base = world
    _, tok = load_model(base)
    pairs = render_pairs(tok, store.records("preference", "val"), max_len=256)
    assert len(pairs) >= 20
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for (c_ids, c_mask), (r_ids, r_mask) in pairs:
        for ids, mask in ((c_ids, c_mask), (r_ids, r_mask)):
            assert ids[-1] == im_end and mask[-1] == 1          # EOS is the last token and in the mask
            assert mask[0] == 0 and ids[mask.index(1) - 1] != im_end  # prompt not in the mask
        # same prompt tokens on both sides; the mask starts where the responses start
        assert c_ids[:c_mask.index(1)] == r_ids[:r_mask.index(1)]
    assert tok.pad_token_id != im_end


def test_pairs_truncated_without_response_are_dropped(world):
    from instar.train.models import load_model
    from instar.train.reward import render_pairs

    store, base = world
    _, tok = load_model(base)
    records = store.records("preference", "val")
    assert render_pairs(tok, records, max_len=4) == []

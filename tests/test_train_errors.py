"""User mistakes in `instar train` / `instar eval` give one clear line and a non-zero exit, never a traceback:
bad config key or value, unknown stage, missing dataset, empty split, missing model, corrupt checkpoint."""

import json
import sys

import pytest

from instar.datasets import runs
from instar.datasets.store import Provenance, record_id, split_of
from instar.errors import ConfigError, InstarError
from instar.train import load_stage_config, run_stage
from train_fixtures import FAST, documents, fill_store


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from instar import cli as instar_cli

    monkeypatch.setattr(sys, "argv", ["instar", *args])
    with pytest.raises(SystemExit) as e:
        instar_cli.main()
    return e.value.code, capsys.readouterr().err


def test_bad_config_key_and_value(store, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        run_stage("pretrain", None, ["bogus=1"], store)
    with pytest.raises(ConfigError, match="dtype"):
        run_stage("sft", None, ["dtype=fp16"], store)
    with pytest.raises(ConfigError, match="unknown stage 'finetune'"):
        run_stage("finetune", None, [], store)
    bad = tmp_path / "train.toml"
    bad.write_text("[train.sft]\nmax_step = 10\n")
    code, err = cli(monkeypatch, capsys, "train", "sft", "--config", str(bad), "--db", str(tmp_path / "x.db"))
    assert code == 2 and "unknown key 'max_step'" in err and "Traceback" not in err


def test_missing_dataset(store, tmp_path, monkeypatch, capsys):
    with pytest.raises(InstarError, match="need at least 1 'messages' records in split 'train'"):
        run_stage("sft", None, [f"out={tmp_path}/sft"], store)
    code, err = cli(monkeypatch, capsys, "train", "pretrain", "--db", str(store.path), "--set", f"out={tmp_path}/p")
    assert code == 1 and "need at least 1 'text' records" in err and "instar generate" in err


def test_empty_split(store, tmp_path):
    train_only = [{"text": t} for t in documents(60) if split_of(record_id("text", {"text": t})) == "train"]
    store.add("text", train_only, Provenance())
    with pytest.raises(InstarError, match="split 'val'"):
        run_stage("pretrain", None, [f"out={tmp_path}/p"], store)


def test_missing_model(store, tmp_path):
    fill_store(store, n_docs=0, n_convs=200)
    with pytest.raises(InstarError, match="model not found"):
        run_stage("sft", None, [f"model={tmp_path}/nowhere", f"out={tmp_path}/sft"], store)
    (failed,) = runs.list_runs(store, stage="sft")
    assert failed["status"] == "failed"                     # not left "running" forever
    with pytest.raises(InstarError, match="only for `instar train pretrain`"):
        run_stage("sft", None, ["model=scratch", f"out={tmp_path}/sft"], store)


def test_corrupt_checkpoint(store, tmp_path, monkeypatch, capsys):
    fill_store(store, n_docs=150, n_convs=0)
    out = tmp_path / "p"
    run_stage("pretrain", None, FAST + [f"out={out}", "max_steps=2", "eval_every=0"], store)
    for done in ("summary.json", "model/config.json"):     # as if killed before the end
        (out / done).unlink()
    (out / "checkpoint" / "model.safetensors").write_bytes(b"\x00" * 64)
    code, err = cli(monkeypatch, capsys, "train", "pretrain", "--db", str(store.path), "--set", f"out={out}",
                    *[a for s in FAST for a in ("--set", s)])
    assert code == 1 and "corrupt or incompatible checkpoint" in err and "Traceback" not in err


def test_eval_errors(tmp_path, monkeypatch, capsys):
    code, err = cli(monkeypatch, capsys, "eval", str(tmp_path / "nowhere"), "--data", str(tmp_path / "none.jsonl"))
    assert code == 1 and "data file not found" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + "{broken\n")
    code, err = cli(monkeypatch, capsys, "eval", str(tmp_path / "nowhere"), "--data", str(bad))
    assert code == 1 and "bad.jsonl:2" in err


@pytest.mark.parametrize("stage, key", [("grpo", "max_len=64"), ("grpo", "eval_batches=2"), ("grpo", "compile=true"),
                                        ("ppo", "compile=true"), ("reward", "sample_tokens=8"),
                                        ("pretrain", "lora=true")])
def test_a_key_the_stage_cannot_honour_is_an_error(stage, key):
    """Bug 6 (config side): PPO and GRPO inherited keys they silently ignored."""
    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=f"{name}.*{stage}|{stage}.*{name}"):
        load_stage_config(stage, None, [key])


def test_sampled_eval_counts_pass_at_k_majority_and_samples(tmp_path, monkeypatch):
    """`instar eval --samples K`: what each question's K samples answered, counted three ways. The replies are
    fixed here (generation stubbed) so that every count is known; the real model's path is in test_grpo."""
    import torch

    from instar.train import evaluate
    from instar.train.sampling import Completions
    from train_fixtures import tiny_tokenizer

    replies = {"What is 2 + 3?": ["Answer: 5", "Answer: 6", "Answer: 6", "no answer"],    # right once, vote 6
               "What is 4 + 4?": ["Answer: 8", "Answer: 9", "Answer: 8", "Answer: 8"],    # right 3x, vote 8
               "What is 1 + 1?": ["Answer: 3", "Answer: 3", "Answer: 4", "Answer: 1"]}    # never right
    seen = []

    def fake_generate(model, tok, prompts, max_new_tokens, temperature, seed=None):
        texts = [t for q in replies if any(tok.decode(p).count(q) for p in prompts[:1]) for t in replies[q]]
        seen.append((len(prompts), temperature, seed))
        n = len(texts)
        return Completions(texts, torch.zeros(n, 1), torch.ones(n, 1), torch.zeros(n, 1, dtype=torch.long),
                           torch.ones(n, 1))

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    monkeypatch.setattr(evaluate, "stopped", lambda gen, tok: torch.ones(len(gen.texts), dtype=torch.bool))
    records = [{"question": q, "answer": a} for q, a in zip(replies, ["5", "8", "2"])]
    got, right = evaluate.sample_math(None, tiny_tokenizer(), records, k=4, temperature=0.9, batch_size=4, seed=7)
    assert right == [1, 3, 0]
    assert got == {"pass_at_k": 2 / 3, "majority_at_k": 1 / 3, "sample_accuracy": 4 / 12}
    assert seen == [(4, 0.9, 7), (4, 0.9, 8), (4, 0.9, 9)]  # one question per batch of 4; a seed per batch


def test_sampled_eval_refuses_what_it_cannot_sample(tmp_path, monkeypatch, capsys):
    from instar.train.models import save_model
    from train_fixtures import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    save_model(tiny_model(tok), tok, tmp_path / "m")
    text, math = tmp_path / "t.jsonl", tmp_path / "m.jsonl"
    text.write_text(json.dumps({"text": "the cat"}) + "\n")
    math.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "5"}) + "\n")
    for data, extra, says in [(text, [], "scores math records"), (math, ["--temperature", "0"], "temperature above 0"),
                              (math, ["--samples", "-1", "--temperature", "1"], "must be >= 0")]:
        args = ["--samples", "2"] + extra if "--samples" not in extra else extra
        code, err = cli(monkeypatch, capsys, "eval", str(tmp_path / "m"), "--data", str(data), *args)
        assert code == 1 and says in err and "Traceback" not in err


def test_eval_reads_the_shapes_data_import_reads(tmp_path):
    """Bug 7: `instar eval` had its own JSONL reader, which refused {"prompt", "answer"} and Alpaca lines."""
    from instar.train.evaluate import evaluate_file
    from instar.train.models import save_model
    from train_fixtures import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    save_model(tiny_model(tok), tok, tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": 5}) + "\n")
    got = evaluate_file(tmp_path / "m", data, max_len=8)
    assert got["kind"] == "math" and got["n"] == 1 and got["accuracy"] == 0.0
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "the cat sees a red ball."}) + "\n")
    got = evaluate_file(tmp_path / "m", data)
    assert got["kind"] == "messages" and got["n"] == 1 and got["tokens"] > 5
    data.write_text(json.dumps({"text": "the cat"}) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(InstarError, match="d.jsonl:2"):
        evaluate_file(tmp_path / "m", data)

"""Stages 0-2 end to end on a tiny random-init model: pretrain from scratch, then SFT (full and LoRA), then
`instar eval`. One pretraining run is shared by the module (~5 s)."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from instar.datasets import runs
from instar.datasets.store import Store
from instar.train import run_stage
from instar.train.models import load_model, new_model
from instar.train.sampling import generate
from instar.train.tokens import render_chat, stop_ids
from train_fixtures import FAST, fill_store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    store = Store.open(root / "instar.db")
    fill_store(store)
    summary = run_stage("pretrain", None, FAST + [f"out={root}/pretrain", "max_steps=60", "eval_every=30"], store)
    return root, store, summary


def weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def test_pretrain_from_scratch_learns_and_records_everything(world):
    root, store, summary = world
    start, end = summary["start"], summary["end"]
    assert start["val_loss"] > 5.0                       # ~ln(vocab): random init
    assert end["val_loss"] < start["val_loss"] - 2.0     # falls clearly on a small templated corpus
    assert 0 < end["val_bpb"] < start["val_bpb"]
    assert summary["data"]["non_embedding_params"] == pytest.approx(1.05e6, rel=0.05)  # the tiny preset
    # Every trainable parameter changed: rebuild the same seeded init and compare.
    model, tok = load_model(root / "pretrain")
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    torch.manual_seed(0)
    init = new_model("tiny", tok, 64).state_dict()
    for name, trained in model.state_dict().items():
        assert not torch.equal(trained, init[name]), f"{name} did not change"
    # The same numbers are in the run tables, with the report prompts' answers before and after.
    run = runs.get_run(store, summary["run_id"])
    assert run["status"] == "done" and run["summary"]["end"] == end
    assert runs.metric_series(store, summary["run_id"], "val_loss")[0] == (0, start["val_loss"])
    assert len(runs.metric_series(store, summary["run_id"], "loss")) == 60
    tags = [json.loads(s["extra"])["when"] for s in runs.run_samples(store, summary["run_id"])]
    assert tags.count("start") == 5 and tags.count("end") == 5
    assert json.loads((root / "pretrain" / "summary.json").read_text())["end"] == end


def test_the_tokenizer_learns_from_the_corpus_and_a_sample_of_the_conversations(world, tmp_path):
    """Stage 0's merges come from the text the model will read: the corpus, plus train-split conversations up to
    the corpus's size in characters (never the val split)."""
    from instar.train.pretrain import tokenizer_texts

    store = Store.open(tmp_path / "small.db")
    fill_store(store, 20, 300)
    corpus = [r["text"] for r in store.records("text", "train")]
    texts = tokenizer_texts(store, corpus, seed=0)
    sample, size = texts[len(corpus):], sum(map(len, corpus))
    assert texts[:len(corpus)] == corpus
    assert sum(map(len, sample[:-1])) < size <= sum(map(len, sample))  # drawn up to the corpus's size

    def rendered(split):
        return {"\n".join(f"{m['role']}\n{m['content']}" for m in r["messages"])
                for r in store.records("messages", split)}
    assert set(sample) <= rendered("train") and not set(sample) & rendered("val")
    assert tokenizer_texts(store, corpus, seed=1) != texts                   # a seeded draw
    _, tok = load_model(world[0] / "pretrain")                                # the module's run: "assistant" and
    assert len(tok("assistant")["input_ids"]) == 1                            # "user" are merged, as in every
    assert len(tok("user")["input_ids"]) == 1                                 # rendered conversation


def test_rerunning_a_finished_stage_returns_its_summary(world):
    root, store, summary = world
    again = run_stage("pretrain", None, FAST + [f"out={root}/pretrain", "max_steps=60", "eval_every=30"], store)
    assert again["already_done"] and again["run_id"] == summary["run_id"]


def test_sft_full_learns_to_answer_and_stop(world):
    root, store, _ = world
    summary = run_stage("sft", None, FAST + [f"model={root}/pretrain", f"out={root}/sft", "max_steps=60",
                                             "eval_every=0", "lr=1e-3"], store)
    assert summary["end"]["val_loss"] < summary["start"]["val_loss"] - 1.0
    before, after = weights(root / "pretrain"), weights(root / "sft")
    for name in after:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    model, tok = load_model(root / "sft")
    prompts = [render_chat(tok, [{"role": "user", "content": f"What is {a} plus {b}?"}],
                           add_generation_prompt=True)[0] for a, b in [(3, 4), (10, 12), (7, 7)]]
    gen = generate(model, tok, prompts, max_new_tokens=24)
    for row, mask in zip(gen.completion_ids, gen.completion_mask):
        n = int(mask.sum())
        assert n < 24 and int(row[n - 1]) in stop_ids(tok)     # the stop token was learned
    assert all("plus" in t for t in gen.texts)


def test_sft_lora_merges_into_a_plain_model(world):
    root, store, _ = world
    summary = run_stage("sft", None, FAST + [f"model={root}/pretrain", f"out={root}/lora", "max_steps=8",
                                             "lora=true", "lora_r=4", "lr=3e-3", "eval_every=0"], store)
    assert summary["data"]["trainable_params"] < 0.2 * summary["data"]["train_loss_tokens"] + 1e6
    before, after = weights(root / "pretrain"), weights(root / "lora")
    assert set(before) == set(after)                           # plain Llama keys, no lora_A/lora_B
    for name in after:
        changed = not torch.equal(before[name], after[name])
        assert changed == name.endswith("proj.weight"), name   # adapters touched projections only
    assert summary["end"]["val_loss"] < summary["start"]["val_loss"]


def test_continued_pretraining_with_lora_trains_adapters_only(world):
    root, store, _ = world
    summary = run_stage("pretrain", None, FAST + [f"model={root}/pretrain", f"out={root}/cpt", "max_steps=4",
                                                  "lora=true", "lora_r=4", "lr=3e-3", "eval_every=0"], store)
    before, after = weights(root / "pretrain"), weights(root / "cpt")
    assert set(before) == set(after)
    assert all((not torch.equal(before[n], after[n])) == n.endswith("proj.weight") for n in after)
    assert summary["end"]["val_loss"] < summary["start"]["val_loss"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-stage peak RSS needs Linux's clear_refs")
def test_peak_memory_is_the_stages_own_and_on_the_report_card(world, tmp_path):
    from rich.console import Console

    from instar.report_card import build_card, render_terminal

    root, store, _ = world
    big = b"\x01" * (600 * 2 ** 20)  # the process's peak is now 600 MB above the stage's
    del big
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    summary = run_stage("sft", None, FAST + [f"model={root}/pretrain", f"out={tmp_path}/sft", "max_steps=2",
                                             "eval_every=0"], store)
    assert 100 < summary["peak_rss_mb"] < hwm - 300, (summary["peak_rss_mb"], hwm)
    assert "peak_cuda_mb" not in summary  # no GPU here
    console = Console(record=True, width=200)
    render_terminal(build_card(store, summary["run_id"]), console)
    assert f"{summary['peak_rss_mb']:,.0f} MB RAM" in console.export_text()


def test_eval_cli_json_matches_the_stage_summary(world, tmp_path, monkeypatch, capsys):
    root, store, summary = world
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in store.records("text", "val")))
    from instar import cli

    monkeypatch.setattr(sys, "argv", ["instar", "eval", str(root / "pretrain"), "--data", str(data), "--json",
                                      "--max-len", "64"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kind"] == "text" and out["n"] == len(store.records("text", "val"))
    assert set(out) >= {"loss", "bpb", "tokens"}
    assert out["loss"] == pytest.approx(summary["end"]["val_loss"], rel=1e-3)  # same rows, same model

    msgs = tmp_path / "msgs.jsonl"
    msgs.write_text("".join(json.dumps(r) + "\n" for r in store.records("messages", "val")))
    monkeypatch.setattr(sys, "argv", ["instar", "eval", str(root / "sft"), "--data", str(msgs), "--json"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kind"] == "messages" and out["loss"] > 0 and out["tokens"] > 0

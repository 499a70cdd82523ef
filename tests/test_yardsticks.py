"""The external yardsticks (instar/train/yardsticks.py): the measures on hand-made text, the shipped sets, the
model-side numbers on a tiny random model, every stage measuring them at start and end, and the report card's
"What generalises" table."""

import pytest
import torch
from train_fixtures import FAST, fill_store, tiny_model, tiny_tokenizer

from instar.train.rewards import INSTRUCTION


def test_is_drill_flags_answer_lines_and_sums_not_prose():
    from instar.train.yardsticks import is_drill

    assert is_drill("1 + 5 = 6 Answer: 6") and is_drill("Let me see.\nanswer: 12") and is_drill("12 x 3 = 36")
    assert is_drill("7-2=5") and is_drill("er: -11") and is_drill("Well.\n: 3/4")
    assert not is_drill("I am a helpful assistant.") and not is_drill("A spider has 8 legs.")
    assert not is_drill("My answer is yes: go outside.") and not is_drill("Call 555-1234 on 2-3 May.")
    assert not is_drill("Open: 9 to 5 on weekdays.") and not is_drill("Tip: drink water.")


def test_repetition_and_diversity_measures():
    from instar.train.yardsticks import distinct_n, distinct_words, rep_n

    assert rep_n("I assistant to assistant to assistant to assistant.") == pytest.approx(0.5)
    assert rep_n("The cat sat on the mat by the door.") == 0.0 and rep_n("too short") == 0.0
    assert rep_n("pup pup pup pup pup") == pytest.approx(2 / 3)
    assert distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)  # bigrams: ab bc ab bd
    assert distinct_n(["same reply"] * 10) == pytest.approx(0.1) and distinct_n([]) == 0.0
    assert distinct_words("Pup, pup. PUP pup!") == 0.25  # punctuation and case do not hide a loop


def test_the_sets_are_hand_written_and_apart_from_the_teacher_pools():
    from instar.evalsets import chat_prompts, chat_references, text_paragraphs
    from instar.generate import prompts as pools
    from instar.train.yardsticks import is_drill

    chats, paragraphs = chat_prompts(), text_paragraphs()
    assert len(chats) >= 60 and len(set(chats)) == len(chats) and not any(c.startswith("#") for c in chats)
    assert "Who are you?" in chats and not any(is_drill(c) for c in chats)
    replies = chat_references()
    assert [p for p, _ in replies] == list(chats) and not any(is_drill(r) for _, r in replies)
    assert all(3 <= len(r.split()) <= 80 for _, r in replies) and len({r for _, r in replies}) == len(replies)
    assert len(paragraphs) >= 30 and all(40 <= len(p.split()) <= 120 for p in paragraphs)
    teacher = [t.lower() for t in pools.TOPICS + pools.TASK_TYPES]
    assert not any(t in c.lower() for t in teacher for c in chats)  # no pool entry appears in a prompt


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(tok), tok


def test_language_and_conversation_numbers_on_a_tiny_model(tiny):
    from instar.evalsets import chat_prompts
    from instar.train import yardsticks

    model, tok = tiny
    lang = yardsticks.language(model, tok, max_new_tokens=6)
    assert set(lang) == {"ext_text_bpb", "ext_cont_distinct", "ext_cont_rep3"}
    assert lang["ext_text_bpb"] > 1 and 0 <= lang["ext_cont_distinct"] <= 1  # random init: many bits per byte
    seen = []

    def scorer(batch):  # the reward model's place: rows are prompt + reply, labels only on the reply
        seen.append(batch)
        return (batch["labels"] != -100).sum(1).float()
    chat = yardsticks.conversation(model, tok, scorer, max_new_tokens=5)
    assert {"ext_chat_drill", "ext_chat_rep3", "ext_chat_distinct2", "ext_chat_stop", "ext_text_bpb"} <= set(chat)
    assert 1 <= chat["ext_chat_tokens"] <= 5 and chat["ext_chat_reward"] == pytest.approx(chat["ext_chat_tokens"])
    assert sum(b["input_ids"].shape[0] for b in seen) == len(chat_prompts())
    assert chat["ext_text_bpb"] == pytest.approx(lang["ext_text_bpb"])
    assert chat["ext_chat_bpb"] > 1  # random init


def test_chat_bpb_scores_the_reference_replies_and_falls_when_they_are_learned(tiny):
    """`chat_bpb`: the bytes it divides by are exactly the replies' UTF-8 bytes (the prompts, the template and the
    end of turn carry none), and a model trained on the reference conversations finds them far more likely."""
    import copy

    from instar.evalsets import chat_references
    from instar.train import yardsticks
    from instar.train.sft import loss_fn
    from instar.train.tokens import collate, render_chat, token_bytes

    model, tok = tiny
    model = copy.deepcopy(model)
    rows = [render_chat(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
            for p, r in chat_references()]
    tbytes = token_bytes(tok)
    assert sum(float(tbytes[i]) for ids, mask in rows for i, m in zip(ids, mask) if m) == \
        sum(len(r.encode()) for _, r in chat_references())
    before = yardsticks.chat_bpb(model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate([ids for ids, _ in rows], [m for _, m in rows], tok.pad_token_id)
    for _ in range(30):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    after = yardsticks.chat_bpb(model.eval(), tok)
    assert after < 0.7 * before, (before, after)


def test_a_model_that_only_drills_scores_drill_one(tiny, monkeypatch):
    from instar.train import yardsticks
    from instar.train.sampling import Completions

    model, tok = tiny

    def drill(m, t, prompts, max_new_tokens, temperature=0.0, **kw):
        ids = torch.tensor([t("1 + 5 = 6\nAnswer: 6<|im_end|>", add_special_tokens=False)["input_ids"]] * len(prompts))
        return Completions(["1 + 5 = 6\nAnswer: 6"] * len(prompts), ids, torch.ones_like(ids), ids, torch.ones_like(ids))
    monkeypatch.setattr(yardsticks, "generate", drill)
    chat = yardsticks.conversation(model, tok)
    assert chat["ext_chat_drill"] == 1.0 and chat["ext_chat_stop"] == 1.0 and "ext_chat_reward" not in chat
    assert chat["ext_chat_distinct2"] < 0.1  # every prompt, the same reply


def test_every_stage_measures_the_yardsticks_at_start_and_end(store, tmp_path, monkeypatch):
    """Through the loop's `Stage.yardsticks` hook: once at the start and once at the end, never at the evals in
    between; stage 1 the language ones, a chat stage the chat ones, the arithmetic with `external_eval` (faked:
    278 problems x 256 tokens from a model that never stops cost ~30 s; tests/test_arithmetic.py scores it)."""
    from instar.datasets import runs
    from instar.train import run_stage, yardsticks

    asked = []
    monkeypatch.setattr(yardsticks, "external_arithmetic", lambda m, tok, instruction: asked.append(instruction)
                        or {"ext_math_acc": 0.0, "ext_math_format": 0.0})

    fill_store(store, 60, 120)
    pre = run_stage("pretrain", None, FAST + [f"out={tmp_path}/pre", "max_steps=4", "eval_every=2", "vocab_size=300"],
                    store)
    assert {"ext_text_bpb", "ext_cont_distinct", "ext_cont_rep3"} <= set(pre["start"]) & set(pre["end"])
    assert not any(k.startswith("ext_chat") for k in pre["end"])
    sft = run_stage("sft", None, FAST + [f"model={tmp_path}/pre", f"out={tmp_path}/sft", "max_steps=2",
                                         "external_eval=true", "sample_tokens=4"], store)
    assert {"ext_chat_drill", "ext_chat_rep3", "ext_chat_tokens", "ext_text_bpb", "ext_math_acc",
            "ext_math_format"} <= set(sft["end"])
    assert asked == [INSTRUCTION, INSTRUCTION]  # no run kept a prompt form: the default instruction
    assert sft["start"]["ext_text_bpb"] == pytest.approx(pre["end"]["ext_text_bpb"], rel=1e-4)  # the same model
    steps = [s for s, _ in runs.metric_series(store, pre["run_id"], "ext_text_bpb")]
    assert steps == [0, 4]  # start and end only, not at step 2's eval

    # The next chat stage from the SFT model, measured the same way, starts from SFT's end values: not measured
    # again (the arithmetic was asked twice so far, not three times) ...
    more = FAST + [f"model={tmp_path}/sft", "max_steps=1", "external_eval=true", "sample_tokens=4"]
    again = run_stage("sft", None, more + [f"out={tmp_path}/sft2"], store)
    assert asked == [INSTRUCTION] * 3 and again["start"]["ext_math_acc"] == sft["end"]["ext_math_acc"]
    assert {k: again["start"][k] for k in sft["end"] if k.startswith("ext_")} == \
        {k: v for k, v in sft["end"].items() if k.startswith("ext_")}
    # ... part by part: another reply length measures the chat part again, not the arithmetic (asked once more:
    # at the end) ...
    run_stage("sft", None, more[:-1] + ["sample_tokens=5", f"out={tmp_path}/sft3"], store)
    assert len(asked) == 4
    # ... and nothing is taken for weights that are not the ones measured.
    (tmp_path / "sft" / "model" / "model.safetensors").touch()
    run_stage("sft", None, more + [f"out={tmp_path}/sft4"], store)
    assert len(asked) == 6


def test_the_embedded_models_start_values_are_kept_in_the_cache(tmp_path, monkeypatch):
    """The embedded model has no folder of its own; its start values (the same in every run) go to the cache
    folder (conftest points INSTAR_CACHE at a temp folder), tied to the GGUF file's size and time."""
    from instar.generate import backends
    from instar.train import yardsticks

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(backends, "embedded_model_path", lambda: gguf)
    chat, math = {"chat": True, "tokens": 48}, {"math": ""}
    assert yardsticks.kept("embedded-smollm2", chat) is None
    yardsticks.remember_base("embedded-smollm2", chat, {"ext_chat_drill": 0.0})
    yardsticks.remember_base("embedded-smollm2", math, {"ext_math_acc": 0.0})
    yardsticks.remember_base(tmp_path, chat, {"ext_chat_drill": 1.0})  # not the embedded model: nothing kept
    assert yardsticks.kept("embedded-smollm2", chat) == {"ext_chat_drill": 0.0}
    assert yardsticks.kept("embedded-smollm2", math) == {"ext_math_acc": 0.0}
    assert yardsticks.kept(tmp_path, chat) is None
    gguf.write_bytes(b"GGUF, another model")
    assert yardsticks.kept("embedded-smollm2", chat) is None


def test_report_card_shows_what_generalises_as_its_own_table(store, tmp_path):
    import io

    from rich.console import Console

    from instar.datasets import runs
    from instar.report_card import build_card, report

    ext = {  # stage -> (start, end): the external numbers each stage logged, beside its own held-out ones
        "pretrain": ({"val_loss": 6.9, "ext_text_bpb": 3.51, "ext_cont_distinct": 0.02},
                     {"val_loss": 4.9, "ext_text_bpb": 3.29, "ext_cont_distinct": 0.31}),
        "sft": ({"val_loss": 6.1, "ext_chat_drill": 0.0, "ext_text_bpb": 3.29, "ext_math_acc": 0.0},
                {"val_loss": 2.3, "ext_chat_drill": 0.031, "ext_text_bpb": 3.77, "ext_math_acc": 0.04}),
        "reward": ({"pair_accuracy": 0.5}, {"pair_accuracy": 0.8}),
        "ppo": ({"reward_mean": 0.1, "ext_chat_drill": 0.031, "ext_chat_reward": 0.42},
                {"reward_mean": 0.6, "ext_chat_drill": 0.016, "ext_chat_reward": 0.77}),
        "grpo": ({"accuracy": 0.1, "ext_chat_drill": 0.016, "ext_math_acc": 0.035},
                 {"accuracy": 0.2, "ext_chat_drill": 0.02, "ext_math_acc": 0.081}),
    }
    pid = runs.start_run(store, kind="pipeline", stage="pipeline", config={}, out_dir=str(tmp_path / "pipe"))
    for stage, (start, end) in ext.items():
        rid = runs.start_run(store, kind="train", stage=stage, config={}, out_dir=f"runs/{stage}", parent_id=pid)
        runs.log_metrics(store, rid, 0, start)
        runs.log_metrics(store, rid, 50, end)
        runs.finish_run(store, rid, summary={"stage": stage, "start": start, "end": end})
    runs.finish_run(store, pid, summary={})
    cols, rows = build_card(store, pid).generalises()
    assert cols == ["0 random init", "1 pretrain", "2 SFT", "3 PPO", "4 GRPO"]  # the reward model measures none
    table = dict(rows)
    assert table["ext_text_bpb"] == [3.51, 3.29, 3.77, None, None]
    # A stage's model is the next one's start: the pretrained model's chat and arithmetic numbers come from SFT's
    # start, the SFT model's reward-model score from PPO's, the PPO model's arithmetic from GRPO's.
    assert table["ext_chat_drill"] == [None, 0.0, 0.031, 0.016, 0.02]
    assert table["ext_chat_reward"] == [None, None, 0.42, 0.77, None]
    assert table["ext_math_acc"] == [None, 0.0, 0.04, 0.035, 0.081]
    assert [k for k, _ in rows][:2] == ["ext_math_acc", "ext_chat_drill"]  # arithmetic first, as in EXTERNAL
    con = Console(file=io.StringIO(), width=220, color_system=None)
    page = report(store, pid, con).read_text()
    text = con.file.getvalue()
    assert "What generalises" in text and "chat prompts: math-drill replies" in text and "0.031" in text
    held_out = text.split("What generalises")[0]
    assert "hand-written text" not in held_out and "val loss" in held_out  # not mixed into the stages' own numbers
    assert "What generalises" in page and "hand-written text: bits/byte" in page

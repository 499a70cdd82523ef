"""`instar chat`: a tiny random model answers piped lines; `/exit`, `/reset` and EOF behave; RUN resolves."""

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console

from instar.datasets import runs
from instar.errors import InstarError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with model/, as a finished stage leaves it (tiny preset, random init)."""
    import torch

    from instar.train.models import new_model, save_model
    from instar.train.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("chat") / "runs" / "sft"
    tok = train_tokenizer(["What is 7 + 5? It is 12. The sea is blue and wide."] * 50, vocab_size=300)
    torch.manual_seed(0)
    save_model(new_model("tiny", tok, max_len=64), tok, out / "model")
    return out


def talk(source, text, **kw):
    from instar.chat import chat

    con = Console(file=io.StringIO(), width=200, color_system=None)
    turns = chat(str(source), io.StringIO(text), con, max_new_tokens=8, **kw)
    return turns, con.file.getvalue()


def test_piped_lines_get_replies_until_exit(run_dir):
    turns, out = talk(run_dir, "hello\n\nWhat is 7 + 5?\n/exit\nnever read\n")
    assert turns == 2
    assert out.count("model>") == 2


def test_eof_quits_and_reset_is_not_a_turn(run_dir):
    turns, out = talk(run_dir, "hi\n/reset\nagain", temperature=0.0)
    assert turns == 2 and "conversation forgotten" in out


def test_greedy_replies_are_reproducible(run_dir):
    assert talk(run_dir, "What is 7 + 5?\n", temperature=0.0) == talk(run_dir, "What is 7 + 5?\n", temperature=0.0)


def test_long_conversation_stays_within_context(run_dir):
    # tiny preset: 256 positions; 40 turns of ~20 tokens each would overflow without dropping old turns.
    turns, _ = talk(run_dir, "tell me about the sea and the sky and the wide blue water\n" * 40)
    assert turns == 40


def test_latest_run_resolves_to_its_model(store, run_dir):
    from instar.report_card import resolve_model

    with pytest.raises(InstarError, match="no runs"):
        resolve_model(store)
    pid = runs.start_run(store, kind="pipeline", stage="pipeline")
    rid = runs.start_run(store, kind="train", stage="sft", out_dir=str(run_dir), parent_id=pid)
    runs.start_run(store, kind="train", stage="reward", out_dir=str(run_dir.parent / "reward"), parent_id=pid)
    assert resolve_model(store) == str(run_dir)
    assert resolve_model(store, rid) == str(run_dir)
    assert resolve_model(store, str(run_dir)) == str(run_dir)
    (run_dir.parent / "pipeline.json").write_text(json.dumps({"run_id": pid}))  # a pipeline directory
    assert resolve_model(store, str(run_dir.parent)) == str(run_dir)
    pending = runs.start_run(store, kind="train", stage="ppo", out_dir=str(run_dir.parent / "ppo"))
    with pytest.raises(InstarError, match="no finished model"):
        resolve_model(store, pending)


def test_chat_command_with_piped_stdin(run_dir, db_path):
    proc = subprocess.run([sys.executable, "-m", "instar.cli", "chat", str(run_dir), "--db", str(db_path),
                           "--max-tokens", "8"], input="What is 7 + 5?\n/exit\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model>") == 1

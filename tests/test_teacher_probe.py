"""Issue 11: the in-process llama.cpp teacher on every CPU, and a native crash that never takes a run down silently.

The AMX crash (SIGILL in llama.cpp's AMX matrix kernel) only showed once a prompt was longer than a handful of
tokens, so the real-model tests here drive prompts of well over 100 tokens through the embedded teacher: on an
AMX machine they fail loudly if the extra-buffer switch ever stops applying. The crash itself is simulated by a
child that kills itself with SIGILL, driven through the real CLI entry point in a subprocess.
"""

import json
import subprocess
import sys

import pytest

from instar.errors import InstarError
from instar.generate import probe as probe_mod
from instar.generate.backends import (LlamaCppBackend, cpu_has_amx, embedded_model_path, llama_extra_buffers,
                                      load_llama)

XEON = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n"


def test_amx_is_read_from_the_cpu_flags():
    assert cpu_has_amx(XEON) and not cpu_has_amx(ZEN4)
    assert not cpu_has_amx("model name\t: something with amx_tile in its name\n")  # only the flags line counts


def test_extra_buffers_follow_the_cpu_unless_overridden(monkeypatch):
    monkeypatch.delenv("INSTAR_LLAMA_EXTRA_BUFFERS", raising=False)
    assert llama_extra_buffers() == (not cpu_has_amx())
    for value, expected in (("off", False), ("on", True), ("OFF", False)):
        monkeypatch.setenv("INSTAR_LLAMA_EXTRA_BUFFERS", value)
        assert llama_extra_buffers() is expected
    monkeypatch.setenv("INSTAR_LLAMA_EXTRA_BUFFERS", "maybe")
    with pytest.raises(InstarError, match="on, off or auto"):
        llama_extra_buffers()


def test_the_switch_reaches_llama_cpp_and_is_undone(monkeypatch):
    from llama_cpp import llama_cpp as native

    seen = []
    original = native.llama_model_default_params
    real_init = __import__("llama_cpp").Llama.__init__

    def spy(self, *args, **kwargs):
        seen.append(native.llama_model_default_params().use_extra_bufts)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr("llama_cpp.Llama.__init__", spy)
    monkeypatch.setenv("INSTAR_LLAMA_EXTRA_BUFFERS", "off")
    llm = load_llama(embedded_model_path(), n_ctx=512)
    assert seen == [False] and llm.model_params.use_extra_bufts is False
    assert native.llama_model_default_params is original


def test_a_long_prompt_runs_through_the_embedded_teacher():
    backend = LlamaCppBackend(embedded_model_path(), name="embedded", n_ctx=2048)
    out = backend.chat([{"role": "user", "content": probe_mod.PROMPT}], schema=probe_mod.SCHEMA, temperature=0.0,
                       seed=0, max_tokens=12)
    assert out.prompt_tokens >= 100
    assert "answer" in json.loads(out.text)


def test_the_probe_child_passes_on_this_machine():
    proc = subprocess.run(probe_mod.probe_command(embedded_model_path(), 2048), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["prompt_tokens"] >= 100


def test_failure_lines_name_the_cause_and_the_way_out(tmp_path):
    line = probe_mod.failure_line(tmp_path / "m.gguf", -4, "")
    assert "SIGILL" in line and "INSTAR_LLAMA_EXTRA_BUFFERS=off" in line and "--backend ollama" in line
    assert "\n" not in line
    assert "native crash" in probe_mod.failure_line(tmp_path / "m.gguf", -11, "")
    assert probe_mod.failure_line(tmp_path / "m.gguf", 1, "trace\nValueError: bad file\n").endswith("bad file")


# Loaded by every Python process of the command (sitecustomize, through PYTHONPATH): `instar run`'s teacher
# runs in a child process of its own, which a monkeypatch in the parent would not reach.
CRASHING = """
import sys
from instar.generate import probe
probe.probe_command = lambda path, n_ctx: [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
"""


@pytest.mark.parametrize("command", [["generate", "corpus", "-n", "5"],
                                     ["run", "--config", "configs/ci.toml", "--set", "data.math_sft=0"]])
def test_a_crashing_teacher_exits_2_with_one_line_and_keeps_the_store(tmp_path, store, db_path, command):
    import os
    from pathlib import Path

    from instar.datasets.store import Provenance

    store.add("text", [{"text": f"Stored document number {i} stays where it is."} for i in range(3)],
              Provenance(source="test"))
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(CRASHING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "instar.cli", *command, "--db", str(db_path),
                           *(["--set", f"out={tmp_path / 'runs'}"] if command[0] == "run" else [])],
                          capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SIGILL" in lines[0] and "Traceback" not in proc.stderr
    assert store.count("text") == 3


RECORDING = """
import os
from instar.generate import pipeline

def generate(store, gen, console=None):
    with open(os.environ["INSTAR_TEST_CALLS"], "a") as f:
        f.write(f"{os.getpid()} {gen.kind}\\n")
    return pipeline.GenerateResult(kind=gen.kind, target=gen.count, before=0, status="stopped")

pipeline.generate = generate
"""


def test_instar_run_teaches_every_kind_in_one_child_process(tmp_path, db_path):
    """The llama.cpp teacher loads (and passes its probe) once per `instar run`, in one process that is not the
    one that trains: every `generate` call of the top-up comes from the same other pid."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(RECORDING)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "INSTAR_TEST_CALLS": str(calls),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "instar.cli", "run", "--config", "configs/ci.toml", "--db",
                             str(db_path), "--set", "data.math_sft=0", "--set", f"out={tmp_path / 'runs'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env)
    _, stderr = proc.communicate(timeout=300)
    # The fake teacher stores nothing, so the run stops at the split check: one line, exit 1.
    assert proc.returncode == 1 and "needs `text` records" in stderr, stderr
    rows = [line.split() for line in calls.read_text().splitlines()]
    assert {kind for _, kind in rows} == {"corpus", "instructions", "math"}  # preference pairs: procedural here
    assert len(rows) == 15  # each kind: its target, then 4 rounds for an empty val split
    pids = {pid for pid, _ in rows}
    assert len(pids) == 1 and pids != {str(proc.pid)}


def test_a_run_whose_data_is_complete_starts_no_teacher_process(tmp_path, db_path, monkeypatch):
    """`top_up` asks `teacher_pending` first: the teacher's process (seconds of start-up) only when a kind is short,
    in `teach`'s order, with the corpus's topic requests counted as `teach` counts them."""
    from instar import pipeline_run, report
    from instar.datasets.store import Provenance, Store
    from instar.generate.requests import PER_DOCUMENT
    from instar.pipeline_run import load_pipeline_config, teacher_pending, top_up

    store = Store.open(db_path)
    cfg = load_pipeline_config(None, ["data.corpus=2", "data.instructions=1", "data.preferences=0", "data.math=0",
                                      "data.math_sft=0", f"out={tmp_path / 'runs'}"])
    assert teacher_pending(store, cfg)  # no corpus yet
    store.add("text", [{"text": f"Tide pools hold small animals, number {i}."} for i in range(2)],
              Provenance(topic="tide pools"))  # one sentence each: topic requests, no continuations
    assert teacher_pending(store, cfg)  # the requests are stored now (procedural: not instructions), the teacher's not
    assert store.count("messages") == store.count("messages", procedural=True) == 2 * PER_DOCUMENT
    drill = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Answer: 4"}]
    store.add("messages", [{"messages": drill}], Provenance(source="procedural"))
    assert teacher_pending(store, cfg)  # an SFT math conversation is not one of the teacher's either
    hello = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    store.add("messages", [{"messages": hello}])
    assert not teacher_pending(store, cfg)

    monkeypatch.setattr(pipeline_run, "in_child", lambda *a, **k: pytest.fail("a teacher process was started"))
    assert top_up(store, cfg, None, report.console)["messages"] == 2 * PER_DOCUMENT + 2

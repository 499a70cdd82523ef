"""Process set-up (`instar.runtime`): OpenMP's wait policy is chosen by an explicit call at start-up, never as an
import side effect; llama.cpp in the process or a busy machine means PASSIVE; the user's own choice is kept."""

import os
import subprocess
import sys


def test_importing_the_trainer_sets_no_policy():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, instar.train; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"  # it chose here before
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "unset"


def test_start_chooses_only_for_commands_that_load_torch(monkeypatch):
    from instar import runtime

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(runtime, "cpu_busy", lambda: True)
    assert runtime.start(["data", "stats"]) == "default" and "OMP_WAIT_POLICY" not in os.environ
    assert runtime.start(["--db", "x.db"]) == "default"
    assert runtime.start(["train", "sft", "--set", "lr=1"]) == "PASSIVE"


def test_openmp_wait_policy_sleeps_for_llama_cpp_or_a_busy_machine_and_keeps_the_users_choice(monkeypatch):
    from instar import runtime

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(runtime, "cpu_busy", lambda: False)
    assert runtime.choose_openmp_wait_policy() == "default" and "OMP_WAIT_POLICY" not in os.environ
    assert runtime.choose_openmp_wait_policy(llama_cpp=True) == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(runtime, "cpu_busy", lambda: True)
    assert runtime.choose_openmp_wait_policy() == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert runtime.choose_openmp_wait_policy(llama_cpp=True) == "ACTIVE"


def test_cpu_busy_sees_a_spinning_process():
    import subprocess
    import sys

    from instar import runtime

    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert runtime.cpu_busy(window=0.5)
    finally:
        spin.kill()
        spin.wait()


def test_in_child_returns_the_value_and_brings_errors_and_crashes_back_as_one_line(tmp_path):
    import pytest

    from instar import runtime
    from instar.datasets.store import Store
    from instar.errors import InstarError

    assert runtime.in_child(os.getpid) != os.getpid()  # a value back, from another process
    with pytest.raises(InstarError, match="database path is a directory"):  # the child's InstarError, as itself
        runtime.in_child(Store.open, str(tmp_path))
    with pytest.raises(InstarError, match=r"^the teacher crashed \(SIGABRT\) in its own process; what it stored"):
        runtime.in_child(os.abort, what="the teacher")  # a native crash: one line, not a dead parent

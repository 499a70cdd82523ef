"""Process set-up, done once at start-up by `cli.main` before torch or llama.cpp can load: OpenMP's wait policy,
and Python's fault handler; and work that needs a process of its own.

    runtime.start(["train", "sft"])                # the CLI's arguments; chooses the policy for torch commands
    runtime.choose_openmp_wait_policy(llama_cpp=True)   # before llama_cpp is imported (generate/backends.py)
    runtime.in_child(fn, *args, what="the teacher")     # fn(*args) in a fresh (spawned) process: its value back

Both libraries load libgomp once per process and read OMP_WAIT_POLICY then, so the choice must come first; it is
an explicit call, never an import side effect. A value the user set in the environment is always kept.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time

from instar.errors import InstarError

# Commands that load torch in this process (OpenMP's first reader). `generate` chooses when it imports llama.cpp;
# `run` runs a llama.cpp teacher in a child process (`in_child`), which chooses there.
TORCH_COMMANDS = {"train", "eval", "run", "chat", "export"}


def start(argv: list[str]) -> str:
    """Set the process up for the command in `argv` (the CLI's arguments); returns the OpenMP policy in force."""
    try:  # a native crash (llama.cpp, torch) prints where it happened instead of dying silently
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr is not a real file (captured, as in tests)
        pass
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in TORCH_COMMANDS:
        return choose_openmp_wait_policy()
    return os.environ.get("OMP_WAIT_POLICY", "default")


def choose_openmp_wait_policy(llama_cpp: bool = False) -> str:
    """Set OMP_WAIT_POLICY before torch or llama.cpp loads libgomp (one copy per process, which reads it once);
    a value the user set is kept. Returns the policy in force.

    PASSIVE (idle OpenMP threads sleep) whenever llama.cpp will run in this process: with spinning threads its
    first grammar-constrained call stalled 10-200 s in 11 of 12 fresh processes (measured on this project's 2-core
    machines; docs/measured-facts.md). For torch alone it depends on the machine, measured on GRPO steps (2 cores, 2
    threads): on a quiet machine spinning is 1.6x faster (0.15 vs 0.245 s/step), with one other busy process PASSIVE
    is 2.2x faster (0.26 vs 0.56), with two 2.4x (0.28 vs 0.68). So: PASSIVE unless the CPU is idle now."""
    if "OMP_WAIT_POLICY" not in os.environ and (llama_cpp or cpu_busy()):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "default")


def cpu_busy(window: float = 0.2) -> bool:
    """Other processes use more than a quarter of a core over `window` seconds (Linux /proc/stat; elsewhere
    the 1-minute load average against the same quarter core)."""

    def idle_total() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    cores = os.cpu_count() or 1
    try:
        i0, t0 = idle_total()
        time.sleep(window)
        i1, t1 = idle_total()
        used = cores * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        used = os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
    return used > 0.25


def in_child(fn, *args, what: str = "a child process"):
    """`fn(*args)` in a fresh Python process (multiprocessing's "spawn": nothing of this one's native state, such as
    its OpenMP, is inherited); returns its value. `fn` must be a module-level function and its arguments and value
    picklable. An `InstarError` raised there is raised here as itself; Ctrl-C reaches both processes (the child
    stops the way `fn` does on Ctrl-C, then this one raises KeyboardInterrupt); a child killed by a signal (a
    native crash, the OOM killer) is one line naming `what` and the signal. Any other exception in the child is
    a bug: its traceback prints there and this one raises RuntimeError."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(fn, args, send), name=f"instar: {what}")
    child.start()
    send.close()  # the child holds the only write end now: its death ends recv() with EOFError
    try:
        try:
            kind, value = receive.recv()
        except EOFError:
            kind, value = "died", None
    except KeyboardInterrupt:
        child.join()  # it got the same Ctrl-C: let it keep what it finished
        raise
    child.join()
    if kind == "value":
        return value
    if kind == "error":
        raise value
    if kind == "interrupted":
        raise KeyboardInterrupt
    code = child.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        raise InstarError(f"{what} crashed ({name}) in its own process; what it stored is kept: run the same "
                          "command again to go on")
    raise RuntimeError(f"{what} failed in its own process (exit code {code}): see its traceback above")


def _child(fn, args, conn) -> None:
    try:
        message = ("value", fn(*args))
    except KeyboardInterrupt:
        message = ("interrupted", None)
    except InstarError as e:
        message = ("error", e)
    conn.send(message)
    conn.close()

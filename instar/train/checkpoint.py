"""Training state on disk: atomic checkpoints (weights + optimizer/scheduler/RNG/step) and the run's summary.

    save_checkpoint(dir, model, state) / load_checkpoint(dir, model) -> state    atomic; corrupt -> InstarError
    has_checkpoint(dir)         a checkpoint is there (completing a save killed between its renames)
    finished_summary(out) / write_summary(out, summary)

Weights go to safetensors and the rest to a `torch.save` of plain tensors/numbers/strings, read back with
`torch.load(weights_only=True)`: a checkpoint can never execute code. Atomic against a killed process (temp
folder + renames), not against power loss (no fsync).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from instar.errors import InstarError
from instar.train.models import unwrap


def save_checkpoint(path: str | Path, model, state: dict, trainable_only: bool = False) -> None:
    """Atomically write <path>/model.safetensors (the weights of `model`, unwrapped; with `trainable_only` just
    the parameters that train, e.g. LoRA adapters: 19 MB instead of 540 MB for SmolLM2) and <path>/state.pt
    (`state`: optimizer, scheduler, RNG, step, data position... — tensors, numbers, strings, dicts and lists
    only, so `torch.load(weights_only=True)` reads it). Writes a temp folder, then renames."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    m = unwrap(model)
    keep = {k for k, p in m.named_parameters() if p.requires_grad} if trainable_only else None
    weights = {k: v.detach().contiguous().cpu() for k, v in m.state_dict().items() if keep is None or k in keep}
    state = {**state, "trainable_only": trainable_only}
    # Tied embeddings share storage; safetensors refuses shared tensors, so store each once.
    seen: dict[int, str] = {}
    for k in list(weights):
        ptr = weights[k].data_ptr()
        if ptr in seen:
            del weights[k]
        else:
            seen[ptr] = k
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    # A directory cannot replace another in one rename: checkpoint -> .old, .tmp -> checkpoint, drop .old.
    # A process killed between the two renames leaves .old and a complete .tmp: `has_checkpoint` finishes the job.
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a checkpoint, after completing a save that was killed between its two renames."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        # .old exists only once .tmp was complete, so .tmp is the newer checkpoint
        os.replace(tmp if (tmp / "state.pt").exists() else old, path)
    return (path / "state.pt").exists() or (path / "model.safetensors").exists()


def load_checkpoint(path: str | Path, model) -> dict:
    """Load weights saved by `save_checkpoint` into `model` (built the same way) and return the state dict."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        weights = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        target = unwrap(model)
        missing, unexpected = target.load_state_dict(weights, strict=False)
        # Tied weights were stored once: a missing key is fine only if it is tied to a loaded one (or frozen,
        # for a trainable-only checkpoint: frozen weights come from the base model, rebuilt the same way).
        tied = set(getattr(target, "_tied_weights_keys", None) or [])
        frozen = {k for k, p in target.named_parameters() if not p.requires_grad} if state.get("trainable_only") \
            else set()
        missing = [k for k in missing if k not in tied and k not in frozen and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    except Exception as e:  # safetensors/pickle/shape errors all mean the same thing to a user
        raise InstarError(f"corrupt or incompatible checkpoint {path}: {str(e).splitlines()[0][:200]} "
                          f"(delete it to start over)") from None
    return state


def finished_summary(out: str | Path) -> dict | None:
    """The summary of a finished run in `out` (model/ and summary.json present), else None."""
    out = Path(out)
    if (out / "summary.json").exists() and (out / "model" / "config.json").exists():
        return json.loads((out / "summary.json").read_text())
    return None


def write_summary(out: str | Path, summary: dict) -> None:
    out = Path(out)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "summary.json")

"""Training stages behind one entry point: `run_stage("sft", config_path, sets, store) -> summary dict`.

Each stage is a module `instar/train/<stage>.py` with a `Config` (a `config.TrainConfig` subclass) and
`run(cfg, store) -> summary`; modules are imported lazily so `instar --help` never pays for torch.
`instar train STAGE [--config FILE] [--set key=value ...]` calls `run_stage`. A config file may hold the
stage's keys at the top level or under a `[train.<stage>]` / `[<stage>]` table (so one file can serve `instar run`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from instar.errors import ConfigError

STAGES = {
    "pretrain": "instar.train.pretrain",
    "sft": "instar.train.sft",
    "reward": "instar.train.reward",
    "ppo": "instar.train.ppo",
    "dpo": "instar.train.dpo",
    "grpo": "instar.train.grpo",
}


def stage_module(stage: str):
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
    try:
        return importlib.import_module(STAGES[stage])
    except ModuleNotFoundError as e:
        if e.name == STAGES[stage]:
            raise ConfigError(f"stage {stage!r} is not implemented yet") from None
        raise


def load_stage_config(stage: str, config_path: Path | None = None, sets: list[str] | None = None):
    """The stage's validated Config: defaults <- file (top level or its [train.<stage>]/[<stage>] table) <- sets."""
    from instar.config import apply_overrides, read_toml, validate

    module = stage_module(stage)
    data: dict = {}
    if config_path is not None:
        raw = read_toml(config_path)
        if isinstance(raw.get("train"), dict):  # an `instar run` file: [train.<stage>]
            data = dict(raw["train"].get(stage, {}))
        else:
            data = dict(raw.get(stage, raw)) if isinstance(raw.get(stage, raw), dict) else raw
    data = apply_overrides(data, sets or [])
    return validate(module.Config, data, source=str(config_path) if config_path else "config")


def run_stage(stage: str, config_path: Path | None = None, sets: list[str] | None = None, store=None) -> dict:
    """Load the stage's Config and run it against `store`; return its summary (see config.TrainConfig)."""
    return train_stage(stage, load_stage_config(stage, config_path, sets), store)


def train_stage(stage: str, cfg, store, **hooks) -> dict:
    """Run a stage with a validated Config (`instar train` and `instar run` alike); a run that stops early is
    marked `interrupted` (Ctrl-C) or `failed` (anything else) in the runs table, never left `running`.
    `hooks` go to the stage's `run` (tests plant a reward with `scorer=`)."""
    try:
        return stage_module(stage).run(cfg, store, **hooks)
    except BaseException as e:
        mark_stopped(store, Path(cfg.out), "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise


def mark_stopped(store, out: Path, status: str) -> None:
    """Set the status of the run recorded in <out>/run.json, if it is still marked running."""
    import json

    from instar.datasets import runs

    marker = out / "run.json"
    if store is None or not marker.exists():
        return
    run_id = json.loads(marker.read_text()).get("run_id")
    run = runs.get_run(store, run_id) if run_id else None
    if run and run["status"] == "running":
        runs.finish_run(store, run_id, status=status)

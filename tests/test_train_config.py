"""Stage configs: one source for every default. `instar/configs/default.toml`'s [train.<stage>] tables hold only
what the default run sets differently from the stage's own Config default (which `instar train STAGE` uses), so
a value never lives in two places that can drift apart; and every stage Config refuses what it cannot honour."""

import tomllib
from importlib import resources

import pytest

from instar.train import STAGES, stage_module


def test_default_toml_sets_only_what_differs_from_the_stage_defaults():
    default = tomllib.loads(resources.files("instar").joinpath("configs/default.toml").read_text(encoding="utf-8"))
    for stage, table in default.get("train", {}).items():
        fields = stage_module(stage).Config.model_fields
        for key, value in table.items():
            assert key in fields, f"[train.{stage}] {key}: not a key of the stage"
            field = fields[key]
            own = field.default_factory() if field.default_factory else field.default
            assert value != own, f"[train.{stage}] {key} = {value!r} repeats the stage's default: drop it"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_default_config_validates_and_names_what_it_refuses(stage):
    config = stage_module(stage).Config
    cfg = config()
    assert set(config.unsupported) <= set(config.model_fields)  # only inherited keys can be refused
    assert cfg.out == f"runs/{stage}"
    # What a run records (summary.json, the run row) is itself a config the stage accepts: copy it, change a key,
    # train again (the refused keys would each stop the run with "does not use").
    recorded = cfg.recorded()
    assert not set(config.unsupported) & set(recorded) and config(**recorded) == cfg

"""Configs: TOML + `--set key=value` into strict pydantic models; every mistake is a one-line ConfigError (exit 2)."""

import pytest
from pydantic import Field

from instar.config import StrictConfig, apply_overrides, deep_merge, load_config, parse_value
from instar.errors import ConfigError, InstarError


class Optim(StrictConfig):
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate.")
    betas: list[float] = [0.9, 0.95]


class Stage(StrictConfig):
    name: str = "sft"
    steps: int = 100
    bf16: bool = True
    optim: Optim = Optim()


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_file_and_overrides_in_order(tmp_path):
    assert load_config(Stage) == Stage()
    path = write(tmp_path, 'steps = 50\nname = "dpo"\n[optim]\nlr = 1e-3\n')
    cfg = load_config(Stage, path, ["steps=7", "optim.betas=[0.8, 0.99]"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("dpo", 7, 1e-3, [0.8, 0.99])


def test_unknown_key_is_a_config_error_with_exit_code_2(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'stpes'") as e:
        load_config(Stage, None, ["stpes=3"])
    assert e.value.exit_code == 2 and isinstance(e.value, InstarError)
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key 'optim\.momentum'"):
        load_config(Stage, write(tmp_path, "[optim]\nmomentum = 0.9\n"))


@pytest.mark.parametrize("override, message", [
    ("steps=many", "steps: Input should be a valid integer"),
    ("steps=1.5", "steps: Input should be a valid integer"),
    ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
    ("bf16=maybe", "bf16: Input should be a valid boolean"),
    ("optim=3", "optim: Input should be a valid dictionary"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Stage, None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_set_syntax_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(Stage, None, ["steps"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(Stage, None, ["=3"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Stage, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(Stage, write(tmp_path, "steps = = 3\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Stage, tmp_path)  # a directory


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("1e-4", 1e-4), ("0.5", 0.5), ("true", True), ("false", False),
    ("[1, 2]", [1, 2]), ('"quoted"', "quoted"), ("plain words", "plain words"), ("sft", "sft"),
    ("runs/sft", "runs/sft"), ("", ""), ("{a = 1}", {"a": 1}),
])
def test_value_parsing(text, value):
    assert parse_value(text) == value


def test_value_with_equals_sign_and_spaces():
    cfg = apply_overrides({}, [" name = a=b "])
    assert cfg == {"name": "a=b"}


def test_overrides_do_not_mutate_their_input():
    base = {"optim": {"lr": 1.0, "betas": [0.9]}}
    out = apply_overrides(base, ["optim.lr=2.0", "new.deep.key=1"])
    assert base == {"optim": {"lr": 1.0, "betas": [0.9]}}
    assert out == {"optim": {"lr": 2.0, "betas": [0.9]}, "new": {"deep": {"key": 1}}}


def test_nested_tables_merge_deeply_over_base(tmp_path):
    base = {"steps": 10, "optim": {"lr": 0.1, "betas": [0.5, 0.5]}}
    cfg = load_config(Stage, write(tmp_path, "[optim]\nlr = 0.2\n"), base=base)
    assert cfg.steps == 10 and cfg.optim.lr == 0.2 and cfg.optim.betas == [0.5, 0.5]  # betas kept, not replaced
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}
    assert deep_merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}  # a scalar replaces a table


def test_resolved_config_dumps_for_storage():
    cfg = load_config(Stage, None, ["optim.lr=1e-3"])
    assert Stage.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ValueError):
        cfg.steps = "lots"  # validate_assignment


@pytest.mark.parametrize("name", ["ci.toml", "smollm2.toml"])
def test_shipped_configs_load_and_validate_every_stage(name):
    """A misspelt key in a config the README tells users to run would only surface when they ran it."""
    from pathlib import Path

    from instar.pipeline_run import load_pipeline_config, stage_configs

    path = Path(__file__).parent.parent / "configs" / name
    cfgs = stage_configs(load_pipeline_config(path, ["out=x"]))
    assert "grpo" in cfgs and all(c.out.startswith("x") for c in cfgs.values())

"""Configs: TOML files plus `--set key=value` overrides, validated by small pydantic models.

Every config class derives from `StrictConfig` (unknown keys are errors, as in nanoGPT's configurator).
`load_config(Model, path, sets)` merges, in order: the model's defaults, a `base` dict, the TOML file, the
overrides; nested tables merge key by key (a TOML `[sft]` table with only `lr` keeps the base's other keys).
Dotted keys (`--set stages.sft.lr=1e-4`) address nested tables. A value is parsed as a TOML literal
when it is one (`3`, `1e-4`, `true`, `[1, 2]`, `"text"`) and kept as a plain string otherwise.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from instar.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StrictConfig(BaseModel):
    """Base for every config: unknown keys fail, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_value(text: str) -> Any:
    """`"3"` -> 3, `"1e-4"` -> 0.0001, `"true"` -> True, `"abc"` -> "abc"."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, sets: list[str]) -> dict:
    """Apply `key=value` strings (dotted keys for nested tables) to a copy of `data`."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = parse_value(value.strip())
    return data


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, recursively: nested tables merge key by key instead of replacing each other."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8
        raise ConfigError(f"cannot read config file {path}: {e}") from None


def validate(model: type[T], data: dict, source: str = "config") -> T:
    """Validate `data` into `model`, turning pydantic's report into one line naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown key {key!r}") from None
        if not err["loc"]:  # a check across keys (a model validator): its message names them
            raise ConfigError(f"{source}: {err['msg'].removeprefix('Value error, ')}") from None
        raise ConfigError(f"{source}: {key}: {err['msg']}") from None


def load_config(model: type[T], path: Path | None = None, sets: list[str] | None = None,
                base: dict | None = None) -> T:
    """Defaults <- `base` <- TOML file at `path` <- `sets`, validated into `model`."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_toml(path))
    data = apply_overrides(data, sets or [])
    return validate(model, data, source=str(path) if path else "config")

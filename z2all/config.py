"""Typed configuration: dataclasses with defaults < a TOML preset < `--section.key=value` overrides.

Every stage owns one dataclass (its `Config`); nested dataclasses are its sections. Each field carries
its help text in `metadata["help"]` (use `opt()`), which the CLI turns into `--help` output, so no option
is ever undocumented. Unknown keys, from TOML or the command line, are errors naming the key.

    @dataclass
    class OptimConfig:
        lr: float = opt(3e-4, "peak learning rate")

    @dataclass
    class TrainConfig:
        out_dir: str = opt("runs/demo", "where checkpoints and metrics go")
        optim: OptimConfig = section(OptimConfig, "optimizer")

    cfg = load_config(TrainConfig, "configs/demo_cpu.toml", ["optim.lr=1e-3"])
    save_config(cfg, "runs/demo/config.json")      # the resolved config, next to the artifact
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from z2all.utils import UserError

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

T = TypeVar("T")




def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, positional: bool = False,
        choices: tuple | None = None):
    """A config field with help text. `factory` for mutable defaults (lists); `positional` makes the CLI
    take it as a positional argument; `choices` restricts (and documents) the accepted values."""
    if not help:
        raise ValueError("every config option needs help text")
    meta = {"help": help, "positional": positional, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str):
    """A nested dataclass section (a TOML table, `--name.key=` on the command line)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(f: dataclasses.Field, hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) if isinstance(hint, type) else False


def leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf option of a config class as (dotted key, field, type hint), sections flattened."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        key = prefix + f.name
        if _is_section(f, hint):
            out.extend(leaves(hint, key + "."))
        else:
            out.append((key, f, hint))
    return out


def strip_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or raise UserError."""
    base, optional = strip_optional(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or value is None:
            return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str):
                return int(value.replace("_", ""))
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
        origin = typing.get_origin(base)
        if origin in (list, tuple):
            (item,) = typing.get_args(base)[:1] or (str,)
            if isinstance(value, str):
                value = [v for v in (s.strip() for s in value.split(",")) if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            items = [coerce(key, v, item) for v in value]
            return items if origin is list else tuple(items)
        if origin is dict or base is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise UserError(f"config key '{key}': cannot read {value!r} as {getattr(base, '__name__', base)}") from None
    return value


def _check_choice(key: str, f: dataclasses.Field, value: Any) -> None:
    choices = f.metadata.get("choices")
    if choices and value is not None and value not in choices:
        raise UserError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")


def _apply(cfg: Any, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            known = ", ".join(sorted(names))
            sect = ".".join(parts[:i]) or "top level"
            raise UserError(f"unknown config key '{key}' ({where}); known keys at {sect}: {known}")
        f = names[part]
        hint = _hints(type(obj))[part]
        if i == len(parts) - 1:
            if _is_section(f, hint):
                if not isinstance(value, dict):
                    raise UserError(f"config key '{key}' is a section; set its keys, e.g. {key}.<name>=...")
                for k, v in value.items():
                    _apply(cfg, f"{key}.{k}", v, where)
                return
            value = coerce(key, value, hint)
            _check_choice(key, f, value)
            setattr(obj, part, value)
            return
        if not _is_section(f, hint):
            raise UserError(f"unknown config key '{key}' ({where}): '{'.'.join(parts[: i + 1])}' is not a section")
        obj = getattr(obj, part)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((prefix + k, v))
    return out


def parse_overrides(items: list[str] | dict[str, Any] | None) -> list[tuple[str, Any]]:
    """`["optim.lr=1e-3", "--data.workers=2"]` or `{"optim.lr": 1e-3}` -> [(key, value)]."""
    if not items:
        return []
    if isinstance(items, dict):
        return list(items.items())
    out = []
    for item in items:
        s = item[2:] if item.startswith("--") else item
        if "=" not in s:
            raise UserError(f"override '{item}' must look like section.key=value")
        k, v = s.split("=", 1)
        out.append((k.strip().replace("-", "_"), v))
    return out


def load_config(cls: type[T], toml_path: str | os.PathLike | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> T:
    """Defaults, then the TOML file, then overrides (later wins). Raises UserError on unknown keys."""
    cfg = cls()
    if toml_path:
        path = Path(toml_path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "not found"
            raise UserError(f"config file {path} {what}; give a TOML file (--config)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: invalid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}); a --config file is TOML") from None
        except OSError as e:
            raise UserError(f"config file {path} cannot be read ({e.strerror})") from None
        for key, value in _flatten(data):
            _apply(cfg, key, value, f"in {path}")
    for key, value in parse_overrides(overrides):
        _apply(cfg, key, value, "on the command line")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config from `to_dict` output (e.g. a saved config.json); unknown keys are errors."""
    return load_config(cls, None, dict(_flatten(data)))


def save_config(cfg: Any, path: str | os.PathLike, **extra: Any) -> None:
    """Save the resolved config as JSON (plus `extra` provenance, e.g. versions, inputs), atomically."""
    from z2all import __version__

    data = {"z2all_version": __version__, "config": to_dict(cfg), **extra}
    from z2all.io import atomic_write_json

    atomic_write_json(path, data)

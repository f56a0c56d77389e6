"""YAML -> validated config dataclasses. Every error names the file, the field's full path,
the bad value and what is allowed; an unknown key suggests the nearest valid one."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from fluxion_dist.config.schema import ByteSize, DeployConfig
from fluxion_dist.errors import ConfigError

T = TypeVar("T")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: Any) -> int:
    """``4096``, ``"512MiB"``, ``"1.5GiB"`` or ``"2GB"`` -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).upper() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    raise ValueError("a byte size: an integer or a string like '512MiB', '64GiB', '2GB'")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is ByteSize:
        try:
            return parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{path}: {value!r} is not {e}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {value!r} is not a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: {value!r} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {value!r} is not a string")
        return value
    raise TypeError(f"config schema uses an unsupported type {tp!r} at {path}")


def _check_range(f: dataclasses.Field, value: Any, path: str) -> None:
    if value is None or not isinstance(value, (int, float)):
        return
    md = f.metadata
    if "ge" in md and value < md["ge"]:
        raise ConfigError(f"{path}: {value!r} is out of range; must be >= {md['ge']}")
    if "gt" in md and value <= md["gt"]:
        raise ConfigError(f"{path}: {value!r} is out of range; must be > {md['gt']}")
    if "le" in md and value > md["le"]:
        raise ConfigError(f"{path}: {value!r} is out of range; must be <= {md['le']}")


def _build(cls: type[T], data: Any, path: str) -> T:
    where = path or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            full = f"{path}.{key}" if path else str(key)
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{full}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            full = f"{path}.{name}" if path else name
            kwargs[name] = _convert(hints[name], data[name], full)
            _check_range(f, kwargs[name], full)
    return cls(**kwargs)


def config_from_dict(data: Any, cls: type[T] = DeployConfig) -> T:
    return _build(cls, data, "")


def parse_overrides(items: list[str]) -> dict:
    """Command-line ``--sparse KEY=VALUE`` items -> typed values (YAML scalars), for
    :func:`config_from_dict` to validate: ``["floor_fraction=0.5", "head_predictor=false"]``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--sparse expects KEY=VALUE; got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_config(path: str | Path, cls: type[T] = DeployConfig) -> T:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    try:
        return config_from_dict(data, cls)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls: type = DeployConfig, prefix: str = "") -> list[str]:
    """One line per field: path, type, default and documentation (for `fluxion-dist validate --help-fields`)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, full + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{full}: {_type_name(tp)} = {default!r}  # {f.metadata.get('doc', '')}")
    return lines

"""Print the configuration reference (markdown) from the schema's field docs.

Every field of ``fluxion_dist/config/schema.py`` carries ``metadata=doc(text, ge=..., ...)``;
this walks the dataclasses from ``DeployConfig`` down and prints one table per section.
Paste its output into the README's "Configuration reference":

    python scripts/gen_config_reference.py
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxion_dist.config import schema  # noqa: E402

_LIMITS = (("ge", ">="), ("gt", ">"), ("le", "<="))


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(tp)).replace("'", "`")
    if tp is schema.ByteSize:
        return "bytes (`\"64GiB\"`)"
    args = typing.get_args(tp)
    if args:
        return " \\| ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 20 and v % (1 << 20) == 0:
            return f"`{v >> 20}MiB`"
        return "`null`" if v is None else f"`{v}`"
    return ""


def _num(v: float) -> str:
    if isinstance(v, int) and v >= 1 << 20 and v % (1 << 20) == 0:
        return f"{v >> 20}MiB"
    return f"{v:g}"


def _section(prefix: str, cls, out: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((f"{prefix}.{f.name}" if prefix else f.name, tp, f.metadata.get("doc", "")))
            continue
        limits = ", ".join(f"{s} {_num(f.metadata[k])}" for k, s in _LIMITS if k in f.metadata)
        text = f.metadata.get("doc", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_type_name(tp)} | {_default(f)} | {limits} | {text} |")
    if rows:
        out += [f"#### `{prefix}`", "", "| field | type | default | range | meaning |",
                "| --- | --- | --- | --- | --- |", *rows, ""]
    for name, tp, _ in nested:
        _section(name, tp, out)


def main() -> None:
    out: list[str] = []
    _section("", schema.DeployConfig, out)
    print("\n".join(out).rstrip())


if __name__ == "__main__":
    main()

"""The package layering: a lower layer never imports a higher one.

Layers, lowest first: the core library (attention, kernels, cpu, sparse, hybrid, model,
config, quality, ...), then ``kv_store``, then the workers, then ``fluxion_dist.server`` and
the CLI, which deploy the workers. Checked on every module's imports, read with ``ast``
(function-local imports included), so an arrow back up fails here before it becomes a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package (a path prefix under the repo) -> modules it must not import (dotted prefixes)
FORBIDDEN = {
    "kv_store": ("fluxion_dist.server", "fluxion_dist.cli", "prefill_worker", "decode_worker"),
    "prefill_worker": ("fluxion_dist.server", "fluxion_dist.cli", "decode_worker"),
    "decode_worker": ("fluxion_dist.server", "fluxion_dist.cli", "prefill_worker"),
}
_CORE_EXCEPT = ("fluxion_dist/server", "fluxion_dist/cli.py")
_CORE_FORBIDDEN = ("fluxion_dist.server", "fluxion_dist.cli", "prefill_worker", "decode_worker")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _violations(files, forbidden) -> list[str]:
    return [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod in _imports(f)
            if any(mod == bad or mod.startswith(bad + ".") for bad in forbidden)]


def test_workers_and_store_never_import_the_server():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        bad += _violations(sorted((ROOT / package).rglob("*.py")), forbidden)
    assert not bad, "lower layer imports a higher one:\n" + "\n".join(bad)


def test_core_library_imports_no_worker_or_server():
    files = [f for f in sorted((ROOT / "fluxion_dist").rglob("*.py"))
             if not str(f.relative_to(ROOT)).startswith(_CORE_EXCEPT)]
    bad = _violations(files, _CORE_FORBIDDEN)
    assert not bad, "core library imports a higher layer:\n" + "\n".join(bad)


def test_the_check_sees_imports():
    """The walker finds module-level and function-local imports (a check that reads nothing passes)."""
    found = {mod for _, mod in _imports(ROOT / "fluxion_dist" / "cli.py")}
    assert "fluxion_dist.server" in found

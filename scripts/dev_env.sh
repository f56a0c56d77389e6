#!/usr/bin/env bash
# Create (once) and refresh the project's virtual environment in .venv, then activate it.
# Sourced by run_demo.sh and run_tests.sh; reinstalls only when packaging or Cython sources change.
# Sourced into a user's shell: the caller's shell options stay as they were (the strict-mode
# work runs in a subshell), and a failure returns non-zero instead of closing the terminal.
_fluxion_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_fluxion_venv="${FLUXION_VENV:-$_fluxion_root/.venv}"
if (
  set -euo pipefail
  root="$_fluxion_root" venv="$_fluxion_venv" python="${PYTHON:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[dev_env] creating $venv" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
  fi
  stamp="$venv/.fluxion-install-stamp"
  want="$(cd "$root" && cat setup.cfg setup.py pyproject.toml $(ls fluxion_dist/cpu/*.pyx fluxion_dist/cpu/*.pxd fluxion_dist/cpu/*.h 2>/dev/null) | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[dev_env] installing fluxion-dist[dev] into $venv (first time: a few minutes)" >&2
    (cd "$root" && "$venv/bin/python" -m pip install -q -e ".[dev]")
    echo "$want" > "$stamp"
  fi
); then
  # Ray replaces 127.0.0.1 with the external address unless told not to; no usage reports leave the machine.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
  # shellcheck disable=SC1091
  source "$_fluxion_venv/bin/activate"
  unset _fluxion_root _fluxion_venv
else
  echo "[dev_env] setting up $_fluxion_venv failed; your shell is unchanged" >&2
  unset _fluxion_root _fluxion_venv
  return 1 2>/dev/null || exit 1
fi

#!/usr/bin/env bash
# The README's test command: set up .venv, then run the whole suite (GPU tests skip without a device).
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m "not cluster"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/dev_env.sh"
cd "$root"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$rc"

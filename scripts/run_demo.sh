#!/usr/bin/env bash
# The README's run command: set up .venv, then run the single-machine demo deployment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/dev_env.sh"
cd "$root"
exec fluxion-dist demo "${1:-cluster_configs/deploy_cpu_quality.yaml}"

#!/usr/bin/env python3
"""Load generator for OpenAI-compatible /v1/completions endpoints (streaming SSE).

    python scripts/loadgen.py --base-url http://127.0.0.1:8000 --num-prompts 50 \\
        --input-len 64:256 --output-len 32 --request-rate 4 --burstiness 0.5 \\
        --goodput ttft:500 tpot:50 --result-dir out/bench
    python scripts/loadgen.py --max-concurrency 8 --num-prompts 64      # closed loop
    python scripts/loadgen.py --sweep 1,2,4,inf --num-prompts 40        # one JSON per rate + summary

Results use the key names of `vllm bench serve`; see scripts/loadgen_lib/.
Only loopback endpoints are loaded unless --allow-remote is given.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen_lib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

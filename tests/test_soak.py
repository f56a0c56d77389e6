"""The soak in its short form: mixed load on the CPU demo deployment with a decode worker stopped past
the router's deadline, then killed, and clients hanging up mid-stream."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_soak_loses_no_request_and_leaks_nothing():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/soak.py"), "--duration", "20", "--concurrency", "4",
                          "--max-requests", "400"], capture_output=True, text=True, timeout=400)
    report = "\n".join(line for line in out.stdout.splitlines() if line.startswith("[soak]"))
    assert out.returncode == 0, report + out.stderr[-3000:]
    assert "FAIL" not in report and report.count("PASS") == 4, report

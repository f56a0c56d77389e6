"""`fluxion-dist serve|status|shutdown` as a user runs them, in separate processes: the local
cluster takes only its own token, `status` and `shutdown` find it without `--address`; and
`source scripts/dev_env.sh` leaves the caller's shell as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = "cluster_configs/deploy_cpu_demo.yaml"


def _cli(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "fluxion_dist.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _join_without_token(address: str, env: dict) -> subprocess.CompletedProcess:
    code = (f"import ray; ray.init(address={address!r}); "
            "print('JOINED', ray.get(ray.remote(lambda: 1).remote(), timeout=20))")
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bare.update(RAY_gcs_rpc_server_connect_timeout_s="3", HOME=env["FLUXION_STATE_DIR"])
    return subprocess.run([sys.executable, "-c", code], env=bare, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_serve_status_shutdown_find_the_local_cluster_which_takes_only_its_token(tmp_path):
    env = {**os.environ, "FLUXION_STATE_DIR": str(tmp_path / "state"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    assert _cli("status", DEMO, env=env).returncode == 1  # nothing running: says so, starts nothing
    serve = subprocess.Popen([sys.executable, "-m", "fluxion_dist.cli", "serve", DEMO, "--port", "0"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        endpoint = None
        deadline = time.monotonic() + 240
        for line in serve.stdout:
            if "is serving" in line:
                endpoint = line.rsplit(" at ", 1)[1].strip().removesuffix("/v1")
                break
            assert time.monotonic() < deadline
        assert endpoint, "serve did not come up"
        assert httpx.get(f"{endpoint}/health", timeout=5).status_code == 200

        state_path = tmp_path / "state" / "fluxion.json"
        state = json.loads(state_path.read_text())
        assert state["pid"] == serve.pid
        token = Path(state["token_path"])
        assert token.stat().st_mode & 0o077 == 0 and (tmp_path / "state").stat().st_mode & 0o077 == 0

        intruder = _join_without_token(state["address"], env)
        assert intruder.returncode != 0 and "JOINED" not in intruder.stdout, intruder.stdout
        assert "Authentication" in intruder.stderr or "auth" in intruder.stderr.lower(), intruder.stderr[-2000:]

        status = _cli("status", DEMO, env=env)
        assert status.returncode == 0, status.stdout + status.stderr[-2000:]
        assert "fluxion-decode-0" in status.stdout and "healthy: true" in status.stdout

        down = _cli("shutdown", DEMO, env=env)
        assert down.returncode == 0 and "stopped 3 actor(s)" in down.stdout, down.stdout + down.stderr[-2000:]
        assert serve.wait(timeout=60) == 0
        assert not state_path.exists() and not token.exists()
        after = _cli("status", DEMO, env=env)
        assert after.returncode == 1 and "no local deployment" in after.stderr, after.stderr
    finally:
        if serve.poll() is None:
            serve.terminate()
            serve.wait(timeout=60)


def test_dev_env_leaves_the_callers_shell_options_alone(tmp_path):
    # A venv whose install stamp is current: sourcing installs nothing and only activates it.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "activate").write_text("export FLUXION_TEST_ACTIVATED=1\n")
    sources = [ROOT / n for n in ("setup.cfg", "setup.py", "pyproject.toml")]
    sources += sorted(p for ext in ("pyx", "pxd", "h") for p in (ROOT / "fluxion_dist/cpu").glob(f"*.{ext}"))
    (venv / ".fluxion-install-stamp").write_text(
        hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest() + "\n")
    script = f"""
        set -o | sort > {tmp_path}/before
        source {ROOT}/scripts/dev_env.sh
        echo "rc=$? activated=$FLUXION_TEST_ACTIVATED"
        set -o | sort > {tmp_path}/after
        FLUXION_VENV=/proc/forbidden/venv source {ROOT}/scripts/dev_env.sh
        echo "failed rc=$?"
        false
        echo "still here"
    """
    out = subprocess.run(["bash", "-c", script], env={**os.environ, "FLUXION_VENV": str(venv)},
                         capture_output=True, text=True, timeout=60)
    assert "rc=0 activated=1" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()
    assert "failed rc=1" in out.stdout and "still here" in out.stdout, out.stdout + out.stderr

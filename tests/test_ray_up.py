"""`ray up` / `ray exec` / `ray down` of cluster_configs/ray_local.yaml, for real.

An sshd on 127.0.0.1:22 (tests/sshd_fixture.py) plays the head node; the
YAML is used as shipped (but for the ssh key path), run from a clean copy of
the checkout, in the sandbox of tests/ray_up_sandbox.py (own HOME, own venv
overlay, free ports, a `ray stop` that stops only this run's processes). Every process the run
started is killed by PID at the end, whatever happened.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ray_up_sandbox import RayUpSandbox
from sshd_fixture import LoopbackSshd, SshdError, ensure_installed, port_in_use

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = "cluster_configs/ray_local.yaml"

# What `ray exec` runs on the head, from ~ with the venv active: the cluster as
# a driver sees it, then the CPU demo deployment joined to it (detached
# actors, any free port), one completion and a short load-generator run
# against it from here, and its shutdown.
PROBE_COMMAND = ("python -c \"import fluxion_dist, ray; ray.init(address='auto'); "
                 "print('RESOURCES', ray.cluster_resources())\"")
DEPLOY_YAML = "cluster_configs/deploy_cpu_demo.yaml"
SERVE_COMMAND = f"cd ~/fluxion-dist && fluxion-dist serve {DEPLOY_YAML} --address auto --port 0"
SHUTDOWN_COMMAND = f"cd ~/fluxion-dist && fluxion-dist shutdown {DEPLOY_YAML} --address auto"
# True: the test also serves the CPU demo on the cluster, sends a completion and runs
# scripts/loadgen.py against it (False checks only the cluster's life cycle).
EXERCISE_SERVICE = True

UP_TIMEOUT_S = 420  # includes the editable install's Cython builds on 2 cores
EXEC_TIMEOUT_S = 120
DOWN_TIMEOUT_S = 120
SERVE_TIMEOUT_S = 240

pytestmark = pytest.mark.cluster


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _run(step: str, args: list[str], sandbox: RayUpSandbox, timeout_s: float,
         timings: dict[str, float]) -> str:
    t0 = time.monotonic()
    try:
        done = subprocess.run([_ray_cli(), *args], cwd=sandbox.checkout, env=sandbox.client_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-4000:]
        pytest.fail(f"`ray {step}` ran past {timeout_s}s:\n{out}")
    timings[step] = time.monotonic() - t0
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"`ray {step}` exited {done.returncode}:\n{output[-6000:]}"
    return output


@pytest.fixture
def sandbox():
    if port_in_use():
        pytest.skip("127.0.0.1:22 is taken; Ray's local provider can only reach port 22")
    ensure_installed()  # sshd, and rsync which the sandbox copy needs too
    # Under /tmp with a short name: Ray's Unix socket paths must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="frup-", dir="/tmp"))
    box = RayUpSandbox(root=root, token=uuid.uuid4().hex)
    try:
        box.build(REPO)
        yield box
    finally:
        box.sweep()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_up_exec_down(sandbox: RayUpSandbox):
    cluster = f"fluxion-test-{sandbox.token[:8]}"
    timings: dict[str, float] = {}
    try:
        with LoopbackSshd(sandbox.root / "sshd", session_env=sandbox.session_env()) as sshd:
            config = sandbox.cluster_yaml(REPO / CLUSTER_YAML, sshd.client_key)
            base = ["--cluster-name", cluster, str(config)]
            _run("up", ["up", "-y", "--no-config-cache", *base], sandbox, UP_TIMEOUT_S, timings)
            assert sandbox.node_processes(), "`ray up` returned but nothing runs on the node"

            out = _run("exec", ["exec", *base, PROBE_COMMAND], sandbox, EXEC_TIMEOUT_S, timings)
            match = re.search(r"RESOURCES (\{.*\})", out)
            assert match, f"no resources printed:\n{out[-4000:]}"
            assert "'prefill': 1.0" in match[1] and "'decode': 1.0" in match[1], match[1]
            if EXERCISE_SERVICE:
                _exercise_service(sandbox, base, timings)

            _run("down", ["down", "-y", *base], sandbox, DOWN_TIMEOUT_S, timings)
            # `ray down` stops Ray through the node's ~/.bashrc; if that chain is
            # broken it reports success and leaves Ray running.
            deadline = time.monotonic() + 15
            while sandbox.node_processes() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not sandbox.node_processes(), "Ray still runs on the node after `ray down`"
    except SshdError as e:
        pytest.fail(f"test sshd: {e}")
    finally:
        print("ray up/exec/down seconds:", {k: round(v, 1) for k, v in timings.items()})
        _remove_ssh_control_dir(cluster)


def _exercise_service(sandbox: RayUpSandbox, base: list[str], timings: dict[str, float]) -> None:
    out = _run("serve", ["exec", *base, SERVE_COMMAND], sandbox, SERVE_TIMEOUT_S, timings)
    match = re.search(r"serving (\S+) at (http://127\.0\.0\.1:\d+)/v1", out)
    assert match, f"`fluxion-dist serve` printed no loopback endpoint:\n{out[-4000:]}"
    model, endpoint = match[1], match[2]
    try:
        body = json.dumps({"model": model, "prompt": "The KV cache lives in", "max_tokens": 8,
                           "temperature": 0.0}).encode()
        request = urllib.request.Request(f"{endpoint}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(request, timeout=60) as resp:
            reply = json.loads(resp.read())
        assert reply["choices"][0]["text"], reply
        assert reply["usage"]["completion_tokens"] >= 1, reply

        results = sandbox.root / "bench"
        t0 = time.monotonic()
        bench = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "loadgen.py"), "--base-url", endpoint,
             "--model", model, "--num-prompts", "6", "--request-rate", "4", "--input-len", "16:48",
             "--output-len", "8", "--tokenizer", "bytes", "--max-concurrency", "3",
             "--max-duration", "120", "--request-timeout", "60", "--no-progress",
             "--result-dir", str(results), "--result-filename", "cpu_demo.json"],
            capture_output=True, text=True, timeout=180)
        timings["loadgen"] = time.monotonic() - t0
        assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
        summary = json.loads((results / "cpu_demo.json").read_text())
        assert summary["completed"] == 6, summary["errors"]
        assert (results / "cpu_demo.png").stat().st_size > 0
    finally:
        _run("shutdown", ["exec", *base, SHUTDOWN_COMMAND], sandbox, EXEC_TIMEOUT_S, timings)


def _remove_ssh_control_dir(cluster: str) -> None:
    # Ray keeps ssh ControlPath sockets in /tmp/ray_ssh_<user hash>/<cluster hash>
    # (10 hex digits each); only this run's cluster directory is ours.
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    ours = hashlib.sha256(cluster.encode()).hexdigest()[:10]
    shutil.rmtree(Path("/tmp") / f"ray_ssh_{user}" / ours, ignore_errors=True)

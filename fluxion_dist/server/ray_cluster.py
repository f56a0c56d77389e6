"""Joining or starting the Ray cluster a deployment runs on, and the environment every process gets.

A local cluster (``cluster.address: local``) runs with Ray's token authentication
(``RAY_AUTH_MODE=token``) and a token of its own, fresh for each cluster, in a file only this
user can read: any other local user who reaches its ports cannot join it, submit work, or
read its objects. Its address and token file are recorded in a state file
(``<state_dir>/<namespace>.json``) so ``fluxion-dist status|shutdown`` find the running
deployment without ``--address``.

Ray reads ``RAY_AUTH_MODE`` once, when it is imported: :func:`prepare` must run before
anything imports ``ray`` (the CLI calls it first). A process that imported Ray earlier gets
a local cluster without authentication, and a warning.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from pathlib import Path

from fluxion_dist.config.schema import ClusterConfig, TransportConfig
from fluxion_dist.cpu.omp_env import omp_env
from fluxion_dist.errors import FluxionError

# Ray replaces 127.0.0.1 with the machine's external address unless told not to.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
STATE_DIR = Path(os.environ.get("FLUXION_STATE_DIR", "~/.fluxion-dist")).expanduser()

log = logging.getLogger(__name__)


class NoLocalDeployment(FluxionError):
    """``status``/``shutdown`` found no local cluster of this namespace; the message says where it looked."""


def worker_env(transport: TransportConfig) -> dict[str, str]:
    """Environment of prefill/decode actors: UCX and OpenMP must see their settings before they
    initialise."""
    return {**RAY_ENV, **omp_env(), **transport.ucx_env()}


def state_file(namespace: str, state_dir: Path | None = None) -> Path:
    return (state_dir or STATE_DIR) / f"{namespace}.json"


def prepare(cluster: ClusterConfig) -> None:
    """Before Ray is imported: token authentication on for a local cluster or a local status/shutdown.
    (A cluster that ``--address`` names keeps the caller's Ray settings: ``ray up`` nodes export them.)"""
    os.environ.update(RAY_ENV)
    if cluster.address == "local" and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"


def token_auth_active() -> bool:
    """Whether this process's Ray speaks token authentication (fixed when Ray was imported)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode
    return get_authentication_mode() == AuthenticationMode.TOKEN


def _joined(cluster: ClusterConfig) -> bool:
    """Ray set up for ``cluster`` (its auth mode first): True if this process is connected already
    or has now joined the cluster ``cluster.address`` names; False for a local one still to reach."""
    prepare(cluster)
    import ray

    if ray.is_initialized():
        return True
    if cluster.address != "local":
        ray.init(address=cluster.address, namespace=cluster.namespace, log_to_driver=False)
        return True
    return False


def connect(cluster: ClusterConfig, *, temp_dir: str | None = None, state_dir: Path | None = None) -> bool:
    """Join ``cluster.address`` or start a local cluster; returns True if this process started it."""
    if _joined(cluster):
        return False
    import ray

    token_path = None
    if token_auth_active():
        token_path = _new_token(cluster.namespace, state_dir)
        _use_token(token_path)
    else:
        log.warning("Ray was imported before fluxion_dist.server.ray_cluster.prepare(): this local cluster "
                    "runs WITHOUT token authentication (any local user can join it)")
    ctx = ray.init(num_cpus=cluster.num_cpus, namespace=cluster.namespace, include_dashboard=False,
                   _temp_dir=temp_dir, log_to_driver=False, runtime_env={"env_vars": RAY_ENV})
    _write_state(cluster.namespace, state_dir, {"address": ctx.address_info["gcs_address"], "pid": os.getpid(),
                                                "token_path": str(token_path) if token_path else None})
    return True


def connect_running(cluster: ClusterConfig, *, state_dir: Path | None = None) -> int | None:
    """Join the cluster a deployment runs on: ``cluster.address``, or for ``local`` the cluster
    that ``fluxion-dist serve`` started on this machine (never a new, empty one). Returns the
    PID of the process that owns that local cluster (None for any other cluster)."""
    if _joined(cluster):
        return None
    import ray

    path = state_file(cluster.namespace, state_dir)
    hint = ("start one with `fluxion-dist serve`, or pass --address auto (a cluster started with "
            "`ray start` on this machine) or --address host:port")
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoLocalDeployment(f"no local deployment of namespace {cluster.namespace!r} is running "
                                f"(no {path}); {hint}") from None
    if not _alive(state.get("pid")):
        path.unlink(missing_ok=True)
        raise NoLocalDeployment(f"the local deployment of namespace {cluster.namespace!r} is gone (its "
                                f"process {state.get('pid')} has exited; removed the stale {path}); {hint}")
    if state.get("token_path"):
        _use_token(Path(state["token_path"]))
    ray.init(address=state["address"], namespace=cluster.namespace, log_to_driver=False)
    return state["pid"]


def forget(cluster: ClusterConfig, *, state_dir: Path | None = None) -> None:
    """The local cluster this process started is going away: drop its state file and token."""
    path = state_file(cluster.namespace, state_dir)
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return
    if state.get("pid") == os.getpid():
        if state.get("token_path"):
            Path(state["token_path"]).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def _private_dir(state_dir: Path | None) -> Path:
    directory = state_dir or STATE_DIR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


def _new_token(namespace: str, state_dir: Path | None) -> Path:
    path = _private_dir(state_dir) / f"{namespace}.{os.getpid()}.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _use_token(path: Path) -> None:
    """Token auth for this process and every Ray process it starts (they inherit the environment)."""
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    try:  # Ray caches the token it read first; a second cluster in one process has another
        from ray._raylet import AuthenticationTokenLoader
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):
        pass


def _write_state(namespace: str, state_dir: Path | None, state: dict) -> None:
    path = _private_dir(state_dir) / state_file(namespace, state_dir).name
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    tmp.replace(path)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Every `ray up` YAML in cluster_configs/ passes Ray's own validation, offline.

`ray up` has no dry run; Ray's launcher runs prepare_config (defaults, the
local provider's node-type rewrite) and then validate_config (ray-schema.json
plus cross-field checks), which is what runs here. Deployment YAMLs
(deploy_*.yaml) have their own schema and are not checked here.
The project's own conventions (node roles as custom resources, the Ray
environment in ~/.bashrc) are checked on top.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "cluster_configs"
RAY_CONFIGS = sorted(CONFIG_DIR.glob("ray_*.yaml"))
ROLE_RESOURCES = {"prefill", "decode"}
RAY_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", "RAY_USAGE_STATS_ENABLED=0")


def _load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def _all_commands(cfg: dict) -> str:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return "\n".join(cmd for key in keys for cmd in cfg.get(key) or [])


def test_the_three_configs_exist():
    names = {p.name for p in RAY_CONFIGS}
    assert {"ray_local.yaml", "ray_aws.yaml", "ray_gcp.yaml"} <= names, names


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_validates(path: Path):
    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_environment_comes_from_bashrc(path: Path):
    # Ray runs remote commands through `bash --login -i` after sourcing
    # ~/.bashrc; an env var exported anywhere else is gone by the next command.
    init = "\n".join(_load(path).get("initialization_commands") or [])
    assert "~/.bashrc" in init
    for assignment in RAY_ENV:
        assert assignment in init, f"{path.name}: {assignment} not appended to ~/.bashrc"
    assert "fluxion-venv/bin/activate" in init


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_installs_this_project(path: Path):
    cfg = _load(path)
    assert cfg["file_mounts"].get("~/fluxion-dist") == "."
    assert ".gitignore" in cfg.get("rsync_filter", []), "the checkout's venv would be synced"
    assert "pip install -e ~/fluxion-dist" in _all_commands(cfg)


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_runs_with_token_authentication(path: Path):
    # Every node starts Ray in token mode with the token the launching machine made, and every
    # command there (drivers included) runs in token mode through ~/.bashrc.
    cfg = _load(path)
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    init = "\n".join(cfg.get("initialization_commands") or [])
    assert "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in init
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), f"{path.name}:{key}"


def test_local_config_is_a_loopback_head():
    cfg = _load(CONFIG_DIR / "ray_local.yaml")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] == "127.0.0.1"
    assert cfg["auth"]["ssh_user"] == "root"
    # The local provider has a single node type: roles go on `ray start`.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = cfg[key][-1]
        for role in ROLE_RESOURCES:
            assert f'"{role}"' in start, f"{key} lacks the {role!r} resource"


@pytest.mark.parametrize("name", ["ray_aws.yaml", "ray_gcp.yaml"])
def test_cloud_node_types_carry_roles(name: str):
    cfg = _load(CONFIG_DIR / name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not ROLE_RESOURCES & set(head["resources"]), "workers must not land on the head"
    roles = {t: set(spec["resources"]) for t, spec in types.items()}
    decode = [t for t, r in roles.items() if "decode" in r]
    prefill = [t for t, r in roles.items() if "prefill" in r]
    assert decode and all("decode_gpu" in roles[t] for t in decode), roles
    assert any("prefill_gpu" in roles[t] for t in prefill), "no GPU prefill type"
    assert any("prefill_gpu" not in roles[t] for t in prefill), "no CPU prefill type"
    for t in decode + [t for t in prefill if "prefill_gpu" in roles[t]]:
        assert "[gpu]" in "\n".join(types[t].get("worker_setup_commands", [])), \
            f"{name}:{t} is a GPU node but does not install the gpu extra"

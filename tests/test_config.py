"""Deployment YAML validation: every error names the field, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from fluxion_dist.config import DeployConfig, config_from_dict, load_config, parse_size
from fluxion_dist.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("data, message", [
    ({"decode": {"sparse": {"budgett": 0.1}}}, "decode.sparse.budgett: unknown key (did you mean 'budget'?)"),
    ({"kv_stor": {}}, "kv_stor: unknown key (did you mean 'kv_store'?)"),
    ({"zzz": 1}, "zzz: unknown key; valid keys: model, prefill"),
    ({"decode": {"sparse": {"policy": "dense"}}}, "decode.sparse.policy: 'dense' is not allowed; choose one of 'full'"),
    ({"decode": {"sparse": {"budget": 0}}}, "decode.sparse.budget: 0.0 is out of range; must be > 0"),
    ({"decode": {"sparse": {"budget": 1.5}}}, "decode.sparse.budget: 1.5 is out of range; must be <= 1"),
    ({"server": {"port": 70000}}, "server.port: 70000 is out of range; must be <= 65535"),
    ({"server": {"port": "80"}}, "server.port: '80' is not an integer"),
    ({"prefill": {"num_workers": True}}, "prefill.num_workers: True is not an integer"),
    ({"kv_store": {"capacity": "lots"}}, "kv_store.capacity: 'lots' is not a byte size"),
    ({"kv_store": {"capacity": "1KiB"}}, "kv_store.capacity: 1024 is out of range; must be >= 1048576"),
    ({"server": {"host": 127}}, "server.host: 127 is not a string"),
    ({"decode": ["a"]}, "decode: expected a mapping of DecodeConfig fields, got list"),
    ([1, 2], "top level: expected a mapping of DeployConfig fields, got list"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)


def test_defaults_and_sizes():
    cfg = config_from_dict({"kv_store": {"capacity": "1.5GiB"}, "server": {"api_key": None}})
    assert cfg.kv_store.capacity == 3 << 29
    assert cfg.server.host == "127.0.0.1"
    assert cfg.decode.sparse == DeployConfig().decode.sparse
    assert config_from_dict(None) == DeployConfig()
    assert [parse_size(s) for s in (4096, "2KB", "512MiB", "64GiB")] == [4096, 2000, 512 << 20, 64 << 30]


def test_config_is_frozen():
    cfg = DeployConfig()
    with pytest.raises(AttributeError):
        cfg.server.port = 1  # type: ignore[misc]


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("decode:\n  sparse:\n    budgett: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: decode.sparse.budgett: unknown key"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "cluster_configs").glob("deploy_*.yaml")), ids=lambda p: p.name)
def test_shipped_deployments_validate(path):
    load_config(path)


def test_validate_command_exit_codes(tmp_path):
    cli = [sys.executable, "-m", "fluxion_dist.cli", "validate"]
    ok = subprocess.run(cli + [str(ROOT / "cluster_configs/deploy_cpu_demo.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0 and "capacity: 67108864" in ok.stdout
    bad = tmp_path / "x.yaml"
    bad.write_text("decode: {sparse: {budgett: 1}}\n")
    err = subprocess.run(cli + [str(bad)], capture_output=True, text=True)
    assert err.returncode == 1
    assert err.stderr.strip() == f"error: {bad}: decode.sparse.budgett: unknown key (did you mean 'budget'?)"
    assert "Traceback" not in err.stderr

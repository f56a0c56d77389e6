"""The CPU path's processes get OpenMP's passive wait (cpu/omp_env.py: why), unless the user set one."""

from __future__ import annotations

import os

from fluxion_dist.config.schema import TransportConfig
from fluxion_dist.cpu import omp_env
from fluxion_dist.server.ray_cluster import worker_env


def test_workers_wait_passively_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert worker_env(TransportConfig())["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env(TransportConfig())["OMP_WAIT_POLICY"] == "ACTIVE"


def test_apply_keeps_the_users_setting(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    omp_env.apply()
    assert omp_env.omp_env() == {"OMP_WAIT_POLICY": "ACTIVE"}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    omp_env.apply()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"

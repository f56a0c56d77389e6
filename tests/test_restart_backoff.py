"""The backoff between restarts of a deployment's actors: the policy, its config checks, and an
actor that dies while it starts, restarted by a real local Ray cluster with growing waits."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from fluxion_dist.config import config_from_dict
from fluxion_dist.config.schema import ClusterConfig, ServerConfig
from fluxion_dist.errors import ConfigError
from fluxion_dist.restart_backoff import backoff_s, next_streak

SERVER = ServerConfig(restart_backoff_s=0.5, restart_backoff_max_s=3.0, restart_backoff_reset_s=60.0)


def test_the_wait_doubles_per_restart_in_a_row_up_to_the_cap():
    assert [backoff_s(k, SERVER) for k in range(6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_s(10_000, SERVER) == 3.0  # no overflow however long the streak
    off = dataclasses.replace(SERVER, restart_backoff_s=0.0)
    assert [backoff_s(k, off) for k in range(4)] == [0.0] * 4


def test_a_streak_grows_only_with_quick_restarts():
    now = 1_000_000.0
    assert next_streak(None, reconstructed=False, now=now, server=SERVER) == 0
    assert next_streak({"streak": 4, "started": now - 1}, reconstructed=False, now=now, server=SERVER) == 0
    assert next_streak(None, reconstructed=True, now=now, server=SERVER) == 1
    assert next_streak({"streak": 2, "started": now - 59.0}, reconstructed=True, now=now, server=SERVER) == 3
    assert next_streak({"streak": 7, "started": now - 60.0}, reconstructed=True, now=now, server=SERVER) == 1


@pytest.mark.parametrize("server, field", [
    ({"restart_backoff_s": 5.0, "restart_backoff_max_s": 2.0}, "server.restart_backoff_max_s"),
    ({"restart_backoff_s": -1.0}, "server.restart_backoff_s"),
    ({"restart_backoff_reset_s": 0}, "server.restart_backoff_reset_s"),
])
def test_bad_backoff_settings_name_the_field(server, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict({"server": server})


def test_an_actor_dying_at_start_up_restarts_with_growing_waits(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from fluxion_dist.server.ray_cluster import connect, token_auth_active

    tmp = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths must fit in 107 bytes
    connect(ClusterConfig(namespace="fluxion-backoff", num_cpus=1), temp_dir=str(tmp), state_dir=tmp / "state")
    try:
        assert token_auth_active()  # the tests' local cluster runs as the product's does
        server = ServerConfig(restart_backoff_s=0.4, restart_backoff_max_s=1.0, restart_backoff_reset_s=60.0)
        dies = 4

        class Flaky:
            """Dies in its constructor on its first ``dies`` starts, as a worker with a bad setup would."""

            def __init__(self) -> None:
                from ray.experimental import internal_kv

                from fluxion_dist.restart_backoff import wait_before_start
                self.record = wait_before_start(server)
                starts = json.loads(internal_kv._internal_kv_get(b"starts", namespace="test") or b"[]")
                starts.append(self.record)
                internal_kv._internal_kv_put(b"starts", json.dumps(starts).encode(), True, namespace="test")
                if len(starts) <= dies:
                    os._exit(1)

            def starts(self) -> list[dict]:
                from ray.experimental import internal_kv
                return json.loads(internal_kv._internal_kv_get(b"starts", namespace="test"))

        actor = ray.remote(Flaky).options(max_restarts=-1, num_cpus=0).remote()
        starts = ray.get(actor.starts.remote(), timeout=120)
        want = [0.0, 0.4, 0.8, 1.0, 1.0]  # the first start waits nothing; then doubled, capped at 1.0
        assert [s["streak"] for s in starts] == list(range(dies + 1)), starts
        assert [s["restarts"] for s in starts] == list(range(dies + 1)), starts
        assert [s["waited_s"] for s in starts] == pytest.approx(want), starts
        # and it really waited: each start comes at least its backoff after the one before
        gaps = [b["started"] - a["started"] for a, b in zip(starts, starts[1:])]
        assert all(gap >= wait for gap, wait in zip(gaps, want[1:])), (gaps, want)
        ray.kill(actor, no_restart=True)
    finally:
        ray.shutdown()


def test_a_restarted_router_whose_start_fails_tries_again_until_it_serves():
    """Nobody awaits a restarted router's start: a failure (its port held a moment longer)
    must not leave it up but deaf."""
    import asyncio
    from types import SimpleNamespace

    from fluxion_dist.server.router_actor import Router

    router = Router.__new__(Router)
    router.cfg = SimpleNamespace(server=ServerConfig(restart_backoff_s=0.01, restart_backoff_max_s=0.02))
    attempts = []

    async def start():
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(98, "address already in use")
        return "http://127.0.0.1:1"

    router.start = start
    asyncio.run(asyncio.wait_for(router.serve_after_restart(), 5))
    assert len(attempts) == 3


def test_a_router_start_on_a_taken_port_raises_an_error_naming_it_instead_of_exiting():
    """uvicorn exits the process when it cannot bind; inside the actor's event loop that exit
    would stop the loop, so the restart's retry loop never runs again."""
    import asyncio
    import socket
    from types import SimpleNamespace

    from fluxion_dist.server.router_actor import Router

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]

    async def app(scope, receive, send):  # never reached: the bind fails first
        raise AssertionError("served")

    async def backend_start():
        return None

    router = Router.__new__(Router)
    router.cfg = SimpleNamespace(server=ServerConfig(host="127.0.0.1", port=port))
    router.start_record, router.app, router._task = {"restarts": 0}, app, None
    router.backend = SimpleNamespace(start=backend_start)
    try:
        with pytest.raises(RuntimeError, match=f"could not serve on 127.0.0.1:{port}"):
            asyncio.run(asyncio.wait_for(router.start(), 10))
    finally:
        holder.close()

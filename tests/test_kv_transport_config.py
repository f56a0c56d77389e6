"""One TransportConfig: the deployment YAML's ``transport`` section is the object the KV
transfer runs on, validated with errors that name the field."""

from __future__ import annotations

import pytest

import kv_store
from fluxion_dist.config import TransportConfig, config_from_dict
from fluxion_dist.errors import ConfigError


def test_the_kv_store_runs_on_the_schema_class():
    assert kv_store.TransportConfig is TransportConfig
    cfg = config_from_dict({"transport": {"ucx_tls": "tcp,self", "ucx_net_devices": "lo", "timeout_s": 7,
                                          "heartbeat_s": 0.5, "offer_deadline_s": 3}})
    assert isinstance(cfg.transport, kv_store.TransportConfig)
    assert (cfg.transport.timeout_s, cfg.transport.offer_deadline_s) == (7.0, 3.0)
    assert cfg.transport.ucx_env() == {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo",
                                       "UCX_WARN_UNUSED_ENV_VARS": "n"}


@pytest.mark.parametrize("section,message", [
    ({"heartbeat_s": 20.0}, "transport.timeout_s (30.0) must exceed twice transport.heartbeat_s (20.0)"),
    ({"offer_deadline_s": 0}, "transport.offer_deadline_s: 0.0 is out of range; must be > 0"),
    ({"connect_timeout_s": -1}, "transport.connect_timeout_s: -1.0 is out of range; must be > 0"),
    ({"ucx_tls": "sm,,self"}, "transport.ucx_tls: 'sm,,self' is not a comma list of UCX transports"),
    ({"ucx_error_handling": "yes"}, "transport.ucx_error_handling: 'yes' is not a boolean"),
    ({"peer_timeout_s": 5}, "transport.peer_timeout_s: unknown key"),
])
def test_bad_transport_settings_name_the_field(section, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"transport": section})
    assert message in str(e.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="transport.heartbeat_s"):
        TransportConfig(heartbeat_s=0)
    with pytest.raises(ConfigError, match="must exceed twice"):
        TransportConfig(timeout_s=1.0, heartbeat_s=0.5)

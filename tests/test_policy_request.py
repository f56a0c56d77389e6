"""The policy names and a request's own sparse settings (policy.request): validation names the field."""

from __future__ import annotations

import typing

import pytest

from fluxion_dist.config.schema import SparseConfig, SparsePolicy
from fluxion_dist.policy import POLICIES, RequestSparse, RequestSparseError, resolve_request_sparse, traits


def test_policy_names_are_the_config_literal():
    assert POLICIES == typing.get_args(SparsePolicy)
    assert traits("fluxion").uses_cache and traits("quest_gpu").execution == "gpu_only"
    with pytest.raises(ValueError, match="allowed: full"):
        traits("quest")


def test_none_is_the_deployment():
    assert resolve_request_sparse(SparseConfig(policy="fluxion"), None) is None


@pytest.mark.parametrize("asked,want", [
    ({}, RequestSparse("fluxion", 0.05)),
    ({"budget": 0.2}, RequestSparse("fluxion", 0.2)),
    ({"budget": 1}, None),  # above the cap: see the error test
    ({"policy": "fluxion", "budget": 0.125}, RequestSparse("fluxion", 0.125)),
    ({"policy": "full"}, RequestSparse("full", 1.0)),
    ({"policy": "full", "budget": 0.1}, RequestSparse("full", 1.0)),
])
def test_valid_requests(asked, want):
    deploy = SparseConfig(policy="fluxion", budget=0.05, max_request_budget=0.25)
    if want is None:
        with pytest.raises(RequestSparseError, match="above this deployment's cap 0.25"):
            resolve_request_sparse(deploy, asked)
    else:
        assert resolve_request_sparse(deploy, asked) == want


@pytest.mark.parametrize("asked,field", [
    ({"budget": 0.9}, "sparse.budget 0.9 is above this deployment's cap 0.3"),
    ({"budget": 0.0}, "sparse.budget 0.0 is outside"),
    ({"budget": -0.1}, "sparse.budget -0.1 is outside"),
    ({"budget": float("nan")}, "sparse.budget nan is outside"),
    ({"budget": "0.1"}, "sparse.budget must be a number"),
    ({"budget": True}, "sparse.budget must be a number"),
    ({"policy": "quest_gpu"}, "sparse.policy 'quest_gpu' is not served here"),
    ({"policy": 3}, "sparse.policy must be a string"),
    ({"top_k": 3}, "unknown key"),
    ([("budget", 0.1)], "sparse must be an object"),
])
def test_invalid_requests_name_the_field(asked, field):
    deploy = SparseConfig(policy="fluxion", budget=0.05, max_request_budget=0.3)
    with pytest.raises(RequestSparseError, match=field.replace("(", r"\(").replace(".", r"\.")):
        resolve_request_sparse(deploy, asked)


def test_request_sparse_error_is_a_value_error():
    assert issubclass(RequestSparseError, ValueError)


def test_config_fields_are_validated():
    from fluxion_dist.config.loader import config_from_dict
    from fluxion_dist.errors import ConfigError

    cfg = config_from_dict({"decode": {"sparse": {"policy": "fluxion", "floor_fraction": 0.25,
                                                  "head_predictor": True, "max_request_budget": 0.5}}})
    sp = cfg.decode.sparse
    assert (sp.floor_fraction, sp.head_predictor, sp.max_request_budget) == (0.25, True, 0.5)
    for bad in ({"floor_fraction": 1.5}, {"max_request_budget": 0}, {"head_predictor": 1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            config_from_dict({"decode": {"sparse": bad}})

"""What a backend's token stream carries to the app besides the token id."""

from __future__ import annotations

from dataclasses import dataclass

from fluxion_dist.sampling import TokenLogprobs


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    token: int
    # fraction of the request's KV its decode step read (policy.StepReport.budget_per_request);
    # None for the prefill's token, which read it all
    kv_fraction_read: float | None = None
    logprobs: TokenLogprobs | None = None  # when the request asked for logprobs


def token_id(item: int | GeneratedToken) -> int:
    return item if isinstance(item, int) else item.token


def token_logprobs(item: int | GeneratedToken) -> TokenLogprobs | None:
    return None if isinstance(item, int) else item.logprobs

"""Prompt scoring (``echo`` + ``logprobs``) and token logprobs against a float64 log-softmax of
the same model's logits, on awkward prompt lengths (the scorer works 1024 rows at a time)."""

from __future__ import annotations

import os

import pytest
import torch

from fluxion_dist.config.schema import ModelConfig
from fluxion_dist.model.loader import load_from_config
from fluxion_dist.sampling import MAX_LOGPROBS, token_logprobs
from prefill_worker.prompt_scoring import ROWS_PER_CHUNK, prompt_logprobs


@pytest.fixture(scope="module")
def model():
    return load_from_config(ModelConfig(), "cpu")[0]


def _prompt(n: int) -> tuple[list[int], int]:
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 258, (n,), generator=g).tolist(), seed


@pytest.mark.parametrize("length, n, chunk", [(1, 2, None), (2, 0, None), (17, 5, None), (15, 3, 4),
                                              (ROWS_PER_CHUNK + 9, 1, None)])
def test_prompt_logprobs_equal_the_float64_log_softmax(model, length, n, chunk):
    prompt, seed = _prompt(length)
    got = prompt_logprobs(model, prompt, n, torch.device("cpu"), chunk)
    with torch.inference_mode():
        want = torch.log_softmax(model.prefill(torch.tensor(prompt)).logits.double(), dim=-1)
    assert len(got) == length and got[0] is None, seed
    for pos in range(1, length):
        row = want[pos - 1]
        assert got[pos].token == prompt[pos]
        assert got[pos].logprob == pytest.approx(float(row[prompt[pos]]), abs=2e-5), (seed, pos)
        top = row.topk(n)
        assert [t for t, _ in got[pos].top] == top.indices.tolist(), (seed, pos)
        assert [v for _, v in got[pos].top] == pytest.approx(top.values.tolist(), abs=2e-5), (seed, pos)


def test_token_logprobs_take_the_raw_distribution_whatever_the_sampling():
    seed = int.from_bytes(os.urandom(4), "little")
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 4
    want = torch.log_softmax(logits.double(), dim=-1)
    token = int(logits.argsort()[500])  # a middling token, as top-p sampling may pick
    lp = token_logprobs(logits, token, MAX_LOGPROBS)
    assert lp.token == token and lp.logprob == pytest.approx(float(want[token]), abs=1e-5), seed
    assert [t for t, _ in lp.top] == want.topk(MAX_LOGPROBS).indices.tolist(), seed
    assert token_logprobs(logits, token, 0).top == ()

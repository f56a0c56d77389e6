"""Prompt scoring (``echo`` + ``logprobs``) as a GPU prefill worker runs it: the model on CUDA,
the prompt in ``chunk_tokens`` rows at a time, against the CPU float64 log-softmax. Never
imports ray. Skipped with a reason where no GPU runs kernels."""

from __future__ import annotations

import os

import pytest
import torch

from tests import gpu_util

gpu_util.skip_unless_gpu()

from fluxion_dist.config.schema import ModelConfig  # noqa: E402
from fluxion_dist.model.loader import load_from_config  # noqa: E402
from prefill_worker.prompt_scoring import ROWS_PER_CHUNK, prompt_logprobs  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("length, chunk", [(1, 8192), (17, 8192), (1333, 8192), (ROWS_PER_CHUNK + 5, 100),
                                           (1000, 7)])
def test_gpu_prompt_logprobs_equal_the_cpu_reference(length, chunk):
    seed = int.from_bytes(os.urandom(4), "little")
    prompt = torch.randint(0, 258, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    cpu = load_from_config(ModelConfig(), "cpu")[0]
    gpu = load_from_config(ModelConfig(), "cuda")[0]
    got = prompt_logprobs(gpu, prompt, 3, torch.device("cuda"), chunk)
    with torch.inference_mode():
        want = torch.log_softmax(cpu.prefill(torch.tensor(prompt)).logits.double(), dim=-1)
    assert len(got) == length and got[0] is None
    for pos in range(1, length):
        assert got[pos].logprob == pytest.approx(float(want[pos - 1, prompt[pos]]), abs=2e-3), (seed, pos)
        assert got[pos].top[0][1] == pytest.approx(float(want[pos - 1].max()), abs=2e-3), (seed, pos)

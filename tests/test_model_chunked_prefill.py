"""Chunked prefill equals the one-pass prefill (K/V of every layer and the logits), in float32 on
the CPU, for awkward prompt and chunk lengths and GQA groups 1, 4 and 8."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fluxion_dist.model.tiny import TINY_ARCH, tiny_model


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("n, chunk", [(1, 1), (17, 16), (50, 7), (1000, 333)])
def test_chunked_prefill_equals_unchunked(heads, kv_heads, n, chunk):
    arch = dataclasses.replace(TINY_ARCH, num_attention_heads=heads, num_key_value_heads=kv_heads)
    model = tiny_model(seed=heads + kv_heads, arch=arch)
    tokens = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n))
    whole = model.prefill(tokens)
    seen = []
    parts = model.prefill(tokens, lambda i, k, v: seen.append((i, k.clone(), v.clone())), chunk_tokens=chunk)
    assert [i for i, _, _ in seen] == list(range(arch.num_hidden_layers))
    torch.testing.assert_close(parts.logits, whole.logits, rtol=1e-4, atol=1e-4)
    for layer in range(arch.num_hidden_layers):
        torch.testing.assert_close(parts.keys[layer], whole.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parts.values[layer], whole.values[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[layer][1], whole.keys[layer], rtol=1e-5, atol=1e-5)


def test_prefill_without_kept_kv_and_bad_chunk():
    model = tiny_model(seed=1)
    tokens = torch.arange(40) % 256
    out = model.prefill(tokens, chunk_tokens=16, keep_kv=False, all_logits=False)
    assert out.keys == [] and out.logits.shape == (1, TINY_ARCH.vocab_size)
    torch.testing.assert_close(out.logits, model.prefill(tokens).logits[-1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        model.prefill(tokens, chunk_tokens=0)

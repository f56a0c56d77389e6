"""Greedy generation in one process: the demo's engine until the service runs, and the oracle
the service's output is compared with token for token."""

from __future__ import annotations

import torch

from fluxion_dist.model.decoder import AttentionHook, CausalLM
from fluxion_dist.model.dense_cache import DenseKVCache


def greedy_generate(model: CausalLM, prompt: list[int], max_new_tokens: int,
                    eos_token_id: int | None = None, attend: AttentionHook | None = None,
                    kv_dtype: torch.dtype | None = None) -> list[int]:
    """Prefill ``prompt`` then decode greedily; stops at ``eos_token_id`` (included in the output).

    ``kv_dtype=torch.bfloat16`` keeps the cache as the host KV store does, so the result is the
    service's output token for token.
    """
    tokens = torch.tensor(prompt, dtype=torch.long)
    pre = model.prefill(tokens)
    if attend is None:
        cache = DenseKVCache(model.arch.num_hidden_layers, kv_dtype)
        cache.add_sequence(pre)
        attend = cache
    out = [int(pre.logits[-1].argmax())]
    pos = len(prompt)
    while len(out) < max_new_tokens and out[-1] != eos_token_id:
        logits = model.decode_step(torch.tensor([out[-1]]), torch.tensor([pos]), attend)
        out.append(int(logits[0].argmax()))
        pos += 1
    return out

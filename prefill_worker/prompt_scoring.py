"""Prompt scoring for ``echo`` + ``logprobs``: each prompt token's logprob under the tokens
before it, and the likeliest alternatives there (what lm-evaluation-harness's loglikelihood
tasks read). One dense forward with every position's logits; no KV is kept or pushed."""

from __future__ import annotations

import torch

from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.sampling import TokenLogprobs

# rows of the [T, vocab] logits turned into logprobs at a time (bounds the float32 copy)
ROWS_PER_CHUNK = 1024


@torch.inference_mode()
def prompt_logprobs(model: CausalLM, prompt: list[int], n: int, device: torch.device,
                    chunk_tokens: int | None = None) -> list[TokenLogprobs | None]:
    """One entry per prompt token; the first is None (nothing precedes it)."""
    tokens = torch.tensor(prompt, dtype=torch.long, device=device)
    logits = model.prefill(tokens, None, all_logits=True, chunk_tokens=chunk_tokens, keep_kv=False).logits
    out: list[TokenLogprobs | None] = [None]
    for lo in range(0, len(prompt) - 1, ROWS_PER_CHUNK):
        hi = min(lo + ROWS_PER_CHUNK, len(prompt) - 1)
        logp = torch.log_softmax(logits[lo:hi].float(), dim=-1)  # row i predicts prompt[i + 1]
        chosen = logp.gather(1, tokens[lo + 1:hi + 1, None])[:, 0].tolist()
        top = logp.topk(n, dim=-1) if n > 0 else None
        for j in range(hi - lo):
            pairs = tuple(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else ()
            out.append(TokenLogprobs(prompt[lo + 1 + j], chosen[j], pairs))
    return out

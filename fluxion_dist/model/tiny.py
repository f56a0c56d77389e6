"""The tiny seeded default model: a few layers, GQA ratio 4, the byte vocabulary.

Random but reproducible: the same seed gives the same weights on every machine, so a
service run and a single-process run can be compared token for token.
"""

from __future__ import annotations

import torch

from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.model.tokenizer import ByteTokenizer

TINY_ARCH = ModelArch(
    architecture="llama",
    vocab_size=ByteTokenizer.vocab_size,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=65536,
    tie_word_embeddings=True,
    bos_token_id=ByteTokenizer.BOS,
    eos_token_id=ByteTokenizer.EOS,
)


def tiny_model(seed: int = 0, arch: ModelArch = TINY_ARCH) -> CausalLM:
    gen = torch.Generator().manual_seed(seed)
    model = CausalLM(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Norm gains near 1, not exactly 1, so tests notice a norm applied twice or skipped.
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model.eval()

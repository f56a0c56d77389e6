"""The quality model: its architecture, its initialisation, and where its trained weights ship.

A small Llama-family GQA decoder of the project's own class, trained by
``scripts/train_quality_model.py`` on ``quality.tasks`` and shipped as package data
(``fluxion_dist/data/quality_model``: config.json, model.safetensors in bf16,
tokenizer.json), so the tests, benchmarks and demo have heads that really retrieve.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.checkpoint import load_model, save_model
from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.model.loader import SHIPPED_QUALITY_DIR
from fluxion_dist.quality import vocab

SHIPPED_DIR = SHIPPED_QUALITY_DIR

QUALITY_ARCH = ModelArch(
    architecture="llama",
    vocab_size=vocab.VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-5,
    # large theta: the slow channels barely turn over 64k tokens, so content matching
    # learnt on them at 16k still holds at 32k
    rope_theta=500000.0,
    max_position_embeddings=65536,
    tie_word_embeddings=True,
    bos_token_id=vocab.BOS,
    eos_token_id=vocab.EOS,
)

# A few-second CPU stand-in with the same vocabulary, for smoke runs of the training script.
TINY_QUALITY_ARCH = ModelArch(
    architecture="llama", vocab_size=vocab.VOCAB_SIZE, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
    rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=vocab.BOS, eos_token_id=vocab.EOS)


def init_model(arch: ModelArch, seed: int) -> CausalLM:
    """GPT-2 style: N(0, 0.02), residual outputs scaled down by depth, norms at 1.

    The module defaults (N(0, 1) embeddings) start a tied model with logits in the
    tens, which stalls the first thousand steps.
    """
    gen = torch.Generator().manual_seed(seed)
    model = CausalLM(arch)
    resid = 0.02 / math.sqrt(2 * arch.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = resid if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def export_model(model: CausalLM, path: Path) -> None:
    """Write the shippable form: bf16 weights (half the bytes; loads back as float32) + tokenizer."""
    export = CausalLM(model.arch)
    export.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_model(export.to(torch.bfloat16), path)
    vocab.write_tokenizer(path)


def load_quality_model(path: Path = SHIPPED_DIR, dtype: torch.dtype = torch.float32) -> CausalLM:
    return load_model(path, dtype)

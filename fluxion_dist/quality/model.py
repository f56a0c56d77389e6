"""The quality model: its architecture, its initialisation, and where its trained weights ship.

A small Llama-family GQA decoder of the project's own class, trained by
``scripts/train_quality_model.py`` and shipped as package data
(``fluxion_dist/data/quality_model``: config.json, model.safetensors in bf16,
tokenizer.json), so the tests, benchmarks and demo have heads that really retrieve.

Two generations: ``QUALITY_ARCH`` (v1, the word vocabulary of ``vocab``, trained on the
word tasks) and ``TEXT_ARCH`` (v2, the corpus' 6144-token BPE, trained on natural text
with the RULER tasks). Which one a directory holds is read from its config.json and
tokenizer.json, never assumed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.checkpoint import load_model, save_model
from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.model.loader import SHIPPED_QUALITY_DIR
from fluxion_dist.quality import vocab
from fluxion_dist.quality.corpus import CORPUS_DIR

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


# v2: 8 layers of 8 query / 2 KV heads of 64 over a 256-wide residual, 7.73M parameters
# (15.5 MB in bf16): the checkpoint (weights + two Adam moments) travels to and from the
# device machine within its 64 MiB, each file under its 16 MiB. RoPE theta 1e6: the
# slowest channels turn less than once over 64k positions, so the 48k-64k evaluation
# contexts beyond the 32k training length stay inside the angles seen in training.
TEXT_VOCAB_SIZE = 6144
EOA = 4  # <eoa>, ``corpus.SPECIAL``: the v2 model's end of answer, which stops generation
TEXT_ARCH = ModelArch(
    architecture="llama", vocab_size=TEXT_VOCAB_SIZE, hidden_size=256, intermediate_size=576,
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=1_000_000.0, max_position_embeddings=65536, tie_word_embeddings=True,
    bos_token_id=vocab.BOS, eos_token_id=EOA)

# the CPU smoke stand-in for v2: the same vocabulary and special tokens
TINY_TEXT_ARCH = ModelArch(
    architecture="llama", vocab_size=TEXT_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rope_theta=1_000_000.0, tie_word_embeddings=True, bos_token_id=vocab.BOS, eos_token_id=EOA)


def write_text_tokenizer(path: Path, source: Path = CORPUS_DIR) -> None:
    """Put the BPE ``source/tokenizer.json`` beside a v2 model, with <eoa> as its end token."""
    path.mkdir(parents=True, exist_ok=True)
    if (Path(source) / "tokenizer.json").resolve() != (path / "tokenizer.json").resolve():
        shutil.copyfile(Path(source) / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eoa>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))


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


def export_model(model: CausalLM, path: Path, tokenizer_dir: Path | None = None) -> None:
    """Write the shippable form: bf16 weights (half the bytes; loads back as float32) + tokenizer.

    ``tokenizer_dir``: the BPE a v2 model was trained with; None writes v1's word vocabulary.
    """
    export = CausalLM(model.arch)
    export.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_model(export.to(torch.bfloat16), path)
    if tokenizer_dir is None:
        vocab.write_tokenizer(path)
    else:
        write_text_tokenizer(path, tokenizer_dir)


def load_quality_model(path: Path = SHIPPED_DIR, dtype: torch.dtype = torch.float32) -> CausalLM:
    return load_model(path, dtype)

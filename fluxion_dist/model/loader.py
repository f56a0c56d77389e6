"""The model a deployment config names: an HF checkpoint directory or the tiny seeded default."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxion_dist.config.schema import ModelConfig
from fluxion_dist.model.checkpoint import load_model
from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.model.tiny import tiny_model
from fluxion_dist.model.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUILTIN_QUALITY = "builtin:quality"
SHIPPED_QUALITY_DIR = Path(__file__).resolve().parents[1] / "data" / "quality_model"


def checkpoint_dir(cfg: ModelConfig) -> Path | None:
    if cfg.path is None:
        return None
    return SHIPPED_QUALITY_DIR if cfg.path == BUILTIN_QUALITY else Path(cfg.path).expanduser()


def load_from_config(cfg: ModelConfig) -> tuple[CausalLM, Tokenizer]:
    dtype = _DTYPES[cfg.dtype]
    path = checkpoint_dir(cfg)
    if path is None:
        model = tiny_model(cfg.seed).to(dtype)
        return model, load_tokenizer(None, model.arch.eos_token_id)
    model = load_model(path, dtype)
    return model, load_tokenizer(path, model.arch.eos_token_id)

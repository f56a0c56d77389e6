"""The model a deployment config names: an HF checkpoint directory, dummy weights for an HF
config.json (``load_format: dummy``), or the tiny seeded default."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fluxion_dist.config.schema import ModelConfig
from fluxion_dist.errors import ModelLoadError
from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.checkpoint import load_model
from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.model.rope import inverse_frequencies
from fluxion_dist.model.tiny import tiny_model
from fluxion_dist.model.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUILTIN_QUALITY = "builtin:quality"
SHIPPED_QUALITY_DIR = Path(__file__).resolve().parents[1] / "data" / "quality_model"
SHIPPED_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "data" / "model_configs"


def checkpoint_dir(cfg: ModelConfig) -> Path | None:
    if cfg.path is None:
        return None
    if cfg.path == BUILTIN_QUALITY:
        return SHIPPED_QUALITY_DIR
    if cfg.path.startswith("builtin:"):
        name = cfg.path.split(":", 1)[1]
        d = SHIPPED_CONFIGS_DIR / name
        if not (d / "config.json").is_file():
            known = sorted(p.name for p in SHIPPED_CONFIGS_DIR.iterdir() if (p / "config.json").is_file())
            raise ModelLoadError(f"model.path: unknown builtin {cfg.path!r}; shipped: "
                                 f"{', '.join(['builtin:quality'] + ['builtin:' + k for k in known])}")
        return d
    p = Path(cfg.path).expanduser()
    return p.parent if p.name == "config.json" else p


def resolve_device(cfg: ModelConfig, has_gpu: bool | None = None) -> torch.device:
    """``model.device`` -> a torch device. ``auto`` takes CUDA when this process may use it
    (``has_gpu``: whether the worker was given a GPU; None: whether torch sees one): the decode
    runner and the GPU prefill keep the whole forward on the device."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    ok = torch.cuda.is_available() if has_gpu is None else (has_gpu and torch.cuda.is_available())
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("model.device: 'cuda' but no CUDA device is usable in this process")
        return torch.device("cuda")
    return torch.device("cuda") if ok else torch.device("cpu")


def read_hf_config(path: Path) -> ModelArch:
    f = path / "config.json"
    if not f.is_file():
        raise ModelLoadError(f"model.path: {path} has no config.json")
    try:
        return ModelArch.from_hf(json.loads(f.read_text()), source=str(f))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{f}: invalid JSON: {e}") from None


@torch.no_grad()
def dummy_model(arch: ModelArch, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                seed: int = 0) -> CausalLM:
    """vLLM's ``load_format: dummy``: the architecture with seeded random weights, allocated
    directly on ``device`` in ``dtype`` (no float32 copy, no host staging: an 8B shape is 16 GB
    of bf16 on the GPU and nothing on the host).

    Linear weights ~ N(0, 1/fan_in) (so activations keep unit scale through 32+ layers and
    logits stay finite), embeddings ~ N(0, 1), norm gains 1 +- small noise. The same seed on
    the same device type gives the same weights.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = CausalLM(arch).to(dtype)  # cast while weightless: to_empty then allocates dtype only
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.normal_(0.0, 0.02, generator=gen).add_(1.0)
        elif name.endswith("embed_tokens.weight"):
            p.data.normal_(0.0, 1.0, generator=gen)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    # Non-persistent buffers come out of to_empty uninitialised: recompute (float32, as Rotary does).
    model.rotary.inv_freq = inverse_frequencies(arch).to(device)
    return model.eval()


def tokenizer_from_config(cfg: ModelConfig) -> Tokenizer:
    """The tokenizer alone (what a router needs), without building the model's weights."""
    path = checkpoint_dir(cfg)
    if path is None:
        return load_tokenizer(None, tiny_model(cfg.seed).arch.eos_token_id)
    return load_tokenizer(path, read_hf_config(path).eos_token_id)


def load_from_config(cfg: ModelConfig, device: torch.device | str | None = None, *,
                     has_gpu: bool | None = None) -> tuple[CausalLM, Tokenizer]:
    """Build the model ``cfg`` names on ``device`` (default: ``resolve_device(cfg, has_gpu)``)."""
    dtype = _DTYPES[cfg.dtype]
    dev = torch.device(device) if device is not None else resolve_device(cfg, has_gpu)
    path = checkpoint_dir(cfg)
    if path is None:
        model = to_device(tiny_model(cfg.seed), dev, dtype)
        return model, load_tokenizer(None, model.arch.eos_token_id)
    if cfg.load_format == "dummy":
        model = dummy_model(read_hf_config(path), dev, dtype, cfg.seed)
        return model, load_tokenizer(path, model.arch.eos_token_id)
    model = to_device(load_model(path, dtype), dev, dtype)
    return model, load_tokenizer(path, model.arch.eos_token_id)


def to_device(model: CausalLM, device: torch.device | str, dtype: torch.dtype) -> CausalLM:
    """The model's weights on ``device`` in ``dtype``; RoPE's frequencies stay float32 (in bf16
    the angles at 128k positions would be off by whole turns)."""
    inv = model.rotary.inv_freq.float()
    model = model.to(device=device, dtype=dtype)
    model.rotary.inv_freq = inv.to(device)
    return model

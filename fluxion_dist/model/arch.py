"""Architecture hyper-parameters of a Llama/Qwen-family GQA decoder, read from an HF config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from fluxion_dist.errors import ModelLoadError

Architecture = Literal["llama", "qwen3"]

_HF_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelArch:
    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises q and k per head before RoPE."""
        return self.architecture == "qwen3"

    @property
    def gqa_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArch":
        archs = cfg.get("architectures") or []
        known = [_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES]
        if not known:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(_HF_ARCHITECTURES)}")
        try:
            heads = int(cfg["num_attention_heads"])
            scaling = cfg.get("rope_scaling")
            rope = None
            if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
                rope = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                   float(scaling["high_freq_factor"]),
                                   int(scaling["original_max_position_embeddings"]))
            elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
                raise ModelLoadError(f"{source}: unsupported rope_scaling {scaling!r} (supported: llama3)")
            eos = cfg.get("eos_token_id")
            return cls(
                architecture=known[0],
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rope_scaling=rope,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: bad value: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        name = {v: k for k, v in _HF_ARCHITECTURES.items()}[self.architecture]
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("architecture", "rope_scaling")}
        out["architectures"] = [name]
        out["model_type"] = self.architecture
        out["hidden_act"] = "silu"
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return out

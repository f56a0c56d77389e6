"""A Llama/Qwen3-family GQA decoder in torch whose decode attention is a pluggable hook.

Module names mirror Hugging Face's (``model.layers.N.self_attn.q_proj`` ...) so an HF
state dict loads with no renaming. ``prefill`` runs dense causal attention over the
prompt and hands back every layer's post-RoPE K/V; ``decode_step`` computes q, k, v for
one new token per sequence and asks the hook for the attention output, so the KV cache
(and which of it is read) belongs to the hook, not to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.rope import Rotary, apply_rotary


class AttentionHook(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [B, Hq, d]``, the new token's ``k, v [B, Hkv, d]`` (post-RoPE) -> output ``[B, Hq, d]``.

        The hook appends ``k, v`` to its cache before attending, so the new token sees itself.
        """


LayerKVCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True, slots=True)
class PrefillOutput:
    logits: torch.Tensor  # [T, vocab]
    keys: list[torch.Tensor]  # per layer [T, Hkv, d], post-RoPE
    values: list[torch.Tensor]  # per layer [T, Hkv, d]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        hq, hkv, d = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
        bias = arch.attention_bias
        self.q_proj = nn.Linear(arch.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(arch.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(arch.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, arch.hidden_size, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.rms_norm_eps)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``x [N, hidden]`` -> post-RoPE ``q [N, Hq, d]``, ``k, v [N, Hkv, d]``."""
        a = self.arch
        q = self.q_proj(x).view(-1, a.num_attention_heads, a.head_dim)
        k = self.k_proj(x).view(-1, a.num_key_value_heads, a.head_dim)
        v = self.v_proj(x).view(-1, a.num_key_value_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.self_attn = SelfAttention(arch)
        self.mlp = MLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class _Backbone(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.model = _Backbone(arch)
        self.rotary = Rotary(arch)
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        w = self.model.embed_tokens.weight if self.arch.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, w).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, on_layer_kv: LayerKVCallback | None = None, *,
                all_logits: bool = True, chunk_tokens: int | None = None, keep_kv: bool = True) -> PrefillOutput:
        """Dense causal forward over one prompt ``tokens [T]``.

        ``on_layer_kv(layer, k, v)`` is called as soon as each layer's K/V exist, so a
        caller can ship layer ``i`` while layer ``i + 1`` computes. With ``all_logits=False``
        only the last position's logits are computed (``logits [1, vocab]``): all a server needs.

        ``chunk_tokens``: the prompt goes through each layer ``chunk_tokens`` rows at a time,
        each chunk attending causally over the layer's K/V so far, so the activations (the MLP's
        ``[chunk, intermediate]``, the attention's working set) are bounded by the chunk, not the
        prompt; the layer's K/V are whole when ``on_layer_kv`` sees them. ``keep_kv=False``
        returns no K/V (a server ships them through ``on_layer_kv``; keeping every layer's
        would hold the whole cache on the device).
        """
        if tokens.ndim != 1 or tokens.numel() == 0:
            raise ValueError(f"prefill takes a non-empty 1-D token tensor; got shape {tuple(tokens.shape)}")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1 or None; got {chunk_tokens}")
        a = self.arch
        n = tokens.numel()
        step = n if chunk_tokens is None else chunk_tokens
        bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
        cos, sin = self.rotary.cos_sin(torch.arange(n, device=tokens.device))
        h = self.model.embed_tokens(tokens)
        keys, values = [], []
        for i, layer in enumerate(self.model.layers):
            k_all = torch.empty((n, a.num_key_value_heads, a.head_dim), dtype=h.dtype, device=h.device)
            v_all = torch.empty_like(k_all)
            for lo, hi in bounds:
                q, k, v = layer.self_attn.qkv(layer.input_layernorm(h[lo:hi]), cos[lo:hi], sin[lo:hi])
                k_all[lo:hi], v_all[lo:hi] = k, v
                h[lo:hi] = self._prefill_rows(layer, h[lo:hi], q, k_all[:hi], v_all[:hi])
            if on_layer_kv is not None:
                on_layer_kv(i, k_all, v_all)
            if keep_kv:
                keys.append(k_all)
                values.append(v_all)
        return PrefillOutput(self._logits(h if all_logits else h[-1:]), keys, values)

    @staticmethod
    def _prefill_rows(layer: DecoderLayer, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
        """Rows ``h [c, hidden]`` (the last ``c`` of ``k, v [t, Hkv, d]``) through the rest of the layer."""
        c, t = q.shape[0], k.shape[0]
        # 4-D inputs: with 3-D ones torch falls back to the math kernel, which materialises T x T.
        # Lower-right causal: row r of the chunk is token t - c + r and sees keys 0..t - c + r.
        mask = None if c == t else causal_lower_right(c, t)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, enable_gqa=True)[0]
        h = h + layer.self_attn.o_proj(attn.transpose(0, 1).reshape(c, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, attend: AttentionHook) -> torch.Tensor:
        """One new token per sequence: ``tokens, positions [B]`` -> logits ``[B, vocab]``."""
        if tokens.shape != positions.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tuple(tokens.shape)} and positions {tuple(positions.shape)} must be [B]")
        h, cos, sin = self.decode_embed(tokens, positions)
        for i in range(len(self.model.layers)):
            q, k, v = self.decode_qkv(i, h, cos, sin)
            h = self.decode_rest(i, h, attend(i, q, k, v))
        return self._logits(h)

    # The pieces of a decode step, in order (a runner may replay each as a CUDA graph, with the
    # attention hook run between them): embed -> per layer (qkv, hook, rest) -> logits.
    def decode_embed(self, tokens: torch.Tensor, positions: torch.Tensor):
        """``tokens, positions [B]`` -> the hidden state ``[B, hidden]`` and RoPE's ``cos, sin``."""
        cos, sin = self.rotary.cos_sin(positions)
        return self.model.embed_tokens(tokens), cos, sin

    def decode_qkv(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer ``layer``'s post-RoPE ``q [B, Hq, d]``, ``k, v [B, Hkv, d]`` for the hook."""
        lay = self.model.layers[layer]
        return lay.self_attn.qkv(lay.input_layernorm(h), cos, sin)

    def decode_rest(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The layer after attention: ``h`` plus the projected ``attn [B, Hq, d]``, then the MLP."""
        lay = self.model.layers[layer]
        h = h + lay.self_attn.o_proj(attn.reshape(h.shape[0], -1).to(h.dtype))
        return h + lay.mlp(lay.post_attention_layernorm(h))

    def decode_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._logits(h)

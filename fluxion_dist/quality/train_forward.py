"""Batched causal forward with gradients over a ``CausalLM``'s own modules, for training.

``CausalLM.prefill`` is inference-only and one sequence at a time; training needs
``[B, T]`` batches and autograd. This reuses the model's submodules (so the weights
trained here are exactly the ones the serving path loads) and changes only the
batching: all B*T tokens go through the projections as one matrix, and attention
is one SDPA call over ``[B, H, T, d]`` (flash attention under bf16 autocast on a GPU).

Two losses. ``answer_loss`` (v1, the word tasks): only where a task has an answer,
since the filler haystack is random and carries no signal. ``lm_loss`` (v2, natural
text): next-token loss over every position, so the model learns the language its
haystacks are made of (and attention that looks like a real LM's), mixed with the
answer loss at a fixed share: ``answer_share`` of the loss is the mean over answer
tokens, the rest the mean over the text. A per-token weight instead would let the text
swamp the answers as contexts grow (one question per 32k tokens) and shift the
balance with every change of how many questions a sample asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.quality.tasks import Sample


def hidden_states(model: CausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [B, T]`` -> last hidden states ``[B, T, hidden]`` (before the final norm)."""
    b, t = tokens.shape
    arch = model.arch
    hq, hkv, d = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    cos, sin = model.rotary.cos_sin(torch.arange(t, device=tokens.device))
    cos, sin = cos.repeat(b, 1), sin.repeat(b, 1)  # qkv() takes one row per token
    h = model.model.embed_tokens(tokens.reshape(-1))
    for layer in model.model.layers:
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
        q = q.view(b, t, hq, d).transpose(1, 2)
        # repeat rather than enable_gqa: flash attention takes it on every torch we run
        k = k.view(b, t, hkv, d).transpose(1, 2).repeat_interleave(arch.gqa_group, 1)
        v = v.view(b, t, hkv, d).transpose(1, 2).repeat_interleave(arch.gqa_group, 1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b * t, hq * d))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h.view(b, t, -1)


@dataclass(frozen=True, slots=True)
class AnswerIndex:
    """Where a batch's answers are: the flat token positions to predict and their owners."""

    rows: torch.Tensor  # int64 [N] batch row of each answer token
    cols: torch.Tensor  # int64 [N] position of the answer token (predicted from cols - 1)
    span_id: torch.Tensor  # int64 [N] which answer span (over the batch) the token belongs to
    span_task: list[str]  # per span: its sample's task

    @classmethod
    def of(cls, samples: list[Sample], device: torch.device) -> "AnswerIndex":
        rows, cols, ids, tasks = [], [], [], []
        for r, s in enumerate(samples):
            for start, end in s.spans:
                rows.append(np.full(end - start, r))
                cols.append(np.arange(start, end))
                ids.append(np.full(end - start, len(tasks)))
                tasks.append(s.task)
        cat = lambda xs: torch.from_numpy(np.concatenate(xs)).to(device)  # noqa: E731
        return cls(cat(rows), cat(cols), cat(ids), tasks)


@dataclass(frozen=True, slots=True)
class BatchResult:
    loss: torch.Tensor  # scalar, mean cross-entropy over answer tokens
    span_correct: torch.Tensor  # bool [spans]: every token of the answer is the argmax (teacher forced)
    span_task: list[str]


def batch_tokens(samples: list[Sample], device: torch.device) -> torch.Tensor:
    lengths = {s.tokens.size for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"a training batch needs one sequence length; got {sorted(lengths)}")
    return torch.from_numpy(np.stack([s.tokens for s in samples])).to(device)


def answer_loss(model: CausalLM, samples: list[Sample], device: torch.device) -> BatchResult:
    tokens = batch_tokens(samples, device)
    idx = AnswerIndex.of(samples, device)
    h = hidden_states(model, tokens)
    logits = model._logits(h[idx.rows, idx.cols - 1])  # [N, vocab] float32
    target = tokens[idx.rows, idx.cols]
    # a plain mean over answer tokens: the copy task's many tokens dominate early, which is
    # what forms the shared lookup circuit fast (a per-task mean delayed it several-fold)
    loss = F.cross_entropy(logits, target)
    wrong = (logits.argmax(-1) != target).long()
    n_spans = len(idx.span_task)
    span_wrong = torch.zeros(n_spans, dtype=torch.long, device=device).index_add_(0, idx.span_id, wrong)
    return BatchResult(loss, span_wrong == 0, idx.span_task)


@dataclass(frozen=True, slots=True)
class LMResult:
    loss: torch.Tensor  # scalar: (1 - share) x text mean + share x answer mean cross-entropy
    lm_loss: torch.Tensor  # scalar, detached: mean cross-entropy over the non-answer tokens
    span_loss: torch.Tensor  # float [spans], detached: mean cross-entropy of each answer's tokens
    span_correct: torch.Tensor  # bool [spans]: every token of the answer is the argmax (teacher forced)
    span_task: list[str]


def lm_loss(model: CausalLM, samples: list[Sample], device: torch.device, answer_share: float) -> LMResult:
    if not 0.0 <= answer_share <= 1.0:
        raise ValueError(f"answer_share must be in [0, 1]; got {answer_share}")
    tokens = batch_tokens(samples, device)
    b, t = tokens.shape
    idx = AnswerIndex.of(samples, device)
    h = hidden_states(model, tokens)
    logits = model._logits(h[:, :-1].reshape(b * (t - 1), -1))  # [B*(T-1), vocab] float32
    target = tokens[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits, target, reduction="none")
    at = idx.rows * (t - 1) + idx.cols - 1  # flat index of the position that predicts each answer token
    is_answer = torch.zeros_like(ce, dtype=torch.bool).index_fill_(0, at, True)
    text = ce[~is_answer].mean()
    loss = (1 - answer_share) * text + answer_share * ce[at].mean()
    n_spans = len(idx.span_task)
    ans = ce[at].detach()
    wrong = (logits[at].argmax(-1) != target[at]).long()
    zeros = torch.zeros(n_spans, device=device)
    span_len = zeros.index_add(0, idx.span_id, torch.ones_like(ans))
    span_loss = zeros.index_add(0, idx.span_id, ans) / span_len
    span_wrong = torch.zeros(n_spans, dtype=torch.long, device=device).index_add_(0, idx.span_id, wrong)
    return LMResult(loss, text.detach(), span_loss, span_wrong == 0, idx.span_task)


@torch.no_grad()
def text_loss(model: CausalLM, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy over ``tokens [B, T]`` of plain text."""
    h = hidden_states(model, tokens)
    logits = model._logits(h[:, :-1].reshape(-1, h.shape[-1]))
    return float(F.cross_entropy(logits.float(), tokens[:, 1:].reshape(-1)))

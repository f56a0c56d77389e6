"""Continuous batching over host-resident KV: sequences join and leave between decode steps.

The engine is synchronous and knows nothing of Ray or UCX: the actor feeds it sequences
whose prompt KV already sits in the store, calls :meth:`step` in a worker thread, and
forwards each step's events to the streams that wait for them. The model runs in a
:class:`~decode_worker.model_runner.ModelRunner` on the model's device (the GPU's, in bf16,
on a GPU decode worker): a step hands it the batch's token ids and positions and the hybrid
operator's hook, and reads back the logits (the greedy rows' argmax only, on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from decode_worker.model_runner import ModelRunner
from fluxion_dist.hybrid import HybridAttention, StepReport
from fluxion_dist.model.decoder import CausalLM
from fluxion_dist.policy.request import RequestSparse
from fluxion_dist.sampling import Sampler, SamplingParams, TokenLogprobs, token_logprobs


class PagedKV(Protocol):
    """What the engine needs of a KV store: the arena, and a request's pages per layer."""

    pages: np.ndarray  # uint16 [P, Hkv, 2, 16, d]
    kmin: np.ndarray  # uint16 [P, Hkv, d]
    kmax: np.ndarray

    def block_tables(self, request_id: str) -> list[list[int]]: ...

    def ensure_tokens(self, request_id: str, num_tokens: int) -> None:
        """Check the pages reserved at admission hold ``num_tokens``; raises ``StoreFull`` if not
        (pages never grow after admission)."""


@dataclass(slots=True)
class PagedSequence:
    """Where one sequence's KV lies in the arena: per layer, its pages in token order."""

    block_tables: list[list[int]]
    seq_len: int  # tokens whose K/V are already in the pages


@dataclass(frozen=True, slots=True)
class TokenEvent:
    request_id: str
    token: int | None  # None when the request ends without a new token (an error)
    finish_reason: str | None = None  # "stop" | "length" | "error" | "abort" (the actor's, on cancel)
    error: str | None = None
    logprobs: TokenLogprobs | None = None  # when the request's SamplingParams.logprobs asks for them
    kv_fraction: float | None = None  # of the request's KV this step's attention read (the operator's report)


@dataclass(slots=True)
class _Running:
    request_id: str
    seq: PagedSequence
    sampler: Sampler
    last_token: int
    generated: int = 1  # the prefill's first token counts
    eos: int | None = None
    sparse: RequestSparse | None = None  # the request's own policy and budget; None: the deployment's


class DecodeEngine:
    def __init__(self, model: CausalLM, kv: PagedKV, max_batch_size: int, attention: HybridAttention, *,
                 enforce_eager: bool = False) -> None:
        # the model runs where the operator attends: the GPU's q, k, v stay on the device
        device = "cuda" if attention.device == "gpu" else "cpu"
        self.runner = ModelRunner(model, max_batch_size, enforce_eager=enforce_eager, device=device)
        self.model, self.kv, self.max_batch_size = self.runner.model, kv, max_batch_size
        self.attention = attention
        self.budget_used = 0.0  # of the last step, as the attention operator reports it
        self.last_report: StepReport | None = None  # the operator's report of the last step
        self._waiting: list[_Running] = []
        self._running: list[_Running] = []

    @property
    def num_active(self) -> int:
        return len(self._waiting) + len(self._running)

    def add(self, request_id: str, prompt_len: int, first_token: int, params: SamplingParams,
            eos_token_id: int | None, sparse: RequestSparse | None = None) -> TokenEvent | None:
        """Admit a request whose prompt KV is in the store; returns an event if it is already done.
        ``sparse``: the request's validated settings (``policy.resolve_request_sparse``)."""
        if first_token == eos_token_id and not params.ignore_eos:
            return TokenEvent(request_id, None, "stop")
        if params.max_tokens <= 1:
            return TokenEvent(request_id, None, "length")
        seq = PagedSequence(self.kv.block_tables(request_id), seq_len=prompt_len)
        self._waiting.append(_Running(request_id, seq, Sampler(params), first_token,
                                      eos=None if params.ignore_eos else eos_token_id, sparse=sparse))
        return None

    def abort(self, request_id: str) -> bool:
        for queue in (self._waiting, self._running):
            for r in queue:
                if r.request_id == request_id:
                    queue.remove(r)
                    self._forget(r)
                    return True
        return False

    def _forget(self, r: _Running) -> None:
        """The operator drops the sequence's predictor state and any cached copy of its pages."""
        self.attention.release(r.request_id, [p for table in r.seq.block_tables for p in table])

    def step(self) -> list[TokenEvent]:
        """One decode step for up to ``max_batch_size`` sequences; empty when idle."""
        while self._waiting and len(self._running) < self.max_batch_size:
            self._running.append(self._waiting.pop(0))
        events: list[TokenEvent] = []
        batch: list[_Running] = []
        for r in list(self._running):
            try:
                self.kv.ensure_tokens(r.request_id, r.seq.seq_len + 1)
            except Exception as e:  # a full store ends this request only, never the step
                self._running.remove(r)
                self._forget(r)
                events.append(TokenEvent(r.request_id, None, "error", f"{type(e).__name__}: {e}"))
                continue
            r.seq.block_tables = self.kv.block_tables(r.request_id)
            batch.append(r)
        if not batch:
            return events
        hook = self.attention.step([r.seq for r in batch], [r.request_id for r in batch],
                                   [r.sparse for r in batch])
        logits = self.runner.run([r.last_token for r in batch], [r.seq.seq_len for r in batch], hook)
        tokens = self._sample(batch, logits)
        self.last_report = hook.report()
        self.budget_used = self.last_report.budget_used
        fractions = self.last_report.budget_per_request
        for i, (r, tok) in enumerate(zip(batch, tokens)):
            n = r.sampler.params.logprobs
            lp = token_logprobs(logits[i], tok, n) if n is not None else None
            r.seq.seq_len += 1
            r.last_token = tok
            r.generated += 1
            finish = None
            if tok == r.eos:
                finish = "stop"
            elif r.generated >= r.sampler.params.max_tokens:
                finish = "length"
            if finish:
                self._running.remove(r)
                self._forget(r)
            events.append(TokenEvent(r.request_id, tok, finish, logprobs=lp,
                                     kv_fraction=fractions[i] if i < len(fractions) else None))
        return events

    @staticmethod
    def _sample(batch: list[_Running], logits: torch.Tensor) -> list[int]:
        """One token per row: greedy rows by an argmax where the logits are, one read of the
        result; the others from host logits (their samplers' generators live on the host)."""
        greedy = [r.sampler.params.temperature == 0 for r in batch]
        if all(greedy):
            return logits.argmax(dim=-1).tolist()
        host = logits.float().cpu()
        return [r.sampler(host[i]) for i, r in enumerate(batch)]

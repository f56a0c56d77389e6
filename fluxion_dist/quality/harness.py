"""Run the quality model on task samples under each attention policy; collect accuracy and fidelity.

Per sample: the prompt except its last token is prefilled densely (as the prefill worker
does), then the last prompt token and every answer token are *decoded*, greedily: under a
deployment policy through the production operator (``quality.operator_decode``: the GPU
pipeline on a GPU, the CPU path elsewhere), under the oracle through the harness's own hook
(``quality.decode_hook``). So every answer token comes out of the attention being judged,
including the first, and a wrong token early on is never corrected by the reference.
A sample is correct when the greedy answer matches exactly.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fluxion_dist.config.loader import config_from_dict, parse_overrides
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.hybrid import CostModel
from fluxion_dist.model.decoder import CausalLM, PrefillOutput
from fluxion_dist.quality.decode_hook import PolicyAttention
from fluxion_dist.quality.fidelity import FidelityStats
from fluxion_dist.quality.operator_decode import OperatorRunner, PackedPrefill, pack_prefill, with_mirror_boxes
from fluxion_dist.quality.policies import METADATA, ORACLES, OracleTopK, check_policy_names, split_variant
from fluxion_dist.quality.tasks import ALL_TASKS, SHIPPED_SUITE, Sample, TaskName, TaskSuite


@dataclass(slots=True)
class Cell:
    """One (task, context, policy): exact-match counts, the fidelity sums and the decode time."""

    task: TaskName
    context: int
    policy: str
    stats: FidelityStats
    correct: int = 0
    total: int = 0
    seconds: float = 0.0  # decoding the answers (the shared prefill not counted)
    tokens: int = 0  # answer tokens decoded
    examples: list[str] = field(default_factory=list)  # a few wrong answers, for reading

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def eval_samples(task: TaskName, context: int, count: int, seed: int,
                 suite: TaskSuite = SHIPPED_SUITE) -> list[Sample]:
    """The same samples for every policy and run: seeded by (seed, task, context, index), in
    the task family (and tokenizer) of the model being evaluated (``suite``)."""
    t = ALL_TASKS.index(task)
    return [suite.make_sample(task, np.random.default_rng([seed, t, context, i]), context) for i in range(count)]


@torch.inference_mode()
def dense_prefill(model: CausalLM, tokens: torch.Tensor) -> PrefillOutput:
    """``CausalLM.prefill`` with its positions made on the tokens' device.

    ``CausalLM.prefill`` builds its position ids on the CPU (``torch.arange`` without a
    device), so it fails for a model on a GPU; the arithmetic here is the same. Attention
    gets a batch axis: 3-D float32 inputs send SDPA to its math kernel, which
    materialises the [H, T, T] scores (32 GiB at 32k tokens) and ran out of memory on an H100.
    """
    arch = model.arch
    cos, sin = model.rotary.cos_sin(torch.arange(tokens.numel(), device=tokens.device))
    h = model.model.embed_tokens(tokens)
    keys, values = [], []
    for layer in model.model.layers:
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
        keys.append(k)
        values.append(v)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.repeat_interleave(arch.gqa_group, 1).transpose(0, 1)[None],
            v.repeat_interleave(arch.gqa_group, 1).transpose(0, 1)[None], is_causal=True)[0]
        h = h + layer.self_attn.o_proj(attn.transpose(0, 1).reshape(tokens.numel(), -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return PrefillOutput(model._logits(h), keys, values)


class Prefilled:
    """One sample's dense prefill (the prompt less its last token), shared by every policy;
    its packed form for the operator's arena is made once, when first asked for."""

    def __init__(self, model: CausalLM, prompt: torch.Tensor) -> None:
        self.prompt = prompt
        self.output = dense_prefill(model, prompt[:-1])
        self._packed: dict[str, PackedPrefill] = {}

    def packed_as(self, metadata: str = "bf16") -> PackedPrefill:
        """The packed prefill with its boxes as ``metadata`` says (``policies.METADATA``)."""
        if metadata not in self._packed:
            self._packed[metadata] = (pack_prefill(self.output) if metadata == "bf16"
                                      else with_mirror_boxes(self.packed_as("bf16")))
        return self._packed[metadata]


class Runner(Protocol):
    name: str

    def run(self, model: CausalLM, pre: Prefilled, answer_len: int, stats: FidelityStats) -> list[int]: ...

    def close(self) -> None: ...


class OperatorPolicy:
    """A deployment policy, decoded by ``HybridAttention``."""

    def __init__(self, runner: OperatorRunner, metadata: str = "bf16") -> None:
        self.runner, self.name, self.metadata = runner, runner.name, metadata

    def run(self, model: CausalLM, pre: Prefilled, answer_len: int, stats: FidelityStats) -> list[int]:
        with torch.inference_mode():
            return self.runner.decode(model, pre.prompt, pre.packed_as(self.metadata), answer_len, stats)

    def close(self) -> None:
        self.runner.close()


class OraclePolicy:
    """``oracle_topk`` on the harness's own hook (it reads the true attention)."""

    def __init__(self, budget: float, compute: torch.device) -> None:
        self.oracle, self.name = OracleTopK(budget), "oracle_topk"
        self.dtype = torch.float64 if compute.type == "cpu" else torch.float32

    @torch.inference_mode()
    def run(self, model: CausalLM, pre: Prefilled, answer_len: int, stats: FidelityStats) -> list[int]:
        prompt = pre.prompt
        hook = PolicyAttention(pre.output, model.arch, self.oracle, stats, prompt.numel() + answer_len, self.dtype)
        tok, pos, out = prompt[-1:], prompt.numel() - 1, []
        for _ in range(answer_len):
            logits = model.decode_step(tok, torch.tensor([pos], device=prompt.device), hook)
            tok = logits[0].argmax().view(1)
            out.append(int(tok))
            pos += 1
        return out

    def close(self) -> None:
        pass


def deployment_sparse(budget: float, overrides: dict | None = None) -> SparseConfig:
    """The ``SparseConfig`` the deployment policies run under: ``budget`` plus field overrides,
    validated as a deployment YAML's ``decode.sparse`` is (errors name the field)."""
    overrides = dict(overrides or {})
    for key in ("policy", "budget"):
        if key in overrides:
            raise ValueError(f"--sparse {key}=... is not an override: the policies come from --policies "
                             f"and the budget from --budget")
    # the policy is set per runner; ``full`` validates the other fields
    return config_from_dict({**overrides, "policy": "full", "budget": budget}, SparseConfig)


def make_runners(model: CausalLM, names: list[str], sparse: SparseConfig, cost: CostModel, *, max_tokens: int,
                 compute: torch.device, device: str = "auto", cpu_threads: int | None = None) -> list[Runner]:
    """One runner per policy name (validated), each reused across every sample of the run."""
    runners: list[Runner] = []
    try:
        for name in check_policy_names(names):
            if name in ORACLES:
                runners.append(OraclePolicy(sparse.budget, compute))
            else:
                base, items = split_variant(name)
                overrides = parse_overrides(items)
                metadata = overrides.pop("metadata", "bf16")
                if metadata not in METADATA:
                    raise ValueError(f"{name}: metadata={metadata!r}; allowed: {', '.join(METADATA)}")
                runner = OperatorRunner(model.arch, dataclasses.replace(sparse, policy=base, **overrides),
                                        cost, max_tokens=max_tokens, compute=compute, device=device,
                                        cpu_threads=cpu_threads)
                runner.name = name
                runners.append(OperatorPolicy(runner, metadata))
    except Exception:
        for r in runners:
            r.close()
        raise
    return runners


def run_cells(model: CausalLM, runners: list[Runner], tasks: list[TaskName], contexts: list[int],
              samples: int, seed: int = 0, device: torch.device = torch.device("cpu"),
              progress=print, suite: TaskSuite = SHIPPED_SUITE) -> list[Cell]:
    cells = []
    for context in contexts:
        for task in tasks:
            row = {r.name: Cell(task, context, r.name, FidelityStats(model.arch)) for r in runners}
            for s in eval_samples(task, context, samples, seed, suite):
                pre = Prefilled(model, torch.from_numpy(s.prompt()).to(device))
                answer = s.answer().tolist()
                for r in runners:
                    cell = row[r.name]
                    t0 = time.perf_counter()
                    got = r.run(model, pre, len(answer), cell.stats)
                    cell.seconds += time.perf_counter() - t0
                    cell.tokens += len(answer)
                    cell.total += 1
                    cell.correct += got == answer
                    if got != answer and len(cell.examples) < 3:
                        cell.examples.append(f"want {answer} got {got}")
            cells += row.values()
            progress(f"{task:>13s} @ {context:6d}: " + "  ".join(
                f"{c.policy} {100 * c.accuracy:5.1f}%" for c in row.values()))
    return cells


def full_attention_correct(model: CausalLM, sample: Sample, device: torch.device = torch.device("cpu")) -> list[bool]:
    """Per answer of a (multi-question) sample, whether dense attention gets it exactly.

    One prefill over the whole sample reads off every answer token's argmax at once:
    under full attention, teacher forcing and greedy decoding agree on exact match.
    """
    tokens = torch.from_numpy(sample.tokens).to(device)
    pred = dense_prefill(model, tokens).logits.argmax(-1)
    return [bool((pred[a - 1:b - 1] == tokens[a:b]).all()) for a, b in sample.spans]

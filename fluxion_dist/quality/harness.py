"""Run the quality model on task samples under each attention policy; collect accuracy and fidelity.

Per sample: the prompt except its last token is prefilled densely (as the prefill
worker does), then the last prompt token and every answer token are *decoded* with
the policy's hook, greedily. So every answer token comes out of sparse attention,
including the first, and a wrong token early on is never corrected by the reference.
A sample is correct when the greedy answer matches exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import torch.nn.functional as F

from fluxion_dist.model.decoder import CausalLM, PrefillOutput
from fluxion_dist.quality.decode_hook import FidelityStats, PolicyAttention
from fluxion_dist.quality.policies import Policy
from fluxion_dist.quality.tasks import TASKS, Sample, TaskName, make_sample


@dataclass(slots=True)
class Cell:
    """One (task, context, policy): exact-match counts and the fidelity sums."""

    task: TaskName
    context: int
    policy: str
    stats: FidelityStats
    correct: int = 0
    total: int = 0
    examples: list[str] = field(default_factory=list)  # a few wrong answers, for reading

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def eval_samples(task: TaskName, context: int, count: int, seed: int) -> list[Sample]:
    """The same samples for every policy and run: seeded by (seed, task, context, index)."""
    t = TASKS.index(task)
    return [make_sample(task, np.random.default_rng([seed, t, context, i]), context) for i in range(count)]


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


def decode_answer(model: CausalLM, prompt: torch.Tensor, prefill, answer_len: int, policy: Policy,
                  stats: FidelityStats) -> list[int]:
    hook = PolicyAttention(prefill, model.arch, policy, stats, capacity=prompt.numel() + answer_len)
    tok, pos, out = prompt[-1:], prompt.numel() - 1, []
    for _ in range(answer_len):
        logits = model.decode_step(tok, torch.tensor([pos], device=prompt.device), hook)
        tok = logits[0].argmax().view(1)
        out.append(int(tok))
        pos += 1
    return out


def run_cells(model: CausalLM, policies: list[Policy], tasks: list[TaskName], contexts: list[int],
              samples: int, seed: int = 0, device: torch.device = torch.device("cpu"),
              progress=print) -> list[Cell]:
    cells = []
    for context in contexts:
        for task in tasks:
            row = {p.name: Cell(task, context, p.name, FidelityStats(model.arch)) for p in policies}
            for s in eval_samples(task, context, samples, seed):
                prompt = torch.from_numpy(s.prompt()).to(device)
                answer = s.answer().tolist()
                pre = dense_prefill(model, prompt[:-1])
                for p in policies:
                    cell = row[p.name]
                    got = decode_answer(model, prompt, pre, len(answer), p, cell.stats)
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

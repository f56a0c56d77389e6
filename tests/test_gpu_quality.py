"""The quality harness on the GPU: deployment policies decode through the device pipeline
(``HybridAttention`` with ``device="gpu"``), and the fidelity is read back from the selection
the pipeline recorded. Under ``full`` the answers are the dense model's own greedy decode; under
``quest_gpu`` and ``fluxion`` the recorded blocks are exactly what the pipeline attended (its
output equals a float64 attention over them) and the harness's recall is the float64 one.
Skipped with a reason where no GPU runs kernels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests import gpu_util

gpu_util.skip_unless_gpu()

from fluxion_dist.attention import reference  # noqa: E402
from fluxion_dist.attention.layout import unpack_kv_blocks  # noqa: E402
from fluxion_dist.hybrid import calibrate  # noqa: E402
from fluxion_dist.quality.fidelity import FidelityStats  # noqa: E402
from fluxion_dist.quality.harness import Prefilled, deployment_sparse, dense_prefill  # noqa: E402
from fluxion_dist.quality.model import load_quality_model  # noqa: E402
from fluxion_dist.quality.operator_decode import OperatorRunner  # noqa: E402
from fluxion_dist.quality.tasks import make_sample  # noqa: E402

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model():
    torch.backends.cuda.matmul.allow_tf32 = False
    return load_quality_model().to(CUDA)


@pytest.fixture(scope="module")
def cost(model):
    a = model.arch
    return calibrate(a.head_dim, a.num_key_value_heads, a.gqa_group, num_threads=2, blocks_per_row=256)


def _runner(model, cost, policy, budget, max_tokens):
    sparse = dataclasses.replace(deployment_sparse(budget), policy=policy)
    runner = OperatorRunner(model.arch, sparse, cost, max_tokens=max_tokens, compute=CUDA, device="gpu", cpu_threads=2)
    assert runner.op.device == "gpu"
    return runner


def test_full_on_the_gpu_is_the_dense_models_greedy_decode(model, cost):
    runner = _runner(model, cost, "full", 0.05, 4200)
    try:
        for i, (task, length) in enumerate([("kv_retrieval", 4111), ("passkey", 1333), ("var_tracking", 2049)]):
            s = make_sample(task, np.random.default_rng([21, i]), length)
            prompt = torch.from_numpy(s.prompt()).to(CUDA)
            pre = Prefilled(model, prompt)
            stats = FidelityStats(model.arch)
            got = runner.decode(model, prompt, pre.packed_as(), len(s.answer()) + 1, stats)
            tokens = torch.cat([prompt, torch.tensor(got[:-1], device=CUDA)])
            pred = dense_prefill(model, tokens).logits.argmax(-1)[prompt.numel() - 1:].tolist()
            assert got == pred, (task, length)
            m = stats.mean()
            np.testing.assert_allclose(m["recall"], 1.0, atol=1e-5)
            np.testing.assert_array_equal(m["budget"], 1.0)
            assert m["rel_err"].max() < 1e-3
    finally:
        runner.close()


class _Recorder:
    def __init__(self, hook):
        self.hook, self.calls = hook, {}

    def __call__(self, layer, q, k, v):
        out = self.hook(layer, q, k, v)
        self.calls[layer] = (q[0].double().cpu().numpy(), out[0].double().cpu().numpy())
        return out


@pytest.mark.parametrize("policy,budget", [("quest_gpu", 0.05), ("quest_gpu", 0.3), ("fluxion", 0.05)])
def test_the_recorded_selection_is_what_the_pipeline_attended(model, cost, policy, budget):
    arch = model.arch
    runner = _runner(model, cost, policy, budget, 6000)
    try:
        s = make_sample("kv_retrieval", np.random.default_rng(3), 5003)
        prompt = torch.from_numpy(s.prompt()).to(CUDA)
        pre = Prefilled(model, prompt)
        seq, rid = runner.begin(pre.packed_as())
        tok = prompt[-1:]
        for step in range(3):  # fluxion's first step measures demand; the next ones use it
            stats = FidelityStats(arch)
            rec = _Recorder(runner.hook(seq, rid, stats))
            with torch.inference_mode():
                logits = model.decode_step(tok, torch.tensor([seq.seq_len], device=CUDA), rec)
            t = seq.seq_len + 1
            nb = -(-t // 16)
            for layer in range(arch.num_hidden_layers):
                indptr, blocks = rec.hook.inner.selections[layer]
                ids = [blocks[indptr[h]:indptr[h + 1]].astype(np.int64) for h in range(arch.num_key_value_heads)]
                assert all(i.size and (np.diff(i) > 0).all() and i[0] >= 0 and i[-1] < nb for i in ids)
                assert all(nb - 1 in i for i in ids)  # the new token's block
                if policy == "quest_gpu":
                    assert [i.size for i in ids] == [int(np.ceil(budget * nb))] * len(ids)
                pages = np.asarray(seq.block_tables[layer][:nb])
                k, v = unpack_kv_blocks(runner.arena.kv_pages[pages], t)
                # the mirror the fidelity is computed over is the arena's K/V, the new token included
                np.testing.assert_array_equal(seq.keys[layer][:t].cpu().numpy(), k)
                np.testing.assert_array_equal(seq.values[layer][:t].cpu().numpy(), v)
                q, out = rec.calls[layer]
                sparse = reference.merge_partials([reference.partial_attention(q, k, v, ids)])
                np.testing.assert_allclose(out, sparse, rtol=2e-3, atol=2e-4, err_msg=f"{policy} step {step} L{layer}")
                logits64 = np.einsum("hd,thd->ht", q, np.repeat(k.astype(np.float64), arch.gqa_group, 1)) / np.sqrt(q.shape[1])
                p = np.exp(logits64 - logits64.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                mask = np.zeros((len(ids), nb), bool)
                for h, i in enumerate(ids):
                    mask[h, i] = True
                tokm = np.repeat(np.repeat(mask, 16, 1)[:, :t], arch.gqa_group, 0)
                np.testing.assert_allclose(stats.recall[layer], (p * tokm).sum(1), atol=1e-5)
            seq.seq_len += 1
            tok = logits[0].argmax().view(1)
        runner.end(seq, rid)
    finally:
        runner.close()

"""The decode model runner on the CPU: padded batch sizes, sequences joining and leaving between
steps, and logits equal to the plain model's decode_step over the same (dense, in-memory) KV."""

from __future__ import annotations

import pytest
import torch

from decode_worker.model_runner import ModelRunner, padded_batch_sizes
from fluxion_dist.model.dense_cache import DenseKVCache
from fluxion_dist.model.hbm_kv import DenseHBMKV
from fluxion_dist.model.tiny import TINY_ARCH, tiny_model


@pytest.mark.parametrize("max_bs, want", [(1, (1,)), (3, (1, 2, 3)), (8, (1, 2, 4, 8)), (17, (1, 2, 4, 8, 16, 17))])
def test_padded_batch_sizes(max_bs, want):
    assert padded_batch_sizes(max_bs) == want
    runner = ModelRunner(tiny_model(0), max_bs)
    assert [runner.padded(n) for n in range(1, max_bs + 1)] == [next(b for b in want if b >= n)
                                                                 for n in range(1, max_bs + 1)]
    with pytest.raises(ValueError, match="holds 1.."):
        runner.padded(max_bs + 1)


class _Seq:
    """One sequence and its oracle: the plain model decoding it alone over a DenseKVCache."""

    def __init__(self, model, prompt, slot, kv: DenseHBMKV):
        pre = model.prefill(torch.tensor(prompt))
        self.cache = DenseKVCache(model.arch.num_hidden_layers)
        self.cache.add_sequence(pre)
        kv.adopt(slot, pre.keys, pre.values)
        self.slot, self.pos, self.last = slot, len(prompt), int(pre.logits[-1].argmax())

    def reference(self, model):
        return model.decode_step(torch.tensor([self.last]), torch.tensor([self.pos]), self.cache)[0]


def test_runner_logits_equal_plain_decode_step_with_join_and_leave():
    torch.manual_seed(0)
    model = tiny_model(seed=4)
    runner = ModelRunner(model, 4)
    kv = DenseHBMKV(TINY_ARCH, num_slots=6, max_len=1100, device="cpu", max_batch_size=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 15, 17, 1000, 33, 16)]
    seqs = {i: _Seq(model, p, i, kv) for i, p in enumerate(prompts[:3])}
    late = {i: p for i, p in enumerate(prompts) if i >= 3}
    for step in range(7):
        if step == 2:  # two join
            for i in (3, 4):
                seqs[i] = _Seq(model, late.pop(i), i, kv)
            seqs.pop(0)  # and one leaves
        if step == 5:
            seqs.pop(3)
            seqs[5] = _Seq(model, late.pop(5), 5, kv)
        batch = list(seqs.values())
        kv.set_rows([s.slot for s in batch])
        got = runner.run([s.last for s in batch], [s.pos for s in batch], kv)
        assert got.shape == (len(batch), TINY_ARCH.vocab_size)
        for row, s in zip(got, batch):
            want = s.reference(model)
            torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-4)
            s.last, s.pos = int(want.argmax()), s.pos + 1
    assert runner.graph_replays == 0  # the CPU runs eagerly


def test_runner_rejects_mismatched_inputs():
    runner = ModelRunner(tiny_model(0), 2)
    kv = DenseHBMKV(TINY_ARCH, 2, 64, "cpu", 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="positions"):
        runner.run([1, 2], [3], kv)
    with pytest.raises(ValueError, match="outside"):
        kv.set_rows([2])


def test_padded_rows_write_the_spare_column_not_a_live_row():
    """A captured batch's padding rows (position 0, slot 0) must leave slot 0's keys intact: they
    write the one spare column per slot, the baseline's only HBM beyond the requests' own KV."""
    arch = TINY_ARCH
    kv = DenseHBMKV(arch, 2, 32, "cpu", 4, dtype=torch.float32)
    assert kv.k[0].shape == (2, arch.num_key_value_heads, 33, arch.head_dim)
    g = torch.Generator().manual_seed(3)
    for t in kv.k + kv.v:
        t.normal_(generator=g)
    before = kv.k[0][0, :, :32].clone()
    kv.set_rows([1])
    kv.bind(torch.tensor([5, 0, 0, 0]))
    hq, d = arch.num_attention_heads, arch.head_dim
    new_k = torch.randn(4, arch.num_key_value_heads, d, generator=g)
    kv(0, torch.randn(4, hq, d, generator=g), new_k, torch.randn(4, arch.num_key_value_heads, d, generator=g))
    torch.testing.assert_close(kv.k[0][0, :, :32], before)  # slot 0 untouched by the padding
    torch.testing.assert_close(kv.k[0][1, :, 5], new_k[0])  # the live row wrote its position
    torch.testing.assert_close(kv.k[0][0, :, 32], new_k[3])  # the last padding row's write

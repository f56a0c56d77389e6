"""The GPU prefill's on-device packing (prefill_worker.layer_offload.pack_on_device), run on the
CPU: bit for bit the KV store's own pack_layer (paged bf16 layout, zero tail, min/max over the
valid keys only) for awkward lengths and GQA shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_store.packing import pack_layer
from prefill_worker.layer_offload import pack_on_device


@pytest.mark.parametrize("t", [1, 15, 16, 17, 1000])
@pytest.mark.parametrize("hkv, d", [(1, 64), (4, 16), (8, 128)])
def test_pack_on_device_equals_the_stores_packing(t, hkv, d):
    g = torch.Generator().manual_seed(t * 100 + hkv)
    k = (3 * torch.randn((t, hkv, d), generator=g)).to(torch.bfloat16)
    v = torch.randn((t, hkv, d), generator=g).to(torch.bfloat16)
    want = pack_layer(k, v)
    got = [x.numpy().view(np.uint16) for x in pack_on_device(k, v)]
    for name, a, b in zip(("blocks", "kmin", "kmax"), got, want):
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)

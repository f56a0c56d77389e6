"""GPU kernels (CuPy raw CUDA) for the decode path: one concept per module.

- :mod:`~fluxion_dist.kernels.scoring`: ``quest_scores`` (Quest block scores, 16/64/256 tokens)
- :mod:`~fluxion_dist.kernels.selection`: ``select_topk``, ``select_topp`` -> ``Selection`` (CSR)
- :mod:`~fluxion_dist.kernels.attention`: ``sparse_partial_attention`` (GPU cache / UVA host KV)
- :mod:`~fluxion_dist.kernels.merge`: ``merge_states``, ``merge_attention`` (exact LSE merge)
- :mod:`~fluxion_dist.kernels.append`: ``append_kv`` (new token's K/V + block metadata)
- :mod:`~fluxion_dist.kernels.uva`: ``pinned_empty``, ``map_host_array`` (host memory for UVA reads)
- :mod:`~fluxion_dist.kernels.device`: ``gpu_unavailable_reason``, ``sm_count``
- :mod:`~fluxion_dist.kernels.loader`: the ``.cu``/``.cuh`` sources, their ``-D`` options, the module cache
- :mod:`~fluxion_dist.kernels.checks`, :mod:`~fluxion_dist.kernels.counters`: launcher argument
  checks; per-stream arrival counters for last-CTA steps

The launcher modules import CuPy; this package and ``loader``/``device`` do not, so the
CPU-only compile check and CI can import them. The argument contract is
``fluxion_dist/attention/KERNEL_API.md``; the oracle is ``fluxion_dist.attention.reference``.
"""

"""The CPU path: multithreaded Cython kernels over the host-resident paged bf16 KV.

- ``attention``: sparse partial attention (the merge contract of KERNEL_API.md);
- ``selection``: Quest block scoring, top-k / top-p, block -> token selection;
- ``torch_baseline``: the same attention in plain torch, the benchmark's baseline.

The compiled modules (``_attention``, ``_selection``, ``_stream``) are built by
``pip install``; import the Python modules above, which check arguments first.
"""

"""The CPU path: multithreaded Cython kernels over the host-resident paged bf16 KV.

- ``attention``: sparse partial attention (the merge contract of KERNEL_API.md);
- ``selection``: Quest block scoring, top-k / top-p, block -> token selection;
- ``torch_baseline``: the same attention in plain torch, the benchmark's baseline;
- ``synthetic_arena``: random paged arenas and selections for the tests and the benchmark.

The compiled modules (``_attention``, ``_selection``, ``_stream``; C kernels in the
``.h`` files beside them) are built by ``pip install``; import the Python modules
above, which check arguments first.
"""

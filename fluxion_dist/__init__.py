"""fluxion-dist: disaggregated prefill/decode serving with hybrid sparse attention over host KV."""

__version__ = "0.1.0"

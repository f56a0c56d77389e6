"""Pages of the running sequences in the decode node's store.

A request holds two entries in the store: the prompt's pages (written by the KV transfer)
and ``<id>/decode`` for the tokens it will generate, reserved at admission so a sequence
never runs out of pages mid-decode. Its block table per layer is the prompt's pages followed
by the decode pages: token ``p`` lives in block ``p // 16`` either way.
"""

from __future__ import annotations

from fluxion_dist.attention.layout import BLOCK_TOKENS
from kv_store import KVStore, StoreFull

def decode_entry(request_id: str) -> str:
    return f"{request_id}/decode"


class SequencePages:
    def __init__(self, store: KVStore, lease_s: float) -> None:
        self.store = store
        self.geometry = store.geometry
        self.lease_s = lease_s
        self.pages = store.arena.pages
        self.kmin = store.arena.kmin
        self.kmax = store.arena.kmax
        self._tables: dict[str, list[list[int]]] = {}

    def admit(self, request_id: str, prompt_len: int, max_tokens: int) -> None:
        """Reserve the generated tokens' pages; refuse now if the prompt's would not fit too."""
        g = self.geometry
        prompt_pages = g.num_layers * g.blocks_for(prompt_len)
        extra_blocks = g.blocks_for(prompt_len + max_tokens) - g.blocks_for(prompt_len)
        stats = self.store.stats()
        free = stats.total_pages - stats.used_pages
        if prompt_pages + g.num_layers * extra_blocks > free:
            raise StoreFull(prompt_pages + g.num_layers * extra_blocks, free,
                            f"prompt of {prompt_len} + {max_tokens} new tokens")
        if extra_blocks:
            # Leased: if the prompt never arrives, the pages come back on their own.
            self.store.reserve(decode_entry(request_id), extra_blocks * BLOCK_TOKENS, ttl_s=self.lease_s)

    def adopt(self, request_id: str) -> int:
        """Claim a prompt that is READY in the store; returns its length."""
        prompt = self.store.claim(request_id)
        tables = [list(map(int, prompt.block_table(layer))) for layer in range(self.geometry.num_layers)]
        extra_id = decode_entry(request_id)
        if extra_id in self.store:
            extra = self.store.handle(extra_id)
            self.store.keep(extra_id)  # freed by release from now on, not by a lease
            for layer, table in enumerate(tables):
                table.extend(map(int, extra.block_table(layer)))
        self._tables[request_id] = tables
        return prompt.num_tokens

    def block_tables(self, request_id: str) -> list[list[int]]:
        return self._tables[request_id]

    def ensure_tokens(self, request_id: str, num_tokens: int) -> None:
        have = len(self._tables[request_id][0]) * BLOCK_TOKENS
        if num_tokens > have:
            raise StoreFull(1, 0, f"request {request_id} outgrew the {have} token slots reserved at admission")

    def release(self, request_id: str, *, prompt_in_flight: bool = False) -> bool:
        """Free every page of the request; False if it held none. With ``prompt_in_flight`` the
        prompt's pages are left to the transport (UCX may still be writing into them)."""
        extra_id = decode_entry(request_id)
        held = request_id in self.store or extra_id in self.store
        if not prompt_in_flight:
            self.store.abort(request_id)
        self.store.abort(extra_id)
        self._tables.pop(request_id, None)
        return held

    def occupancy(self) -> dict:
        s = self.store.stats()
        return {"used_pages": s.used_pages, "free_pages": s.total_pages - s.used_pages,
                "total_pages": s.total_pages, "kv_bytes_in": s.bytes_in}

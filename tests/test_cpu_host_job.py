"""The CPU share as a CUDA host node's function (``cpu/host_job.h``), called here directly.

The job is made once over fixed buffers and reads whatever they hold when it runs: the same
bits as ``AttentionTeam.attend`` on the same inputs, call after call with the inputs rewritten
in place; the entry count comes from the routing's counts; an empty share writes an empty
partial; bad input is latched and reported by ``take_error``, never a crash.
"""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.cpu.attention import BatchPartial
from fluxion_dist.cpu.synthetic_arena import paged_batch, random_selection
from fluxion_dist.cpu.team import AttentionTeam
from tests.cpu_util import ISAS

KINDS = ["one", 0.3, "all", "empty", 0.05, "all", 0.5, "one"]


def _buffers(batch, capacity: int):
    b, hq, d = batch.q.shape
    rows = b * batch.kv_pages.shape[1]
    return (np.zeros_like(batch.q), np.zeros(rows + 1, np.int32), np.zeros(capacity, np.int32),
            np.zeros(4, np.int32), BatchPartial(np.zeros((b, hq, d), np.float32), np.zeros((b, hq), np.float32),
                                                np.zeros((b, hq), np.float32)))


@pytest.mark.parametrize("isa", ISAS)
def test_host_job_matches_attend_call_after_call(isa):
    rng = np.random.default_rng()
    hkv, d = 2, 128
    batch = paged_batch(rng, [17, 1000, 4111, 16], hkv, 4, d, spare_pages=5, spare_columns=2)
    scale = 1 / np.sqrt(d)
    lens = batch.seq_lens.copy()
    q, indptr, blocks, counts, out = _buffers(batch, 3000)
    with AttentionTeam(3, isa=isa) as team:
        job = team.host_job(batch.kv_pages, lens, batch.block_tables, q, indptr, blocks, counts, out, scale)
        team.bind(batch.kv_pages, batch.seq_lens, batch.q.shape[1], scale)
        for _ in range(3):  # fresh inputs written into the job's buffers, as a replay finds them
            sel_indptr, sel_blocks = random_selection(rng, batch.seq_lens, hkv, KINDS)
            q[:] = rng.standard_normal(q.shape, dtype=np.float32)
            indptr[:] = sel_indptr
            blocks[:sel_blocks.size] = sel_blocks
            blocks[sel_blocks.size:] = -7  # past the count: never read
            counts[:] = (5, 6, sel_blocks.size, 8)
            job.run()
            assert job.take_error() is None
            assert job.last_entries == sel_blocks.size
            want = team.attend(q, batch.block_tables, sel_indptr, sel_blocks)
            for got, exp in zip(out, want):
                assert np.array_equal(got, exp), "the host job must give attend's bits"


def test_empty_share_writes_an_empty_partial():
    rng = np.random.default_rng()
    batch = paged_batch(rng, [33, 70], 2, 2, 64, spare_pages=1)
    q, indptr, blocks, counts, out = _buffers(batch, 16)
    out.m[:] = 3.0
    out.l[:] = 1.0
    with AttentionTeam(2) as team:
        job = team.host_job(batch.kv_pages, batch.seq_lens, batch.block_tables, q, indptr, blocks, counts, out, 0.1)
        job.run()
    assert job.take_error() is None and job.last_entries == 0
    assert np.all(out.m == -np.inf) and np.all(out.l == 0)


def test_bad_input_is_latched_not_raised():
    rng = np.random.default_rng()
    batch = paged_batch(rng, [40, 90], 2, 2, 64, spare_pages=1)
    q, indptr, blocks, counts, out = _buffers(batch, 8)
    with AttentionTeam(2) as team:
        job = team.host_job(batch.kv_pages, batch.seq_lens, batch.block_tables, q, indptr, blocks, counts, out, 0.1)
        counts[2] = 9  # more entries than the buffer holds
        job.run()
        err = job.take_error()
        assert isinstance(err, ValueError) and "9 entries" in str(err)
        assert job.take_error() is None, "taking the error clears it"
        indptr[:] = [0, 3, 1, 2, 2]  # decreasing offsets
        counts[2] = 2
        job.run()
        assert "malformed at row" in str(job.take_error())
        assert np.all(out.m == -np.inf), "a malformed share writes an empty partial"
        indptr[:] = [0, 1, 1, 1, 1]
        counts[2] = 1
        blocks[0] = 99  # outside the first sequence's 3 blocks
        job.run()
        err = job.take_error()
        assert isinstance(err, IndexError) and "sel_blocks[0] = 99" in str(err)


def test_buffers_are_checked_when_the_job_is_made():
    rng = np.random.default_rng()
    batch = paged_batch(rng, [40], 2, 2, 64)
    q, indptr, blocks, counts, out = _buffers(batch, 8)
    with AttentionTeam(1) as team:
        with pytest.raises(ValueError, match="sel_indptr"):
            team.host_job(batch.kv_pages, batch.seq_lens, batch.block_tables, q, indptr[:-1], blocks, counts,
                          out, 0.1)
        with pytest.raises(ValueError, match="out.m"):
            team.host_job(batch.kv_pages, batch.seq_lens, batch.block_tables, q, indptr, blocks, counts,
                          out._replace(m=out.m[:, :1].copy()), 0.1)
        with pytest.raises(TypeError, match="counts"):
            team.host_job(batch.kv_pages, batch.seq_lens, batch.block_tables, q, indptr, blocks,
                          counts.astype(np.int64), out, 0.1)

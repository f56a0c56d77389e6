"""The persistent CPU team against the float64 reference and the OpenMP path, and its life cycle.

Awkward sizes (1, 15, 16, 17, 1000+ tokens), GQA groups 1, 4 and 8, every kind
of selection, several thread counts; the same bits as ``sparse_partial_attention``
with the same thread and chunk counts; workers that fall asleep between calls
and wake; argument checks per layer; threads joined on close and on collection.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

from fluxion_dist.cpu.attention import BatchPartial, sparse_partial_attention
from fluxion_dist.cpu.synthetic_arena import paged_batch, random_selection
from fluxion_dist.cpu.team import AttentionTeam
from tests.cpu_util import ISAS
from tests.test_cpu_attention import assert_matches_reference

KINDS = ["empty", "one", "all", 0.3, "all", 0.5, 0.05, "one", "all", "all", "one", 0.7]


def threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_team_matches_reference_and_openmp_path(isa, group, threads):
    rng = np.random.default_rng([group, threads, len(isa), 7])
    hkv, d = 2, 128
    batch = paged_batch(rng, [1, 15, 17, 1000, 16, 1037], hkv, group, d, spare_pages=9, spare_columns=3)
    indptr, blocks = random_selection(rng, batch.seq_lens, hkv, KINDS)
    scale = 1 / np.sqrt(d)
    with AttentionTeam(threads, isa=isa) as team:
        team.bind(batch.kv_pages, batch.seq_lens, batch.q.shape[1], scale)
        got = team.attend(batch.q, batch.block_tables, indptr, blocks)
    assert isinstance(got, BatchPartial)
    assert_matches_reference(batch, indptr, blocks, got, scale)
    want = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens,
                                    indptr, blocks, scale, num_threads=threads, isa=isa)
    assert all(np.array_equal(x, y) for x, y in zip(got, want)), "the same job must give the same bits"


def test_a_call_never_waits_for_workers_that_do_not_run():
    """Workers that are not scheduled in time (held here, as if another process had their cores)
    join no call: the caller does all the work, with the bits the whole team gives, and the held
    workers join again once released."""
    rng = np.random.default_rng()
    hkv, d = 2, 64
    batch = paged_batch(rng, [1, 17, 1000, 4111], hkv, 4, d, spare_pages=5)
    indptr, blocks = random_selection(rng, batch.seq_lens, hkv, [0.3, "all", "one", 0.05, "all", 0.5, "one", 1.0])
    words = rng.integers(0, 2**63, 9_001, dtype=np.int64).view(np.uint64)
    starts = rng.integers(0, words.size - 40, 77).astype(np.int64)
    want_fold = int(np.bitwise_xor.reduce(np.concatenate([words[s:s + 40] for s in starts])))
    with AttentionTeam(4) as team:
        team.bind(batch.kv_pages, batch.seq_lens, batch.q.shape[1], 0.125)
        whole = team.attend(batch.q, batch.block_tables, indptr, blocks)
        team._native.hold_workers(True)
        for _ in range(3):
            alone = team.attend(batch.q, batch.block_tables, indptr, blocks)
            assert all(np.array_equal(x, y) for x, y in zip(alone, whole))
            assert team.scattered_read(words, starts, 40) == want_fold
        team._native.hold_workers(False)
        again = team.attend(batch.q, batch.block_tables, indptr, blocks)
    assert_matches_reference(batch, indptr, blocks, whole, 0.125)
    assert all(np.array_equal(x, y) for x, y in zip(again, whole))


@pytest.mark.parametrize("isa", ISAS)
def test_token_masks_and_many_layers_of_one_step(isa):
    rng = np.random.default_rng(3)
    batch = paged_batch(rng, [257, 1000, 4111], 4, 2, 64, spare_pages=3)
    pages = batch.kv_pages.shape[0]
    twice = np.concatenate([batch.kv_pages, batch.kv_pages])  # each layer reads one copy
    with AttentionTeam(3, isa=isa, chunks_per_thread=2) as team:
        team.bind(twice, batch.seq_lens, batch.q.shape[1], 0.125)
        for layer in range(6):  # new q, tables and selection per layer; scratch reused
            q = rng.standard_normal(batch.q.shape, dtype=np.float32)
            tables = np.where(batch.block_tables >= 0, batch.block_tables + pages * (layer % 2), -1)
            indptr, blocks = random_selection(rng, batch.seq_lens, 4, [0.5, "all", 0.1, "one"][layer % 4])
            masks = rng.integers(0, 1 << 16, size=blocks.shape, dtype=np.uint16)
            masks[::7] = 0
            masks = masks if layer % 2 else None
            got = team.attend(q, tables.astype(np.int32), indptr, blocks, masks)
            layer_batch = type(batch)(q, batch.kv_pages, batch.block_tables, batch.seq_lens)
            assert_matches_reference(layer_batch, indptr, blocks, got, 0.125, masks=masks)


def test_sleeping_workers_wake_for_every_call():
    """spin_us=0: the workers sleep after every task, so every call goes through the wake-up."""
    rng = np.random.default_rng(4)
    batch = paged_batch(rng, [700, 33, 2000], 8, 4, 32, spare_pages=2)
    args = (batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens)
    with AttentionTeam(3, spin_us=0.0) as team:
        team.bind(batch.kv_pages, batch.seq_lens, batch.q.shape[1], 0.2)
        for i in range(40):
            indptr, blocks = random_selection(rng, batch.seq_lens, 8, [0.3, "one", "empty", "all"][i % 4])
            if i % 10 == 9:
                time.sleep(0.005)
            got = team.attend(batch.q, batch.block_tables, indptr, blocks)
            want = sparse_partial_attention(*args, indptr, blocks, 0.2, num_threads=3)
            assert all(np.array_equal(x, y) for x, y in zip(got, want)), f"call {i}"


def test_threads_are_joined_on_close_and_on_collection():
    before = threads_now()
    team = AttentionTeam(4)
    assert threads_now() == before + 3
    team.close()
    assert team.closed and threads_now() == before
    team.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        team.bind(np.zeros((1, 1, 2, 16, 16), np.uint16), np.ones(1, np.int32), 1, 0.1)

    rng = np.random.default_rng(5)
    batch = paged_batch(rng, [100], 2, 2, 16)
    team = AttentionTeam(3, spin_us=0.0)
    team.bind(batch.kv_pages, batch.seq_lens, 4, 0.1)
    team.attend(batch.q, batch.block_tables, *random_selection(rng, batch.seq_lens, 2, "all"))
    team.close()
    with pytest.raises(RuntimeError, match="closed"):
        team.attend(batch.q, batch.block_tables, *random_selection(rng, batch.seq_lens, 2, "all"))

    for _ in range(3):  # never closed: collection joins them
        AttentionTeam(3).bind(batch.kv_pages, batch.seq_lens, 4, 0.1)
        gc.collect()
    assert threads_now() == before


def test_rejects_bad_arguments_per_layer():
    rng = np.random.default_rng(1)
    batch = paged_batch(rng, [40], 2, 2, 16, spare_pages=1)
    indptr, blocks = random_selection(rng, batch.seq_lens, 2, "all")
    with AttentionTeam(2) as team:
        with pytest.raises(RuntimeError, match="bind a step first"):
            team.attend(batch.q, batch.block_tables, indptr, blocks)
        with pytest.raises(ValueError, match="multiple of KV heads"):
            team.bind(batch.kv_pages, batch.seq_lens, 3, 0.1)
        with pytest.raises(ValueError, match="kv_pages pages must each be contiguous"):
            team.bind(batch.kv_pages[:, :, :, ::-1], batch.seq_lens, 4, 0.1)
        with pytest.raises(ValueError, match="seq_lens must be >= 0"):
            team.bind(batch.kv_pages, np.array([-1], np.int32), 4, 0.1)
        team.bind(batch.kv_pages, batch.seq_lens, 4, 0.1)

        def call(q=batch.q, tables=batch.block_tables, ip=indptr, bl=blocks, masks=None):
            return team.attend(q, tables, ip, bl, masks)

        with pytest.raises(ValueError, match="q must be C-contiguous float32"):
            call(q=np.asfortranarray(batch.q))
        with pytest.raises(ValueError, match=r"q must be .*\[1, 4, 16\]"):
            call(q=np.zeros((1, 2, 16), np.float32))
        with pytest.raises(ValueError, match="block_tables must be int32"):
            call(tables=batch.block_tables.astype(np.int64))
        with pytest.raises(ValueError, match="block_tables has 2 columns"):
            call(tables=batch.block_tables[:, :2].copy())
        with pytest.raises(ValueError, match="sel_indptr must be C-contiguous int32 \\[3\\]"):
            call(ip=indptr[:2].copy())
        with pytest.raises(ValueError, match="sel_indptr must rise"):
            call(ip=indptr[::-1].copy())
        zigzag = indptr.copy()
        zigzag[1] = zigzag[2] + 1
        with pytest.raises(ValueError, match="sel_indptr must not decrease"):
            call(ip=zigzag)
        with pytest.raises(ValueError, match="sel_masks must be C-contiguous uint16"):
            call(masks=np.zeros(blocks.size + 1, np.uint16))
        bad = blocks.copy()
        bad[-1] = 3  # 40 tokens are 3 blocks
        with pytest.raises(IndexError, match="outside the sequence's 3 blocks"):
            call(bl=bad)
        table = batch.block_tables.copy()
        table[0, 1] = 99
        with pytest.raises(IndexError, match="maps to page 99, outside the arena's 4 pages"):
            call(tables=table)
        got = call()  # still usable after the errors
        assert_matches_reference(batch, indptr, blocks, got, 0.1)
    with pytest.raises(ValueError, match="num_threads must be a positive integer"):
        AttentionTeam(0)
    with pytest.raises(ValueError, match="spin_us must lie in"):
        AttentionTeam(2, spin_us=-1)


def _long_call(rng):
    """A call of a few hundred ms from little memory: long lists revisiting the same blocks."""
    batch = paged_batch(rng, [1024], 8, 4, 128, poison=False)
    reps = 12000
    blocks = np.tile(np.arange(64, dtype=np.int32), 8 * reps // 64)
    indptr = (np.arange(9) * reps).astype(np.int32)
    return batch, indptr, blocks


def test_gil_released_and_one_caller_at_a_time():
    rng = np.random.default_rng(2)
    batch, indptr, blocks = _long_call(rng)
    ticks: list[float] = []
    refused: list[str] = []
    with AttentionTeam(1) as team:
        team.bind(batch.kv_pages, batch.seq_lens, 32, 0.1)
        done = threading.Event()

        def other():
            while not done.is_set():
                ticks.append(time.perf_counter())
                try:
                    team.attend(batch.q, batch.block_tables, np.zeros(9, np.int32), blocks[:0])
                except RuntimeError as e:
                    refused.append(str(e))

        worker = threading.Thread(target=other)
        worker.start()
        try:
            time.sleep(0.02)
            while True:  # the other thread may hold the team for an instant: retry
                try:
                    t0 = time.perf_counter()
                    team.attend(batch.q, batch.block_tables, indptr, blocks)
                    t1 = time.perf_counter()
                    break
                except RuntimeError:  # the other thread's call: let it finish
                    time.sleep(0.001)
        finally:
            done.set()
            worker.join()
    assert t1 - t0 > 0.02, "the call must be long enough to tell"
    # Inside the kernel, not at the call's edges (where the caller holds the GIL anyway); the
    # bar is low because on a loaded machine the other thread may wait long for a core.
    mid = [t for t in ticks if t0 + 0.1 * (t1 - t0) < t < t0 + 0.9 * (t1 - t0)]
    assert len(mid) > 10, f"another thread ran only {len(mid)} times during a {t1 - t0:.3f} s call"
    assert refused and all("running a call on another thread" in r for r in refused)


def test_a_forked_child_refuses_the_parents_team():
    rng = np.random.default_rng(6)
    batch = paged_batch(rng, [100], 2, 2, 16)
    indptr, blocks = random_selection(rng, batch.seq_lens, 2, "all")
    # in the parent: libgomp's pool does not survive a fork, so the child runs no OpenMP
    want = sparse_partial_attention(batch.q, batch.kv_pages, batch.block_tables, batch.seq_lens, indptr, blocks,
                                    0.1, num_threads=3)
    with AttentionTeam(3) as team:
        team.bind(batch.kv_pages, batch.seq_lens, 4, 0.1)
        pid = os.fork()
        if pid == 0:  # the child: refuse, not hang; then a team of its own works, and so does
            code = 1  # the parent's once bound here (it starts the child's own threads)
            try:
                team.attend(batch.q, batch.block_tables, indptr, blocks)
            except RuntimeError as e:
                code = 0 if "forked" in str(e) else 2
            try:
                with AttentionTeam(2) as own:
                    own.bind(batch.kv_pages, batch.seq_lens, 4, 0.1)
                    own.attend(batch.q, batch.block_tables, indptr, blocks)
                threads = threads_now()
                team.bind(batch.kv_pages, batch.seq_lens, 4, 0.1, owner="child")
                got = team.attend(batch.q, batch.block_tables, indptr, blocks)
                if not all(np.array_equal(x, y) for x, y in zip(got, want)) or team.owner != "child" \
                        or threads_now() != threads + 2:
                    code = 4
                team.close()
                if threads_now() != threads:
                    code = 5
            except Exception:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
        assert_matches_reference(batch, indptr, blocks, team.attend(batch.q, batch.block_tables, indptr, blocks), 0.1)


@pytest.mark.parametrize("threads", [1, 3])
def test_scattered_read_folds_the_runs_as_the_openmp_ceiling_does(threads):
    """The benchmark's team-side ceiling reads exactly the runs asked for (its fold is NumPy's XOR
    of them and the OpenMP fold's), and refuses a run outside the buffer."""
    from fluxion_dist.cpu import _stream

    rng = np.random.default_rng()
    words = rng.integers(0, 2**63, 50_021, dtype=np.int64).view(np.uint64)
    for n_runs, run in ((1, 512), (7, 13), (333, 64)):
        starts = rng.integers(0, words.size - run, n_runs).astype(np.int64)
        want = int(np.bitwise_xor.reduce(np.concatenate([words[s:s + run] for s in starts])))
        with AttentionTeam(threads) as team:
            assert team.scattered_read(words, starts, run) == want
            assert team.scattered_read(words, starts[:0], run) == 0
            with pytest.raises(ValueError, match="outside"):
                team.scattered_read(words, np.array([words.size - run + 1], np.int64), run)
        assert _stream.scattered_read(words, starts, run, threads) == want

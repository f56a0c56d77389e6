"""Where a layer's blocks run (policy.routing): the CPU's share of the misses against a brute
force over every split, and the routing oracle of classify_entries."""

from __future__ import annotations

import numpy as np
import pytest

from fluxion_dist.hybrid import CostModel
from fluxion_dist.hybrid.cost_model import OBSERVE_MIN_BLOCKS, observe_cpu
from fluxion_dist.policy.routing import SLOT_CPU, balanced_cpu_fraction, route_entries_reference


def test_balanced_fraction_follows_the_rates():
    fast_cpu = CostModel.from_rates(128, cpu_gb_per_s=100, uva_gb_per_s=10, cached_gb_per_s=1000)
    slow_cpu = CostModel.from_rates(128, cpu_gb_per_s=10, uva_gb_per_s=100, cached_gb_per_s=1000)
    assert balanced_cpu_fraction(fast_cpu, 0, 2000) > 0.8
    assert balanced_cpu_fraction(slow_cpu, 0, 2000) < 0.2
    assert balanced_cpu_fraction(fast_cpu, 0, 0) == 0.0
    assert balanced_cpu_fraction(CostModel.cpu_only(128, 10.0), 0, 50) == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_balanced_fraction_is_the_best_integer_split(seed):
    """Against a brute force over every split, with the host round trip a split costs."""
    rng = np.random.default_rng(seed)
    cost = CostModel.from_rates(128, cpu_gb_per_s=rng.uniform(5, 100), uva_gb_per_s=rng.uniform(5, 60),
                                cached_gb_per_s=1000, cpu_overhead_s=rng.uniform(0, 2e-4))
    hits, misses, admits = (int(x) for x in rng.integers(0, 3000, 3))
    hits *= seed % 3 > 0  # no hits at all: all-CPU launches nothing on the GPU
    switch = float(rng.uniform(0, 3e-4))
    t = [cost.gpu_time(hits, misses, admits)] + [
        max(cost.cpu_time(x), cost.gpu_time(hits, misses - x, admits)) + switch for x in range(1, misses + 1)]
    got = balanced_cpu_fraction(cost, hits, misses, admits=admits, switch_s=switch)
    assert t[round(got * misses)] <= min(t) + 1e-12


def test_the_split_follows_the_measured_cpu_rate():
    """A CPU that measures half its start-up rate in the step's calls gets a smaller share:
    the model moves to the measured rate, a call's fixed cost excluded, and calls too small
    to show a rate leave it alone."""
    start = CostModel.from_rates(128, cpu_gb_per_s=100, uva_gb_per_s=50, cached_gb_per_s=1000, cpu_overhead_s=20e-6)
    blocks = 4000
    seconds = start.cpu_overhead_s + blocks * start.block_bytes / 50e9  # the step's calls: 50 GB/s
    cost = start
    for _ in range(40):
        cost = observe_cpu(cost, blocks, seconds)
    assert cost.cpu_bytes_per_s == pytest.approx(50e9, rel=1e-3)
    assert cost.uva_bytes_per_s == start.uva_bytes_per_s and cost.cpu_overhead_s == start.cpu_overhead_s
    first = observe_cpu(start, blocks, seconds, weight=0.25)  # a quarter of the way in seconds per block
    assert first.cpu_block_s == pytest.approx(0.75 * start.cpu_block_s + 0.25 * 2 * start.cpu_block_s)
    assert balanced_cpu_fraction(cost, 0, 20000) < balanced_cpu_fraction(start, 0, 20000)
    assert observe_cpu(start, OBSERVE_MIN_BLOCKS - 1, 1.0) is start
    assert observe_cpu(start, blocks, start.cpu_overhead_s / 2) is start


def test_a_small_miss_set_stays_on_the_gpu():
    """A split has to pay for the host round trip: a few misses never go to the CPU."""
    cost = CostModel.from_rates(128, cpu_gb_per_s=100, uva_gb_per_s=50, cached_gb_per_s=1000, cpu_overhead_s=50e-6)
    assert balanced_cpu_fraction(cost, 3000, 100, switch_s=100e-6) == 0.0
    assert balanced_cpu_fraction(cost, 3000, 20000, switch_s=100e-6) > 0.5


def test_route_reference_puts_every_entry_in_one_place():
    rng = np.random.default_rng(3)
    tables = rng.permutation(64).reshape(2, 32).astype(np.int32)
    seq = np.array([500, 300], np.int32)
    rows = [np.sort(rng.choice(32 if r < 2 else 19, 10, replace=False)) for r in range(4)]
    indptr = np.concatenate([[0], np.cumsum([10] * 4)]).astype(np.int32)
    blocks = np.concatenate(rows).astype(np.int32)
    slot_of = np.where(rng.random(128) < 0.5, np.arange(128), -1).astype(np.int32)
    sel_slot, cpu_indptr, cpu_blocks, admit, counts = route_entries_reference(
        indptr, blocks, tables, seq, 2, slot_of, 0.5)
    assert counts.sum() - counts[3] == blocks.size
    assert (sel_slot == SLOT_CPU).sum() == counts[2] == cpu_blocks.size == cpu_indptr[-1]
    assert abs(counts[2] - 0.5 * (counts[1] + counts[2])) <= 1


def test_admission_by_reuse_admits_only_what_the_step_before_selected():
    """With stamps, a miss is admitted only if the step before selected it as well; every
    selected key is stamped, and a key selected on two steps running is admitted on the second."""
    rng = np.random.default_rng(4)
    tables = rng.permutation(64).reshape(2, 32).astype(np.int32)
    seq = np.array([512, 512], np.int32)
    indptr = np.array([0, 6, 12, 18, 24], np.int32)
    blocks = np.concatenate([np.sort(rng.choice(32, 6, replace=False)) for _ in range(4)]).astype(np.int32)
    slot_of = np.full(128, -1, np.int32)
    plain = route_entries_reference(indptr, blocks, tables, seq, 2, slot_of, 0.0)
    seen = np.full(128, -1, np.int32)
    first = route_entries_reference(indptr, blocks, tables, seq, 2, slot_of, 0.0, seen, 5)
    assert first[4][3] == 0 and plain[4][3] == blocks.size  # nothing seen at step 4
    keys = plain[3]
    assert (seen[keys] == 5).all() and (np.delete(seen, keys) == -1).all()
    second = route_entries_reference(indptr, blocks, tables, seq, 2, slot_of, 0.0, seen, 6)
    np.testing.assert_array_equal(second[3], keys)
    assert route_entries_reference(indptr, blocks, tables, seq, 2, slot_of, 0.0, seen, 8)[4][3] == 0  # a gap
    seen[:] = 8
    assert route_entries_reference(indptr, blocks, tables, seq, 2, slot_of, 0.0, seen, 11, window=3)[4][3] == 24
    seen[:] = 8
    assert route_entries_reference(indptr, blocks, tables, seq, 2, slot_of, 0.0, seen, 12, window=3)[4][3] == 0

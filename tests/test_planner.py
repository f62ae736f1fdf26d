"""The split-KV planner (a host TIR function) on the CPU: coverage, bounds, capacities, errors."""

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvm_attn.planner import GLOBAL_NAME, register_global_planner


@pytest.fixture(scope="module")
def planner():
    return register_global_planner()


def run_plan(planner, kv_lens, page_size, max_works, max_batch, max_partials, target, min_chunk_pages=1, split=1):
    pages = [(n + page_size - 1) // page_size for n in kv_lens]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)], np.int32)
    work = tvm.runtime.tensor(np.full((4, max_works), 7, np.int32))
    merge = tvm.runtime.tensor(np.full(max_batch + 1, 7, np.int32))
    stats = tvm.runtime.tensor(np.zeros(4, np.int32))
    planner(tvm.runtime.tensor(indptr), tvm.runtime.tensor(last), work, merge, stats, max_partials, page_size, target,
            min_chunk_pages, split)
    return work.numpy(), merge.numpy(), stats.numpy()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.sampled_from([1, 8, 16, 32]),
       st.integers(1, 300), st.booleans())
def test_plan_covers_every_key_once(planner, kv_lens, page_size, target, split):
    max_batch = len(kv_lens) + 3
    max_works = max(max_batch, target)
    work, merge, stats = run_plan(planner, kv_lens, page_size, max_works, max_batch, max_works, target, 2, int(split))
    num_works, num_partials, chunk, status = stats
    assert status == 0
    assert num_works <= max_works
    if split and len(kv_lens) < target:
        assert num_works <= target  # the split never oversubscribes the grid
    if not split:
        assert num_works == len(kv_lens)
    seen = [[] for _ in kv_lens]
    for w in range(max_works):
        req, begin, end, out_row = work[:, w]
        if w >= num_works:
            assert req == -1
            continue
        seen[req].append((begin, end, out_row))
        assert end - begin <= chunk
    partial_rows = []
    for b, n in enumerate(kv_lens):
        ranges = sorted(seen[b])
        assert ranges[0][0] == 0 and ranges[-1][1] == n  # contiguous cover, each key once
        assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
        rows = [r[2] for r in ranges]
        if len(ranges) == 1:
            assert rows == [-1] and merge[b + 1] == merge[b]
        else:
            assert rows == list(range(merge[b], merge[b + 1]))
            partial_rows += rows
    assert sorted(partial_rows) == list(range(num_partials))
    assert np.all(merge[len(kv_lens):] == num_partials)


def test_long_single_request_is_split(planner):
    work, merge, stats = run_plan(planner, [32768], 16, 132, 1, 132, 132, min_chunk_pages=16)
    num_works, _, chunk, status = stats
    assert status == 0 and 100 <= num_works <= 132 and chunk * num_works >= 32768
    assert merge.tolist() == [0, num_works]


@pytest.mark.parametrize(
    "kwargs, status",
    [(dict(max_works=4, max_batch=8, max_partials=64, target=4), 1),  # 8 requests, 4 works
     (dict(max_works=64, max_batch=8, max_partials=2, target=64), 2),
     (dict(max_works=64, max_batch=2, max_partials=64, target=64), 3)],
)
def test_capacity_errors_write_nothing_out_of_bounds(planner, kwargs, status):
    work, merge, stats = run_plan(planner, [4000] * 8, 16, kwargs["max_works"], kwargs["max_batch"],
                                  kwargs["max_partials"], kwargs["target"])
    assert stats[3] == status
    assert np.all(work[0] == -1)  # a failed plan launches nothing
    assert np.all(merge == 0)


def test_global_registration(planner):
    assert tvm.get_global_func(GLOBAL_NAME) is not None


def test_workspace_size_function():
    from tvm_attn.planner import decode_workspace_size

    small = decode_workspace_size(16, 32, 8, 128)
    big = decode_workspace_size(256, 32, 8, 128)
    assert 0 < small < big
    assert big >= 256 * 32 * 129 * 4  # partial states of a fully split batch

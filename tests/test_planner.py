"""The split-KV planner (a host TIR function) on the CPU: coverage, bounds, capacities, errors."""

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvm_attn.planner import (
    GLOBAL_NAME, MIN_PIECE, PACK_SLACK_DIV, PLAN_STATS, WORK_FIELDS, WORK_OVERHEAD, PlanParams, Work,
    register_global_planner,
)


@pytest.fixture(scope="module")
def planner():
    return register_global_planner()


def page_table(kv_lens, page_size):
    pages = [(n + page_size - 1) // page_size for n in kv_lens]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)], np.int32)
    return indptr, last


def run_plan(planner, kv_lens, page_size, num_ctas, max_works, max_batch, max_partials, split=1, qo_lens=None,
             group=1, tile_q=1, causal=0, overhead=WORK_OVERHEAD, slack=PACK_SLACK_DIV, window=-1, heads=1):
    """Decode by default (one query row per request); prefill with ``qo_lens``. ``max_batch`` sizes
    merge_indptr (max packed rows)."""
    indptr, last = page_table(kv_lens, page_size)
    qo_lens = [1] * len(kv_lens) if qo_lens is None else qo_lens
    qo_indptr = np.cumsum([0] + list(qo_lens)).astype(np.int32)
    work = tvm.runtime.tensor(np.full((WORK_FIELDS, max_works), 7, np.int32))
    cta = tvm.runtime.tensor(np.full(num_ctas + 1, 7, np.int32))
    merge = tvm.runtime.tensor(np.full(max_batch + 1, 7, np.int32))
    stats = tvm.runtime.tensor(np.zeros(PLAN_STATS, np.int32))
    params = PlanParams(max_partials=max_partials, page_size=page_size, allow_split=split, group_size=group,
                        tile_q=tile_q, causal=causal, window_left=window, work_overhead=overhead,
                        pack_slack_div=slack, kv_heads=heads)
    arrays = (tvm.runtime.tensor(a) for a in (qo_indptr, indptr, last))
    planner(*arrays, work, cta, merge, stats, *params.args())
    return work.numpy(), cta.numpy(), merge.numpy(), stats.numpy()


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.integers(0, 5000), st.integers(0, 40000)), min_size=1, max_size=70),
       st.sampled_from([1, 8, 16, 32]), st.integers(1, 140), st.booleans())
def test_plan_covers_every_key_once_and_balances(planner, kv_lens, page_size, num_ctas, split):
    max_batch = len(kv_lens) + 3
    max_works = max_batch + num_ctas
    work, cta, merge, stats = run_plan(planner, kv_lens, page_size, num_ctas, max_works, max_batch, max_works,
                                       int(split))
    num_works, num_partials, quota, status = stats
    assert status == 0 and num_works <= len(kv_lens) + num_ctas
    assert cta[0] == 0 and cta[-1] == num_works and np.all(np.diff(cta) >= 0)
    if not split:
        assert num_works == len(kv_lens)
    seen = [[] for _ in kv_lens]
    loads = []
    for c in range(num_ctas):
        load = 0
        for w in range(cta[c], cta[c + 1]):
            req, begin, end, out_row, row0, stride, head = work[:, w]
            assert head == 0
            assert row0 == 0 and stride == (0 if out_row < 0 else stride)
            seen[req].append((begin, end, out_row))
            load += end - begin + WORK_OVERHEAD
        loads.append(load)
    if split:  # cut: every CTA within MIN_PIECE + overhead of its quota; packed: within the slack
        bound = max(quota + MIN_PIECE + 2 * WORK_OVERHEAD, quota + quota // PACK_SLACK_DIV)
        assert max(loads) <= bound or num_ctas == 1
    partial_rows = []
    for b, n in enumerate(kv_lens):
        ranges = sorted(seen[b])
        assert ranges[0][0] == 0 and ranges[-1][1] == n  # contiguous cover, each key once
        assert all(r[1] == s_[0] for r, s_ in zip(ranges, ranges[1:]))
        rows = [r[2] for r in ranges]
        if len(ranges) == 1:
            assert rows == [-1] and merge[b + 1] == merge[b]
        else:
            assert sorted(rows) == list(range(merge[b], merge[b + 1]))
            partial_rows += rows
    assert sorted(partial_rows) == list(range(num_partials))
    assert np.all(merge[len(kv_lens):] == num_partials)


def test_uniform_batch_is_packed_without_cuts(planner):
    work, cta, merge, stats = run_plan(planner, [2048] * 64, 16, 66, 64 + 66, 64, 64 + 66)
    assert stats[3] == 0 and stats[0] == 64 and stats[1] == 0  # 64 whole works, nothing to merge
    work2, _, _, stats2 = run_plan(planner, [1024] * 128, 16, 66, 128 + 66, 128, 128 + 66)
    assert stats2[0] == 128 and stats2[1] == 0


def test_long_single_request_is_cut_evenly(planner):
    work, cta, merge, stats = run_plan(planner, [32768], 16, 66, 67, 1, 67)
    num_works, num_partials, quota, status = stats
    assert status == 0 and num_works == 66 and num_partials == 66
    assert np.all(np.diff(cta) == 1)
    sizes = work[Work.KV_END, :num_works] - work[Work.KV_BEGIN, :num_works]
    assert sizes.max() - sizes.min() <= 2 * WORK_OVERHEAD  # ceil rounding of the quota


@pytest.mark.parametrize(
    "kwargs, status",
    [(dict(num_ctas=8, max_works=4, max_batch=8, max_partials=64), 1),
     (dict(num_ctas=64, max_works=128, max_batch=8, max_partials=2), 2),
     (dict(num_ctas=64, max_works=128, max_batch=2, max_partials=128), 3)],
)
def test_capacity_errors_write_nothing_out_of_bounds(planner, kwargs, status):
    work, cta, merge, stats = run_plan(planner, [4000] * 8, 16, kwargs["num_ctas"], kwargs["max_works"],
                                       kwargs["max_batch"], kwargs["max_partials"])
    assert stats[3] == status
    assert np.all(cta == 0)  # a failed plan runs no work
    assert np.all(merge == 0)


def test_global_registration(planner):
    assert tvm.get_global_func(GLOBAL_NAME) is not None


def test_workspace_size_function():
    from tvm_attn.planner import decode_workspace_size

    small = decode_workspace_size(16, 32, 8, 128)
    big = decode_workspace_size(256, 32, 8, 128)
    assert 0 < small < big
    assert big >= 256 * 32 * 129 * 4  # partial states of a fully split batch


def test_workspace_size_follows_the_schedule(tmp_path):
    """The size is the one the wrapper allocates for the schedule it runs: a pinned schedule's, or a
    tuned table's for the GPU, else the hand-written one's."""
    import json

    from tvm_attn.planner import decode_workspace, decode_workspace_size
    from tvm_attn.schedule import tuned
    from tvm_attn.schedule.decode import DecodeTiles

    def direct(schedule):
        ws = decode_workspace(64, 32, 8, 128, DecodeTiles.parse(schedule, 128, "float16"), 132)
        return ws.int_bytes + ws.float_bytes

    hand = decode_workspace_size(64, 32, 8, 128, gpu="none")
    for schedule in ("w4u4g4b3p", "w4u4g2b4", "w8u2g4b2"):
        assert decode_workspace_size(64, 32, 8, 128, schedule=schedule) == direct(schedule)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"version": 1, "entries": [{"family": "cuda_decode", "gpu": "GPU X",
                                                            "class": "d128-float16-g4-plain",
                                                            "schedule": "w4u4g2b4"}]}))
    tuned.use_table(table)
    try:
        assert decode_workspace_size(64, 32, 8, 128, gpu="GPU X") == direct("w4u4g2b4") != hand
        assert decode_workspace_size(64, 32, 8, 128, gpu="GPU Y") == hand
    finally:
        tuned.use_table(None)
    with pytest.raises(ValueError, match="schedule"):
        decode_workspace_size(64, 32, 8, 128, schedule="w4u4g3b4")


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 3000)), min_size=1, max_size=12),
       st.sampled_from([1, 4, 6]), st.sampled_from([16, 64, 128]), st.integers(1, 40), st.booleans(),
       st.booleans())
def test_prefill_plan_covers_every_tile_and_row(planner, reqs, group, tile_q, num_ctas, split, causal):
    """Prefill items are (request, query tile); each is covered once, and every packed row of a cut
    item has one partial row per piece, laid out as merge_indptr says."""
    qo_lens = [q for q, _ in reqs]
    kv_lens = [max(k, q) if causal else k for q, k in reqs]  # append: kv_len >= qo_len
    rows_total = sum(qo_lens) * group
    items = sum(-(-q * group // tile_q) for q in qo_lens)
    max_works = items + num_ctas
    max_partials = 2 * num_ctas * tile_q
    work, cta, merge, stats = run_plan(planner, kv_lens, 16, num_ctas, max_works, rows_total + 5,
                                       max_partials, int(split), qo_lens, group, tile_q, int(causal),
                                       32 + tile_q // 2, 10)
    num_works, num_partials, quota, status = stats
    assert status == 0 and cta[-1] == num_works <= max_works
    pieces = {}
    for w in range(num_works):
        req, begin, end, out_row, row0, stride, head = work[:, w]
        assert head == 0
        pieces.setdefault((req, row0), []).append((begin, end, out_row, stride))
    q_indptr = np.cumsum([0] + qo_lens)
    expect = {}
    for b, (q, n) in enumerate(zip(qo_lens, kv_lens)):
        for row0 in range(0, q * group, tile_q):
            rows = min(tile_q, q * group - row0)
            last_tok = (row0 + rows - 1) // group
            expect[(b, row0)] = (rows, min(n, last_tok + n - q + 1) if causal else n)
    assert set(pieces) == set(expect)
    used = []
    for (b, row0), ps in pieces.items():
        rows, extent = expect[(b, row0)]
        ps.sort()
        assert ps[0][0] == 0 and ps[-1][1] == extent and all(p[1] == r[0] for p, r in zip(ps, ps[1:]))
        grow0 = q_indptr[b] * group + row0
        if len(ps) == 1:
            assert ps[0][2] == -1
            assert np.all(merge[grow0 + 1: grow0 + rows + 1] == merge[grow0: grow0 + rows])
            continue
        for r in range(rows):
            slots = sorted(p[2] + r * p[3] for p in ps)
            assert slots == list(range(merge[grow0 + r], merge[grow0 + r + 1]))
            used += slots
    assert sorted(used) == list(range(num_partials))
    if not split:
        assert num_works == items
    else:  # balance: cut to the quota, or packed within 10% of it
        overhead = 32 + tile_q // 2
        loads = [sum(work[Work.KV_END, w] - work[Work.KV_BEGIN, w] + overhead
                     for w in range(cta[c], cta[c + 1])) for c in range(num_ctas)]
        assert max(loads) <= max(quota + MIN_PIECE + 2 * overhead, quota + quota // 10) or num_ctas == 1


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 3000)), min_size=1, max_size=10),
       st.sampled_from([1, 4]), st.sampled_from([64, 128]), st.sampled_from([2, 8]), st.integers(1, 40),
       st.booleans(), st.booleans())
def test_prefill_plan_with_heads_in_the_work_list(planner, reqs, group, tile_q, heads, num_ctas, split,
                                                  causal):
    """kv_heads > 1 (the Hopper kernel's one-dimensional grid): every (head, request, tile) is
    covered once; a cut plan is one head's plan repeated on each head's own CTAs, so the pieces of a
    tile write the same partial rows under every head; the capacities are prefill_capacity's."""
    from tvm_attn.planner import prefill_capacity

    qo_lens = [q for q, _ in reqs]
    kv_lens = [max(k, q) if causal else k for q, k in reqs]
    cap = prefill_capacity(sum(qo_lens), len(reqs), num_ctas, tile_q, group, heads, 16, heads)
    overhead = 32 + tile_q // 2
    work, cta, merge, stats = run_plan(planner, kv_lens, 16, num_ctas, cap.max_works, cap.max_rows + 1,
                                       cap.max_partials, int(split), qo_lens, group, tile_q, int(causal),
                                       overhead, 10, heads=heads)
    num_works, num_partials, quota, status = stats
    assert status == 0 and cta[0] == 0 and cta[-1] == num_works <= cap.max_works
    assert np.all(np.diff(cta) >= 0)
    pieces = {}
    for c in range(num_ctas):
        for w in range(cta[c], cta[c + 1]):
            req, begin, end, out_row, row0, stride, head = work[:, w]
            assert 0 <= head < heads
            pieces.setdefault((head, req, row0), []).append((begin, end, out_row, stride, c))
    items = {(b, row0) for b, q in enumerate(qo_lens) for row0 in range(0, q * group, tile_q)}
    assert set(pieces) == {(h, b, r) for h in range(heads) for b, r in items}
    cut_ctas = max(num_ctas // heads, 1)
    for (head, b, row0), ps in pieces.items():
        ps.sort()
        assert all(p[1] == r[0] for p, r in zip(ps, ps[1:]))
        same = sorted(p[:4] for p in pieces[(0, b, row0)])
        assert [p[:4] for p in ps] == same  # every head's pieces are head 0's
        if len(ps) > 1:  # cut: head h's pieces on its own CTAs
            assert all(head * cut_ctas <= p[4] < (head + 1) * cut_ctas for p in ps)
    if not split:
        assert num_works == heads * len(items) and num_partials == 0


def _decode_ws(max_batch, num_ctas=8):
    from tvm_attn.planner import Workspace

    return Workspace(max_batch, num_ctas, max_batch + num_ctas, max_batch + num_ctas, 4, 16)


def test_plan_buffers_send_plan_and_index_in_one_staging_array(planner):
    """PlanBuffers (here on the CPU): the planner writes into the staging array, upload copies plan
    and index arrays together, and the kernels' views see exactly them."""
    from tvm_attn.planner import PlanBuffers

    rng = np.random.default_rng(0)
    bufs = PlanBuffers(_decode_ws(8), tvm.cpu(), (9, 400, 8))
    for lens in ([300, 5, 0, 1000, 17], [64] * 8, [1]):
        indptr, last = page_table(lens, 16)
        indices = rng.permutation(int(indptr[-1])).astype(np.int32)
        qo = np.arange(len(lens) + 1, dtype=np.int32)
        num_works, _, _ = bufs.plan(planner, qo, indptr, last, page_size=16, allow_split=True)
        views = bufs.upload((indptr, indices, last))
        for view, host in zip(views, (indptr, indices, last)):
            np.testing.assert_array_equal(view.numpy(), host)
        np.testing.assert_array_equal(bufs.work_info.numpy(), bufs.host_work)
        np.testing.assert_array_equal(bufs.cta_indptr.numpy(), bufs.host_cta)
        np.testing.assert_array_equal(bufs.merge_indptr.numpy(), bufs.host_merge)
        assert bufs.host_cta[-1] == num_works > 0
    assert not bufs.fits((9, 401, 8))
    with pytest.raises(ValueError, match="exceed the workspace's slots"):
        bufs.upload((indptr, np.zeros(401, np.int32), last))
    with pytest.raises(ValueError, match="workspace is too small"):
        indptr, last = page_table([10] * 9, 16)  # 9 requests, room for 8 rows
        bufs.plan(planner, np.arange(10, dtype=np.int32), indptr, last, page_size=16, allow_split=True)


def test_device_plan_grows_its_buffers_or_refuses_under_cuda_graphs():
    from tvm_attn.api._common import DevicePlan

    dp = DevicePlan(tvm.cpu(), graph=False)
    a = dp.workspace(("decode",), (8,), _decode_ws, (9, 100, 8))
    assert dp.workspace(("decode",), (4,), _decode_ws, (5, 200, 4)) is a  # fits: twice the first sizes
    b = dp.workspace(("decode",), (4,), _decode_ws, (5, 300, 4))
    assert b is not a and b.fits((9, 600, 8)) and b.ws.max_rows == 8  # grown, never shrunk
    g = DevicePlan(tvm.cpu(), graph=True)
    first = g.workspace(("decode",), (8,), _decode_ws, (9, 100, 8))
    assert g.workspace(("decode",), (8,), _decode_ws, (9, 100, 8)) is first
    with pytest.raises(ValueError, match="use_cuda_graph"):
        g.workspace(("decode",), (8,), _decode_ws, (9, 101, 8))


def test_prefill_packs_by_list_scheduling_so_ctas_share_keys(planner):
    """Long prefill: whole tiles, no cuts. Each CTA takes the next tile when it has the least cost
    so far, so at any moment the CTAs work on neighbouring tiles of one request (and read the same
    keys): the first works of the CTAs are the first tiles in planning order, which with causal
    are a request's last (longest) tiles."""
    tile_q, group, num_ctas, overhead = 128, 4, 33, 96
    for causal, lens in ((1, [16384]), (1, [4096] * 4), (0, [1024] * 16)):
        items = sum(n * group // tile_q for n in lens)
        work, cta, merge, stats = run_plan(planner, lens, 1, num_ctas, items + num_ctas, sum(lens) * group,
                                           2 * num_ctas * tile_q, 1, lens, group, tile_q, causal, overhead)
        num_works, num_partials, quota, status = stats
        assert status == 0 and num_works == items and num_partials == 0 and np.all(merge == 0)
        loads = [sum(work[Work.KV_END, w] - work[Work.KV_BEGIN, w] + overhead
                     for w in range(cta[c], cta[c + 1])) for c in range(num_ctas)]
        tiles_per_req = lens[0] * group // tile_q
        if causal:
            assert max(loads) <= 1.01 * np.mean(loads)
            first = [tuple(work[[Work.REQUEST, Work.ROW_BEGIN], cta[c]]) for c in range(num_ctas)]
            assert first == [(0, (tiles_per_req - 1 - c) * tile_q) for c in range(num_ctas)]
        else:  # equal tiles: round robin, the k-th works of all CTAs are neighbours
            for c in range(num_ctas):
                ws = range(cta[c], cta[c + 1])
                items_taken = [work[Work.REQUEST, w] * tiles_per_req + work[Work.ROW_BEGIN, w] // tile_q
                               for w in ws]
                assert items_taken == list(range(c, items, num_ctas))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, 5), min_size=0, max_size=8), st.sampled_from([1, 16]),
       st.sampled_from(["none", "indptr0", "decrease", "overrun", "last_big", "last_zero",
                        "last_nonzero_empty", "negative_page"]), st.integers(0, 1000), st.booleans())
def test_decode_plan_checks_stages_and_plans_in_one_call(pages, page_size, fault, seed, graph):
    """The kernel modules' decode plan (check, staging, planner in one host call) accepts exactly
    what PagedKV.validate accepts and raises its message otherwise, leaving the staging array as it
    was; else it finds the largest page id, stages the table (padded under CUDA graphs) and writes
    the plan that the planner makes for the staged table."""
    from tvm_attn.cache import get_cache
    from tvm_attn.config import PlannerKey
    from tvm_attn.kv.formats import PagedKV
    from tvm_attn.planner import PLAN_DECODE, PlanBuffers

    plan_decode = get_cache().module(PlannerKey())[PLAN_DECODE]
    rng = np.random.default_rng(seed)
    indptr = np.cumsum([0] + pages).astype(np.int32)
    indices = rng.integers(0, 50, int(indptr[-1]) + 2).astype(np.int32)
    last = np.array([rng.integers(1, page_size + 1) if p else 0 for p in pages], np.int32)
    b = int(rng.integers(0, max(len(pages), 1)))
    if fault == "indptr0":
        indptr = indptr + 1
    elif fault == "decrease" and len(pages) > 1 and indptr[b + 1] > 0:
        indptr[b + 1] = indptr[b + 1] - 1 - int(indptr[b + 1] - indptr[b])
    elif fault == "overrun":
        indices = indices[: max(int(indptr[-1]) - 1, 0)]
    elif fault == "last_big" and len(pages):
        last[b] = page_size + 1
    elif fault == "last_zero" and len(pages) and pages[b]:
        last[b] = 0
    elif fault == "last_nonzero_empty" and len(pages) and not pages[b]:
        last[b] = 1
    elif fault == "negative_page" and indptr[-1] > 0:
        indices[int(rng.integers(0, int(indptr[-1])))] = -3
    fmt = PagedKV(page_size, "NHD")
    try:
        fmt.validate(indptr, indices, last)
        error = None
    except ValueError as e:
        error = str(e)
    num_ctas, max_batch, max_pages = 3, 10, 45
    bufs = PlanBuffers(_decode_ws(max_batch, num_ctas), tvm.cpu(), (max_batch + 1, max_pages, max_batch))
    bufs.host[:] = 7
    pad = (max_batch, max_pages) if graph else None
    if error is not None:
        with pytest.raises(ValueError) as info:
            bufs.plan_decode(plan_decode, fmt, indptr, indices, last, True, pad)
        assert str(info.value) == error
        assert np.all(bufs.host == 7)  # nothing staged, nothing planned
        return
    max_page, (v_indptr, v_indices, v_last) = bufs.plan_decode(plan_decode, fmt, indptr, indices, last, True,
                                                               pad)
    used = int(indptr[-1])
    assert max_page == int(indices[:used].max(initial=-1))
    staged = v_indptr.numpy(), v_indices.numpy(), v_last.numpy()  # what the kernel gets
    if graph:
        assert [len(a) for a in staged] == [max_batch + 1, max_pages, max_batch]
        expect = (np.concatenate([indptr, np.full(max_batch - len(pages), used)]),
                  np.concatenate([indices[:used], np.zeros(max_pages - used, np.int32)]),
                  np.concatenate([last, np.zeros(max_batch - len(pages), np.int32)]))
    else:
        expect = indptr, indices[:used], last
    for got, want in zip(staged, expect):
        np.testing.assert_array_equal(got, want)
    # the same plan as the planner's for the staged table
    want = PlanBuffers(_decode_ws(max_batch, num_ctas), tvm.cpu())
    want.plan(register_global_planner(), np.arange(len(staged[2]) + 1, dtype=np.int32), staged[0], staged[2],
              page_size=page_size, allow_split=True)
    num_works = int(want.host_cta[-1])
    np.testing.assert_array_equal(bufs.work_info.numpy()[:, :num_works], want.host_work[:, :num_works])
    np.testing.assert_array_equal(bufs.cta_indptr.numpy(), want.host_cta)
    np.testing.assert_array_equal(bufs.merge_indptr.numpy(), want.host_merge)


def test_decode_plan_refuses_a_table_beyond_its_slots():
    """Under CUDA graphs the table is padded to fixed slots: more pages than the slot hold is a
    ValueError, never a write past the staging array."""
    from tvm_attn.cache import get_cache
    from tvm_attn.config import PlannerKey
    from tvm_attn.kv.formats import PagedKV
    from tvm_attn.planner import PLAN_DECODE, PlanBuffers

    plan_decode = get_cache().module(PlannerKey())[PLAN_DECODE]
    bufs = PlanBuffers(_decode_ws(4, 3), tvm.cpu(), (5, 20, 4))
    indptr, last = page_table([16 * 10, 16 * 11], 16)  # 21 pages
    with pytest.raises(ValueError, match="exceeds the workspace's slots"):
        bufs.plan_decode(plan_decode, PagedKV(16, "NHD"), indptr, np.arange(21, dtype=np.int32), last, True,
                         (4, 20))
    with pytest.raises(ValueError, match="exceeds the workspace's slots"):  # more requests than the pad
        bufs.plan_decode(plan_decode, PagedKV(16, "NHD"), indptr, np.arange(21, dtype=np.int32), last, True,
                         (1, 20))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=20), st.sampled_from([1, 16]),
       st.sampled_from([-1, 0, 1, 15, 100, 700, 5000]), st.integers(1, 12), st.booleans())
def test_decode_plan_with_a_window_covers_exactly_the_keys_it_shows(kv_lens, page_size, window, num_ctas,
                                                                     split):
    """With ``window_left = w >= 0`` the decode plan splits only each request's last ``w + 1`` keys
    (all of a shorter request's): they are covered once, in order, and balanced like any plan."""
    from tvm_attn.cache import get_cache
    from tvm_attn.config import PlannerKey
    from tvm_attn.kv.formats import PagedKV
    from tvm_attn.planner import PLAN_DECODE, PlanBuffers

    plan_decode = get_cache().module(PlannerKey())[PLAN_DECODE]
    indptr, last = page_table(kv_lens, page_size)
    indices = np.arange(int(indptr[-1]), dtype=np.int32)
    batch = len(kv_lens)
    bufs = PlanBuffers(_decode_ws(batch, num_ctas), tvm.cpu(), (batch + 1, int(indptr[-1]), batch))
    bufs.plan_decode(plan_decode, PagedKV(page_size, "NHD"), indptr, indices, last, split, None, window)
    work, cta = bufs.work_info.numpy(), bufs.cta_indptr.numpy()
    merge = bufs.merge_indptr.numpy()
    seen = [[] for _ in kv_lens]
    for w in range(cta[-1]):
        req, begin, end, out_row = work[[Work.REQUEST, Work.KV_BEGIN, Work.KV_END, Work.OUT_ROW], w]
        seen[req].append((begin, end, out_row))
    for b, n in enumerate(kv_lens):
        first = 0 if window < 0 else max(n - 1 - window, 0)
        ranges = sorted(seen[b])
        assert ranges[0][0] == first and ranges[-1][1] == n
        assert all(r[1] == s_[0] for r, s_ in zip(ranges, ranges[1:]))
        if len(ranges) > 1:
            assert sorted(r[2] for r in ranges) == list(range(merge[b], merge[b + 1]))
    if window >= 0 and split:  # the quota is the windows' keys, not the requests'
        shown = sum(min(n, window + 1) for n in kv_lens)
        assert bufs._decode_stats[2] <= -(-(shown + WORK_OVERHEAD * (batch + num_ctas - 1)) // num_ctas)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 2500)), min_size=1, max_size=10),
       st.sampled_from([1, 4]), st.sampled_from([16, 64, 128]), st.integers(1, 30), st.booleans(),
       st.booleans(), st.sampled_from([0, 1, 7, 64, 300, 3000]))
def test_prefill_plan_with_a_window_covers_every_visible_key_once(planner, reqs, group, tile_q, num_ctas,
                                                                   split, causal, window):
    """With ``window_left = w`` a prefill item reads from the first key its first row's window shows
    (its later rows see no earlier key) to its extent: every key some row of the item sees lies in
    exactly one of its pieces, and no piece reads a key before the window of the item's first row."""
    qo_lens = [q for q, _ in reqs]
    kv_lens = [max(k, q) if causal else k for q, k in reqs]
    rows_total = sum(qo_lens) * group
    items = sum(-(-q * group // tile_q) for q in qo_lens)
    overhead = 32 + tile_q // 2
    work, cta, merge, stats = run_plan(planner, kv_lens, 16, num_ctas, items + num_ctas, rows_total + 1,
                                       2 * num_ctas * tile_q, int(split), qo_lens, group, tile_q, int(causal),
                                       overhead, 10, window)
    num_works, num_partials, quota, status = stats
    assert status == 0 and cta[-1] == num_works
    pieces = {}
    for w in range(num_works):
        pieces.setdefault((work[Work.REQUEST, w], work[Work.ROW_BEGIN, w]), []).append(
            (work[Work.KV_BEGIN, w], work[Work.KV_END, w]))
    assert len(pieces) == items
    windowed = 0
    for b, (q, n) in enumerate(zip(qo_lens, kv_lens)):
        for row0 in range(0, q * group, tile_q):
            ps = sorted(pieces[(b, row0)])
            assert all(p[1] == r[0] for p, r in zip(ps, ps[1:]))  # contiguous: no key twice
            first, end = ps[0][0], ps[-1][1]
            seen = set()
            for r in range(row0, min(row0 + tile_q, q * group)):
                pos = r // group + n - q
                lo, hi = max(pos - window, 0), min(pos + 1, n) if causal else n
                seen.update(range(lo, hi))
            if seen:
                assert first <= min(seen) and max(seen) < end
                assert first == min(seen)  # the plan reads nothing before the first visible key
            windowed += end - first
    if split:  # the quota counts the windows' keys only (and is at least 1)
        assert quota <= max(-(-(windowed + overhead * (items + num_ctas - 1)) // num_ctas), 1)


def test_plan_time_key_ranges():
    """One mechanism for both planners: a variant's plan-time keys. RuntimeCausal's flag is a run's
    choice, so its plan reads every key (it planned causally before, and a non-causal run then
    missed keys); a run that needs more keys than its plan read is refused, naming the argument."""
    import tvm_attn as ta
    from tvm_attn.api.prefill import CudaPrefillPlan
    from tvm_attn.config import AttentionKey
    from tvm_attn.kv.formats import BlockSparseKV, RaggedKV
    from tvm_attn.variants.base import KeyRange, check_key_range

    rc = ta.variants.RuntimeCausal()
    assert rc.key_range() is None
    assert rc.key_range({"is_causal": 0}) is None and rc.key_range({}) == KeyRange(causal=True)
    assert ta.Causal().key_range() == KeyRange(causal=True)
    both = ta.Causal() + ta.SlidingWindow(9) + ta.SlidingWindow(4)
    assert both.key_range() == KeyRange(causal=True, window_left=4)
    assert (rc + ta.SlidingWindow(9)).key_range() == KeyRange(window_left=9)
    assert ta.SlidingWindow().key_range() is None
    assert ta.SlidingWindow(3).key_range({"window_left": 5}) == KeyRange(window_left=5)

    def key(kind, fmt, variant):
        return AttentionKey(kind, fmt, 4, 2, 64, "float16", "float16", variant, "cuda:sm_90a")

    assert CudaPrefillPlan.plan_key_range(key("prefill", RaggedKV("NHD"), rc)) is None
    windowed = key("prefill", RaggedKV("NHD"), ta.Causal() + ta.SlidingWindow(5))
    assert CudaPrefillPlan.plan_key_range(windowed) == KeyRange(True, 5)
    assert CudaPrefillPlan.plan_key_range(key("bsr", BlockSparseKV(4, 4), ta.Causal())) is None

    check_key_range(KeyRange(True, 8), KeyRange(True, 3))
    check_key_range(None, None)
    with pytest.raises(ValueError, match="window_left: .* does not read"):
        check_key_range(KeyRange(window_left=8), KeyRange(window_left=9))
    with pytest.raises(ValueError, match="window_left"):
        check_key_range(KeyRange(window_left=8), None)
    with pytest.raises(ValueError, match="causal"):
        check_key_range(KeyRange(causal=True), KeyRange(window_left=2))
    with pytest.raises(TypeError, match="window_left: expected an int32 scalar"):
        ta.SlidingWindow(3).key_range({"window_left": "wide"})


@pytest.mark.parametrize("kind", ["decode", "paged", "ragged"])
def test_run_refuses_keys_its_plan_did_not_read(kind, rng):
    """Every wrapper (here on the CPU, where the contract is the same) refuses a run whose window is
    wider than the one it planned for, and runs a narrower one."""
    import tvm_attn as ta

    Hq, Hk, D, S = 4, 2, 64, 4
    kv_lens, qo_lens = [9, 5], [3, 2]
    indptr = np.cumsum([0] + [-(-n // S) for n in kv_lens]).astype(np.int32)
    last = np.array([n - (-(-n // S) - 1) * S for n in kv_lens], np.int32)
    indices = np.arange(int(indptr[-1]), dtype=np.int32)
    qo_indptr = np.cumsum([0] + qo_lens).astype(np.int32)
    cache = rng.standard_normal((int(indptr[-1]), 2, S, Hk, D)).astype(np.float16)
    if kind == "decode":
        w = ta.BatchDecodeWithPagedKVCacheWrapper("NHD")
        w.plan(indptr, indices, last, Hq, Hk, D, S, window_left=4)
        args = (rng.standard_normal((2, Hq, D)).astype(np.float16), cache)
    elif kind == "paged":
        w = ta.BatchPrefillWithPagedKVCacheWrapper("NHD")
        w.plan(qo_indptr, indptr, indices, last, Hq, Hk, D, S, causal=True, window_left=4)
        args = (rng.standard_normal((5, Hq, D)).astype(np.float16), cache)
    else:
        w = ta.BatchPrefillWithRaggedKVCacheWrapper("NHD")
        w.plan(qo_indptr, np.cumsum([0] + kv_lens).astype(np.int32), Hq, Hk, D, causal=True, window_left=4)
        k = rng.standard_normal((sum(kv_lens), Hk, D)).astype(np.float16)
        args = (rng.standard_normal((5, Hq, D)).astype(np.float16), k, k)
    w.run(*args)
    w.run(*args, window_left=2)
    for wider in (5, -1):
        with pytest.raises(ValueError, match="window_left: .* does not read"):
            w.run(*args, window_left=wider)


def _off_boundary(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` whose data starts 4 bytes past a 64-byte boundary."""
    raw = np.zeros(a.size + 32, a.dtype)
    at = (-raw.ctypes.data % 64) // a.itemsize + 1
    out = raw[at: at + a.size]
    out[:] = a
    assert out.ctypes.data % 64 == 4
    return out


def test_host_arrays_off_the_64_byte_boundary_are_planned_the_same():
    """The compiled planner assumes 64-byte aligned arguments (the host-CPU build's AVX-512 loads
    fault otherwise, as numpy's 16-byte alignment gave in CI): page tables that numpy placed
    elsewhere are copied to an aligned buffer and give the same plan."""
    from tvm_attn.cache import get_cache
    from tvm_attn.config import PlannerKey
    from tvm_attn.kv.formats import PagedKV
    from tvm_attn.planner import PLAN_DECODE, PlanBuffers, _host_arg

    assert _host_arg(_off_boundary(np.arange(9, dtype=np.int32))).data_ptr() % 64 == 0
    plan_decode = get_cache().module(PlannerKey())[PLAN_DECODE]
    rng = np.random.default_rng(3)
    pages = [3, 0, 5, 1, 4]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    indices = rng.integers(0, 50, int(indptr[-1])).astype(np.int32)
    last = np.array([rng.integers(1, 17) if p else 0 for p in pages], np.int32)
    plans = []
    for arrays in ((indptr, indices, last), tuple(_off_boundary(a) for a in (indptr, indices, last))):
        for pad in (None, (10, 45)):
            bufs = PlanBuffers(_decode_ws(10, 3), tvm.cpu(), (11, 45, 10))
            bufs.plan_decode(plan_decode, PagedKV(16, "NHD"), *arrays, True, pad)
            plans.append(bufs.host.copy())
    np.testing.assert_array_equal(plans[0], plans[2])
    np.testing.assert_array_equal(plans[1], plans[3])

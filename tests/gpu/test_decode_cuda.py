"""GPU tier: the CUDA paged-decode kernels against the numpy reference on random data.

Every case of cases.py (layouts, page sizes, dtypes, head_dims, GQA/MHA, variants) over a batch with
skewed lengths including 0, 1 and page boundaries, split and unsplit; plus split-KV on a single long
request, batch invariance with split-KV off, and a CUDA-graph replay after the lengths change.
Runs on a GPU host with the kernels built by scripts/build_gpu_kernels.py (TVM_ATTN_CACHE_DIR).
"""

import numpy as np
import pytest

import tvm_attn as ta
from tvm_attn import reference as R
from tvm_attn.api.decode import pin_schedule
from tvm_attn.planner import WORK_OVERHEAD

from conftest import assert_attention_close, randn
from .cases import CASES, RING_SCHEDULES, capture_graph, case_id, key_of, page_table, variant_of

pytestmark = pytest.mark.gpu


def variant_args(name, rng, Hq, kv_lens):
    if name == "custom_mask":
        packed, indptr = ta.pack_custom_mask([rng.random((1, n)) < 0.7 for n in kv_lens])
        return {"custom_mask": packed, "mask_indptr": indptr}
    if name in ("window", "window_softcap"):
        args = {"window_left": 100}
        if name == "window_softcap":
            args["logits_soft_cap"] = 3.0
        return args
    if name == "softcap":
        return {"logits_soft_cap": 2.0}
    return {}


def check(case, kv_lens, rng, **wrapper_kw):
    Hq, Hkv = case["heads"]
    D, S, dtype, layout = case["head_dim"], case["page_size"], case["dtype"], case["layout"]
    indptr, indices, last, num_pages = page_table(rng, kv_lens, S)
    cache = randn(rng, ta.PagedKV(S, layout).cache_shape(num_pages, Hkv, D), dtype)
    q = randn(rng, (len(kv_lens), Hq, D), dtype)
    variant = variant_of(case["variant"])
    args = variant_args(case["variant"], rng, Hq, kv_lens)
    w = ta.BatchDecodeWithPagedKVCacheWrapper(layout, device="cuda", **wrapper_kw)
    if case.get("schedule"):
        pin_schedule(w, case["schedule"])
    w.plan(indptr, indices, last, Hq, Hkv, D, S, variant=variant, q_data_type=dtype)
    assert w.kernel_key.uri == key_of(case, w.kernel_key.target, w.gpu).uri
    import tvm

    cache_dev = tvm.runtime.tensor(cache, tvm.cuda(0))
    softmax = w.kernel_key.variant.use_softmax
    res = w.run(q, cache_dev, return_lse=softmax, **args)
    o, lse = res if softmax else (res, None)
    ref_o, ref_lse = R.paged_attention(q, None, cache, indptr, indices, last, layout, variant=variant,
                                       params=args)
    assert_attention_close(o, lse, ref_o, ref_lse, dtype, case_id(case))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_matches_reference(case):
    rng = np.random.default_rng(7)
    S = case["page_size"]
    kv_lens = [0, 1, S, S + 1, 2 * S - 1, 37, 300, 1024, 3000]  # skewed; the long ones get split
    check(case, kv_lens, rng)


@pytest.mark.parametrize("heads", list(RING_SCHEDULES), ids=lambda h: f"h{h[0]}x{h[1]}")
def test_cp_async_ring_schedule_matches_reference(heads):
    """The cp.async ring of key steps (schedule suffix ``s<stages>``), which no default schedule
    picks (measured on the H100: 3 stages 0.5-5% slower than the register prefetch), on the skewed
    batch and on a long request cut into pieces (the schedule pinned: ``pin_schedule``)."""
    case = {**CASES[0], "heads": heads, "schedule": RING_SCHEDULES[heads]}
    rng = np.random.default_rng(17)
    check(case, [0, 1, 16, 17, 31, 37, 300, 1024, 3000], rng)
    check(case, [20000, 5], rng)


def test_single_long_request_is_split():
    rng = np.random.default_rng(3)
    check(CASES[0], [32768], rng)
    check(CASES[0], [5000, 0, 1], rng)


@pytest.mark.parametrize("variant", [ta.SlidingWindow(100), ta.SlidingWindow(100) + ta.LogitsSoftCap()],
                         ids=["window", "window_softcap"])
def test_a_window_given_at_plan_time_is_planned_for(variant):
    """A sliding window known to ``plan`` (here the variant's default; FlashInfer's ``window_left``
    plan option makes the same variant): the plan splits only the keys inside it, the kernel
    matches the reference with that window and with a narrower one, and a run with a wider window
    (or none), which would need keys the plan left out, is refused."""
    import tvm

    rng = np.random.default_rng(13)
    Hq, Hkv, D, S = 32, 8, 128, 16
    lens = [0, 1, 50, 101, 102, 5000, 32768, 3]
    indptr, indices, last, num_pages = page_table(rng, lens, S)
    cache = randn(rng, (num_pages, 2, S, Hkv, D), "float16")
    cache_dev = tvm.runtime.tensor(cache, tvm.cuda(0))
    q = randn(rng, (len(lens), Hq, D), "float16")
    w = ta.BatchDecodeWithPagedKVCacheWrapper(device="cuda")
    w.plan(indptr, indices, last, Hq, Hkv, D, S, variant=variant)
    bufs = w._dev_plan.buffers
    cost = sum(min(n, 101) for n in lens) + WORK_OVERHEAD * (len(lens) + bufs.ws.num_ctas - 1)
    assert bufs._decode_stats[2] == -(-cost // bufs.ws.num_ctas)  # the quota: the window's keys only
    extra = {"logits_soft_cap": 50.0} if len(variant.extra_params()) > 1 else {}
    for args in ({}, {"window_left": 40}, {"window_left": 0}):
        params = {"window_left": 100, **extra, **args}
        o, lse = w.run(q, cache_dev, return_lse=True, **extra, **args)
        ref_o, ref_lse = R.paged_attention(q, None, cache, indptr, indices, last, variant=variant,
                                           params=params)
        assert_attention_close(o, lse, ref_o, ref_lse, "float16", f"window {params['window_left']}")
    for wider in (101, 5000, -1):
        with pytest.raises(ValueError, match="does not read"):
            w.run(q, cache_dev, window_left=wider, **extra)


def test_every_run_of_a_plan_merges_its_cut_requests():
    """One plan, several runs (a step's layers): the kernel merges each cut request in the block
    that finishes its last piece, counting pieces in merge_count, which every run must leave zero
    for the next."""
    import tvm

    rng = np.random.default_rng(11)
    Hq, Hkv, D, S = 32, 8, 128, 16
    lens = [20000, 3, 4100, 0, 9000]  # long ones cut into many pieces
    indptr, indices, last, num_pages = page_table(rng, lens, S)
    w = ta.BatchDecodeWithPagedKVCacheWrapper(device="cuda")
    w.plan(indptr, indices, last, Hq, Hkv, D, S)
    assert w._dev_plan.buffers.num_partials > 0, "the plan cut no request: nothing is merged"
    count = w._dev_plan.buffers.merge_state[1]
    for layer in range(3):
        cache = randn(rng, (num_pages, 2, S, Hkv, D), "float16")
        q = randn(rng, (len(lens), Hq, D), "float16")
        o, lse = w.run(q, tvm.runtime.tensor(cache, tvm.cuda(0)), return_lse=True)
        ref_o, ref_lse = R.paged_attention(q, None, cache, indptr, indices, last)
        assert_attention_close(o, lse, ref_o, ref_lse, "float16", f"layer {layer}")
        assert not count.numpy().any(), f"layer {layer} left merge counts behind"


def test_split_kv_off_is_batch_invariant():
    """With disable_split_kv a request's output does not depend on the rest of the batch."""
    import tvm

    rng = np.random.default_rng(5)
    case = CASES[0]
    Hq, Hkv = case["heads"]
    lens = [4000, 10, 20, 30000]
    indptr, indices, last, num_pages = page_table(rng, lens, 16)
    cache = tvm.runtime.tensor(randn(rng, (num_pages, 2, 16, Hkv, 128), "float16"), tvm.cuda(0))
    q = randn(rng, (len(lens), Hq, 128), "float16")
    outs = []
    for b in (1, len(lens)):
        w = ta.BatchDecodeWithPagedKVCacheWrapper(device="cuda", disable_split_kv=True)
        w.plan(indptr[: b + 1], indices[: indptr[b]], last[:b], Hq, Hkv, 128, 16)
        outs.append(w.run(q[:b], cache)[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_cuda_graph_replay_after_lengths_change():
    torch = pytest.importorskip("torch")
    import tvm

    rng = np.random.default_rng(9)
    Hq, Hkv, D, S = 32, 8, 128, 16
    max_batch, max_pages, num_pages = 8, 800, 810
    cache = randn(rng, (num_pages, 2, S, Hkv, D), "float16")
    dev = tvm.cuda(0)
    cache_dev = tvm.runtime.tensor(cache, dev)
    q_dev = tvm.runtime.tensor(randn(rng, (max_batch, Hq, D), "float16"), dev)
    o_dev = tvm.runtime.empty((max_batch, Hq, D), "float16", dev)
    lse_dev = tvm.runtime.empty((max_batch, Hq), "float32", dev)
    w = ta.BatchDecodeWithPagedKVCacheWrapper(device="cuda", use_cuda_graph=True, max_batch_size=max_batch,
                                             max_num_pages=max_pages)

    def plan(lens):
        pages = [(n + S - 1) // S for n in lens]
        indptr = np.cumsum([0] + pages).astype(np.int32)
        indices = rng.permutation(num_pages)[: indptr[-1]].astype(np.int32)
        last = np.array([n - (p - 1) * S if p else 0 for n, p in zip(lens, pages)], np.int32)
        w.plan(indptr, indices, last, Hq, Hkv, D, S)
        return indptr, indices, last

    plan([100, 2000, 5])
    graph = capture_graph(lambda: w.run(q_dev, cache_dev, out=o_dev, lse=lse_dev))
    for lens in ([3000, 1, 700, 64, 9000], [1, 1], [12000]):  # new lengths, same buffers
        indptr, indices, last = plan(lens)
        b = len(lens)
        ref_o, ref_lse = R.paged_attention(q_dev.numpy()[:b], None, cache, indptr, indices, last)
        for replay in range(2):  # a replay must leave the merge counts as it found them
            o_dev.copyfrom(np.full((max_batch, Hq, D), np.nan, np.float16))
            graph.replay()
            torch.cuda.synchronize()
            assert_attention_close(o_dev.numpy()[:b], lse_dev.numpy()[:b], ref_o, ref_lse, "float16",
                                   f"{lens} replay {replay}")
            assert np.all(o_dev.numpy()[b:] == 0)


@pytest.mark.parametrize("fault, message", [
    ("indptr0", "kv_indptr: must start at 0"), ("decrease", "kv_indptr: must be non-decreasing"),
    ("overrun", "exceeds len\\(kv_indices\\)"), ("last_big", "kv_last_page_len\\[1\\] = 17 must be in"),
    ("last_empty", "must be 0 for a request with no pages"),
    ("negative", "kv_indices\\[3\\] = -1 is out of range"),
    ("count", "kv_last_page_len: has 2 entries"), ("cache", "refer to page 40"),
])
def test_plan_refuses_a_bad_page_table(fault, message):
    """The CUDA plan checks the page table in the kernel module's compiled pass, and names the
    fault as the CPU's checks do; a good table then plans and runs."""
    indptr = np.array([0, 2, 5, 5], np.int32)
    indices = np.arange(7, dtype=np.int32)
    last = np.array([16, 3, 0], np.int32)
    if fault == "indptr0":
        indptr = indptr + 1
    elif fault == "decrease":
        indptr[2] = 1
    elif fault == "overrun":
        indices = indices[:4]
    elif fault == "last_big":
        last[1] = 17
    elif fault == "last_empty":
        last[2] = 2
    elif fault == "negative":
        indices[3] = -1
    elif fault == "count":
        last = last[:2]
    elif fault == "cache":
        indices[4] = 40
    w = ta.BatchDecodeWithPagedKVCacheWrapper("NHD", device="cuda")
    rng = np.random.default_rng(0)
    cache = randn(rng, (8, 2, 16, 8, 128), "float16")
    q = randn(rng, (3, 32, 128), "float16")
    with pytest.raises(ValueError, match=message):
        w.plan(indptr, indices, last, 32, 8, 128, 16)
        w.run(q, cache)
    w.plan(np.array([0, 2, 5, 5], np.int32), np.arange(7, dtype=np.int32), np.array([16, 3, 0], np.int32),
           32, 8, 128, 16)
    assert w.run(q, cache).shape == (3, 32, 128)


def test_torch_views_off_the_alignment_are_taken():
    """torch CUDA views that start 2 bytes into their storage (TVM takes 64-byte aligned data only)
    are copied and give the same result; an ``out=`` view that would be a copy is refused by name."""
    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(13)
    Hq, Hkv, D, S = 32, 8, 128, 16
    lens = [300, 17, 1]
    indptr, indices, last, num_pages = page_table(rng, lens, S)
    cache = randn(rng, (num_pages, 2, S, Hkv, D), "float16")
    q = randn(rng, (len(lens), Hq, D), "float16")

    def off_by_one_element(x):
        buf = torch.empty(x.size + 1, dtype=torch.float16, device="cuda")
        view = buf[1:].view(x.shape)
        view.copy_(torch.from_numpy(x))
        assert view.data_ptr() % 64
        return view

    w = ta.BatchDecodeWithPagedKVCacheWrapper(device="cuda")
    w.plan(indptr, indices, last, Hq, Hkv, D, S)
    o, lse = w.run(off_by_one_element(q), off_by_one_element(cache), return_lse=True)
    assert o.is_cuda, "a torch input gives a torch output"
    ref_o, ref_lse = R.paged_attention(q, None, cache, indptr, indices, last)
    assert_attention_close(o.float().cpu().numpy(), lse.cpu().numpy(), ref_o, ref_lse, "float16", "views")
    with pytest.raises(ValueError, match="out"):
        w.run(q, cache, out=off_by_one_element(np.zeros_like(q)))

"""GPU tier: the CUDA tensor-core prefill kernels against the numpy reference on random data.

Every case of prefill_cases.py over a batch whose lengths are not multiples of any tile (with empty
queries, an empty KV, append and decode-like rows); the three query tiles; a long request whose
tiles are cut over the CTAs; batch invariance with split-KV off; an all-false custom mask;
block-sparse and vector-sparse attention; the single-request calls; and a CUDA-graph replay after
the lengths change. Runs on a GPU host with the kernels built by scripts/build_gpu_kernels.py.
"""

import numpy as np
import pytest

import tvm_attn as ta
from tvm_attn import reference as R

from conftest import TOL, assert_attention_close, randn
from .cases import capture_graph, page_table, variant_of
from .prefill_cases import (
    BASE, BSR, CASES, HOPPER_CASES, HOPPER_EDGES, HOPPER_SCHEDULES, LENGTHS, LONG, MEDIUM, SHORT, backends,
    bsr_key, case_id, key_of,
)
from tvm_attn.api.prefill import pin_schedule

pytestmark = pytest.mark.gpu


def _dev():
    import tvm

    return tvm.cuda(0)


def variant_args(name, rng, lengths, all_false=False):
    if name == "custom_mask":
        masks = [(rng.random((q, k)) < 0.7) & (not all_false) for q, k in lengths]
        packed, indptr = ta.pack_custom_mask(masks)
        return {"custom_mask": packed, "mask_indptr": indptr}
    if name == "window":
        return {"window_left": 100}
    if name == "softcap":
        return {"logits_soft_cap": 2.0}
    return {}


def check(case, lengths, rng, all_false_mask=False, schedule=None, **wrapper_kw):
    import tvm

    Hq, Hkv = case["heads"]
    D, dtype, layout, S = case["head_dim"], case["dtype"], case["layout"], case["page_size"]
    qo_lens, kv_lens = [q for q, _ in lengths], [k for _, k in lengths]
    qo_indptr = np.cumsum([0] + qo_lens).astype(np.int32)
    q = randn(rng, (int(qo_indptr[-1]), Hq, D), dtype)
    variant = variant_of(case["variant"])
    args = variant_args(case["variant"], rng, lengths, all_false_mask)
    plan_kw = dict(causal=case["causal"], variant=variant, q_data_type=dtype)
    if case["kv"] == "paged":
        indptr, indices, last, num_pages = page_table(rng, kv_lens, S, spare=3)
        cache = randn(rng, ta.PagedKV(S, layout).cache_shape(num_pages, Hkv, D), dtype)
        w = ta.BatchPrefillWithPagedKVCacheWrapper(layout, device="cuda", **wrapper_kw)
        if schedule:
            pin_schedule(w, schedule)
        w.plan(qo_indptr, indptr, indices, last, Hq, Hkv, D, S, **plan_kw)
        data = (tvm.runtime.tensor(cache, _dev()),)
        ref = lambda: R.paged_attention(q, qo_indptr, cache, indptr, indices, last, layout,  # noqa: E731
                                        variant=w.kernel_key.variant, params=args)
    else:
        kv_indptr = np.cumsum([0] + kv_lens).astype(np.int32)
        shape = ta.RaggedKV(layout).kv_shape(int(kv_indptr[-1]), Hkv, D)
        k, v = randn(rng, shape, dtype), randn(rng, shape, dtype)
        w = ta.BatchPrefillWithRaggedKVCacheWrapper(layout, device="cuda", **wrapper_kw)
        if schedule:
            pin_schedule(w, schedule)
        w.plan(qo_indptr, kv_indptr, Hq, Hkv, D, **plan_kw)
        data = (tvm.runtime.tensor(k, _dev()), tvm.runtime.tensor(v, _dev()))
        ref = lambda v=v: R.ragged_attention(q, qo_indptr, k, v, kv_indptr, layout,  # noqa: E731
                                             variant=w.kernel_key.variant, params=args)
    backend = wrapper_kw.get("backend", "auto")
    assert w.kernel_key.uri == key_of(case, lengths, w.kernel_key.target, backend, schedule).uri
    softmax = w.kernel_key.variant.use_softmax
    res = w.run(q, *data, return_lse=softmax, **args)
    o, lse = res if softmax else (res, None)
    ref_o, ref_lse = ref()
    if not softmax and case["kv"] == "ragged":
        # Unnormalized weights (sigmoid): P.V runs on tensor cores with P rounded to the data type, an
        # error of up to half an ulp of each weight, so it grows with sum_j w_j |v_j| (the same
        # attention over |v|), not with |o|. Allow exactly that on top of the usual bound.
        mass, _ = ref(v=np.abs(np.asarray(v, np.float32)).astype(v.dtype))
        ulp = 2.0 ** (-11 if dtype == "float16" else -8)
        err = np.abs(np.asarray(o, np.float32) - ref_o)
        bound = TOL[dtype] * (1 + np.abs(ref_o)) + ulp * mass
        assert np.all(err <= bound), \
            f"{case_id(case)}: max |err| {err.max():.3e}, worst excess {(err - bound).max():.3e}"
    else:
        assert_attention_close(o, lse, ref_o, ref_lse if softmax else None, dtype, case_id(case))
    return o, lse


@pytest.mark.parametrize("case,backend", [(c, b) for c in CASES for b in backends(c)],
                         ids=[f"{case_id(c)}-{b}" for c in CASES for b in backends(c)])
def test_prefill_matches_reference(case, backend):
    check(case, LENGTHS, np.random.default_rng(11), backend=backend)


@pytest.mark.parametrize("case", HOPPER_CASES, ids=case_id)
def test_hopper_prefill_tile_edges(case):
    """The Hopper kernel (backend="fa3") at its tile edges, with split-KV on and off."""
    check(case, HOPPER_EDGES, np.random.default_rng(13), backend="fa3")
    assert "wsq" in key_of(case, HOPPER_EDGES, "cuda:sm_90a", "fa3").schedule
    check(case, HOPPER_EDGES, np.random.default_rng(13), backend="fa3", disable_split_kv=True)


@pytest.mark.parametrize("schedule", HOPPER_SCHEDULES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_hopper_schedules(schedule, causal):
    """Each Hopper consumer loop (serial or overlapped, with or without the ping-pong) at the tile
    edges, with split-KV on and off."""
    case = {**BASE, "causal": causal}
    for split_off in (False, True):
        check(case, HOPPER_EDGES, np.random.default_rng(17), schedule=schedule, backend="fa3",
              disable_split_kv=split_off)


@pytest.mark.parametrize("lengths", [SHORT, MEDIUM, LONG], ids=["tile16", "tile64", "long-split"])
def test_query_tiles_and_split(lengths):
    check(BASE, lengths, np.random.default_rng(12))
    check(BASE, lengths, np.random.default_rng(12), disable_split_kv=True)


def test_all_false_custom_mask_gives_zeros():
    o, lse = check({**BASE, "variant": "custom_mask"}, LENGTHS, np.random.default_rng(13),
                   all_false_mask=True)
    assert np.all(o == 0) and np.all(np.isneginf(lse))


def test_split_kv_off_is_batch_invariant():
    """With disable_split_kv a request's output does not depend on the rest of the batch."""
    import tvm

    rng = np.random.default_rng(5)
    lengths = [(64, 20000), (30, 40), (200, 900)]
    kv_indptr = np.cumsum([0] + [k for _, k in lengths]).astype(np.int32)
    qo_indptr = np.cumsum([0] + [q for q, _ in lengths]).astype(np.int32)
    k = randn(rng, (int(kv_indptr[-1]), 8, 128), "float16")
    v = randn(rng, (int(kv_indptr[-1]), 8, 128), "float16")
    q = randn(rng, (int(qo_indptr[-1]), 32, 128), "float16")
    outs = []
    for b in (1, len(lengths)):
        w = ta.BatchPrefillWithRaggedKVCacheWrapper(device="cuda", disable_split_kv=True)
        w.plan(qo_indptr[: b + 1], kv_indptr[: b + 1], 32, 8, 128, causal=True)
        # same tile for both batches: the first request alone picks the same 128-row tile
        kb, vb = (tvm.runtime.tensor(x[: kv_indptr[b]], _dev()) for x in (k, v))
        outs.append(w.run(q[: qo_indptr[b]], kb, vb)[: qo_indptr[1]])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("M, N, Rb, C, causal", BSR)
def test_block_sparse(M, N, Rb, C, causal):
    import tvm

    rng = np.random.default_rng(17)
    rows, cols = M // Rb, N // C
    blocks = rng.random((rows, cols)) < 0.4
    blocks[0] = False  # a block row with no blocks
    indptr = np.concatenate([[0], np.cumsum(blocks.sum(1))]).astype(np.int32)
    indices = np.nonzero(blocks)[1].astype(np.int32)
    q, k, v = (randn(rng, (n, h, 128), "float16") for n, h in ((M, 32), (N, 8), (N, 8)))
    w = ta.BlockSparseAttentionWrapper(device="cuda")
    w.plan(indptr, indices, M, N, Rb, C, 32, 8, 128, causal=causal)
    assert w.kernel_key.uri == bsr_key(M, N, Rb, C, causal, w.kernel_key.target).uri
    o, lse = w.run(q, tvm.runtime.tensor(k, _dev()), tvm.runtime.tensor(v, _dev()), return_lse=True)
    ref_o, ref_lse = R.block_sparse_attention(q, k, v, indptr, indices, Rb, C, causal=causal)
    assert_attention_close(o, lse, ref_o, ref_lse, "float16", f"bsr{Rb}x{C}")


def test_single_calls():
    rng = np.random.default_rng(19)
    q = randn(rng, (200, 32, 128), "float16")
    k, v = randn(rng, (300, 8, 128), "float16"), randn(rng, (300, 8, 128), "float16")
    o, lse = ta.single_prefill_with_kv_cache(q, k, v, device="cuda", return_lse=True)
    ref_o, ref_lse = R.dense_attention(q, k, v)
    assert_attention_close(o, lse, ref_o, ref_lse, "float16", "single prefill")
    o1 = ta.single_decode_with_kv_cache(q[0], k, v, device="cuda")
    ref1, _ = R.dense_attention(q[:1], k, v)
    assert_attention_close(o1[None], None, ref1, None, "float16", "single decode")


def test_cuda_graph_replay_after_lengths_change():
    torch = pytest.importorskip("torch")
    import tvm

    rng = np.random.default_rng(9)
    Hq, Hkv, D, S = 32, 8, 128, 16
    max_batch, max_tokens, max_pages, num_pages = 6, 1200, 700, 710
    cache = randn(rng, (num_pages, 2, S, Hkv, D), "float16")
    dev = _dev()
    cache_dev = tvm.runtime.tensor(cache, dev)
    q_host = randn(rng, (max_tokens, Hq, D), "float16")
    q_dev = tvm.runtime.tensor(q_host, dev)
    o_dev = tvm.runtime.empty((max_tokens, Hq, D), "float16", dev)
    lse_dev = tvm.runtime.empty((max_tokens, Hq), "float32", dev)
    w = ta.BatchPrefillWithPagedKVCacheWrapper(device="cuda", use_cuda_graph=True, max_batch_size=max_batch,
                                              max_num_tokens=max_tokens, max_num_pages=max_pages)

    def plan(lengths):
        qo_indptr = np.cumsum([0] + [q for q, _ in lengths]).astype(np.int32)
        indptr, indices, last, _ = page_table(rng, [k for _, k in lengths], S, spare=3)
        indices = rng.permutation(num_pages)[: indptr[-1]].astype(np.int32)
        w.plan(qo_indptr, indptr, indices, last, Hq, Hkv, D, S, causal=True)
        return qo_indptr, indptr, indices, last

    plan([(100, 300), (7, 2000), (1, 5)])
    graph = capture_graph(lambda: w.run(q_dev, cache_dev, out=o_dev, lse=lse_dev))
    for lengths in ([(300, 3000), (1, 1), (500, 700), (64, 64)], [(1, 9000)], [(1000, 1000), (3, 200)]):
        qo_indptr, indptr, indices, last = plan(lengths)
        graph.replay()
        torch.cuda.synchronize()
        n = int(qo_indptr[-1])
        ref_o, ref_lse = R.paged_attention(q_host[:n], qo_indptr, cache, indptr, indices, last, causal=True)
        assert_attention_close(o_dev.numpy()[:n], lse_dev.numpy()[:n], ref_o, ref_lse, "float16",
                               str(lengths))


def test_hopper_cuda_graph_replay_after_lengths_change():
    """The Hopper kernel under a CUDA graph: captured once over fixed buffers, replayed after plans
    of other lengths (the tensor maps cover the whole buffers, the work lists change in place)."""
    torch = pytest.importorskip("torch")
    import tvm

    rng = np.random.default_rng(19)
    Hq, Hkv, D = 32, 8, 128
    max_batch, max_tokens, max_kv = 5, 2048, 12000
    dev = _dev()
    q_host = randn(rng, (max_tokens, Hq, D), "float16")
    k_host, v_host = randn(rng, (max_kv, Hkv, D), "float16"), randn(rng, (max_kv, Hkv, D), "float16")
    q_dev, k_dev, v_dev = (tvm.runtime.tensor(x, dev) for x in (q_host, k_host, v_host))
    o_dev = tvm.runtime.empty((max_tokens, Hq, D), "float16", dev)
    lse_dev = tvm.runtime.empty((max_tokens, Hq), "float32", dev)
    # ragged KV under CUDA graphs: max_num_pages is the K/V buffers' row count
    w = ta.BatchPrefillWithRaggedKVCacheWrapper(device="cuda", backend="fa3", use_cuda_graph=True,
                                               max_batch_size=max_batch, max_num_tokens=max_tokens,
                                               max_num_pages=max_kv)

    def plan(lengths):
        qo_indptr = np.cumsum([0] + [q for q, _ in lengths]).astype(np.int32)
        kv_indptr = np.cumsum([0] + [k for _, k in lengths]).astype(np.int32)
        w.plan(qo_indptr, kv_indptr, Hq, Hkv, D, causal=True)
        return qo_indptr, kv_indptr

    plan([(100, 300), (7, 2000), (1, 5)])
    assert "wsq" in w.kernel_key.schedule
    graph = capture_graph(lambda: w.run(q_dev, k_dev, v_dev, out=o_dev, lse=lse_dev))
    for lengths in ([(300, 3000), (1, 1), (500, 700), (64, 64), (0, 9)], [(1, 9000)],
                    [(1000, 1000), (3, 200)], [(2048, 11000)]):
        qo_indptr, kv_indptr = plan(lengths)
        graph.replay()
        torch.cuda.synchronize()
        n = int(qo_indptr[-1])
        ref_o, ref_lse = R.ragged_attention(q_host[:n], qo_indptr, k_host, v_host, kv_indptr, causal=True)
        assert_attention_close(o_dev.numpy()[:n], lse_dev.numpy()[:n], ref_o, ref_lse, "float16",
                               str(lengths))


def _ragged_batch(rng, lengths):
    import tvm

    qo_indptr = np.cumsum([0] + [q for q, _ in lengths]).astype(np.int32)
    kv_indptr = np.cumsum([0] + [k for _, k in lengths]).astype(np.int32)
    q = randn(rng, (int(qo_indptr[-1]), 32, 128), "float16")
    k, v = (randn(rng, (int(kv_indptr[-1]), 8, 128), "float16") for _ in range(2))
    return qo_indptr, kv_indptr, q, k, v, tuple(tvm.runtime.tensor(x, _dev()) for x in (k, v))


def test_planned_window_reads_only_the_keys_it_shows():
    """A sliding window known at plan time (the variant's own): the prefill plan starts every query
    tile at the first key its first row's window shows, runs with that window or a narrower one
    match the reference, and a wider one is refused (the plan did not read its keys)."""
    from tvm_attn.planner import Work

    rng = np.random.default_rng(23)
    window = 100
    qo_indptr, kv_indptr, q, k, v, data = _ragged_batch(rng, LENGTHS)
    w = ta.BatchPrefillWithRaggedKVCacheWrapper(device="cuda")
    w.plan(qo_indptr, kv_indptr, 32, 8, 128, causal=True, variant=ta.SlidingWindow(window))
    bufs = w._dev_plan.buffers
    work, cta = bufs.host_work, bufs.host_cta
    first = {}
    for i in range(int(cta[-1])):
        item = (int(work[Work.REQUEST, i]), int(work[Work.ROW_BEGIN, i]))
        first[item] = min(first.get(item, 1 << 30), int(work[Work.KV_BEGIN, i]))
    skipped = 0
    for (b, row0), begin in first.items():
        qo_len, kv_len = LENGTHS[b]
        pos = row0 // 4 + kv_len - qo_len  # the tile's first row (group 4)
        assert begin == max(min(pos - window, kv_len), 0), (b, row0)
        skipped += begin
    assert skipped > 0
    for args in ({}, {"window_left": 40}, {"window_left": 0}):
        params = {"window_left": window, **args}
        o, lse = w.run(q, *data, return_lse=True, **args)
        ref_o, ref_lse = R.ragged_attention(q, qo_indptr, k, v, kv_indptr, "NHD",
                                            variant=w.kernel_key.variant, params=params)
        assert_attention_close(o, lse, ref_o, ref_lse, "float16", f"window {params['window_left']}")
    for wider in (window + 1, -1):
        with pytest.raises(ValueError, match="window_left: .* does not read"):
            w.run(q, *data, window_left=wider)


def test_runtime_causal_plans_every_key():
    """RuntimeCausal's flag is chosen per run, so the plan reads every key: a run with is_causal=0
    sees the keys after each query's position (a causal plan would have cut them off)."""
    rng = np.random.default_rng(29)
    qo_indptr, kv_indptr, q, k, v, data = _ragged_batch(rng, [(130, 300), (17, 17), (64, 2000), (300, 300)])
    w = ta.BatchPrefillWithRaggedKVCacheWrapper(device="cuda")
    w.plan(qo_indptr, kv_indptr, 32, 8, 128, variant=ta.variants.RuntimeCausal())
    for flag in (0, 1):
        o, lse = w.run(q, *data, return_lse=True, is_causal=flag)
        ref_o, ref_lse = R.ragged_attention(q, qo_indptr, k, v, kv_indptr, "NHD",
                                            variant=w.kernel_key.variant, params={"is_causal": flag})
        assert_attention_close(o, lse, ref_o, ref_lse, "float16", f"is_causal={flag}")

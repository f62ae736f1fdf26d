"""GPU tier: NaN inputs propagate through the CUDA decode and prefill kernels (and their merges of
cut requests), as they do on the CPU and in torch/FlashInfer: a NaN in a query row makes that row's o
and LSE NaN, a NaN in a key that a row sees makes that row NaN, and a NaN that no row sees (a key
the mask hides, out of the window, or a page slot past a sequence's end) changes nothing. Every other
row matches the reference exactly as in the other GPU tests. The merge kernels: a NaN (or +inf) LSE,
or a NaN in the v of a non-empty state, comes out NaN; an empty state's NaN v still weighs 0.

Keys only, never values, are poisoned where a row must not see them: a hidden key's weight is 0, and
``0 * NaN`` in P.V is NaN in torch and FlashInfer too. The exception is the next request's values,
which a request's last KV tile overhangs: the prefill kernels load zeros in their place (FA2: the
cp.async zero fill; Hopper: the consumers clear the rows TMA loaded), so a NaN there stays in its
own request. Uses kernels that
scripts/build_gpu_kernels.py builds (the decode base case, the window case, the prefill base kernels).
"""

import numpy as np
import pytest

import tvm_attn as ta
from tvm_attn import reference as R

from _merge_inputs import nan_merge_inputs
from conftest import assert_attention_close, randn
from . import prefill_cases as P
from .cases import CASES, page_table, variant_of
from .test_merge_cuda import DTYPES, OPS, _run

pytestmark = pytest.mark.gpu

DECODE = CASES[0]  # NHD, page 16, fp16, head_dim 128, 32/8 heads
WINDOW = next(c for c in CASES if c["variant"] == "window")
#: skewed decode lengths: 3000 is cut into pieces, merged in the kernel
KV_LENS = [1, 37, 300, 3000]


def _key_slot(indptr, indices, page_size, req, pos):
    """(page, slot) of key ``pos`` of request ``req`` in the page table."""
    return indices[indptr[req] + pos // page_size], pos % page_size


def _decode(case, poison, args=None):
    import tvm

    rng = np.random.default_rng(3)
    Hq, Hkv = case["heads"]
    D, S, dtype, layout = case["head_dim"], case["page_size"], case["dtype"], case["layout"]
    assert layout == "NHD"
    indptr, indices, last, num_pages = page_table(rng, KV_LENS, S)
    cache = randn(rng, ta.PagedKV(S, layout).cache_shape(num_pages, Hkv, D), dtype)
    q = randn(rng, (len(KV_LENS), Hq, D), dtype)
    poison(q, cache, indptr, indices, last)
    args = args or {}
    variant = variant_of(case["variant"])
    w = ta.BatchDecodeWithPagedKVCacheWrapper(layout, device="cuda")
    w.plan(indptr, indices, last, Hq, Hkv, D, S, variant=variant, q_data_type=dtype)
    o, lse = w.run(q, tvm.runtime.tensor(cache, tvm.cuda(0)), return_lse=True, **args)
    ref_o, ref_lse = R.paged_attention(q, None, cache, indptr, indices, last, layout, variant=variant,
                                       params=args)
    assert_attention_close(o, lse, ref_o, ref_lse, dtype, case["variant"])
    return np.asarray(o, np.float32), np.asarray(lse)


def test_decode_nan_query_row():
    def poison(q, cache, indptr, indices, last):
        q[3, 5, 7] = np.nan  # the long (cut) request, query head 5

    o, lse = _decode(DECODE, poison)
    assert np.isnan(o[3, 5]).all() and np.isnan(lse[3, 5])
    assert np.isfinite(np.delete(o.reshape(-1, o.shape[-1]), 3 * o.shape[1] + 5, axis=0)).all()


@pytest.mark.parametrize("req, pos", [(1, 20), (3, 2500)], ids=["whole", "cut"])
def test_decode_nan_visible_key(req, pos):
    S, G = DECODE["page_size"], DECODE["heads"][0] // DECODE["heads"][1]

    def poison(q, cache, indptr, indices, last):
        page, slot = _key_slot(indptr, indices, S, req, pos)
        cache[page, 0, slot, 2, 11] = np.nan  # K of KV head 2

    o, lse = _decode(DECODE, poison)
    heads = np.arange(2 * G, 3 * G)
    assert np.isnan(o[req, heads]).all() and np.isnan(lse[req, heads]).all()
    assert np.isfinite(np.delete(o, heads, axis=1)).all() and np.isfinite(np.delete(o, req, axis=0)).all()


def test_decode_nan_that_no_row_sees():
    """K and V NaN in the page slots past each sequence's end and in the spare pages; K NaN in keys
    out of the window (window_left=100: the first keys of the 300- and 3000-key requests)."""
    S = WINDOW["page_size"]

    def poison(q, cache, indptr, indices, last):
        used = set(indices.tolist())
        for p in range(cache.shape[0]):
            if p not in used:
                cache[p] = np.nan
        for b in range(len(KV_LENS)):
            if indptr[b + 1] > indptr[b]:
                cache[indices[indptr[b + 1] - 1], :, last[b]:] = np.nan
        for b in (2, 3):
            for pos in (0, 7, KV_LENS[b] - 102):
                page, slot = _key_slot(indptr, indices, S, b, pos)
                cache[page, 0, slot] = np.nan

    o, lse = _decode(WINDOW, poison, {"window_left": 100})
    assert np.isfinite(o).all() and np.isfinite(lse).all()


def _prefill(lengths, poison):
    import tvm

    rng = np.random.default_rng(5)
    c = P.BASE  # ragged NHD, fp16, head_dim 128, 32/8 heads, causal
    (Hq, Hkv), D, dtype = c["heads"], c["head_dim"], c["dtype"]
    qo_indptr = np.cumsum([0] + [q for q, _ in lengths]).astype(np.int32)
    kv_indptr = np.cumsum([0] + [k for _, k in lengths]).astype(np.int32)
    q = randn(rng, (int(qo_indptr[-1]), Hq, D), dtype)
    k, v = (randn(rng, (int(kv_indptr[-1]), Hkv, D), dtype) for _ in range(2))
    poison(q, k, qo_indptr, kv_indptr)
    w = ta.BatchPrefillWithRaggedKVCacheWrapper("NHD", device="cuda")
    w.plan(qo_indptr, kv_indptr, Hq, Hkv, D, causal=True, q_data_type=dtype)
    assert w.kernel_key.uri == P.key_of(c, lengths, w.kernel_key.target).uri
    dev = tvm.cuda(0)
    o, lse = w.run(q, tvm.runtime.tensor(k, dev), tvm.runtime.tensor(v, dev), return_lse=True)
    ref_o, ref_lse = R.ragged_attention(q, qo_indptr, k, v, kv_indptr, "NHD", variant=w.kernel_key.variant)
    assert_attention_close(o, lse, ref_o, ref_lse, dtype, "prefill")
    return np.asarray(o, np.float32), np.asarray(lse), qo_indptr


@pytest.mark.parametrize("lengths", [P.LENGTHS, P.SHORT, P.LONG], ids=["tile128", "tile16", "long-split"])
def test_prefill_nan_query_row(lengths):
    b = int(np.argmax([q for q, _ in lengths]))  # the longest query run (LONG: its tiles are cut)

    def poison(q, k, qo_indptr, kv_indptr):
        q[qo_indptr[b] + lengths[b][0] // 2, 9, 3] = np.nan

    o, lse, qo_indptr = _prefill(lengths, poison)
    row = qo_indptr[b] + lengths[b][0] // 2
    assert np.isnan(o[row, 9]).all() and np.isnan(lse[row, 9])
    assert np.isfinite(np.delete(o.reshape(-1, o.shape[-1]), row * o.shape[1] + 9, axis=0)).all()


@pytest.mark.parametrize("lengths", [P.LENGTHS, P.LONG], ids=["tile128", "long-split"])
def test_prefill_nan_key_reaches_the_rows_that_see_it(lengths):
    """K NaN in one key of the longest request (KV head 1): the rows at or after it (causal) are NaN
    for query heads 4..7; the rows before it, which the mask keeps from it, are exact."""
    b = int(np.argmax([q for q, _ in lengths]))
    qo_len, kv_len = lengths[b]
    pos = kv_len - qo_len + qo_len // 3  # seen by query rows qo_len // 3 ..

    def poison(q, k, qo_indptr, kv_indptr):
        k[kv_indptr[b] + pos, 1, 5] = np.nan

    o, lse, qo_indptr = _prefill(lengths, poison)
    rows, heads = np.arange(qo_indptr[b], qo_indptr[b + 1]), np.arange(4, 8)
    seeing = rows[qo_len // 3:]
    assert np.isnan(o[np.ix_(seeing, heads)]).all() and np.isnan(lse[np.ix_(seeing, heads)]).all()
    assert np.isfinite(o[rows[: qo_len // 3]]).all() and np.isfinite(np.delete(o, heads, axis=1)).all()


@pytest.mark.parametrize("backend", ["fa3", "fa2"])
def test_prefill_nan_value_stays_in_its_request(backend):
    """A NaN in the V of request 1's first key: request 0's last tile overhangs onto that row, and
    only request 1's rows (of that KV head's query heads, in that column) come out NaN."""
    import tvm

    rng = np.random.default_rng(7)
    c = P.BASE
    (Hq, Hkv), D, dtype = c["heads"], c["head_dim"], c["dtype"]
    lengths = [(100, 100), (130, 130), (70, 300)]  # none a multiple of a KV tile
    qo_indptr = np.cumsum([0] + [q for q, _ in lengths]).astype(np.int32)
    kv_indptr = np.cumsum([0] + [k for _, k in lengths]).astype(np.int32)
    q = randn(rng, (int(qo_indptr[-1]), Hq, D), dtype)
    k, v = (randn(rng, (int(kv_indptr[-1]), Hkv, D), dtype) for _ in range(2))
    v[kv_indptr[1], 2, 5] = np.nan
    v[kv_indptr[2], 1, 9] = np.nan
    w = ta.BatchPrefillWithRaggedKVCacheWrapper("NHD", device="cuda", backend=backend)
    w.plan(qo_indptr, kv_indptr, Hq, Hkv, D, causal=True, q_data_type=dtype)
    dev = tvm.cuda(0)
    o, lse = w.run(q, tvm.runtime.tensor(k, dev), tvm.runtime.tensor(v, dev), return_lse=True)
    ref_o, ref_lse = R.ragged_attention(q, qo_indptr, k, v, kv_indptr, "NHD", variant=w.kernel_key.variant)
    assert_attention_close(o, lse, ref_o, ref_lse, dtype, f"prefill {backend}")
    o = np.asarray(o, np.float32)
    assert np.isfinite(o[: qo_indptr[1]]).all()
    assert np.isnan(o[qo_indptr[1]: qo_indptr[2], 2 * Hq // Hkv: 3 * Hq // Hkv, 5]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_merge_nan(op, dtype):
    rng = np.random.default_rng(21)
    for n, H, D in [(7, 3, 128), (6, 2, 36), (6, 2, 7)]:
        for k in ((1, 2, 5, 9) if op == "merge_states" else (2,)):
            v, s = nan_merge_inputs(rng, dtype, n, k, H, D)
            ref_v, ref_s = R.merge_states(v.astype(np.float32), s)
            got_v, got_s = _run(op, "tvm", v, s)
            assert_attention_close(got_v, got_s, ref_v, ref_s, dtype, f"{op} {dtype} n{n} k{k} H{H} D{D}")

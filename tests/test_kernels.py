"""Property tests: the CPU kernels of every form and format against the numpy reference.

Hypothesis draws batch sizes, lengths (0, 1, page boundaries, longer), page tables (shuffled,
shared pages), GQA ratios, layouts, dtypes and variants; bounded by ``max_examples`` so the suite
stays fast. Tolerances: see conftest.py.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tvm_attn as ta
from tvm_attn import reference as R

from conftest import assert_attention_close, randn

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
HEADS = [(4, 4), (4, 2), (4, 1), (6, 3)]
D = 64


def lengths(page_size, max_len=70):
    special = [0, 1, page_size, page_size + 1, 2 * page_size - 1]
    return st.one_of(st.sampled_from(special), st.integers(0, max_len))


def variants(prefill: bool):
    pool = ["default", "rope", "alibi", "softcap_window", "sigmoid", "rope31"]
    if prefill:
        pool.append("custom_mask")
    return st.sampled_from(pool)


def make_variant(name, rng, q_lens, kv_lens):
    """(variant, run kwargs, reference params)."""
    if name == "default":
        return None, {}, {}
    if name == "rope":
        return ta.RoPE(), {"rope_theta": 500.0}, {"rope_theta": 500.0}
    if name == "rope31":
        return ta.RoPE("llama3.1", original_max_position=64), {}, {}
    if name == "alibi":
        return ta.ALiBi(), {}, {}
    if name == "softcap_window":
        w = int(rng.integers(0, 20))
        args = {"logits_soft_cap": 2.5, "window_left": w}
        return ta.LogitsSoftCap(30.0) + ta.SlidingWindow(), args, args
    if name == "sigmoid":
        return ta.SigmoidAttention(), {"sigmoid_bias": -0.5}, {"sigmoid_bias": -0.5}
    if name == "custom_mask":
        masks = [rng.random((ql, kl)) < 0.6 for ql, kl in zip(q_lens, kv_lens)]
        packed, indptr = ta.pack_custom_mask(masks)
        args = {"custom_mask": packed, "mask_indptr": indptr}
        return ta.CustomMask(), args, args
    raise AssertionError(name)


def paged_table(rng, kv_lens, page_size, share: bool):
    pages = [(n + page_size - 1) // page_size for n in kv_lens]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    total = int(indptr[-1])
    num_pages = max(total, 1) + 3
    if share and total:
        indices = rng.integers(0, num_pages, total)  # pages may repeat across and within requests
    else:
        indices = rng.permutation(num_pages)[:total]
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)], np.int32)
    return indptr, indices.astype(np.int32), last, num_pages


@st.composite
def paged_problems(draw, prefill: bool):
    page_size = draw(st.sampled_from([1, 4, 16]))
    batch = draw(st.integers(1, 5))
    kv_lens = draw(st.lists(lengths(page_size), min_size=batch, max_size=batch))
    if prefill:
        q_lens = [draw(st.integers(0, max(n, 1) + 2)) for n in kv_lens]
    else:
        q_lens = [1] * batch
    return dict(
        page_size=page_size, kv_lens=kv_lens, q_lens=q_lens, heads=draw(st.sampled_from(HEADS)),
        dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
        layout=draw(st.sampled_from(["NHD", "HND"])),
        variant=draw(variants(prefill)), share=draw(st.booleans()),
        causal=draw(st.booleans()) if prefill else False, seed=draw(st.integers(0, 2**16)),
    )


def run_and_check(w, q, data, args, ref, dtype, what):
    """Run a planned wrapper (with the LSE when its variant has one); compare with ``ref() -> (o, lse)``."""
    use_lse = w.kernel_key.variant.use_softmax
    res = w.run(q, *data, return_lse=use_lse, **args)
    o, lse = res if use_lse else (res, None)
    assert_attention_close(o, lse, *ref(), dtype, what)


@SETTINGS
@given(paged_problems(prefill=False))
def test_batch_decode_paged(p):
    rng = np.random.default_rng(p["seed"])
    (Hq, Hk), S, dtype, layout = p["heads"], p["page_size"], p["dtype"], p["layout"]
    indptr, indices, last, num_pages = paged_table(rng, p["kv_lens"], S, p["share"])
    fmt = ta.PagedKV(S, layout)
    cache = randn(rng, fmt.cache_shape(num_pages, Hk, D), dtype)
    q = randn(rng, (len(p["kv_lens"]), Hq, D), dtype)
    variant, args, ref_args = make_variant(p["variant"], rng, p["q_lens"], p["kv_lens"])
    w = ta.BatchDecodeWithPagedKVCacheWrapper(layout)
    w.plan(indptr, indices, last, Hq, Hk, D, S, variant=variant, q_data_type=dtype)

    def ref():
        return R.paged_attention(q, None, cache, indptr, indices, last, layout, variant=variant,
                                 params=ref_args)

    run_and_check(w, q, (cache,), args, ref, dtype, str(p))


@SETTINGS
@given(paged_problems(prefill=True))
def test_batch_prefill_paged(p):
    rng = np.random.default_rng(p["seed"])
    (Hq, Hk), S, dtype, layout = p["heads"], p["page_size"], p["dtype"], p["layout"]
    indptr, indices, last, num_pages = paged_table(rng, p["kv_lens"], S, p["share"])
    qo_indptr = np.cumsum([0] + p["q_lens"]).astype(np.int32)
    cache = randn(rng, ta.PagedKV(S, layout).cache_shape(num_pages, Hk, D), dtype)
    q = randn(rng, (int(qo_indptr[-1]), Hq, D), dtype)
    variant, args, ref_args = make_variant(p["variant"], rng, p["q_lens"], p["kv_lens"])
    w = ta.BatchPrefillWithPagedKVCacheWrapper(layout)
    w.plan(qo_indptr, indptr, indices, last, Hq, Hk, D, S, causal=p["causal"], variant=variant,
           q_data_type=dtype)
    ref = lambda: R.paged_attention(  # noqa: E731
        q, qo_indptr, cache, indptr, indices, last, layout, variant=variant, causal=p["causal"],
        params=ref_args
    )
    run_and_check(w, q, (cache,), args, ref, dtype, str(p))


@SETTINGS
@given(paged_problems(prefill=True))
def test_batch_prefill_ragged(p):
    rng = np.random.default_rng(p["seed"])
    (Hq, Hk), dtype, layout = p["heads"], p["dtype"], p["layout"]
    kv_indptr = np.cumsum([0] + p["kv_lens"]).astype(np.int32)
    qo_indptr = np.cumsum([0] + p["q_lens"]).astype(np.int32)
    shape = ta.RaggedKV(layout).kv_shape(int(kv_indptr[-1]), Hk, D)
    k, v = randn(rng, shape, dtype), randn(rng, shape, dtype)
    q = randn(rng, (int(qo_indptr[-1]), Hq, D), dtype)
    variant, args, ref_args = make_variant(p["variant"], rng, p["q_lens"], p["kv_lens"])
    w = ta.BatchPrefillWithRaggedKVCacheWrapper(layout)
    w.plan(qo_indptr, kv_indptr, Hq, Hk, D, causal=p["causal"], variant=variant, q_data_type=dtype)
    ref = lambda: R.ragged_attention(  # noqa: E731
        q, qo_indptr, k, v, kv_indptr, layout, variant=variant, causal=p["causal"], params=ref_args
    )
    run_and_check(w, q, (k, v), args, ref, dtype, str(p))


@SETTINGS
@given(
    st.sampled_from([(1, 1), (4, 1), (2, 8), (16, 16)]), st.integers(1, 4), st.integers(1, 4),
    st.floats(0.0, 1.0), st.booleans(), st.sampled_from(HEADS), st.integers(0, 2**16),
    st.sampled_from(["default", "custom_mask", "softcap"]),
)
def test_block_sparse(block, mb, nb, density, causal, heads, seed, vname):
    rng = np.random.default_rng(seed)
    (R_, C_), (Hq, Hk) = block, heads
    M, N = mb * R_, nb * C_
    mask = rng.random((mb, nb)) < density
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int32)
    indices = np.nonzero(mask)[1].astype(np.int32)
    q, k, v = (randn(rng, (M, Hq, D), "float16"), randn(rng, (N, Hk, D), "float16"),
               randn(rng, (N, Hk, D), "float16"))
    variant, args = None, {}
    if vname == "custom_mask":
        packed, mptr = ta.pack_custom_mask([rng.random((M, N)) < 0.7])
        variant, args = ta.CustomMask(), {"custom_mask": packed, "mask_indptr": mptr}
    elif vname == "softcap":
        variant = ta.LogitsSoftCap(1.5)
    w = ta.BlockSparseAttentionWrapper()
    w.plan(indptr, indices, M, N, R_, C_, Hq, Hk, D, causal=causal, variant=variant)
    o, lse = w.run(q, k, v, return_lse=True, **args)
    ref_o, ref_lse = R.block_sparse_attention(q, k, v, indptr, indices, R_, C_, variant=variant,
                                              causal=causal, params=args)
    assert_attention_close(o, lse, ref_o, ref_lse, "float16")


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_decode_and_prefill(head_dim, layout, rng):
    Hq, Hk, L = 8, 2, 45
    shape = (L, Hk, head_dim) if layout == "NHD" else (Hk, L, head_dim)
    k, v = randn(rng, shape, "float16"), randn(rng, shape, "float16")
    kn, vn = (k, v) if layout == "NHD" else (k.transpose(1, 0, 2), v.transpose(1, 0, 2))
    q = randn(rng, (Hq, head_dim), "float16")
    o, lse = ta.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True)
    ref_o, ref_lse = R.dense_attention(q[None], kn, vn)
    assert_attention_close(o[None], lse[None], ref_o, ref_lse, "float16")
    q = randn(rng, (13, Hq, head_dim), "float16")
    o, lse = ta.single_prefill_with_kv_cache(q, k, v, causal=True, kv_layout=layout, return_lse=True)
    ref_o, ref_lse = R.dense_attention(q, kn, vn, variant=ta.Causal())
    assert_attention_close(o, lse, ref_o, ref_lse, "float16")


def test_plan_is_reused_across_layers(rng):
    """One plan, several layers' caches: every run matches its own reference."""
    S, Hq, Hk = 4, 4, 2
    indptr, indices, last, num_pages = paged_table(rng, [5, 9, 0], S, share=False)
    w = ta.BatchDecodeWithPagedKVCacheWrapper()
    w.plan(indptr, indices, last, Hq, Hk, D, S)
    for _ in range(3):
        cache = randn(rng, (num_pages, 2, S, Hk, D), "float16")
        q = randn(rng, (3, Hq, D), "float16")
        o, lse = w.run(q, cache, return_lse=True)
        assert_attention_close(o, lse, *R.paged_attention(q, None, cache, indptr, indices, last), "float16")


def test_replan_follows_changed_options(rng):
    """The wrapper keeps the kernel key while a step's options repeat; any changed option (or another
    variant object) plans a new kernel."""
    S, Hq, Hk = 4, 4, 2
    indptr, indices, last, num_pages = paged_table(rng, [7, 3], S, share=False)
    cache = randn(rng, (num_pages, 2, S, Hk, D), "float16")
    q = randn(rng, (2, Hq, D), "float16")
    w = ta.BatchDecodeWithPagedKVCacheWrapper()
    keys = []
    for kwargs in ({}, {}, {"logits_soft_cap": 2.0}, {"variant": ta.SlidingWindow(2)}, {}):
        w.plan(indptr, indices, last, Hq, Hk, D, S, **kwargs)
        keys.append(w.kernel_key)
        parts = [kwargs.get("variant"), kwargs.get("logits_soft_cap") and ta.LogitsSoftCap(2.0)]
        v = ta.compose(*(p for p in parts if p))
        o = w.run(q, cache)
        ref_o = R.paged_attention(q, None, cache, indptr, indices, last, variant=v)[0]
        assert_attention_close(o, None, ref_o, None, "float16")
    assert keys[0] is keys[1] and keys[4] == keys[0]
    assert len({k.uri for k in keys}) == 3

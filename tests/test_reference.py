"""The numpy reference against a naive per-element loop written from the definitions."""

import math

import numpy as np
import pytest

from tvm_attn import reference as R
from tvm_attn.variants import (ALiBi, Causal, LogitsSoftCap, SigmoidAttention, SlidingWindow, alibi_slopes,
                               compose)


def naive(q, k, v, sm_scale, visible, bias=None, cap=None, sigmoid=False):
    Lq, Hq, D = q.shape
    Lk, Hk, _ = k.shape
    o = np.zeros((Lq, Hq, D))
    lse = np.full((Lq, Hq), -np.inf)
    for h in range(Hq):
        hk = h // (Hq // Hk)
        for i in range(Lq):
            ws, vals = [], []
            for j in range(Lk):
                if not visible(i, j):
                    continue
                s = sm_scale * sum(float(q[i, h, d]) * float(k[j, hk, d]) for d in range(D))
                if cap is not None:
                    s = cap * math.tanh(s / cap)
                if bias is not None:
                    s += bias(h, i, j)
                ws.append(s)
                vals.append(v[j, hk].astype(np.float64))
            if not ws:
                continue
            if sigmoid:
                o[i, h] = sum(1 / (1 + math.exp(-w)) * x for w, x in zip(ws, vals))
                continue
            m = max(ws)
            e = [math.exp(w - m) for w in ws]
            o[i, h] = sum(a * x for a, x in zip(e, vals)) / sum(e)
            lse[i, h] = (m + math.log(sum(e))) / math.log(2)
    return o, lse


@pytest.mark.parametrize("case", ["plain", "causal", "window", "softcap", "alibi", "sigmoid"])
def test_reference_matches_naive_loop(case, rng):
    Lq, Lk, Hq, Hk, D = 5, 9, 4, 2, 8
    q, k, v = (rng.standard_normal(s) for s in ((Lq, Hq, D), (Lk, Hk, D), (Lk, Hk, D)))
    off = Lk - Lq
    variant, vis, kw = None, (lambda i, j: True), {}
    if case == "causal":
        variant, vis = Causal(), (lambda i, j: j <= i + off)
    if case == "window":
        variant, vis = compose(Causal(), SlidingWindow(2)), (lambda i, j: i + off - 2 <= j <= i + off)
    if case == "softcap":
        variant, kw = LogitsSoftCap(3.0), {"cap": 3.0}
    if case == "alibi":
        slopes = alibi_slopes(Hq)
        variant, kw = ALiBi(), {"bias": lambda h, i, j: -slopes[h] * (i + off - j)}
    if case == "sigmoid":
        variant, kw = SigmoidAttention(), {"sigmoid": True}
    o, lse = R.dense_attention(q, k, v, variant=variant, sm_scale=0.3)
    o2, lse2 = naive(q, k, v, 0.3, vis, **kw)
    np.testing.assert_allclose(o, o2, rtol=1e-5, atol=1e-6)
    if case != "sigmoid":
        np.testing.assert_allclose(lse, lse2, rtol=1e-5, atol=1e-6)


def test_gather_paged_reconstructs_sequences(rng):
    S, Hk, D = 4, 2, 3
    cache = rng.standard_normal((6, 2, S, Hk, D))
    indptr, indices, last = np.array([0, 2, 2, 3]), np.array([5, 1, 3]), np.array([3, 0, 4])
    kvs = R.gather_paged(cache, indptr, indices, last)
    assert [k.shape[0] for k, _ in kvs] == [7, 0, 4]
    np.testing.assert_array_equal(kvs[0][0][:4], cache[5, 0])
    np.testing.assert_array_equal(kvs[0][1][4:], cache[1, 1, :3])
    hnd = cache.transpose(0, 1, 3, 2, 4)
    for (k1, v1), (k2, v2) in zip(kvs, R.gather_paged(hnd, indptr, indices, last, "HND")):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(v1, v2)


def test_merge_states_equals_attention_over_union(rng):
    q, k, v = rng.standard_normal((3, 2, 8)), rng.standard_normal((10, 2, 8)), rng.standard_normal((10, 2, 8))
    o, lse = R.dense_attention(q, k, v)
    oa, la = R.dense_attention(q, k[:4], v[:4])
    ob, lb = R.dense_attention(q, k[4:], v[4:])
    om, lm = R.merge_state(oa, la, ob, lb)
    np.testing.assert_allclose(om, o, atol=1e-6)
    np.testing.assert_allclose(lm, lse, atol=1e-6)


def test_merge_states_nan_and_empty_states():
    """An empty state (LSE -inf) weighs 0 whatever its v holds; a NaN or +inf LSE makes its row NaN, a
    NaN in the v of a non-empty state that element; no states at all: every row empty."""
    v = np.arange(5 * 2 * 1 * 3, dtype=np.float64).reshape(5, 2, 1, 3)
    s = np.array([[0.0, 1.0], [-np.inf, 2.0], [np.nan, 1.0], [0.0, 1.0], [-np.inf, np.inf]])[..., None]
    v[1, 0] = np.nan  # empty: ignored
    v[3, 1, 0, 2] = np.nan  # non-empty: element 2 of row 3 is NaN
    o, lse = R.merge_states(v, s)
    w = np.array([1, 2]) / 3  # 2**0 : 2**1
    np.testing.assert_allclose(o[0, 0], w @ v[0, :, 0], rtol=1e-6)
    np.testing.assert_allclose(lse[0, 0], np.log2(3), rtol=1e-6)
    np.testing.assert_allclose(o[1, 0], v[1, 1, 0])
    np.testing.assert_allclose(lse[1, 0], 2.0)
    assert np.isnan(o[2]).all() and np.isnan(lse[2]).all()
    assert np.isnan(o[3, 0, 2]) and np.isfinite(o[3, 0, :2]).all() and np.isfinite(lse[3]).all()
    np.testing.assert_allclose(o[3, 0, :2], w @ v[3, :, 0, :2], rtol=1e-6)
    assert np.isnan(o[4]).all() and np.isnan(lse[4]).all()
    o, lse = R.merge_states(np.zeros((3, 0, 2, 4)), np.zeros((3, 0, 2)))
    assert o.shape == (3, 2, 4) and np.all(o == 0) and np.all(np.isneginf(lse))

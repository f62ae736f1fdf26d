"""merge_state / merge_state_in_place / merge_states kernels against the reference."""

import numpy as np
import pytest

import tvm
import tvm_attn as ta
from tvm_attn import reference as R

from conftest import randn


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_merge_state(dtype, rng):
    va, vb = randn(rng, (7, 3, 64), dtype), randn(rng, (7, 3, 64), dtype)
    sa, sb = (rng.standard_normal((7, 3)) * 4).astype(np.float32), (rng.standard_normal((7, 3)) * 4).astype(np.float32)
    sa[0, 0] = -np.inf  # empty state a
    sa[1, 1] = sb[1, 1] = -np.inf  # both empty
    v, s = ta.merge_state(va, sa, vb, sb)
    rv, rs = R.merge_state(va, sa, vb, sb)
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5}[dtype]
    np.testing.assert_allclose(v.astype(np.float32), rv, atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.isneginf(s), np.isneginf(rs))
    np.testing.assert_allclose(s[np.isfinite(rs)], rs[np.isfinite(rs)], atol=1e-5)
    assert np.all(v.astype(np.float32)[1, 1] == 0)


def test_merge_states_and_in_place(rng):
    V = randn(rng, (4, 5, 2, 128), "float32")
    S = rng.standard_normal((4, 5, 2)).astype(np.float32)
    S[2, :, 0] = -np.inf
    v, s = ta.merge_states(V, S)
    rv, rs = R.merge_states(V, S)
    np.testing.assert_allclose(v, rv, atol=1e-5)
    np.testing.assert_allclose(s[np.isfinite(rs)], rs[np.isfinite(rs)], atol=1e-5)
    assert np.isneginf(s[2, 0])
    # in place on TVM tensors and on numpy arrays
    va, sa = V[:, 0].copy(), S[:, 0].copy()
    ref = R.merge_state(va, sa, V[:, 1], S[:, 1])
    vt, st = tvm.runtime.tensor(va), tvm.runtime.tensor(sa)
    ta.merge_state_in_place(vt, st, V[:, 1], S[:, 1])
    np.testing.assert_allclose(vt.numpy(), ref[0], atol=1e-5)
    ta.merge_state_in_place(va, sa, V[:, 1], S[:, 1])
    np.testing.assert_allclose(va, ref[0], atol=1e-5)


def test_split_kv_merge_equals_full_attention(rng):
    """Attention over two KV halves, merged, equals attention over all keys (the split-KV identity)."""
    q, k, v = randn(rng, (6, 4, 64), "float32"), randn(rng, (30, 2, 64), "float32"), randn(rng, (30, 2, 64), "float32")
    o_a, s_a = ta.single_prefill_with_kv_cache(q, k[:11], v[:11], return_lse=True)
    o_b, s_b = ta.single_prefill_with_kv_cache(q, k[11:], v[11:], return_lse=True)
    o, s = ta.merge_state(o_a, s_a, o_b, s_b)
    ref_o, ref_s = R.dense_attention(q, k, v)
    np.testing.assert_allclose(o, ref_o, atol=1e-5)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)

"""Every host-side validation error: a ValueError that names the argument and the bad value."""

import numpy as np
import pytest

import tvm_attn as ta

from conftest import randn

D = 64


def plan_decode(**over):
    args = dict(indptr=[0, 1, 3], indices=[0, 1, 2], last_page_len=[4, 2], num_qo_heads=4, num_kv_heads=2,
                head_dim=D, page_size=4)
    args.update(over)
    w = ta.BatchDecodeWithPagedKVCacheWrapper()
    w.plan(**args)
    return w


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(indptr=[0, 3, 1]), r"kv_indptr: must be non-decreasing, but kv_indptr\[1\] = 3 > kv_indptr\[2\] = 1"),
        (dict(indptr=[1, 2, 3]), r"kv_indptr: must start at 0"),
        (dict(indptr=[0, 1, 4]), r"kv_indptr: last entry 4 exceeds len\(kv_indices\) = 3"),
        (dict(indptr=[]), r"kv_indptr: needs at least one entry"),
        (dict(indices=[0, -1, 2]), r"kv_indices: kv_indices\[1\] = -1 is out of range"),
        (dict(last_page_len=[5, 2]), r"kv_last_page_len: kv_last_page_len\[0\] = 5 must be in \[1, page_size = 4\]"),
        (dict(last_page_len=[0, 2]), r"kv_last_page_len\[0\] = 0 must be in \[1, page_size = 4\]"),
        (dict(last_page_len=[4]), r"kv_last_page_len: has 1 entries but kv_indptr describes 2 requests"),
        (dict(indptr=[0, 0, 3], last_page_len=[1, 2]), r"kv_last_page_len\[0\] = 1 must be 0 for a request with no pages"),
        (dict(num_qo_heads=6, num_kv_heads=4), r"num_qo_heads: 6 is not a multiple of num_kv_heads = 4"),
        (dict(num_kv_heads=0), r"num_kv_heads: must be a positive int, got 0"),
        (dict(head_dim=96), r"head_dim: 96 is not supported"),
        (dict(page_size=0), r"page_size: must be a positive int, got 0"),
        (dict(q_data_type="int8"), r"q_data_type: dtype 'int8' is not supported"),
        (dict(indices=[0.5, 1, 2]), r"kv_indices: must hold integers"),
        (dict(indptr=[[0, 1, 3]]), r"kv_indptr: must be 1-D"),
        (dict(pos_encoding_mode="ROPE"), r"pos_encoding_mode: must be one of"),
        (dict(logits_soft_cap=-1.0), r"logits_soft_cap: must be > 0"),
        (dict(sm_scale=float("nan")), r"sm_scale: must be a positive finite number"),
        (dict(sm_scale=-0.125), r"sm_scale: must be a positive finite number"),
        (dict(sm_scale=0.0), r"sm_scale: must be a positive finite number"),
    ],
)
def test_decode_plan_errors(over, match):
    with pytest.raises(ValueError, match=match):
        plan_decode(**over)


def test_layout_error():
    with pytest.raises(ValueError, match=r"kv_layout: must be 'NHD' or 'HND', got 'NDH'"):
        ta.BatchDecodeWithPagedKVCacheWrapper("NDH")


def test_device_error():
    with pytest.raises(ValueError, match=r"device: 'tpu' is not supported"):
        ta.BatchDecodeWithPagedKVCacheWrapper(device="tpu")


def test_run_before_plan():
    with pytest.raises(RuntimeError, match=r"call plan\(...\) first"):
        ta.BatchDecodeWithPagedKVCacheWrapper().run(np.zeros((1, 4, D), np.float16), np.zeros((1, 2, 4, 2, D), np.float16))


def test_run_shape_and_dtype_errors(rng):
    w = plan_decode()
    cache = randn(rng, (3, 2, 4, 2, D), "float16")
    with pytest.raises(ValueError, match=r"q: expected shape \(2, 4, 64\), got \(3, 4, 64\)"):
        w.run(randn(rng, (3, 4, D), "float16"), cache)
    with pytest.raises(ValueError, match=r"q: expected dtype float16, got float32"):
        w.run(randn(rng, (2, 4, D), "float32"), cache)
    with pytest.raises(ValueError, match=r"paged_kv_cache: expected shape \(\*, 2, 4, 2, 64\)"):
        w.run(randn(rng, (2, 4, D), "float16"), randn(rng, (3, 2, 2, 4, D), "float16"))
    with pytest.raises(ValueError, match=r"paged_kv_cache: has 2 pages, but the plan's kv_indices refer to page 2"):
        w.run(randn(rng, (2, 4, D), "float16"), randn(rng, (2, 2, 4, 2, D), "float16"))
    with pytest.raises(ValueError, match=r"out: expected shape"):
        w.run(randn(rng, (2, 4, D), "float16"), cache, out=np.zeros((2, 4, 32), np.float16))


def test_variant_argument_errors(rng):
    w = plan_decode(variant=ta.ALiBi() + ta.SlidingWindow())
    q, cache = randn(rng, (2, 4, D), "float16"), randn(rng, (3, 2, 4, 2, D), "float16")
    with pytest.raises(TypeError, match=r"unexpected arguments \['windw_left'\]"):
        w.run(q, cache, windw_left=3)
    with pytest.raises(ValueError, match=r"alibi_slopes: expected shape \(4\), got \(3,\)"):
        w.run(q, cache, alibi_slopes=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"window_left: expected a int32 scalar"):
        w.run(q, cache, window_left="wide")
    w = plan_decode(variant=ta.LogitsSoftCap())
    with pytest.raises(ValueError, match=r"logits_soft_cap: must be > 0, got 0.0"):
        w.run(q, cache, logits_soft_cap=0.0)
    w = plan_decode(variant=ta.CustomMask())
    with pytest.raises(TypeError, match=r"missing argument 'custom_mask'"):
        w.run(q, cache)
    w = plan_decode(variant=ta.SigmoidAttention())
    with pytest.raises(ValueError, match=r"return_lse: the variant .* uses no softmax"):
        w.run(q, cache, return_lse=True)


def test_prefill_and_ragged_errors(rng):
    w = ta.BatchPrefillWithPagedKVCacheWrapper()
    with pytest.raises(ValueError, match=r"qo_indptr: has 2 entries, but the KV index describes 2 requests"):
        w.plan([0, 3], [0, 1, 3], [0, 1, 2], [4, 2], 4, 2, D, 4)
    with pytest.raises(ValueError, match=r"qo_indptr: must be non-decreasing"):
        w.plan([0, 3, 2], [0, 1, 3], [0, 1, 2], [4, 2], 4, 2, D, 4)
    r = ta.BatchPrefillWithRaggedKVCacheWrapper()
    r.plan([0, 2, 3], [0, 5, 9], 4, 2, D)
    with pytest.raises(ValueError, match=r"k: expected shape \(9, 2, 64\), got \(8, 2, 64\)"):
        r.run(randn(rng, (3, 4, D), "float16"), randn(rng, (8, 2, D), "float16"), randn(rng, (8, 2, D), "float16"))


def test_block_sparse_errors():
    w = ta.BlockSparseAttentionWrapper()
    with pytest.raises(ValueError, match=r"M: 10 is not a multiple of the block row size R = 4"):
        w.plan([0, 1, 2], [0, 1], 10, 8, 4, 2, 4, 2, D)
    with pytest.raises(ValueError, match=r"N: 9 is not a multiple of the block column size C = 2"):
        w.plan([0, 1, 2], [0, 1], 8, 9, 4, 2, 4, 2, D)
    with pytest.raises(ValueError, match=r"indptr: has 2 entries, expected M / R \+ 1 = 3"):
        w.plan([0, 1], [0], 8, 8, 4, 2, 4, 2, D)
    with pytest.raises(ValueError, match=r"indices: indices\[1\] = 4 is out of range \[0, 4\)"):
        w.plan([0, 1, 2], [0, 4], 8, 8, 4, 2, 4, 2, D)


def test_variant_declaration_errors():
    with pytest.raises(ValueError, match=r"extra parameter name 'q' is reserved"):
        ta.TensorParam("q", "float32", (1,))
    with pytest.raises(ValueError, match=r"dtype must be int32 or float32"):
        ta.ScalarParam("x", "float16")
    with pytest.raises(ValueError, match=r"RoPE: style must be one of"):
        ta.RoPE("neox")

    class A(ta.AttentionVariant):
        scalars = (ta.ScalarParam("t", "float32", 1.0),)

    class B(ta.AttentionVariant):
        scalars = (ta.ScalarParam("t", "int32", 1),)

    with pytest.raises(ValueError, match=r"both declare 't' with different specs"):
        ta.compose(A(), B())
    with pytest.raises(ValueError, match=r"at most one variant may turn softmax off"):
        ta.compose(ta.SigmoidAttention(), ta.SigmoidAttention(1.0))


def test_merge_errors(rng):
    v = randn(rng, (3, 2, D), "float16")
    s = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"s_b: expected shape \(3, 2\), got \(3, 3\)"):
        ta.merge_state(v, s, v, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"s_a: expected dtype float32, got float16"):
        ta.merge_state(v, s.astype(np.float16), v, s)
    with pytest.raises(ValueError, match=r"v: expected shape \(n, num_states, num_heads, head_dim\)"):
        ta.merge_states(v, s)

"""Every host-side validation error: a ValueError that names the argument and the bad value."""

import numpy as np
import pytest

import tvm_attn as ta

from _tensors import DLPackView, unaligned
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
        (dict(indptr=[0, 3, 1]),
         r"kv_indptr: must be non-decreasing, but kv_indptr\[1\] = 3 > kv_indptr\[2\] = 1"),
        (dict(indptr=[1, 2, 3]), r"kv_indptr: must start at 0"),
        (dict(indptr=[0, 1, 4]), r"kv_indptr: last entry 4 exceeds len\(kv_indices\) = 3"),
        (dict(indptr=[]), r"kv_indptr: needs at least one entry"),
        (dict(indices=[0, -1, 2]), r"kv_indices: kv_indices\[1\] = -1 is out of range"),
        (dict(last_page_len=[5, 2]),
         r"kv_last_page_len: kv_last_page_len\[0\] = 5 must be in \[1, page_size = 4\]"),
        (dict(last_page_len=[0, 2]), r"kv_last_page_len\[0\] = 0 must be in \[1, page_size = 4\]"),
        (dict(last_page_len=[4]), r"kv_last_page_len: has 1 entries but kv_indptr describes 2 requests"),
        (dict(indptr=[0, 0, 3], last_page_len=[1, 2]),
         r"kv_last_page_len\[0\] = 1 must be 0 for a request with no pages"),
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
        ta.BatchDecodeWithPagedKVCacheWrapper().run(np.zeros((1, 4, D), np.float16),
                                                    np.zeros((1, 2, 4, 2, D), np.float16))


def test_run_shape_and_dtype_errors(rng):
    w = plan_decode()
    cache = randn(rng, (3, 2, 4, 2, D), "float16")
    with pytest.raises(ValueError, match=r"q: expected shape \(2, 4, 64\), got \(3, 4, 64\)"):
        w.run(randn(rng, (3, 4, D), "float16"), cache)
    with pytest.raises(ValueError, match=r"q: expected dtype float16, got float32"):
        w.run(randn(rng, (2, 4, D), "float32"), cache)
    with pytest.raises(ValueError, match=r"paged_kv_cache: expected shape \(\*, 2, 4, 2, 64\)"):
        w.run(randn(rng, (2, 4, D), "float16"), randn(rng, (3, 2, 2, 4, D), "float16"))
    with pytest.raises(ValueError,
                       match=r"paged_kv_cache: has 2 pages, but the plan's kv_indices refer to page 2"):
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
    with pytest.raises(TypeError, match=r"window_left: expected an int32 scalar \(an integer\), got 'wide'"):
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
        r.run(randn(rng, (3, 4, D), "float16"), randn(rng, (8, 2, D), "float16"),
              randn(rng, (8, 2, D), "float16"))


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


# -- serving-grade checks (issue 20): options, scalars, tensor kinds, custom masks, non-finite data --

@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: ta.SlidingWindow(-5), ValueError,
         r"window_left: must be -1 \(no window\) or in \[0, 1073741823\].*got -5"),
        (lambda: ta.SlidingWindow(2**31 - 1), ValueError, r"window_left: .*got 2147483647"),
        (lambda: ta.SlidingWindow(2.5), TypeError, r"window_left: expected an int .*got 2.5"),
        (lambda: ta.SlidingWindow(True), TypeError, r"window_left: expected an int .*got True"),
        (lambda: ta.LogitsSoftCap(float("nan")), ValueError,
         r"logits_soft_cap: must be a finite float32 number, got nan"),
        (lambda: ta.LogitsSoftCap(float("inf")), ValueError,
         r"logits_soft_cap: must be a finite float32 number, got inf"),
        (lambda: ta.LogitsSoftCap(0.0), ValueError, r"logits_soft_cap: must be > 0, got 0.0"),
        (lambda: ta.LogitsSoftCap("30"), TypeError, r"logits_soft_cap: expected a float32 scalar .*got '30'"),
        (lambda: ta.RoPE(rope_theta=0.0), ValueError, r"rope_theta: must be > 0, got 0.0"),
        (lambda: ta.RoPE(rope_theta=-1e4), ValueError, r"rope_theta: must be > 0, got -10000.0"),
        (lambda: ta.RoPE(rope_theta=float("nan")), ValueError,
         r"rope_theta: must be a finite float32 number, got nan"),
        (lambda: ta.RoPE(rope_scale=0.0), ValueError, r"rope_scale: must be > 0, got 0.0"),
        (lambda: ta.RoPE(rope_scale=float("nan")), ValueError, r"rope_scale: must be a finite"),
        (lambda: ta.SigmoidAttention(float("inf")), ValueError, r"sigmoid_bias: must be a finite"),
    ],
)
def test_variant_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_window_limits_kept():
    assert ta.SlidingWindow(-1).key_range({}) is None
    assert ta.SlidingWindow(2**30 - 1).key_range({}).window_left == 2**30 - 1


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(window_left=-7), ValueError, r"window_left: must be -1 \(no window\) .*got -7"),
        (dict(window_left=2**31 + 5), ValueError, r"window_left: .*got 2147483653"),
        (dict(window_left=2.5), TypeError, r"window_left: expected an int"),
        (dict(window_left="3"), TypeError, r"window_left: expected an int .*got '3'"),
        (dict(logits_soft_cap=float("nan")), ValueError,
         r"logits_soft_cap: must be a finite float32 number, got nan"),
        (dict(logits_soft_cap=float("inf")), ValueError,
         r"logits_soft_cap: must be a finite float32 number, got inf"),
        (dict(logits_soft_cap="30"), TypeError, r"logits_soft_cap: expected a float32 scalar"),
        (dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=0.0), ValueError,
         r"rope_theta: must be > 0, got 0.0"),
        (dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=float("nan")), ValueError,
         r"rope_theta: must be a finite"),
        (dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=0), ValueError, r"rope_scale: must be > 0, got 0.0"),
        (dict(num_qo_heads=True), ValueError, r"num_qo_heads: must be a positive int, got True"),
        (dict(num_kv_heads=True, num_qo_heads=2), ValueError,
         r"num_kv_heads: must be a positive int, got True"),
        (dict(head_dim=64.0), ValueError, r"head_dim: 64.0 is not supported"),
        (dict(sm_scale="abc"), TypeError, r"sm_scale: expected a positive finite number, got 'abc'"),
        (dict(variant="causal"), TypeError, r"variant: expected an AttentionVariant, got str 'causal'"),
        (dict(variant=ta.Causal), TypeError,
         r"variant: expected an AttentionVariant instance, got the class Causal"),
        (dict(indptr=None), TypeError, r"kv_indptr: expected a 1-D int32 array"),
        (dict(indices="012"), TypeError, r"kv_indices: expected a 1-D int32 array"),
        (dict(indptr=[[0, 1], [3]]), ValueError, r"kv_indptr: is not an array of integers"),
    ],
)
def test_plan_option_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        plan_decode(**over)


def test_soft_cap_zero_or_none_means_no_cap():
    for cap in (None, 0, 0.0):
        assert plan_decode(logits_soft_cap=cap).kernel_key.variant.uri() == "default"


def test_run_time_scalars_are_not_coerced(rng):
    w = plan_decode(variant=ta.SlidingWindow(2) + ta.LogitsSoftCap(10.0))
    q, cache = randn(rng, (2, 4, D), "float16"), randn(rng, (3, 2, 4, 2, D), "float16")
    for kw, exc, match in [
        (dict(window_left=2.5), TypeError, r"window_left: expected an int32 scalar \(an integer\), got 2.5"),
        (dict(window_left="3"), TypeError, r"window_left: expected an int32 scalar \(an integer\), got '3'"),
        (dict(window_left=-7), ValueError, r"window_left: must be -1 \(no window\) .*got -7"),
        (dict(window_left=2**31 - 1), ValueError, r"window_left: .*got 2147483647"),
        (dict(window_left=2**31 + 5), ValueError, r"window_left: 2147483653 does not fit in int32"),
        (dict(logits_soft_cap=float("nan")), ValueError, r"logits_soft_cap: must be a finite float32 number"),
        (dict(logits_soft_cap=float("inf")), ValueError, r"logits_soft_cap: must be a finite float32 number"),
        (dict(logits_soft_cap="1"), TypeError, r"logits_soft_cap: expected a float32 scalar"),
    ]:
        with pytest.raises(exc, match=match):
            w.run(q, cache, **kw)
    np.testing.assert_array_equal(w.run(q, cache, window_left=np.int64(1)), w.run(q, cache, window_left=1))


def test_rope_run_time_scalars_checked(rng):
    w = plan_decode(pos_encoding_mode="ROPE_LLAMA")
    q, cache = randn(rng, (2, 4, D), "float16"), randn(rng, (3, 2, 4, 2, D), "float16")
    with pytest.raises(ValueError, match=r"rope_theta: must be > 0, got -1.0"):
        w.run(q, cache, rope_theta=-1.0)
    with pytest.raises(ValueError, match=r"rope_scale: must be > 0, got 0.0"):
        w.run(q, cache, rope_scale=0.0)


def _qkv(rng, dtype="float32"):
    return randn(rng, (3, 4, D), dtype), randn(rng, (8, 2, D), dtype), randn(rng, (8, 2, D), dtype)


@pytest.mark.parametrize("bad", [None, "q", [[1.0, 2.0]], 3.0])
def test_non_tensors_name_the_argument(rng, bad):
    q, k, v = _qkv(rng)
    for name, args in (("q", (bad, k, v)), ("k", (q, bad, v)), ("v", (q, k, bad))):
        with pytest.raises(TypeError,
                           match=rf"^{name}: expected a numpy array, a tvm.runtime.Tensor or a DLPack"):
            ta.single_prefill_with_kv_cache(*args)
    w = plan_decode()
    cache = randn(rng, (3, 2, 4, 2, D), "float16")
    with pytest.raises(TypeError, match=r"^q: expected a numpy array"):
        w.run(bad, cache)
    with pytest.raises(TypeError, match=r"^paged_kv_cache: expected a numpy array"):
        w.run(randn(rng, (2, 4, D), "float16"), bad)
    if bad is not None:  # out=None means "allocate"
        with pytest.raises(TypeError, match=r"^out: expected a numpy array"):
            w.run(randn(rng, (2, 4, D), "float16"), cache, out=bad)
    with pytest.raises(TypeError, match=r"^v: expected a numpy array"):
        ta.merge_states(bad, np.zeros((1, 2, 2), np.float32))


def test_single_call_variant_type(rng):
    with pytest.raises(TypeError, match=r"variant: expected an AttentionVariant, got str 'causal'"):
        ta.single_prefill_with_kv_cache(*_qkv(rng), variant="causal")
    with pytest.raises(TypeError,
                       match=r"variant: expected an AttentionVariant instance, got the class Causal"):
        ta.single_decode_with_kv_cache(randn(rng, (4, D), "float32"), *_qkv(rng)[1:], variant=ta.Causal)


def test_read_only_numpy_inputs_accepted(rng):
    q, k, v = _qkv(rng)
    ref = ta.single_prefill_with_kv_cache(q, k, v)
    for x in (q, k, v):
        x.flags.writeable = False
    np.testing.assert_array_equal(ta.single_prefill_with_kv_cache(q, k, v), ref)




def test_unaligned_dlpack_inputs_accepted(rng):
    q, k, v = _qkv(rng)
    ref = ta.single_prefill_with_kv_cache(q, k, v)
    o = ta.single_prefill_with_kv_cache(*(DLPackView(unaligned(x)) for x in (q, k, v)))
    np.testing.assert_array_equal(np.from_dlpack(o), ref)


def test_bad_out_refused_before_the_kernel_runs(rng):
    w = plan_decode()
    q, cache = randn(rng, (2, 4, D), "float16"), randn(rng, (3, 2, 4, 2, D), "float16")
    out = np.zeros((2, 4, D), np.float16)
    out.flags.writeable = False
    calls = []
    fn = w._call.fn
    w._call.fn = lambda *a: calls.append(a) or fn(*a)
    with pytest.raises(ValueError, match=r"out: the numpy array is read-only"):
        w.run(q, cache, out=out)
    with pytest.raises(ValueError, match=r"out: cannot be written in place"):
        w.run(q, cache, out=DLPackView(unaligned(np.zeros((2, 4, D), np.float16))))
    lse = np.zeros((2, 4), np.float32)
    lse.flags.writeable = False
    with pytest.raises(ValueError, match=r"lse: the numpy array is read-only"):
        w.run(q, cache, lse=lse, return_lse=True)
    assert not calls


def test_merge_in_place_read_only_refused(rng):
    v = randn(rng, (3, 2, D), "float32")
    s = np.zeros((3, 2), np.float32)
    s.flags.writeable = False
    with pytest.raises(ValueError, match=r"s: the numpy array is read-only"):
        ta.merge_state_in_place(v, s, v.copy(), s.copy())


def test_cuda_without_driver_is_a_value_error():
    from conftest import has_cuda_gpu

    if has_cuda_gpu():
        pytest.skip("this host has a CUDA GPU")
    with pytest.raises(ValueError, match=r"device: 'cuda:0' is not available here"):
        ta.BatchDecodeWithPagedKVCacheWrapper(device="cuda")
    with pytest.raises(ValueError, match=r"device: 'cuda:0' is not available here"):
        ta.single_prefill_with_kv_cache(*_qkv(np.random.default_rng(0)), device="cuda")


def _mask_call(rng, masks, mask_arrays=None):
    """A 2-request ragged prefill with a custom mask: (wrapper, q, k, v, custom_mask, mask_indptr)."""
    w = ta.BatchPrefillWithRaggedKVCacheWrapper()
    w.plan([0, 2, 5], [0, 4, 9], 4, 2, D, variant=ta.CustomMask(), q_data_type="float32")
    q, k, v = (randn(rng, (5, 4, D), "float32"), randn(rng, (9, 2, D), "float32"),
               randn(rng, (9, 2, D), "float32"))
    return w, q, k, v, *ta.pack_custom_mask(masks)


def test_custom_mask_checked(rng):
    masks = [rng.random((2, 4)) < 0.5, rng.random((3, 5)) < 0.5]
    w, q, k, v, packed, indptr = _mask_call(rng, masks)
    assert packed.size == 1 + 2 and indptr.tolist() == [0, 1, 3]
    ok = w.run(q, k, v, custom_mask=packed, mask_indptr=indptr)
    from tvm_attn import reference

    ref, _ = reference.ragged_attention(q, [0, 2, 5], k, v, [0, 4, 9], variant=ta.CustomMask(),
                                        params=dict(custom_mask=packed, mask_indptr=indptr))
    np.testing.assert_allclose(ok, ref, atol=1e-5)
    for bad_mask, bad_indptr, match in [
        (packed[:2], indptr, r"mask_indptr: last entry 3 exceeds len\(custom_mask\) = 2"),
        (packed[:0], indptr, r"mask_indptr: last entry 3 exceeds len\(custom_mask\) = 0"),
        (packed, indptr[:2], r"mask_indptr: has 2 entries, but the plan has 2 requests \(expected 3"),
        (packed, np.asarray([0, 1, 3, 3], np.int32), r"mask_indptr: has 4 entries"),
        (packed, np.asarray([0, 2, 1], np.int32), r"mask_indptr: must be non-decreasing"),
        (packed, np.asarray([0, 1, 4], np.int32),
         r"mask_indptr: last entry 4 exceeds len\(custom_mask\) = 3"),
        (packed, np.asarray([0, 2, 3], np.int32), r"mask_indptr: request 0's segment has 2 bytes, but its "
                                                   r"qo_len x kv_len = 2 x 4 mask packs into 1"),
        (packed, np.asarray([1, 1, 3], np.int32), r"mask_indptr: must start at 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            w.run(q, k, v, custom_mask=bad_mask, mask_indptr=bad_indptr)


def test_custom_mask_checked_in_single_and_decode(rng):
    q, k, v = _qkv(rng)
    packed, indptr = ta.pack_custom_mask([np.ones((3, 8), bool)])
    ta.single_prefill_with_kv_cache(q, k, v, variant=ta.CustomMask(), custom_mask=packed, mask_indptr=indptr)
    with pytest.raises(ValueError, match=r"mask_indptr: last entry 3 exceeds len\(custom_mask\) = 2"):
        ta.single_prefill_with_kv_cache(q, k, v, variant=ta.CustomMask(), custom_mask=packed[:2],
                                        mask_indptr=indptr)
    w = plan_decode(variant=ta.CustomMask())  # kv lens 4 and 6, one row each
    packed, indptr = ta.pack_custom_mask([np.ones((1, 4), bool), np.ones((1, 6), bool)])
    qd, cache = randn(rng, (2, 4, D), "float16"), randn(rng, (3, 2, 4, 2, D), "float16")
    w.run(qd, cache, custom_mask=packed, mask_indptr=indptr)
    with pytest.raises(ValueError, match=r"mask_indptr: has 2 entries, but the plan has 2 requests"):
        w.run(qd, cache, custom_mask=packed, mask_indptr=indptr[:2])


def _with(x, index, value):
    x = x.copy()
    x[index] = value
    return x


@pytest.mark.parametrize(
    "what, change",
    [
        ("nan in q", lambda q, k, v: (_with(q, (1, 2, 5), np.nan), k, v)),
        ("+inf in q", lambda q, k, v: (_with(q, (1, 2, 5), np.inf), k, v)),
        ("-inf in q", lambda q, k, v: (_with(q, (1, 2, 5), -np.inf), k, v)),
        ("nan in k", lambda q, k, v: (q, _with(k, (3, 1, 7), np.nan), v)),
        ("-inf k row", lambda q, k, v: (q, _with(k, (3, 1), -np.inf), v)),
        ("nan in v", lambda q, k, v: (q, k, _with(v, (3, 1, 7), np.nan))),
        ("nan in the last key", lambda q, k, v: (q, _with(k, (7, 0, 0), np.nan), _with(v, (7, 0), np.nan))),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_nan_propagates(rng, what, change, causal):
    """NaN or inf data is never reported as a row that sees nothing (o = 0, LSE = -inf)."""
    from tvm_attn import reference

    q, k, v = change(*_qkv(rng))
    o, lse = ta.single_prefill_with_kv_cache(q, k, v, causal=causal, return_lse=True)
    ref_o, ref_lse = reference.dense_attention(q, k, v, variant=ta.Causal() if causal else None)
    np.testing.assert_array_equal(np.isnan(o), np.isnan(ref_o), err_msg=what)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse), err_msg=what)
    fin = np.isfinite(ref_o)
    np.testing.assert_allclose(o[fin], ref_o[fin], atol=1e-4, err_msg=what)
    assert np.isnan(o).any(), what  # the bad value reached a visible key
    if what == "nan in the last key" and causal:  # only the last query row sees key 7: the others are clean
        assert not np.isnan(o[:2]).any() and np.isnan(o[2, :2]).all()  # kv head 0: query heads 0, 1


@pytest.mark.parametrize("first", [True, False])
def test_minus_inf_logit_weighs_zero(rng, first):
    """A key whose logit is -inf (q > 0, k = -inf) weighs 0, wherever it comes in the row, as in
    torch's softmax; the row stays finite and equals attention over the other keys."""
    q, k, v = _qkv(rng)
    q = np.abs(q) + 0.1
    j = 0 if first else 5
    k[j] = -np.inf
    o, lse = ta.single_prefill_with_kv_cache(q, k, v, return_lse=True)
    keep = np.arange(8) != j
    ref_o, ref_lse = ta.single_prefill_with_kv_cache(q, k[keep], v[keep], return_lse=True)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(o, ref_o, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)


class _NoKernels:
    """A kernel cache that holds no kernel and cannot build one (a runtime-only GPU host)."""

    looked_up: list

    def __init__(self):
        self.looked_up = []

    def module(self, key):
        from tvm_attn.cache import KernelNotBuiltError

        self.looked_up.append(key.uri)
        raise KernelNotBuiltError(f"kernel {key.uri} is not in the cache (test)")

    def get(self, key, name=None):
        return self.module(key)[name or key.uri]


@pytest.fixture
def cuda_without_kernels(monkeypatch):
    """The CUDA code paths of the wrappers and merges on this host: "cuda" resolves to the CPU device
    with a CUDA target, and the kernel cache (a :class:`_NoKernels`, returned) has no kernel."""
    import tvm

    from tvm_attn.api import _common, cascade

    def resolve(device):
        return tvm.cpu(0), "cuda:sm_90a"

    monkeypatch.setattr(_common, "resolve_device", resolve)
    monkeypatch.setattr(cascade, "resolve_device", resolve)
    monkeypatch.setattr(type(tvm.cpu(0)), "multi_processor_count", property(lambda self: 132))
    monkeypatch.setattr(_common, "get_cache", lambda directory=None: cache)
    cache = _NoKernels()
    return cache


def _cuda_plans():
    """(name, plan(**over)) of each CUDA wrapper on a valid small problem (4/2 heads, head_dim 64)."""
    table = dict(indptr=np.array([0, 1, 3], np.int32), indices=np.array([0, 1, 2], np.int32),
                 last=np.array([4, 2], np.int32))
    qo = np.array([0, 2, 5], np.int32)

    def decode(**over):
        a = {**table, **over}
        ta.BatchDecodeWithPagedKVCacheWrapper(device="cuda").plan(
            a["indptr"], a["indices"], a["last"], 4, 2, D, 4, sm_scale=a.get("sm_scale"))

    def paged(**over):
        a = {**table, **over}
        ta.BatchPrefillWithPagedKVCacheWrapper(device="cuda").plan(
            a.get("qo_indptr", qo), a["indptr"], a["indices"], a["last"], 4, 2, D, 4, causal=True,
            sm_scale=a.get("sm_scale"))

    def ragged(**over):
        a = {**table, **over}
        ta.BatchPrefillWithRaggedKVCacheWrapper(device="cuda").plan(
            a.get("qo_indptr", qo), a["indptr"], 4, 2, D, sm_scale=a.get("sm_scale"))

    def bsr(**over):
        a = {**table, **over}
        ta.BlockSparseAttentionWrapper(device="cuda").plan(
            a["indptr"], a["indices"], 4, 6, 2, 2, 4, 2, D, sm_scale=a.get("sm_scale"))

    return [("decode", decode), ("paged", paged), ("ragged", ragged), ("bsr", bsr)]


@pytest.mark.parametrize("name, plan", _cuda_plans(), ids=[n for n, _ in _cuda_plans()])
def test_cuda_plans_check_inputs_before_the_kernel_lookup(cuda_without_kernels, name, plan):
    """On a GPU host without the kernel, bad input is still the ValueError/TypeError naming it
    (the kernel is looked up only after every input is checked)."""
    from tvm_attn.cache import KernelNotBuiltError

    with pytest.raises(KernelNotBuiltError):  # valid input reaches the lookup
        plan()
    assert cuda_without_kernels.looked_up
    decreasing = np.array([0, 2, 1], np.int32)
    with pytest.raises(ValueError, match=r"(kv_)?indptr: must be non-decreasing"):
        plan(indptr=decreasing)
    with pytest.raises(TypeError, match=r"sm_scale: expected a positive finite number, got 'abc'"):
        plan(sm_scale="abc")
    with pytest.raises(ValueError, match=r"sm_scale: must be a positive finite number"):
        plan(sm_scale=-1.0)


def test_cuda_merges_check_inputs_before_the_kernel_lookup(cuda_without_kernels, rng):
    from tvm_attn.cache import KernelNotBuiltError

    v, s = randn(rng, (3, 2, D), "float32"), np.zeros((3, 2), np.float32)
    with pytest.raises(KernelNotBuiltError):  # valid input reaches the lookup
        ta.merge_state(v, s, v, s, device="cuda")
    read_only = s.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"s: the numpy array is read-only"):
        ta.merge_state_in_place(v.copy(), read_only, v, s, device="cuda")
    # the kernels' 32-bit indexing (a broadcast view: no memory behind it)
    big_v = np.broadcast_to(np.float32(0), (2**15, 2, 2**8, 2**8))
    big_s = np.broadcast_to(np.float32(0), (2**15, 2, 2**8))
    with pytest.raises(ValueError, match=r"v: 4294967296 elements"):
        ta.merge_states(big_v, big_s, device="cuda")

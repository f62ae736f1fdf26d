"""The kernels of TVM's KV-cache slots (tvm_attn.tir.abi): TVM's builtin signatures, HND pages, index
arrays passed as views with an element offset, the run-time causal flag, and the refusals."""

import numpy as np
import pytest
import tvm

import tvm_attn as ta
from tvm_attn import reference as R
from tvm_attn.relax.kv_cache import KVCacheConfig
from tvm_attn.tir.abi import kv_cache_kernel

from conftest import assert_attention_close, randn

HQ, HKV, D, PAGE = 4, 2, 64, 16


def _compile(slot, variant=None):
    f = kv_cache_kernel(slot, HQ, HKV, D, "float16", PAGE, variant)
    return tvm.compile(f, target=tvm.target.Target({"kind": "llvm"}))[f.attrs["global_symbol"]]


def _view(arr, pad=3):
    """``arr`` as a view at element offset ``pad`` of a larger int32 tensor (as the cache passes it)."""
    base = tvm.runtime.tensor(np.concatenate([np.full(pad, -7, np.int32), np.asarray(arr, np.int32)]))
    return base._create_view((len(arr),), "int32", pad * 4)


@pytest.mark.parametrize("causal", [1, 0])
def test_paged_prefill_slot(causal, rng):
    lens, qo = [20, 37], [4, 9]
    pages = [(n + PAGE - 1) // PAGE for n in lens]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    indices = rng.permutation(int(indptr[-1]) + 2)[: indptr[-1]].astype(np.int32)
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lens, pages)], np.int32)
    cache = randn(rng, (int(indptr[-1]) + 2, 2, HKV, PAGE, D), "float16")
    qo_indptr = np.cumsum([0] + qo).astype(np.int32)
    q = randn(rng, (sum(qo), HQ, D), "float16")
    o, lse = tvm.runtime.empty(q.shape, "float16"), tvm.runtime.empty(q.shape[:2], "float32")
    f = _compile("prefill_paged", ta.LogitsSoftCap(8.0))
    zeros = np.zeros(len(lens), np.int32)
    f(tvm.runtime.tensor(q), _view(qo_indptr), tvm.runtime.tensor(cache), _view(indptr), _view(indices),
      _view(last), _view(zeros), _view(np.zeros(sum(qo), np.int32)), o, lse, causal, 0, 1.0, 10000.0, 0.125)
    ref = R.paged_attention(q, qo_indptr, cache, indptr, indices, last, kv_layout="HND", causal=bool(causal),
                            variant=ta.LogitsSoftCap(8.0), sm_scale=0.125)
    assert_attention_close(o.numpy(), lse.numpy(), *ref, "float16", f"causal={causal}")


def test_decode_and_ragged_slots_and_inline_rope_refused(rng):
    q = randn(rng, (2, HQ, D), "float16")
    cache = randn(rng, (3, 2, HKV, PAGE, D), "float16")
    indptr, indices = np.array([0, 1, 3], np.int32), np.array([2, 0, 1], np.int32)
    last = np.array([5, 16], np.int32)
    o, lse = tvm.runtime.empty(q.shape, "float16"), tvm.runtime.empty(q.shape[:2], "float32")
    f = _compile("decode")
    args = [tvm.runtime.tensor(q), tvm.runtime.tensor(cache), _view(indptr), _view(indices), _view(last),
            _view([0, 0]), _view([0, 0]), o, lse]
    f(*args, 0, 1.0, 10000.0, D**-0.5)
    ref = R.paged_attention(q, None, cache, indptr, indices, last, kv_layout="HND")
    assert_attention_close(o.numpy(), lse.numpy(), *ref, "float16", "decode slot")
    with pytest.raises(Exception, match="need rope_mode NORMAL or NONE"):
        f(*args, 1, 1.0, 10000.0, D**-0.5)

    qo_indptr = np.array([0, 3, 8], np.int32)
    qr = randn(rng, (8, HQ, D), "float16")
    k, v = randn(rng, (8, HKV, D), "float16"), randn(rng, (8, HKV, D), "float16")
    o, lse = tvm.runtime.empty(qr.shape, "float16"), tvm.runtime.empty(qr.shape[:2], "float32")
    _compile("prefill_ragged")(tvm.runtime.tensor(qr), _view(qo_indptr), tvm.runtime.tensor(k),
                               tvm.runtime.tensor(v), _view(qo_indptr), _view(np.zeros(8, np.int32)),
                               _view([0, 0]), o, lse, 1, 0, 1.0, 10000.0, D**-0.5)
    ref = R.ragged_attention(qr, qo_indptr, k, v, qo_indptr, causal=True)
    assert_attention_close(o.numpy(), lse.numpy(), *ref, "float16", "ragged slot")


def test_refusals():
    with pytest.raises(ValueError, match="cannot pass the argument 'alibi_slopes'"):
        kv_cache_kernel("decode", HQ, HKV, D, "float16", PAGE, ta.ALiBi())
    with pytest.raises(ValueError, match="needs softmax"):
        kv_cache_kernel("decode", HQ, HKV, D, "float16", PAGE, ta.SigmoidAttention())
    with pytest.raises(ValueError, match="slot: must be one of"):
        kv_cache_kernel("tree", HQ, HKV, D, "float16", PAGE)
    with pytest.raises(ValueError, match="RopeMode.INLINE"):
        KVCacheConfig(2, HQ, HKV, D, rope_mode=2)

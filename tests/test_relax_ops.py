"""Relax ops: each kind built into one Relax module over symbolic dims, compiled for llvm, run through
``relax.VirtualMachine`` and compared with the numpy reference."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

import tvm_attn as ta
import tvm_attn.relax as tr
from tvm_attn import reference as R

from conftest import assert_attention_close, randn

HQ, HKV, D, PAGE = 4, 2, 64, 16
SOFT_CAP = 5.0


def _var(name, shape, dtype):
    return relax.Var(name, relax.TensorType(shape, dtype))


def _build():
    """One module, one function per op; every row/length/page dim symbolic."""
    s = {n: tirx.Var(n, "int64") for n in ("batch", "b1", "rows", "pages", "nnz", "kv_rows", "blocks", "m",
                                           "n_kv")}
    bb = relax.BlockBuilder()

    def fn(name, params, body):
        with bb.function(name, params):
            with bb.dataflow():
                o, lse = body(*params)
                out = bb.emit_output(relax.Tuple([o, lse]))
            bb.emit_func_output(out)

    cache = _var("cache", [s["pages"], 2, PAGE, HKV, D], "float16")
    fn("decode", [_var("q", [s["batch"], HQ, D], "float16"), cache, _var("indptr", [s["b1"]], "int32"),
                  _var("indices", [s["nnz"]], "int32"), _var("last", [s["batch"]], "int32")],
       lambda q, c, ip, ix, ll: tr.batch_decode_with_paged_kv_cache(q, c, ip, ix, ll,
                                                                    variant=ta.LogitsSoftCap(SOFT_CAP)))
    cache_hnd = _var("cache", [s["pages"], 2, HKV, PAGE, D], "float16")
    fn("prefill_paged", [_var("q", [s["rows"], HQ, D], "float16"), _var("qo_indptr", [s["b1"]], "int32"),
                         cache_hnd, _var("indptr", [s["b1"]], "int32"), _var("indices", [s["nnz"]], "int32"),
                         _var("last", [s["batch"]], "int32")],
       lambda q, qi, c, ip, ix, ll: tr.batch_prefill_with_paged_kv_cache(q, qi, c, ip, ix, ll,
                                                                          kv_layout="HND", causal=True))
    fn("prefill_ragged", [_var("q", [s["rows"], HQ, D], "float32"), _var("qo_indptr", [s["b1"]], "int32"),
                          _var("k", [s["kv_rows"], HKV, D], "float32"),
                          _var("v", [s["kv_rows"], HKV, D], "float32"),
                          _var("kv_indptr", [s["b1"]], "int32")],
       lambda q, qi, k, v, ki: tr.batch_prefill_with_ragged_kv_cache(q, qi, k, v, ki, causal=True))
    fn("bsr", [_var("q", [s["m"], HQ, D], "float32"), _var("k", [s["n_kv"], HKV, D], "float32"),
               _var("v", [s["n_kv"], HKV, D], "float32"), _var("indptr", [s["blocks"]], "int32"),
               _var("indices", [s["nnz"]], "int32")],
       lambda q, k, v, ip, ix: tr.block_sparse_attention(q, k, v, ip, ix, R=2, C=4))
    fn("merge", [_var("va", [s["rows"], HQ, D], "float16"), _var("sa", [s["rows"], HQ], "float32"),
                 _var("vb", [s["rows"], HQ, D], "float16"), _var("sb", [s["rows"], HQ], "float32")],
       lambda va, sa, vb, sb: tr.merge_state(va, sa, vb, sb))
    return bb.get()


@pytest.fixture(scope="module")
def vm():
    mod = _build()
    return relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())


def _run(vm, name, *args):
    out = vm[name](*(tvm.runtime.tensor(np.asarray(a)) for a in args))
    return out[0].numpy(), out[1].numpy()


def _pages(rng, lens, layout):
    pages = [(n + PAGE - 1) // PAGE for n in lens]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    indices = rng.permutation(int(indptr[-1]) + 3)[: indptr[-1]].astype(np.int32)
    last = np.array([n - (p - 1) * PAGE for n, p in zip(lens, pages)], np.int32)
    num_pages = int(indptr[-1]) + 3
    shape = (num_pages, 2, PAGE, HKV, D) if layout == "NHD" else (num_pages, 2, HKV, PAGE, D)
    return randn(rng, shape, "float16"), indptr, indices, last


def test_module_types_are_symbolic():
    mod = _build()
    ty = mod["prefill_paged"].ret_ty
    assert str(ty.fields[0].shape[0]) == "rows" and str(ty.fields[1].shape) == "R.shape([rows, 4])"
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 5 and any("soft_cap" in k for k in kernels)


def test_decode(vm, rng):
    lens = [1, 17, 40]
    cache, indptr, indices, last = _pages(rng, lens, "NHD")
    q = randn(rng, (3, HQ, D), "float16")
    o, lse = _run(vm, "decode", q, cache, indptr, indices, last)
    ref = R.paged_attention(q, None, cache, indptr, indices, last, variant=ta.LogitsSoftCap(SOFT_CAP))
    assert_attention_close(o, lse, *ref, "float16", "relax decode")


def test_prefill_paged_causal(vm, rng):
    lens, qo = [5, 33], [5, 2]
    cache, indptr, indices, last = _pages(rng, lens, "HND")
    qo_indptr = np.cumsum([0] + qo).astype(np.int32)
    q = randn(rng, (sum(qo), HQ, D), "float16")
    o, lse = _run(vm, "prefill_paged", q, qo_indptr, cache, indptr, indices, last)
    ref = R.paged_attention(q, qo_indptr, cache, indptr, indices, last, kv_layout="HND", causal=True)
    assert_attention_close(o, lse, *ref, "float16", "relax paged prefill")


def test_prefill_ragged_and_bsr(vm, rng):
    qo_indptr, kv_indptr = np.array([0, 3, 10], np.int32), np.array([0, 3, 12], np.int32)
    q, k, v = (randn(rng, (10, HQ, D), "float32"), randn(rng, (12, HKV, D), "float32"),
               randn(rng, (12, HKV, D), "float32"))
    o, lse = _run(vm, "prefill_ragged", q, qo_indptr, k, v, kv_indptr)
    assert_attention_close(o, lse, *R.ragged_attention(q, qo_indptr, k, v, kv_indptr, causal=True), "float32",
                           "ragged")
    indptr, indices = np.array([0, 2, 2, 3], np.int32), np.array([0, 2, 1], np.int32)
    q6 = randn(rng, (6, HQ, D), "float32")
    o, lse = _run(vm, "bsr", q6, k, v, indptr, indices)
    ref = R.block_sparse_attention(q6, k, v, indptr, indices, 2, 4)
    assert_attention_close(o, lse, *ref, "float32", "bsr")


def test_merge(vm, rng):
    va, vb = randn(rng, (5, HQ, D), "float16"), randn(rng, (5, HQ, D), "float16")
    sa, sb = rng.standard_normal((5, HQ)).astype(np.float32), rng.standard_normal((5, HQ)).astype(np.float32)
    sb[0] = -np.inf
    v, s = _run(vm, "merge", va, sa, vb, sb)
    ref_v, ref_s = R.merge_state(va, sa, vb, sb)
    assert_attention_close(v, s, ref_v, ref_s, "float16", "merge")


def test_bad_input_is_named():
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    q = _var("q", [n, HQ, D], "float16")
    cache = _var("cache", [4, 2, PAGE, HKV, D], "float16")
    ip, ix = _var("ip", [n], "int64"), _var("ix", [n], "int32")
    with bb.function("f", [q, cache, ip, ix]):
        with pytest.raises(ValueError, match="kv_indptr: index arrays are int32"):
            tr.batch_decode_with_paged_kv_cache(q, cache, ip, ix, ix)
        with pytest.raises(ValueError, match="unknown variant arguments"):
            tr.batch_decode_with_paged_kv_cache(q, cache, ix, ix, ix, window=3)
        with pytest.raises(ValueError, match="logits_soft_cap: must be > 0"):
            tr.batch_decode_with_paged_kv_cache(q, cache, ix, ix, ix, variant=ta.LogitsSoftCap(),
                                                logits_soft_cap=-1.0)
        with pytest.raises(ValueError, match="dim 1 \\(num_qo_heads\\) must be static"):
            tr.batch_decode_with_paged_kv_cache(_var("q2", [n, n, D], "float16"), cache, ix, ix, ix)
        bb.emit_func_output(q)

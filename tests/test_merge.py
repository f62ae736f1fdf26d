"""merge_state / merge_state_in_place / merge_states kernels against the reference, and the CUDA
merge kernels on the build machine: their index math run on the CPU (threads as serial loops), the
CUDA source they emit, and ptxas's report. Running them on a GPU: tests/gpu/test_merge_cuda.py."""

import functools
import re

import numpy as np
import pytest

import tvm
import tvm_attn as ta
from tvm_attn import reference as R
from tvm_attn.build import compile_key, cuda_source
from tvm_attn.config import MergeKey
from tvm_attn.tir.merge_cuda import MAX_BLOCKS, THREADS, make_merge_cuda, vec_width

from _merge_inputs import merge_inputs, nan_merge_inputs
from conftest import assert_attention_close, randn

OPS = ("merge_state", "merge_state_in_place", "merge_states")
DTYPES = ("float16", "bfloat16", "float32")
TARGET = "cuda:sm_90a"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_merge_state(dtype, rng):
    va, vb = randn(rng, (7, 3, 64), dtype), randn(rng, (7, 3, 64), dtype)
    sa = (rng.standard_normal((7, 3)) * 4).astype(np.float32)
    sb = (rng.standard_normal((7, 3)) * 4).astype(np.float32)
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
    q = randn(rng, (6, 4, 64), "float32")
    k, v = randn(rng, (30, 2, 64), "float32"), randn(rng, (30, 2, 64), "float32")
    o_a, s_a = ta.single_prefill_with_kv_cache(q, k[:11], v[:11], return_lse=True)
    o_b, s_b = ta.single_prefill_with_kv_cache(q, k[11:], v[11:], return_lse=True)
    o, s = ta.merge_state(o_a, s_a, o_b, s_b)
    ref_o, ref_s = R.dense_attention(q, k, v)
    np.testing.assert_allclose(o, ref_o, atol=1e-5)
    np.testing.assert_allclose(s, ref_s, atol=1e-5)


def test_empty_inputs():
    v, s = ta.merge_states(np.zeros((3, 0, 2, 8), np.float32), np.zeros((3, 0, 2), np.float32))
    assert np.all(v == 0) and np.all(np.isneginf(s))  # no states: every row is empty
    v, s = ta.merge_states(np.zeros((0, 2, 2, 8), np.float16), np.zeros((0, 2, 2), np.float32))
    assert v.shape == (0, 2, 8) and s.shape == (0, 2)


# -- the CUDA kernels, on the build machine ----------------------------------------------------------

def _reference(v, s):
    return R.merge_states(v.astype(np.float32), s)


@functools.cache
def _serial(op: str, dtype: str):
    """The CUDA kernel of ``op`` compiled for the CPU, its threads run as serial loops, threadIdx.x
    descending: the lane that overwrites an item's LSE in place (its group's first) then runs after
    the lanes that read it, the order the kernel's ``__syncwarp`` gives them on the GPU."""
    text = make_merge_cuda(MergeKey(op, dtype, TARGET)).script()
    text = re.sub(r'T\.thread_binding\((.*), thread="blockIdx\.x"\)', r"T.serial(\1)", text)
    m = re.search(r'( *)for (\w+) in T\.thread_binding\((\d+), thread="threadIdx\.x"\):\n', text)
    indent, var, n = m.groups()
    text = text.replace(m.group(0), f"{indent}for tx_rev in T.serial({n}):\n"
                                    f"{indent}    {var}: T.int32 = {int(n) - 1} - tx_rev\n")
    text = text.replace('T.call_extern("void", "__syncwarp", T.uint32(4294967295))', "T.evaluate(0)")
    assert "thread_binding" not in text and "__syncwarp" not in text
    func = tvm.script.from_source(text).with_attr("global_symbol", "k")
    return tvm.compile(tvm.IRModule({"k": func}), target="llvm")["k"]


def _run_serial(op, dtype, v, s):
    def t(x):
        return tvm.runtime.tensor(np.ascontiguousarray(x))

    n, _, H, D = v.shape
    if op == "merge_states":
        v_out, s_out = tvm.runtime.empty((n, H, D), dtype), tvm.runtime.empty((n, H), "float32")
        _serial(op, dtype)(t(v), t(s), v_out, s_out)
        return v_out.numpy(), s_out.numpy()
    args = [t(v[:, 0]), t(s[:, 0]), t(v[:, 1]), t(s[:, 1])]
    if op == "merge_state":
        args += [tvm.runtime.empty((n, H, D), dtype), tvm.runtime.empty((n, H), "float32")]
    _serial(op, dtype)(*args)
    out = args[4:] if op == "merge_state" else args[:2]  # in place: the result is (v, s)
    return out[0].numpy(), out[1].numpy()


@pytest.mark.parametrize("op", OPS)
def test_nan_propagates(op, rng):
    """A NaN (or +inf) LSE, or a NaN in the v of a non-empty state, comes out as NaN, in the CPU
    kernels and in the CUDA kernels' math run on the CPU; an empty state's NaN v still weighs 0."""
    for n, H, D in [(7, 3, 128), (6, 2, 36), (6, 2, 7)]:
        for k in ((1, 2, 3, 6, 9) if op == "merge_states" else (2,)):
            v, s = nan_merge_inputs(rng, "float32", n, k, H, D)
            ref = _reference(v, s)
            what = f"{op} n{n} k{k} H{H} D{D}"
            assert_attention_close(*_run_serial(op, "float32", v, s), *ref, "float32", what + " (CUDA math)")
            if op == "merge_states":
                got = ta.merge_states(v, s)
            elif op == "merge_state":
                got = ta.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
            else:
                got = v[:, 0].copy(), s[:, 0].copy()
                ta.merge_state_in_place(*got, v[:, 1], s[:, 1])
            assert_attention_close(*got, *ref, "float32", what + " (CPU kernel)")


#: (n, H, head_dim): one 16-byte chunk per lane and several items per warp, a partial group, head_dims
#: that take two chunks per lane, and head_dims that are not a multiple of the 16-byte width
SHAPES = [(7, 3, 128), (5, 2, 64), (3, 2, 264), (3, 2, 36), (2, 3, 7), (6, 5, 8), (2, 2, 512)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_math_on_cpu(op, dtype, rng):
    """The CUDA kernel's grid, lane groups, chunks and -inf handling, run on the CPU."""
    for n, H, D in SHAPES:
        for k in ((0, 1, 3, 6, 9) if op == "merge_states" else (2,)):
            v, s = merge_inputs(rng, dtype, n, k, H, D)
            got_v, got_s = _run_serial(op, dtype, v, s)
            ref_v, ref_s = _reference(v, s)
            assert_attention_close(got_v, got_s, ref_v, ref_s, dtype, f"{op} {dtype} n{n} k{k} H{H} D{D}")


def test_cuda_kernel_strides_over_a_large_grid(rng):
    """More items than the grid has lane groups: each group takes several in turn."""
    n, H, D = 1100, 32, 128  # float32: 32 chunks, one item per warp, 4096 blocks of 8 warps
    assert n * H > MAX_BLOCKS * THREADS // 32
    v, s = merge_inputs(rng, "float32", n, 2, H, D)
    got_v, got_s = _run_serial("merge_state", "float32", v, s)
    assert_attention_close(got_v, got_s, *_reference(v, s), "float32", "grid stride")


@functools.cache
def _cuda_source(op, dtype, target=TARGET):
    key = MergeKey(op, dtype, target)
    src = cuda_source(compile_key(key))
    body = src[src.index(f"{key.uri}_kernel(", src.index("__global__")):]
    return src, body


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_cuda_source(op, dtype):
    """Bound threads, a 256-thread block, 16-byte loads of every state and stores of the output (and
    the scalar copy for other head_dims), and a warp barrier only where the LSE is overwritten."""
    src, body = _cuda_source(op, dtype)
    assert f"__launch_bounds__({THREADS})" in src and "blockIdx.x" in body and "threadIdx.x" in body
    vec_t = "float4" if dtype == "float32" else "uint4"
    inputs = {"merge_state": ["v_a", "v_b"], "merge_state_in_place": ["v", "v_other"],
              "merge_states": ["v"]}[op]
    for name in inputs:
        assert re.search(rf"= \*\({vec_t}\*\)\({name}_flat_ptr \+", body), f"no 16-byte load of {name}"
    out = "v" if op == "merge_state_in_place" else "v_out"  # in place: the one pointer v, read and written
    store = rf"\*\({vec_t}\*\)\({out}_flat_ptr \+ [^;]*\) = "
    assert re.search(store, body), "no 16-byte store of the output"
    params = body[: body.index(")")]
    assert ("v_out" in params) == (op != "merge_state_in_place"), params
    assert f"% {vec_width(dtype)}) == 0" in body  # the scalar copy for other head_dims
    assert ("__syncwarp" in body) == (op == "merge_state_in_place")


def _ptxas(log: str) -> dict:
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    pairs = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    spills = [int(a) + int(b) for a, b in pairs]
    stack = [int(x) for x in re.findall(r"(\d+) bytes stack frame", log)]
    return {"registers": regs, "spills": spills, "stack": stack}


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_compile_without_spills(op, arch):
    from tvm_attn.cuda_runtime import find_nvcc, nvcc_compile

    if find_nvcc() is None:
        pytest.skip("no nvcc here")
    for dtype in DTYPES:
        src, _ = _cuda_source(op, dtype, f"cuda:{arch}")
        report = _ptxas(nvcc_compile(src, arch)[1])
        assert report["registers"] and max(report["registers"]) <= 64, (dtype, report)  # 4+ blocks per SM
        assert report["spills"] and not any(report["spills"]) and not any(report["stack"]), (dtype, report)


def test_cuda_keys_refused_before_launch():
    with pytest.raises(ValueError, match="target: the CUDA merge kernels need 'cuda:sm_<arch>'"):
        make_merge_cuda(MergeKey("merge_states", "float16", "llvm"))
    with pytest.raises(ValueError, match="target: the CUDA merge kernels need 'cuda:sm_<arch>'"):
        make_merge_cuda(MergeKey("merge_states", "float16", "cuda"))
    with pytest.raises(ValueError, match="unknown merge op"):
        MergeKey("merge_everything", "float16", TARGET)


def test_inputs_checked_for_32_bit_indexing():
    class Huge:  # a DLPack tensor of which only the shape and dtype are read before the refusal
        shape, dtype = (2**16, 2, 2**15), np.dtype(np.float32)

        def __dlpack__(self, *args, **kwargs):
            raise AssertionError("the data of a refused tensor is never read")

    message = r"v_a: 4294967296 elements; the merge kernels take at most 2\*\*31 - 1"
    with pytest.raises(ValueError, match=message):
        ta.merge_state(Huge(), np.zeros((2**16, 2), np.float32), Huge(), np.zeros((2**16, 2), np.float32))


@pytest.mark.slow
def test_kv_cache_merge_slot_is_ours_on_cuda():
    """TVM's KV cache on CUDA gets the CUDA merge kernel in its merge slot, not TVM's."""
    from tvm_attn.models.llama import build_module, get_config
    from tvm_attn.relax.kv_cache import slot_sources

    assert slot_sources(TARGET)["merge_state"] == "tvm_attn"
    assert slot_sources("tvm_builtin")["merge_state"] == "tvm_builtin"
    mod, _ = build_module(get_config("tiny", dtype="float16", num_hidden_layers=1), TARGET)
    names = {gv.name_hint for gv in mod.functions}
    assert "tir_attention_merge_state" not in names
    want = make_merge_cuda(MergeKey("merge_state_in_place", "float16", TARGET))
    got = mod["tvm_attn_merge_state_in_place"]
    tvm.ir.assert_structural_equal(got.without_attr("global_symbol"), want.without_attr("global_symbol"))

"""GPU tier: the CUDA merge kernels (tvm_attn.tir.merge_cuda) through the cascade API against the
numpy reference, with the project's tolerance rule.

Every op (merge_state, merge_state_in_place, merge_states) x dtype x a set of shapes (head_dims with
one, two and a partial group of 16-byte chunks per lane, head_dims that are not a multiple of the
16-byte width, 1 to 9 states, a grid that strides several times), on tvm.runtime.Tensors on
tvm.cuda(0) and on torch CUDA tensors, with empty (-inf) states whose v holds NaN. Runs on a GPU
host with the kernels built by scripts/build_gpu_kernels.py (TVM_ATTN_CACHE_DIR).
"""

import numpy as np
import pytest

import tvm
import tvm_attn as ta
from tvm_attn import reference as R

from _merge_inputs import merge_inputs
from conftest import assert_attention_close

pytestmark = pytest.mark.gpu

OPS = ("merge_state", "merge_state_in_place", "merge_states")
DTYPES = ("float16", "bfloat16", "float32")
#: (rows, heads, head_dim): 100 and 7 are not multiples of 8 (100 is of 4: float32 loads 16 bytes)
SHAPES = [(1, 1, 64), (33, 8, 128), (2000, 4, 128), (7, 3, 256), (9, 2, 96), (4, 3, 100), (3, 2, 7),
          (5, 2, 512)]
STATES = (1, 2, 5, 9)


def _states(rng, dtype, n, k, H, D):
    """``k`` states; row 0 head 0 has no keys in any state, state 0 of row 1 is empty, and every
    empty state's v holds NaN (weight 0: the kernel must not let it in)."""
    v, s = merge_inputs(rng, dtype, n, k, H, D)
    ref = R.merge_states(np.where(np.isneginf(s)[..., None], 0, v.astype(np.float32)), s)
    return v, s, ref


def _device(kind, x):
    if kind == "tvm":
        return tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cuda(0))
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.ascontiguousarray(x).astype(np.float32))
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[str(x.dtype)]
    return t.to(dt).cuda().contiguous()


def _host(kind, x):
    if kind == "tvm":
        assert isinstance(x, tvm.runtime.Tensor) and x.device.dlpack_device_type() == 2
        return x.numpy().astype(np.float32)
    assert x.is_cuda, "the result of a torch CUDA input is a torch CUDA tensor"
    return x.float().cpu().numpy()


def _run(op, kind, v, s):
    """(v, s) merged by ``op`` on the GPU, as host float32 arrays."""
    if op == "merge_states":
        out = ta.merge_states(_device(kind, v), _device(kind, s), device="cuda")
        return _host(kind, out[0]), _host(kind, out[1])
    args = [_device(kind, x) for x in (v[:, 0], s[:, 0], v[:, 1], s[:, 1])]
    if op == "merge_state":
        out = ta.merge_state(*args, device="cuda")
        return _host(kind, out[0]), _host(kind, out[1])
    assert ta.merge_state_in_place(*args, device="cuda") is None
    return _host(kind, args[0]), _host(kind, args[1])  # the given tensors hold the result


@pytest.mark.parametrize("kind", ["tvm", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_merge_matches_reference(op, dtype, kind):
    rng = np.random.default_rng(11)
    for n, H, D in SHAPES:
        for k in (STATES if op == "merge_states" else (2,)):
            v, s, (ref_v, ref_s) = _states(rng, dtype, n, k, H, D)
            got_v, got_s = _run(op, kind, v, s)
            assert_attention_close(got_v, got_s, ref_v, ref_s, dtype, f"{op} {kind} n{n} k{k} H{H} D{D}")
            assert np.all(got_v[0, 0] == 0) and np.isneginf(got_s[0, 0])


@pytest.mark.parametrize("op", OPS)
def test_grid_strides(op):
    """More (row, head) items than the grid has lane groups (4096 blocks x 8 warps x 2 per warp at
    head_dim 128 in fp16): each group merges several in turn."""
    rng = np.random.default_rng(12)
    n, H, D = 4500, 32, 128
    assert n * H > 4096 * 8 * 2
    v, s, (ref_v, ref_s) = _states(rng, "float16", n, 3 if op == "merge_states" else 2, H, D)
    got_v, got_s = _run(op, "tvm", v, s)
    assert_attention_close(got_v, got_s, ref_v, ref_s, "float16", f"{op} grid stride")


def test_no_states():
    """``merge_states`` over zero states: every row empty (v 0, LSE -inf), as on the CPU."""
    v = tvm.runtime.empty((3, 0, 2, 64), "float16", tvm.cuda(0))
    s = tvm.runtime.empty((3, 0, 2), "float32", tvm.cuda(0))
    got_v, got_s = ta.merge_states(v, s, device="cuda")
    assert np.all(got_v.numpy() == 0) and np.all(np.isneginf(got_s.numpy()))


def test_numpy_inputs_copied_to_the_device_and_back():
    rng = np.random.default_rng(13)
    v, s, (ref_v, ref_s) = _states(rng, "float16", 6, 2, 4, 128)
    got_v, got_s = ta.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1], device="cuda")
    assert isinstance(got_v, np.ndarray)
    assert_attention_close(got_v, got_s, ref_v, ref_s, "float16", "numpy in, numpy out")
    va, sa = v[:, 0].copy(), s[:, 0].copy()
    ta.merge_state_in_place(va, sa, v[:, 1], s[:, 1], device="cuda")
    assert_attention_close(va, sa, ref_v, ref_s, "float16", "numpy in place")


def test_misaligned_view_refused():
    base = tvm.runtime.tensor(np.zeros(4 * 2 * 64 + 1, np.float16), tvm.cuda(0))
    v = base._create_view((4, 2, 64), "float16", 2)  # starts 2 bytes in
    s = tvm.runtime.tensor(np.zeros((4, 2), np.float32), tvm.cuda(0))
    with pytest.raises(ValueError, match="v_a: its data starts at an address that is not a multiple of 16"):
        ta.merge_state(v, s, v, s, device="cuda")


def test_tensors_on_another_device_refused():
    v = np.zeros((4, 2, 64), np.float16)
    s = tvm.runtime.tensor(np.zeros((4, 2), np.float32), tvm.cpu(0))
    with pytest.raises(ValueError, match="s_a: is on"):
        ta.merge_state(v, s, v, np.zeros((4, 2), np.float32), device="cuda")

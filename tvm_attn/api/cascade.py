"""Merging attention states (FlashInfer ``cascade.py``): ``merge_state``, ``merge_state_in_place``,
``merge_states``. States are ``(v, s)`` with ``s`` the float32 LSE in log2 units.

``device="cuda"`` runs the CUDA kernels (:mod:`tvm_attn.tir.merge_cuda`) on torch CUDA tensors (or
any DLPack tensor), ``tvm.runtime.Tensor``s on that device, or numpy arrays (copied there and back).
"""

from __future__ import annotations

from ..config import MergeKey
from ..tensor import check_writable, dtype_of, empty, like_input, shape_of, to_tvm
from ._common import check_tensor, kernel_cache, resolve_device

#: the kernels index their tensors with 32-bit integers
MAX_ELEMENTS = 2**31 - 1
#: the CUDA kernels load 16-byte chunks of v (TVM allocates at 64 bytes; a view may start anywhere)
CUDA_ALIGNMENT = 16


def _setup(v, device, op):
    """(device, the merge kernel's key). The kernel is looked up only after every input is checked,
    so that bad input is the ValueError naming it even on a host without that kernel."""
    dev, target = resolve_device(device)
    return dev, MergeKey(op, dtype_of(v), target)


def _inputs(dev, named) -> list:
    """The tensors ``(name, x[, in_place])`` on ``dev``, each checked for the kernels' 32-bit indexing
    and, on CUDA, for alignment, before anything runs."""
    out = []
    for name, x, *in_place in named:
        numel = 1
        for extent in shape_of(x):
            numel *= extent
        if numel > MAX_ELEMENTS:
            raise ValueError(f"{name}: {numel} elements; the merge kernels take at most 2**31 - 1")
        t = to_tvm(x, dev, name, copy=not in_place)
        if dev.dlpack_device_type() != 1 and t.data_ptr() % CUDA_ALIGNMENT:
            raise ValueError(f"{name}: its data starts at an address that is not a multiple of "
                             f"{CUDA_ALIGNMENT} bytes; the CUDA merge kernels load 16-byte chunks "
                             "(pass a copy)")
        out.append(t)
    return out


def merge_state(v_a, s_a, v_b, s_b, *, device=None, cache=None):
    """``v_a``, ``v_b`` ``[n, H, D]``; ``s_a``, ``s_b`` float32 ``[n, H]`` -> merged ``(v, s)``."""
    n, H, D = _check_pair(v_a, s_a, "v_a", "s_a")
    check_tensor("v_b", v_b, (n, H, D), dtype_of(v_a))
    check_tensor("s_b", s_b, (n, H), "float32")
    dev, key = _setup(v_a, device, "merge_state")
    args = _inputs(dev, (("v_a", v_a), ("s_a", s_a), ("v_b", v_b), ("s_b", s_b)))
    fn = kernel_cache(cache).get(key)
    v_out, s_out = empty((n, H, D), dtype_of(v_a), dev), empty((n, H), "float32", dev)
    if n * H:
        fn(*args, v_out, s_out)
    return like_input(v_out, v_a), like_input(s_out, v_a)


def merge_state_in_place(v, s, v_other, s_other, *, device=None, cache=None) -> None:
    """Merge ``(v_other, s_other)`` into ``(v, s)``, which must be writable in place (a TVM or DLPack
    tensor, or a numpy array)."""
    n, H, D = _check_pair(v, s, "v", "s")
    check_tensor("v_other", v_other, (n, H, D), dtype_of(v))
    check_tensor("s_other", s_other, (n, H), "float32")
    dev, key = _setup(v, device, "merge_state_in_place")
    for given, name in ((v, "v"), (s, "s")):
        check_writable(given, name)
    # v and s are written in place: a tensor TVM cannot take without a copy is refused, not copied
    v_t, s_t, vo_t, so_t = _inputs(dev, (("v", v, True), ("s", s, True), ("v_other", v_other),
                                         ("s_other", s_other)))
    fn = kernel_cache(cache).get(key)
    if not n * H:
        return
    fn(v_t, s_t, vo_t, so_t)
    for given, t in ((v, v_t), (s, s_t)):
        if hasattr(given, "__array_interface__") and not _shares(given, t):
            given[...] = t.numpy()  # the numpy input was copied on the way in


def merge_states(v, s, *, device=None, cache=None):
    """``v`` ``[n, num_states, H, D]``, ``s`` float32 ``[n, num_states, H]`` -> merged ``(v, s)``."""
    vs = shape_of(v, "v")
    if len(vs) != 4:
        raise ValueError(f"v: expected shape (n, num_states, num_heads, head_dim), got {vs}")
    check_tensor("s", s, vs[:3], "float32")
    dev, key = _setup(v, device, "merge_states")
    args = _inputs(dev, (("v", v), ("s", s)))
    fn = kernel_cache(cache).get(key)
    v_out, s_out = empty((vs[0], vs[2], vs[3]), dtype_of(v), dev), empty((vs[0], vs[2]), "float32", dev)
    if vs[0] * vs[2]:
        fn(*args, v_out, s_out)
    return like_input(v_out, v), like_input(s_out, v)


def _check_pair(v, s, vn, sn):
    shape = shape_of(v, vn)
    if len(shape) != 3:
        raise ValueError(f"{vn}: expected shape (n, num_heads, head_dim), got {shape}")
    check_tensor(sn, s, shape[:2], "float32")
    return shape


def _shares(arr, t) -> bool:
    return arr.__array_interface__["data"][0] == t.data_ptr()

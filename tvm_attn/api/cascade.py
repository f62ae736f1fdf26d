"""Merging attention states (FlashInfer ``cascade.py``): ``merge_state``, ``merge_state_in_place``,
``merge_states``. States are ``(v, s)`` with ``s`` the float32 LSE in log2 units."""

from __future__ import annotations

from ..config import MergeKey
from ..tensor import check_writable, dtype_of, empty, like_input, shape_of, to_tvm
from ._common import check_tensor, kernel_cache, resolve_device


def _setup(v, device, cache, op):
    dev, target = resolve_device(device)
    key = MergeKey(op, dtype_of(v), target)
    return dev, kernel_cache(cache).get(key)


def merge_state(v_a, s_a, v_b, s_b, *, device=None, cache=None):
    """``v_a``, ``v_b`` ``[n, H, D]``; ``s_a``, ``s_b`` float32 ``[n, H]`` -> merged ``(v, s)``."""
    n, H, D = _check_pair(v_a, s_a, "v_a", "s_a")
    check_tensor("v_b", v_b, (n, H, D), dtype_of(v_a))
    check_tensor("s_b", s_b, (n, H), "float32")
    dev, fn = _setup(v_a, device, cache, "merge_state")
    v_out, s_out = empty((n, H, D), dtype_of(v_a), dev), empty((n, H), "float32", dev)
    fn(*(to_tvm(x, dev, nm) for x, nm in ((v_a, "v_a"), (s_a, "s_a"), (v_b, "v_b"), (s_b, "s_b"))), v_out, s_out)
    return like_input(v_out, v_a), like_input(s_out, v_a)


def merge_state_in_place(v, s, v_other, s_other, *, device=None, cache=None) -> None:
    """Merge ``(v_other, s_other)`` into ``(v, s)``, which must be writable in place (a TVM or DLPack
    tensor, or a numpy array)."""
    n, H, D = _check_pair(v, s, "v", "s")
    check_tensor("v_other", v_other, (n, H, D), dtype_of(v))
    check_tensor("s_other", s_other, (n, H), "float32")
    dev, fn = _setup(v, device, cache, "merge_state_in_place")
    for given, name in ((v, "v"), (s, "s")):
        check_writable(given, name)
    v_t, s_t = to_tvm(v, dev, "v", copy=False), to_tvm(s, dev, "s", copy=False)
    fn(v_t, s_t, to_tvm(v_other, dev, "v_other"), to_tvm(s_other, dev, "s_other"))
    for given, t in ((v, v_t), (s, s_t)):
        if hasattr(given, "__array_interface__") and not _shares(given, t):
            given[...] = t.numpy()  # the numpy input was copied on the way in


def merge_states(v, s, *, device=None, cache=None):
    """``v`` ``[n, num_states, H, D]``, ``s`` float32 ``[n, num_states, H]`` -> merged ``(v, s)``."""
    vs = shape_of(v, "v")
    if len(vs) != 4:
        raise ValueError(f"v: expected shape (n, num_states, num_heads, head_dim), got {vs}")
    check_tensor("s", s, vs[:3], "float32")
    dev, fn = _setup(v, device, cache, "merge_states")
    v_out, s_out = empty((vs[0], vs[2], vs[3]), dtype_of(v), dev), empty((vs[0], vs[2]), "float32", dev)
    fn(to_tvm(v, dev, "v"), to_tvm(s, dev, "s"), v_out, s_out)
    return like_input(v_out, v), like_input(s_out, v)


def _check_pair(v, s, vn, sn):
    shape = shape_of(v, vn)
    if len(shape) != 3:
        raise ValueError(f"{vn}: expected shape (n, num_heads, head_dim), got {shape}")
    check_tensor(sn, s, shape[:2], "float32")
    return shape


def _shares(arr, t) -> bool:
    return arr.__array_interface__["data"][0] == t.data_ptr()

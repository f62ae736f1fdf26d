"""Attention as Relax calls: one function per kind, each emitting ``call_tir`` on our kernel.

Call them inside a ``relax.BlockBuilder`` function (or an ``nn.Module.forward``). Each reads the
configuration (heads, head_dim, page size, dtypes) from its arguments' types, generates the kernel
for that :class:`~tvm_attn.config.AttentionKey` in the Relax argument order
(:class:`~tvm_attn.tir.abi.RelaxDPS`: inputs, scalars, then ``o`` and ``lse``), adds it to the
module being built once, and emits::

    o, lse = call_tir(kernel, [q, <format args>, sm_scale, <variant args>],
                      out_ty=[Tensor((rows, num_qo_heads, head_dim), q.dtype),
                              Tensor((rows, num_qo_heads), "float32")])

The row and length dims may be symbolic (``rows`` is q's first dim); heads, head_dim and the page
size must be static. The LSE is in log2 units. The CPU kernels need no plan: they walk the index
arrays themselves, so no planner call enters the graph.

--- Variables ---
q: queries, ``[rows, num_qo_heads, head_dim]``; decode has one row per request
qo_indptr: int32 ``[batch + 1]``, request ``b`` owns rows ``qo_indptr[b]:qo_indptr[b+1]``
paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len: the paged format (:class:`~tvm_attn.PagedKV`)
k, v, kv_indptr: the ragged format (:class:`~tvm_attn.RaggedKV`)

--- Computation ---
o[r, h] = sum_j softmax_j(logits(r, h, j)) v_j over the keys row r sees (see the README's Semantics).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx

from ..api._common import default_sm_scale
from ..config import AttentionKey, MergeKey
from ..kv.formats import BlockSparseKV, PagedKV, RaggedKV
from ..tir.abi import RelaxDPS
from ..variants.base import AttentionVariant, ScalarParam, compose
from ..variants.masks import Causal

__all__ = [
    "batch_decode_with_paged_kv_cache", "batch_prefill_with_paged_kv_cache",
    "batch_prefill_with_ragged_kv_cache", "block_sparse_attention", "merge_state", "merge_states",
]


def _bb() -> relax.BlockBuilder:
    bb = relax.BlockBuilder.current()
    if bb is None:
        raise RuntimeError("tvm_attn.relax ops emit into the current relax.BlockBuilder; "
                           "call them inside one")
    return bb


def _tensor_ty(name: str, expr: relax.Expr, ndim: int) -> relax.TensorType:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d Relax tensor with a known shape, got {ty}")
    return ty


def _static(name: str, ty: relax.TensorType, axis: int, what: str) -> int:
    dim = ty.shape.values[axis]
    if not isinstance(dim, tirx.IntImm):
        raise ValueError(f"{name}: dim {axis} ({what}) must be static to pick a kernel, got {dim}")
    return int(dim)


def _index(name: str, expr: relax.Expr) -> None:
    ty = _tensor_ty(name, expr, 1)
    if ty.dtype != "int32":
        raise ValueError(f"{name}: index arrays are int32, got {ty.dtype}")


def _emit_attention(key: AttentionKey, q: relax.Expr, format_args: list, sm_scale, variant_args: dict):
    bb = _bb()
    name = RelaxDPS().symbol(key)
    mod = bb.get()
    if name in {gv.name_hint for gv in mod.get_global_vars()}:
        gv = mod.get_global_var(name)
    else:
        from ..tir.attention import make_attention

        gv = bb.add_func(make_attention(key, RelaxDPS()), name)
    head_dim = key.head_dim
    scale = sm_scale if isinstance(sm_scale, relax.Expr) else default_sm_scale(sm_scale, head_dim)
    args = [q, *format_args, _scalar("sm_scale", scale, "float32"), *_variant_args(key, variant_args)]
    rows = q.ty.shape.values[0]
    out_ty = [relax.TensorType([rows, key.num_qo_heads, head_dim], key.o_dtype),
              relax.TensorType([rows, key.num_qo_heads], "float32")]
    res = bb.emit(relax.call_tir(gv, args, out_ty))
    return bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))


def _scalar(name: str, value, dtype: str) -> relax.Expr:
    if isinstance(value, relax.Expr):
        return value
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number or a Relax PrimValue, got {value!r}")
    return relax.prim_value(tirx.const(value, dtype))


def _variant_args(key: AttentionKey, given: dict) -> list:
    """The variant's arguments in kernel order: scalars as PrimValues, tensors as Relax tensors.

    Python scalars are checked with the variant's ``validate_args`` here, at graph-building time.
    """
    params = key.extra_params()
    unknown = sorted(set(given) - {p.name for p in params})
    if unknown:
        raise ValueError(f"unknown variant arguments {unknown}; "
                         f"{key.variant!r} takes {[p.name for p in params]}")
    out, known = [], {}
    scalars = [p for p in params if isinstance(p, ScalarParam)]
    for p in params:
        if isinstance(p, ScalarParam):
            value = given.get(p.name, p.default)
            if value is None:
                raise ValueError(f"missing variant argument {p.name!r}")
            if not isinstance(value, relax.Expr):
                known[p.name] = value
            out.append(_scalar(p.name, value, p.dtype))
        elif p.name in given:
            out.append(_as_tensor(p.name, given[p.name]))
        elif p.default is not None:
            dims = {"num_qo_heads": key.num_qo_heads, "num_kv_heads": key.num_kv_heads,
                    "head_dim": key.head_dim}
            out.append(relax.const(np.asarray(p.default(**dims), p.dtype)))
        else:
            raise ValueError(f"missing variant argument {p.name!r} (a {p.dtype} tensor of shape {p.shape})")
    if len(known) == len(scalars):
        key.variant.validate_args(known)
    return out


def _as_tensor(name, value) -> relax.Expr:
    if isinstance(value, relax.Expr):
        return value
    return relax.const(np.asarray(value))


def _variant(variant, causal: bool) -> AttentionVariant:
    variant = compose(variant)
    return compose(Causal(), variant) if causal else variant


def _q_config(q) -> tuple[int, int, str]:
    ty = _tensor_ty("q", q, 3)
    return _static("q", ty, 1, "num_qo_heads"), _static("q", ty, 2, "head_dim"), ty.dtype


def _paged(paged_kv_cache, kv_layout: str) -> tuple[PagedKV, int, str]:
    ty = _tensor_ty("paged_kv_cache", paged_kv_cache, 5)
    page_axis, head_axis = (2, 3) if kv_layout == "NHD" else (3, 2)
    fmt = PagedKV(_static("paged_kv_cache", ty, page_axis, "page_size"), kv_layout)
    if _static("paged_kv_cache", ty, 1, "K/V") != 2:
        raise ValueError(f"paged_kv_cache: dim 1 holds K and V and must be 2, got shape {ty.shape}")
    return fmt, _static("paged_kv_cache", ty, head_axis, "num_kv_heads"), ty.dtype


def batch_decode_with_paged_kv_cache(q, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, *,
                                     kv_layout: str = "NHD", variant=None, sm_scale=None,
                                     target: str = "llvm", **variant_args):
    """Batch decode over a paged KV cache: ``q`` ``[batch, num_qo_heads, head_dim]`` -> ``(o, lse)``.

    Example::

        o, lse = tvm_attn.relax.batch_decode_with_paged_kv_cache(q, cache, indptr, indices, last_len,
                                                                  variant=tvm_attn.LogitsSoftCap(30.0))
    """
    hq, d, q_dtype = _q_config(q)
    fmt, hkv, kv_dtype = _paged(paged_kv_cache, kv_layout)
    for name, arr in (("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                      ("kv_last_page_len", kv_last_page_len)):
        _index(name, arr)
    key = AttentionKey("decode", fmt, hq, hkv, d, q_dtype, kv_dtype, _variant(variant, False),
                       _target(target))
    return _emit_attention(key, q, [paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len], sm_scale,
                           variant_args)


def batch_prefill_with_paged_kv_cache(q, qo_indptr, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len,
                                      *, kv_layout: str = "NHD", causal: bool = False, variant=None,
                                      sm_scale=None, target: str = "llvm", **variant_args):
    """Batch prefill / append over a paged KV cache: ``q`` ``[total_qo, num_qo_heads, head_dim]``
    -> ``(o, lse)``."""
    hq, d, q_dtype = _q_config(q)
    fmt, hkv, kv_dtype = _paged(paged_kv_cache, kv_layout)
    for name, arr in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices),
                      ("kv_last_page_len", kv_last_page_len)):
        _index(name, arr)
    key = AttentionKey("prefill", fmt, hq, hkv, d, q_dtype, kv_dtype, _variant(variant, causal),
                       _target(target))
    return _emit_attention(key, q, [qo_indptr, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len],
                           sm_scale, variant_args)


def batch_prefill_with_ragged_kv_cache(q, qo_indptr, k, v, kv_indptr, *, kv_layout: str = "NHD",
                                       causal: bool = False, variant=None, sm_scale=None,
                                       target: str = "llvm", **variant_args):
    """Batch prefill over ragged K/V (``[total_kv, num_kv_heads, head_dim]`` for NHD) -> ``(o, lse)``."""
    hq, d, q_dtype = _q_config(q)
    fmt = RaggedKV(kv_layout)
    k_ty = _tensor_ty("k", k, 3)
    _tensor_ty("v", v, 3)
    hkv = _static("k", k_ty, 1 if kv_layout == "NHD" else 0, "num_kv_heads")
    for name, arr in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr)):
        _index(name, arr)
    key = AttentionKey("prefill", fmt, hq, hkv, d, q_dtype, k_ty.dtype, _variant(variant, causal),
                       _target(target))
    return _emit_attention(key, q, [qo_indptr, k, v, kv_indptr], sm_scale, variant_args)


def block_sparse_attention(q, k, v, indptr, indices, *, R: int, C: int, causal: bool = False, variant=None,
                           sm_scale=None, target: str = "llvm", **variant_args):
    """Block-sparse (BSR) attention: block row ``r`` of ``R`` query rows sees the ``C``-row key blocks
    ``indices[indptr[r]:indptr[r+1]]``; ``q`` ``[M, Hq, D]``, ``k``/``v`` ``[N, Hkv, D]`` -> ``(o, lse)``."""
    hq, d, q_dtype = _q_config(q)
    k_ty = _tensor_ty("k", k, 3)
    _tensor_ty("v", v, 3)
    for name, arr in (("indptr", indptr), ("indices", indices)):
        _index(name, arr)
    key = AttentionKey("bsr", BlockSparseKV(R, C), hq, _static("k", k_ty, 1, "num_kv_heads"), d, q_dtype,
                       k_ty.dtype, _variant(variant, causal), _target(target))
    return _emit_attention(key, q, [k, v, indptr, indices], sm_scale, variant_args)


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two attention states: ``v_*`` ``[n, H, D]``, ``s_*`` ``[n, H]`` (log2 LSE) -> ``(v, s)``."""
    ty = _tensor_ty("v_a", v_a, 3)
    return _emit_merge(MergeKey("merge_state", ty.dtype), [v_a, s_a, v_b, s_b], ty.shape.values)


def merge_states(v, s):
    """Merge ``v`` ``[n, k, H, D]`` and ``s`` ``[n, k, H]`` over the ``k`` states -> ``(v, s)``."""
    ty = _tensor_ty("v", v, 4)
    n, _, h, d = ty.shape.values
    return _emit_merge(MergeKey("merge_states", ty.dtype), [v, s], [n, h, d])


def _emit_merge(key: MergeKey, args: list, out_shape):
    from ..tir.merge import make_merge

    bb = _bb()
    names = {gv.name_hint for gv in bb.get().get_global_vars()}
    gv = bb.get().get_global_var(key.uri) if key.uri in names else bb.add_func(make_merge(key), key.uri)
    n, h, d = out_shape
    out_ty = [relax.TensorType([n, h, d], key.dtype), relax.TensorType([n, h], "float32")]
    res = bb.emit(relax.call_tir(gv, args, out_ty))
    return bb.emit(relax.TupleGetItem(res, 0)), bb.emit(relax.TupleGetItem(res, 1))


def _target(target: str) -> str:
    if target != "llvm":
        raise ValueError(
            f"target {target!r}: the Relax ops emit the portable CPU kernels (llvm); CUDA models take our "
            "kernels through the KV cache (tvm_attn.relax.kv_cache)"
        )
    return target

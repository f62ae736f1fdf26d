"""What the CUDA kernel generators share: the warp shuffle and vote, the fence and atomic add, the
16-byte cp.async copy, the planned kernels' and merge kernels' arguments, and the variant's tables
in shared memory. The softmax math lives in :mod:`tvm_attn.tir.softmax`."""

from __future__ import annotations

from typing import Any, NamedTuple

from tvm import tirx

from ..kv.index import declare_layout
from ..planner import WORK_FIELDS
from ..variants.base import HookContext
from ._builder import IRBuilder, T, buffer_param, loop, scalar_param, store, sym, when
from .attention import declare_extra_params
from .softmax import f32

FULL_MASK = 0xFFFFFFFF


def shfl_xor(value, offset: int, width: int = 32):
    return tirx.op.tvm_warp_shuffle_xor(FULL_MASK, value, offset, width, 32)


def syncwarp():
    """``__syncwarp()``: the lanes of the warp meet (and see each other's shared-memory writes)."""
    T.evaluate(tirx.call_extern("void", "__syncwarp", tirx.const(FULL_MASK, "uint32")))


def thread_fence():
    """``__threadfence()``: this thread's global-memory writes are seen device-wide before its later
    ones (and, after an atomic that saw other blocks' fenced writes, their writes are seen here)."""
    T.evaluate(tirx.call_extern("void", "__threadfence"))


def atomic_add(buf, value, *indices):
    """``atomicAdd(&buf[indices], value)``: the value before the add."""
    address = tirx.address_of(tirx.BufferLoad(buf, list(indices)))
    return tirx.call_extern(buf.dtype, "atomicAdd", address, value)


def smem_ptr(buf, indices, mode: str, extent: int = 8):
    """Address of ``buf[indices]`` for an instruction that touches ``extent`` elements there (the
    extent keeps TVM from shrinking the buffer to the elements it sees indexed).

    Shared-memory operands carry an empty access mask: the kernels place their own barriers (or
    need none, where each thread reads back only what it copied), and TVM's ThreadSync pass, which
    cannot prove that a pipeline stage or a warp's rows are disjoint from the others, would add more."""
    mask = 0 if buf.scope().startswith("shared") else mode
    return buf.access_ptr(mask, offset=buf.offset_of(list(indices))[0], extent=extent)


def cp_async(dst, dst_ix, src, src_ix, valid=None):
    """16-byte global -> shared copy that bypasses L1 (``cp.async.cg``); where ``valid`` is false it
    reads nothing and writes 16 zero bytes (the src-size form with size 0)."""
    args = [smem_ptr(dst, dst_ix, "w"), smem_ptr(src, src_ix, "r"), 16]
    if valid is not None:
        args.append(tirx.Cast("uint32", tirx.Select(valid, tirx.const(16, "int32"), tirx.const(0, "int32"))))
    T.evaluate(T.ptx["cp.async.cg.shared.global"](*args))


def warp_any(pred):
    """``__any_sync``: non-zero in every lane when ``pred`` is non-zero in some lane of the warp."""
    return tirx.call_extern("int32", "__any_sync", tirx.const(FULL_MASK, "uint32"), pred)


def _name_kernel(name: str) -> None:
    """Name the PrimFunc being built: a scheduled CUDA kernel whose buffer arguments do not alias."""
    T.func_name(name)
    T.func_attr({"global_symbol": name, "tir.noalias": True, "tirx.is_scheduled": True})


class KernelArgs(NamedTuple):
    """A planned kernel's arguments (:func:`kernel_params`); ``merge`` is ``(merge_indptr,
    merge_count)`` for a kernel that merges its own partial states, else None."""

    idx: Any  # the format's query/KV arguments and index math (tvm_attn.kv.index)
    num_ctas: Any
    work_info: tirx.Buffer  # [Work field, work]: work_info[Work.KV_END, w] (tvm_attn.planner.Work)
    cta_indptr: tirx.Buffer
    tmp_o: tirx.Buffer
    tmp_lse: tirx.Buffer
    merge: Any
    o: tirx.Buffer
    lse: tirx.Buffer
    sm_scale: tirx.Var
    params: dict


def kernel_params(key, part_heads: int, merge_blocks: int = 0) -> KernelArgs:
    """Name a planned kernel ``key.uri`` and declare its arguments in the order the wrappers and the
    KV-cache backend pass them: the format's query/KV arguments, ``work_info, cta_indptr`` (the
    planner's work list), ``tmp_o, tmp_lse`` (partial states of ``part_heads`` heads per row),
    with ``merge_blocks`` (a kernel that merges its own partial states) ``merge_indptr`` and
    ``merge_count`` (int32 ``[max_rows, merge_blocks]``, zero between launches), then ``o, lse,
    sm_scale`` and the variant's extras. The index and work arrays are views into the plan's one
    staging array (tvm_attn.planner.PlanBuffers)."""
    _name_kernel(key.uri)
    idx = declare_layout(key, offsets=True)
    max_works, num_ctas_plus_one, max_partials = sym("max_works"), sym("num_ctas_plus_1"), sym("max_partials")
    work_info = buffer_param("work_info", (WORK_FIELDS, max_works), "int32", offset=True)
    cta_indptr = buffer_param("cta_indptr", (num_ctas_plus_one,), "int32", offset=True)
    tmp_o = buffer_param("tmp_o", (max_partials, part_heads, key.head_dim), "float32")
    tmp_lse = buffer_param("tmp_lse", (max_partials, part_heads), "float32")
    merge = None
    if merge_blocks:
        rows_plus_one = sym("max_rows_plus_1")
        merge = (buffer_param("merge_indptr", (rows_plus_one,), "int32", offset=True),
                 buffer_param("merge_count", (rows_plus_one - 1, merge_blocks), "int32", offset=True))
    o = buffer_param("o", (idx.num_q_rows, key.num_qo_heads, key.head_dim), key.o_dtype)
    lse = buffer_param("lse", (idx.num_q_rows, key.num_qo_heads), "float32")
    sm_scale = scalar_param("sm_scale", "float32")
    params = declare_extra_params(key)
    return KernelArgs(idx, num_ctas_plus_one - 1, work_info, cta_indptr, tmp_o, tmp_lse, merge, o, lse,
                      sm_scale, params)


def merge_params(key, part_heads: int, rows: str, out_rows: str):
    """Name a merge kernel ``<key.uri>_merge`` and declare its ``merge_indptr, tmp_o, tmp_lse, o,
    lse, *extras`` (partial rows of ``part_heads`` heads; ``merge_indptr`` a view into the plan's
    staging array, with symbolic size ``<rows>_plus_1``; ``o``/``lse`` with ``out_rows`` rows);
    returns (rows_plus_one, merge_indptr, tmp_o, tmp_lse, o, lse, params)."""
    _name_kernel(key.uri + "_merge")
    D = key.head_dim
    rows_plus_one, max_partials, num_out = sym(f"{rows}_plus_1"), sym("max_partials"), sym(out_rows)
    merge_indptr = buffer_param("merge_indptr", (rows_plus_one,), "int32", offset=True)
    tmp_o = buffer_param("tmp_o", (max_partials, part_heads, D), "float32")
    tmp_lse = buffer_param("tmp_lse", (max_partials, part_heads), "float32")
    o = buffer_param("o", (num_out, key.num_qo_heads, D), key.o_dtype)
    lse = buffer_param("lse", (num_out, key.num_qo_heads), "float32")
    params = declare_extra_params(key)  # the kernel's call shape (the prefill merge reads none)
    return rows_plus_one, merge_indptr, tmp_o, tmp_lse, o, lse, params


def stage_tables(variant, head_dim: int, params: dict, tid, threads: int) -> dict:
    """Compute each of the variant's :class:`~tvm_attn.variants.DimTable` s once per block into
    shared memory (thread ``tid`` of ``threads`` fills entries ``tid, tid + threads, ...``); returns
    name -> buffer for ``HookContext.tables``, after a block barrier (none without tables)."""
    tables = {}
    ctx = HookContext(None, None, None, None, None, None, None, head_dim, params)
    for table in variant.tables(head_dim):
        buf = T.alloc_buffer((table.size,), "float32", scope="shared")
        IRBuilder.name(table.name, buf)
        with loop("ti", -(-table.size // threads)) as ti:
            i = ti * threads + tid
            with when(i < table.size):
                store(buf, f32(table.value(ctx, i)), i)
        tables[table.name] = buf
    if tables:
        T.evaluate(tirx.op.tvm_storage_sync("shared"))
    return tables

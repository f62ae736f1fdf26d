"""The planner's host side: workspace sizes, and the call of the planner kernel.

The split-KV plan itself is computed by a host TIR function compiled into every CUDA kernel module
(:mod:`tvm_attn.tir.plan`), so Python and C++ callers run the same code; decode and prefill share it.
This module sizes the workspace once per wrapper (``decode_workspace_size`` and
``prefill_workspace_size`` tell the bytes), runs the planner on host tensors, and turns a failed
plan into a ValueError that says which capacity was too small.

Workspace (sized by the wrapper's maxima, never by a step's lengths, so the buffers and the grid
stay put for CUDA graphs):

* ``work_info`` int32 ``[6, max_works]``, ``cta_indptr`` int32 ``[num_ctas + 1]`` and ``merge_indptr``
  int32 ``[max_rows + 1]`` (decode: a row per request; prefill: a row per GQA-packed query row);
* ``tmp_o`` float32 ``[max_partials, part_heads, head_dim]`` and ``tmp_lse`` float32
  ``[max_partials, part_heads]``, the partial states of split items (decode: all query heads of a
  request per row; prefill: one packed row, for each KV head);
* decode only: ``merge_count`` int32 ``[max_rows, merge_blocks]``, the finished pieces of each
  request for each block row of the grid (the decode kernel merges a cut request in the block that
  finishes its last piece); zero after every upload and every launch.

The grid is ``num_ctas = num_sms * blocks_per_sm / (blocks per work)`` persistent CTAs; every CTA
boundary cuts at most one item, so ``max_works = max_items + num_ctas``.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi

from .schedule.decode import DecodeTiles

class Work(enum.IntEnum):
    """The fields of a work record: ``work_info[Work.KV_END, w]`` is work ``w``'s end key. One
    record per work, in CTA order; the planner writes them, the kernels and the KV-cache backend
    read them (see :mod:`tvm_attn.tir.plan` for what each field means)."""

    REQUEST = 0  # the request (-1: padding, no work)
    KV_BEGIN = 1  # first key of the piece
    KV_END = 2  # one past its last key
    OUT_ROW = 3  # -1: write o directly; else the first partial-state row of the piece
    ROW_BEGIN = 4  # the item's first GQA-packed query row
    OUT_STRIDE = 5  # partial rows between packed rows of the piece


#: rows of work_info
WORK_FIELDS = len(Work)

#: name of the planner function inside every CUDA kernel module (see tvm_attn.tir.plan)
PLAN = "tvm_attn_plan"
#: name of the decode plan beside it: page-table check, staging and planner in one call
#: (see tvm_attn.tir.plan.make_decode_plan)
PLAN_DECODE = "tvm_attn_plan_decode"
#: the planner's failure codes -> the capacity that was too small
STATUS = {1: "max_works", 2: "max_partials", 3: "max_rows"}
#: the decode plan's failure codes beyond those: a page table that breaks a rule, a layout too small
STATUS_PAGE_TABLE, STATUS_LAYOUT = 4, 5
#: fields of the decode plan's ``layout`` argument: where the staging array's regions start, and sizes
DECODE_LAYOUT = ("work_at", "max_works", "cta_at", "merge_at", "max_rows", "indptr_at", "indices_at", "last_at",
                 "max_partials")

#: decode: cost of a work beyond its keys (loading q, merging key groups, storing), in keys: ~ one unrolled step
WORK_OVERHEAD = 32
#: decode: whole requests are packed (no cuts) when every CTA stays within quota * (1 + 1/PACK_SLACK_DIV)
PACK_SLACK_DIV = 10
#: prefill: the same 10%. Measured on an H100, 2% (more cuts, partial states and a merge over every
#: packed row) was 7-30% slower than 10% on the dense workloads of scripts/bench_prefill.py
PREFILL_PACK_SLACK_DIV = 10
#: the shortest piece cut to fill a CTA's last room (a CTA then exceeds its quota by at most this)
MIN_PIECE = 16


def prefill_work_overhead(tile_q: int) -> int:
    """Prefill: a work's cost beyond its keys, in keys: loading the query tile and writing the
    output cost about as much as half a key per query row (alpha / beta of the paper's model)."""
    return 32 + tile_q // 2


@dataclass(frozen=True)
class Workspace:
    max_rows: int
    num_ctas: int
    max_works: int
    max_partials: int
    part_heads: int
    head_dim: int
    #: blocks of the grid's y dimension that each keep a count per request (decode; 0: none)
    merge_blocks: int = 0

    @property
    def int_bytes(self) -> int:
        return 4 * (6 * self.max_works + self.num_ctas + 1 + self.max_rows + 1
                    + self.max_rows * self.merge_blocks)

    @property
    def float_bytes(self) -> int:
        return 4 * self.max_partials * self.part_heads * (self.head_dim + 1)


def decode_workspace(max_batch_size: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                     tiles: DecodeTiles, num_sms: int) -> Workspace:
    """Decode: one item per request; a partial row holds all query heads of a request."""
    head_splits = (num_qo_heads // num_kv_heads) // tiles.heads_per_block
    blocks_y = num_kv_heads * head_splits
    num_ctas = max(1, num_sms * tiles.blocks_per_sm // blocks_y)
    max_works = max_batch_size + num_ctas
    return Workspace(max_batch_size, num_ctas, max_works, max_works, num_qo_heads, head_dim, blocks_y)


def prefill_workspace(max_num_tokens: int, max_batch_size: int, num_qo_heads: int, num_kv_heads: int,
                      head_dim: int, tiles, num_sms: int) -> Workspace:
    """Prefill: an item per query tile of ``tiles.tile_q`` packed rows. A cut item of ``n`` pieces
    has ``n`` partial rows per packed row, and the pieces of all cut items number at most twice the
    CTA boundaries, so ``max_partials = 2 * num_ctas * tile_q``."""
    group = num_qo_heads // num_kv_heads
    num_ctas = max(1, num_sms * tiles.blocks_per_sm // num_kv_heads)
    max_rows = max_num_tokens * group
    max_items = -(-max_rows // tiles.tile_q) + max_batch_size
    return Workspace(max_rows, num_ctas, max_items + num_ctas, 2 * num_ctas * tiles.tile_q, num_kv_heads, head_dim)


def decode_workspace_size(max_batch_size: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                          kv_dtype: str = "float16", num_sms: int = 132) -> int:
    """Bytes of device workspace a CUDA decode wrapper needs (int + float parts)."""
    from .schedule.decode import choose_decode_tiles

    tiles = choose_decode_tiles(head_dim, kv_dtype, num_qo_heads // num_kv_heads)  # plain variants
    ws = decode_workspace(max_batch_size, num_qo_heads, num_kv_heads, head_dim, tiles, num_sms)
    return ws.int_bytes + ws.float_bytes


def prefill_workspace_size(max_num_tokens: int, max_batch_size: int, num_qo_heads: int, num_kv_heads: int,
                           head_dim: int, num_sms: int = 132) -> int:
    """Bytes of device workspace a CUDA prefill wrapper needs, with the largest query tile."""
    from .schedule.prefill import choose_prefill_tiles

    tiles = choose_prefill_tiles(head_dim)
    ws = prefill_workspace(max_num_tokens, max_batch_size, num_qo_heads, num_kv_heads, head_dim, tiles, num_sms)
    return ws.int_bytes + ws.float_bytes


#: int32 elements between the starts of the regions of the staging buffer (64 bytes)
_ALIGN = 16


#: DLPack's device type of page-locked host memory (cudaMallocHost)
_CUDA_HOST = 3


def _staging(n: int, device):
    """A host int32 array of ``n`` entries to copy to ``device`` from, and the TVM tensor over the
    same memory (``None`` for plain numpy memory). For a CUDA device it is page-locked: on the H100
    host, copying 9000 entries (a batch-64 plan with its page table) took 1.9-3.5 us from it against
    20 us from numpy's memory. TVM copies between tensors with no stream by ``cudaMemcpy``, which
    returns once a copy from page-locked memory is done, so the next plan may rewrite the array.
    Falls back to numpy memory where the runtime has no page-locked allocator."""
    if device.dlpack_device_type() != 2:
        return np.zeros(n, np.int32), None
    try:
        pinned = tvm.runtime.empty((n,), "int32", tvm.runtime.Device(_CUDA_HOST, device.index))
        host = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(pinned.data_ptr()))
        host[:] = np.arange(n, dtype=np.int32)
        if not np.array_equal(pinned.numpy(), host):  # the address is not where TVM's tensor lives
            return np.zeros(n, np.int32), None
        host[:] = 0
        return host, pinned
    except Exception:  # noqa: BLE001 -- no page-locked memory here: plain memory works, slower
        return np.zeros(n, np.int32), None


def _host_arg(a: np.ndarray):
    """A host int32 array as a TVM function argument: the array itself, which TVM takes through
    DLPack without a copy (~0.1 us faster per array than ``tvm_ffi.from_dlpack``), else a copy:
    numpy shares no read-only array, and gives an empty one strides TVM does not take as compact."""
    if a.size and a.flags.writeable:
        return a
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


class PlanBuffers:
    """Host and device buffers of one wrapper's plan, allocated once.

    Every int array a plan sends to the device (the planner's work list, CTA and merge offsets, and
    the step's index arrays, in slots of ``index_capacity`` entries) lives in one host staging array
    and one device array of the same layout, so a plan moves them with one copy; the device arrays
    the kernels get are views into it (the CUDA kernels take index and work arrays with an offset).
    The planner writes its output straight into the staging array; the decode kernel's merge counts
    stay zero there, so each upload also zeroes them on the device."""

    #: the fixed regions (work_info, cta_indptr, merge_indptr, merge_count) before the index slots
    _FIXED = 4

    def __init__(self, ws: Workspace, device, index_capacity: tuple[int, ...] = ()):
        self.ws = ws
        sizes = [6 * ws.max_works, ws.num_ctas + 1, ws.max_rows + 1, ws.max_rows * ws.merge_blocks,
                 *(max(int(c), 1) for c in index_capacity)]
        starts = np.concatenate([[0], np.cumsum([-(-size // _ALIGN) * _ALIGN for size in sizes])]).tolist()
        end = starts.pop()
        # every upload copies the fixed regions
        self._fixed_end = starts[self._FIXED] if len(sizes) > self._FIXED else end
        self._starts, self.index_capacity = starts, tuple(sizes[self._FIXED:])
        self.host, self._pinned = _staging(end, device)
        self._dev = tvm.runtime.empty((end,), "int32", device)
        self.host_work = self.host[starts[0]: starts[0] + sizes[0]].reshape(6, ws.max_works)
        self.host_cta = self.host[starts[1]: starts[1] + sizes[1]]
        self.host_merge = self.host[starts[2]: starts[2] + sizes[2]]
        self.host_stats = np.zeros(4, np.int32)
        #: the planner's output arguments (work_info, cta_indptr, merge_indptr, stats): zero-copy views
        self.planner_outputs = tuple(tvm_ffi.from_dlpack(a) for a in (self.host_work, self.host_cta,
                                                                       self.host_merge, self.host_stats))
        self.work_info = self._view(starts[0], (6, ws.max_works))
        self.cta_indptr = self._view(starts[1], (ws.num_ctas + 1,))
        self.merge_indptr = self._view(starts[2], (ws.max_rows + 1,))
        #: the decode kernel's (merge_indptr, merge_count) arguments; () for prefill
        self.merge_state = ((self.merge_indptr, self._view(starts[3], (ws.max_rows, ws.merge_blocks)))
                            if ws.merge_blocks else ())
        self.tmp_o = tvm.runtime.empty((ws.max_partials, ws.part_heads, ws.head_dim), "float32", device)
        self.tmp_lse = tvm.runtime.empty((ws.max_partials, ws.part_heads), "float32", device)
        self.num_partials = 0
        self._views: dict = {}
        self._decode_args = None  # plan_decode's staging, layout and stats arguments, made on first use
        self._decode_views = (None, (), 0)  # plan_decode's (table shape, device views, staged entries)

    def _view(self, start: int, shape: tuple):
        return self._dev._create_view(shape, relative_byte_offset=4 * start)

    def fits(self, sizes) -> bool:
        """Whether index arrays of ``sizes`` entries fit the slots."""
        if len(sizes) > len(self.index_capacity):
            return False
        for n, c in zip(sizes, self.index_capacity):
            if n > c:
                return False
        return True

    def plan(self, planner, qo_indptr: np.ndarray, kv_indptr: np.ndarray, last_page_len: np.ndarray,
             page_size: int, allow_split: bool, group_size: int = 1, tile_q: int = 1, causal: bool = False,
             work_overhead: int = WORK_OVERHEAD, pack_slack_div: int = PACK_SLACK_DIV):
        """Run the planner on host arrays (its output lands in the staging array; :meth:`upload`
        sends it); returns (num_works, num_partials, quota)."""
        planner(
            _host_arg(qo_indptr), _host_arg(kv_indptr), _host_arg(last_page_len), *self.planner_outputs,
            self.ws.max_partials, page_size, int(allow_split), group_size, tile_q,
            int(causal), work_overhead, pack_slack_div,
        )
        num_works, num_partials, quota, status = self.host_stats.tolist()
        if status:
            raise ValueError(self._capacity_message(status, len(kv_indptr) - 1, num_works, num_partials,
                                                    int(qo_indptr[-1]) * group_size))
        self.num_partials = num_partials
        return num_works, num_partials, quota

    def plan_decode(self, plan_fn, fmt, indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray,
                    allow_split: bool, pad: tuple[int, int] | None = None, window_left: int = -1):
        """A decode plan in one host call (:func:`tvm_attn.tir.plan.make_decode_plan`): check the
        page table, stage it (padded to ``pad = (batch, pages)`` under CUDA graphs) and plan (only
        the last ``window_left + 1`` keys of each request when ``window_left >= 0``); then send plan
        and table to the device in one copy. Returns (largest page id in use, the device views of
        the staged kv_indptr, kv_indices and kv_last_page_len). A page table that breaks a rule
        raises ``fmt.validate``'s error; a workspace too small raises a ValueError that says which
        capacity."""
        batch, used = indptr.size - 1, int(indptr[-1])
        pad_batch, pad_pages = pad if pad is not None else (batch, -1)
        args = self._decode_args
        if args is None:
            ws, at = self.ws, self._starts
            fields = dict(work_at=at[0], max_works=ws.max_works, cta_at=at[1], merge_at=at[2], max_rows=ws.max_rows,
                          indptr_at=at[4], indices_at=at[5], last_at=at[6], max_partials=ws.max_partials)
            self._layout = np.array([fields[f] for f in DECODE_LAYOUT], np.int32)
            self._decode_stats = np.zeros(5, np.int32)
            args = self._decode_args = tuple(tvm_ffi.from_dlpack(a) for a in (self.host, self._layout,
                                                                              self._decode_stats))
        plan_fn(_host_arg(indptr), _host_arg(indices), _host_arg(last_page_len), *args, self.ws.num_ctas,
                fmt.page_size, int(allow_split), pad_batch, pad_pages, WORK_OVERHEAD, PACK_SLACK_DIV, window_left)
        num_works, num_partials, _, status, max_page = self._decode_stats.tolist()
        if status in (STATUS_PAGE_TABLE, STATUS_LAYOUT):
            fmt.validate(indptr, indices, last_page_len)  # names the fault
            if status == STATUS_PAGE_TABLE:
                raise ValueError("plan: the page table breaks a rule of PagedKV.validate that it did not name")
            raise ValueError(f"plan: the page table ({batch} requests, {used} pages) exceeds the workspace's "
                             f"slots {self.index_capacity} (padded to {pad})")
        if status:
            raise ValueError(self._capacity_message(status, batch, num_works, num_partials, batch))
        self.num_partials = num_partials
        shape = (pad_batch, used if pad_pages < 0 else pad_pages)
        if self._decode_views[0] != shape:  # kept while the shape repeats, as it does under CUDA graphs
            at = self._starts[self._FIXED:]
            self._decode_views = shape, (self._view(at[0], (shape[0] + 1,)), self._view(at[1], (shape[1],)),
                                         self._view(at[2], (shape[0],))), at[2] + shape[0]
        _, views, end = self._decode_views
        self._send(end)
        return max_page, views

    def _capacity_message(self, status: int, batch: int, num_works: int, num_partials: int, rows: int) -> str:
        return (f"plan: the workspace is too small ({STATUS[status]}): the batch has {batch} requests and "
                f"needs {num_works} works / {num_partials} partial rows / {rows} rows, but the wrapper was "
                f"sized for max_rows={self.ws.max_rows}, max_works={self.ws.max_works}, "
                f"max_partials={self.ws.max_partials}; create the wrapper with larger maxima")

    def upload(self, index_arrays=()) -> tuple:
        """Copy the plan and ``index_arrays`` (int32, one per slot) to the device in one transfer;
        returns the device views of the index arrays."""
        if not self.fits([a.size for a in index_arrays]):
            raise ValueError(f"plan: index arrays of {[a.size for a in index_arrays]} entries exceed the "
                             f"workspace's slots {self.index_capacity}")
        views, end = [], self._fixed_end
        for slot, a in enumerate(index_arrays):
            start = self._starts[self._FIXED + slot]
            self.host[start: start + a.size] = a
            end = start + a.size
            views.append(self._last_view(slot, start, a.size))
        self._send(end)
        return tuple(views)

    def _send(self, end: int) -> None:
        """Copy the staging array's first ``end`` entries to the device."""
        dst = self._last_view("copy", 0, end)
        if self._pinned is None:
            dst.copyfrom(self.host[:end])
        else:
            src = self._views.get("pinned")
            if src is None or src.shape[0] != end:
                src = self._views["pinned"] = self._pinned._create_view((end,))
            src.copyto(dst)

    def _last_view(self, slot, start: int, size: int):
        """The device view of ``size`` entries at ``start``, kept while the size repeats (as it does
        step after step in a steady batch, and always under CUDA graphs)."""
        view = self._views.get(slot)
        if view is None or view.shape[0] != size:
            view = self._views[slot] = self._view(start, (size,))
        return view


GLOBAL_NAME = "tvm_attn.plan"


def register_global_planner(cache=None):
    """Register the planner as the global packed function ``tvm_attn.plan`` (same arguments as
    :func:`tvm_attn.tir.plan.make_planner`); returns it. C++ callers of an exported kernel
    module can equally call its ``tvm_attn_plan`` function."""
    import tvm_ffi

    from .cache import get_cache
    from .config import PlannerKey

    key = PlannerKey()
    fn = (cache or get_cache()).get(key)
    tvm_ffi.register_global_func(GLOBAL_NAME, fn, override=True)
    return fn


__all__ = ["register_global_planner", "GLOBAL_NAME", "Workspace", "decode_workspace", "decode_workspace_size",
           "prefill_workspace", "prefill_workspace_size", "PlanBuffers", "PLAN", "PLAN_DECODE"]

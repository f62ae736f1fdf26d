"""The planner's host side: workspace sizes, and the call of the planner kernel.

The split-KV plan itself is computed by a host TIR function compiled into every CUDA kernel module
(:mod:`tvm_attn.tir.plan`), so Python and C++ callers run the same code; decode and prefill share it.
This module sizes the workspace once per wrapper (``decode_workspace_size`` and
``prefill_workspace_size`` tell the bytes), runs the planner on host tensors, and turns a failed
plan into a ValueError that says which capacity was too small.

Workspace (sized by the wrapper's maxima, never by a step's lengths, so the buffers and the grid
stay put for CUDA graphs):

* ``work_info`` int32 ``[7, max_works]``, ``cta_indptr`` int32 ``[num_ctas + 1]`` and ``merge_indptr``
  int32 ``[max_rows + 1]`` (decode: a row per request; prefill: a row per GQA-packed query row);
* ``tmp_o`` float32 ``[max_partials, part_heads, head_dim]`` and ``tmp_lse`` float32
  ``[max_partials, part_heads]``, the partial states of split items (decode: all query heads of a
  request per row; prefill: one packed row, for each KV head);
* decode only: ``merge_count`` int32 ``[max_rows, merge_blocks]``, the finished pieces of each
  request for each block row of the grid (the decode kernel merges a cut request in the block that
  finishes its last piece); zero after every upload and every launch.

The grid is ``num_ctas = num_sms * blocks_per_sm / (blocks per work)`` persistent CTAs; every CTA
boundary cuts at most one item, so ``max_works = max_items + num_ctas``. A prefill family whose
tiles fold the KV heads into the work list (``tiles.fold_heads``: one CTA per SM, where a grid of
``(num_sms // num_kv_heads, num_kv_heads)`` would leave SMs idle) plans every item once per head
over a grid of ``num_sms * blocks_per_sm`` CTAs (``PlanParams.kv_heads``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
from dataclasses import dataclass

import numpy as np
import tvm
import tvm_ffi

from .schedule.decode import DecodeTiles
from .tensor import ALIGNMENT, aligned_zeros, is_aligned


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
    KV_HEAD = 6  # the KV head (plans with kv_heads > 1; else 0, and the grid's y dimension is the head)


#: rows of work_info
WORK_FIELDS = len(Work)


class Stat(enum.IntEnum):
    """The fields of the planner's ``stats`` output (the decode plan adds ``MAX_PAGE``)."""

    NUM_WORKS = 0
    NUM_PARTIALS = 1
    QUOTA = 2  # each CTA's share of the cost
    STATUS = 3  # a :class:`Status`
    MAX_PAGE = 4  # decode plan: the largest page id in use (-1: none)


#: entries of the planner's ``stats``; the decode plan's has one more
PLAN_STATS = Stat.STATUS + 1
DECODE_PLAN_STATS = len(Stat)


class Status(enum.IntEnum):
    """``stats[Stat.STATUS]``: 0 is success; a failed plan runs no work."""

    OK = 0
    MAX_WORKS = 1  # more works than work_info holds
    MAX_PARTIALS = 2  # more partial-state rows than tmp_o holds
    MAX_ROWS = 3  # more GQA-packed query rows than merge_indptr holds
    PAGE_TABLE = 4  # decode plan: the page table breaks a rule of PagedKV.validate
    LAYOUT = 5  # decode plan: the staging layout is too small for the padded table


#: the planner's failure codes -> the capacity that was too small
STATUS = {s.value: s.name.lower() for s in (Status.MAX_WORKS, Status.MAX_PARTIALS, Status.MAX_ROWS)}

#: name of the planner function inside every CUDA kernel module (see tvm_attn.tir.plan)
PLAN = "tvm_attn_plan"
#: name of the decode plan beside it: page-table check, staging and planner in one call
#: (see tvm_attn.tir.plan.make_decode_plan)
PLAN_DECODE = "tvm_attn_plan_decode"
#: fields of the decode plan's ``layout`` argument: where the staging array's regions start, and sizes
DECODE_LAYOUT = ("work_at", "max_works", "cta_at", "merge_at", "max_rows", "indptr_at", "indices_at",
                 "last_at", "max_partials")

#: decode: cost of a work beyond its keys (loading q, merging key groups, storing), in keys: ~ one
#: unrolled step
WORK_OVERHEAD = 32
#: decode: whole requests are packed (no cuts) when every CTA stays within quota * (1 + 1/PACK_SLACK_DIV)
PACK_SLACK_DIV = 10
#: prefill: the same 10%. Measured on an H100, 2% (more cuts, partial states and a merge over every
#: packed row) was 7-30% slower than 10% on the dense workloads of scripts/bench_prefill.py
PREFILL_PACK_SLACK_DIV = 10
#: the shortest piece cut to fill a CTA's last room (a CTA then exceeds its quota by at most this)
MIN_PIECE = 16
#: ``window_left`` of a plan without a sliding window
NO_WINDOW = -1


def _scalar(meaning: str, default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={"meaning": meaning})


@dataclass(frozen=True)
class PlanParams:
    """The planner's scalar arguments by name, in the order of its signature (every one int32).

    Python callers build one from named values and call ``planner(*arrays, *params.args())``; the
    TIR planner holds its scalar parameters (TIR variables) in one; the C++ KV-cache backend gets
    the order from a generated header (:func:`scalars_struct`)."""

    max_partials: int = _scalar("rows of tmp_o / tmp_lse, the partial states of cut items")
    page_size: int = _scalar("keys per page (ragged KV: 1; block-sparse: the block's columns)")
    allow_split: int = _scalar("0: never cut an item (deterministic, batch-invariant plans)")
    group_size: int = _scalar("query heads per KV head: GQA-packed rows per query token", 1)
    tile_q: int = _scalar("GQA-packed query rows per work item", 1)
    causal: int = _scalar("non-zero: an item reads only the keys its last row sees", 0)
    window_left: int = _scalar("sliding window: an item reads no key more than this left of its first row "
                               "(-1: none)", NO_WINDOW)
    work_overhead: int = _scalar("a work's cost beyond its keys, in keys", WORK_OVERHEAD)
    pack_slack_div: int = _scalar("pack whole items when no CTA exceeds its quota by more than 1/this",
                                  PACK_SLACK_DIV)
    kv_heads: int = _scalar("KV heads planned into the work list, each item once per head (Work.KV_HEAD); "
                            "1: the grid's y dimension is the head", 1)

    def args(self) -> tuple:
        """The values in signature order (``int`` for a bool)."""
        return tuple(_int(getattr(self, f.name)) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class DecodePlanParams:
    """The decode plan's scalar arguments (:func:`tvm_attn.tir.plan.make_decode_plan`), by name."""

    num_ctas: int = _scalar("CTAs of the persistent grid (sizes the planner's host scratch)")
    page_size: int = _scalar("keys per page")
    allow_split: int = _scalar("0: never cut a request")
    pad_batch: int = _scalar("requests of the staged table, >= the batch (the rest have no pages)")
    pad_pages: int = _scalar("page ids of the staged table, >= kv_indptr[-1] (-1: exactly that)")
    work_overhead: int = _scalar("a work's cost beyond its keys, in keys", WORK_OVERHEAD)
    pack_slack_div: int = _scalar("pack whole requests when no CTA exceeds its quota by more than 1/this",
                                  PACK_SLACK_DIV)
    window_left: int = _scalar("sliding window: plan only each request's last window_left + 1 keys (-1: all)",
                               NO_WINDOW)

    args = PlanParams.args


def _int(v):
    return int(v) if isinstance(v, (bool, int, np.integer)) else v


def prefill_work_overhead(tile_q: int) -> int:
    """Prefill: a work's cost beyond its keys, in keys: loading the query tile and writing the
    output cost about as much as half a key per query row (alpha / beta of the paper's model)."""
    return 32 + tile_q // 2


def ceildiv(a, b):
    """``ceil(a / b)`` of non-negative ``a`` and positive ``b`` (ints, or :class:`CExpr`)."""
    return (a + b - 1) // b


def imax(a, b):
    """``max(a, b)`` of ints, or of :class:`CExpr` (the sizing rules below run on both)."""
    if isinstance(a, CExpr) or isinstance(b, CExpr):
        return CExpr(f"std::max<int64_t>({a}, {b})")
    return max(a, b)


class CExpr:
    """An int64 C++ expression. The workspace sizing rules of this module run on these as well as
    on ints, so that the KV-cache backend's generated header (:mod:`tvm_attn.relax.kv_backend`)
    sizes its workspace with the same rules, not a retyped copy. Every operand is a non-negative
    size, where C++'s ``/`` is Python's ``//``."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self):
        return self.text

    def _op(self, op: str, other, swap: bool = False) -> "CExpr":
        a, b = (other, self) if swap else (self, other)
        return CExpr(f"({a} {op} {b})")

    def __add__(self, o):
        return self._op("+", o)

    def __radd__(self, o):
        return self._op("+", o, True)

    def __sub__(self, o):
        return self._op("-", o)

    def __rsub__(self, o):
        return self._op("-", o, True)

    def __mul__(self, o):
        return self._op("*", o)

    def __rmul__(self, o):
        return self._op("*", o, True)

    def __floordiv__(self, o):
        return self._op("/", o)

    def __rfloordiv__(self, o):
        return self._op("/", o, True)


@dataclass(frozen=True)
class Workspace:
    """One plan's capacities, and the regions of its int32 and float32 workspaces they size."""

    max_rows: int
    num_ctas: int
    max_works: int
    max_partials: int
    part_heads: int
    head_dim: int
    #: blocks of the grid's y dimension that each keep a count per request (decode; 0: none)
    merge_blocks: int = 0

    def int_regions(self) -> tuple:
        """``(name, shape)`` of the int32 arrays, in the order a layout stores them, each from a
        multiple of :data:`REGION_ALIGN` elements."""
        return (("work_info", (WORK_FIELDS, self.max_works)), ("cta_indptr", (self.num_ctas + 1,)),
                ("merge_indptr", (self.max_rows + 1,)), ("merge_count", (self.max_rows, self.merge_blocks)))

    def float_regions(self) -> tuple:
        """``(name, shape)`` of the float32 arrays: the partial states of cut items."""
        return (("tmp_o", (self.max_partials, self.part_heads, self.head_dim)),
                ("tmp_lse", (self.max_partials, self.part_heads)))

    @property
    def int_bytes(self) -> int:
        return 4 * sum(region_size(_elems(shape)) for _, shape in self.int_regions())

    @property
    def float_bytes(self) -> int:
        return 4 * sum(region_size(_elems(shape)) for _, shape in self.float_regions())


#: int32 / float32 elements a workspace region's start is a multiple of: 64 bytes, the alignment
#: TVM's compiled functions assume of every array argument (:data:`tvm_attn.tensor.ALIGNMENT`);
#: LLVM's SSE loads of the planner's cta_indptr faulted on a region 8 bytes off it
REGION_ALIGN = ALIGNMENT // 4


def region_size(n):
    """Elements a region of ``n`` takes, padded to the next region's aligned start (ints or
    :class:`CExpr`)."""
    return (n + (REGION_ALIGN - 1)) // REGION_ALIGN * REGION_ALIGN


def _elems(shape):
    n = 1
    for d in shape:
        n = n * d
    return n


def grid_ctas(num_sms, blocks_per_sm, blocks_per_work):
    """The persistent grid: CTAs that fill every SM, ``blocks_per_work`` CTAs per work."""
    return imax(1, num_sms * blocks_per_sm // blocks_per_work)


def decode_blocks_per_work(num_qo_heads: int, num_kv_heads: int, tiles: DecodeTiles) -> int:
    """The decode grid's y dimension: a block per KV head and split of its query heads."""
    return num_kv_heads * ((num_qo_heads // num_kv_heads) // tiles.heads_per_block)


def decode_capacity(max_batch, num_ctas, num_qo_heads, head_dim, blocks_per_work) -> Workspace:
    """Decode: one item per request; a partial row holds all query heads of a request; every CTA
    boundary cuts at most one item."""
    max_works = max_batch + num_ctas
    return Workspace(max_batch, num_ctas, max_works, max_works, num_qo_heads, head_dim, blocks_per_work)


def prefill_capacity(max_tokens, max_batch, num_ctas, tile_q, group_size, num_kv_heads,
                     head_dim, planned_heads=1) -> Workspace:
    """Prefill: an item per query tile of ``tile_q`` packed rows (each request's last tile may be
    partial). A cut item of ``n`` pieces has ``n`` partial rows per packed row, and the pieces of all
    cut items number at most twice the CTA boundaries, so ``max_partials = 2 * num_ctas * tile_q``.
    ``planned_heads`` KV heads in the work list (:attr:`PlanParams.kv_heads`): each item is a work
    per head, and a cut plan cuts one head's items over ``num_ctas // planned_heads`` CTAs and repeats
    that plan for every head (the partial rows hold every head, as with one head per grid row)."""
    max_rows = max_tokens * group_size
    max_items = ceildiv(max_rows, tile_q) + max_batch
    cut_ctas = imax(1, num_ctas // planned_heads)
    return Workspace(max_rows, num_ctas, max_items * planned_heads + num_ctas, 2 * cut_ctas * tile_q,
                     num_kv_heads, head_dim)


def decode_workspace(max_batch_size: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                     tiles: DecodeTiles, num_sms: int) -> Workspace:
    blocks = decode_blocks_per_work(num_qo_heads, num_kv_heads, tiles)
    num_ctas = grid_ctas(num_sms, tiles.blocks_per_sm, blocks)
    return decode_capacity(max_batch_size, num_ctas, num_qo_heads, head_dim, blocks)


def planned_heads(tiles, num_kv_heads):
    """KV heads a prefill plan puts in its work list: all of them where ``tiles.fold_heads`` (0 or 1,
    or a C++ expression of it), else 1 (the grid's y dimension is the head)."""
    return 1 + tiles.fold_heads * (num_kv_heads - 1)


def prefill_workspace(max_num_tokens: int, max_batch_size: int, num_qo_heads: int, num_kv_heads: int,
                      head_dim: int, tiles, num_sms: int) -> Workspace:
    heads = planned_heads(tiles, num_kv_heads)
    num_ctas = grid_ctas(num_sms, tiles.blocks_per_sm, num_kv_heads // heads)
    return prefill_capacity(max_num_tokens, max_batch_size, num_ctas, tiles.tile_q,
                            num_qo_heads // num_kv_heads, num_kv_heads, head_dim, heads)


def decode_workspace_size(max_batch_size: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                          kv_dtype: str = "float16", num_sms: int = 132, *, schedule: str | None = None,
                          gpu: str | None = None) -> int:
    """Bytes of device workspace a CUDA decode wrapper needs (int + float parts) for a plain variant:
    with the decode ``schedule`` given (as :func:`tvm_attn.api.decode.pin_schedule` takes), else the
    one a wrapper on ``gpu`` chooses (:meth:`tvm_attn.registry.KernelFamily.choose`: a tuned table's
    entry for that GPU, else the hand-written schedule). The size depends on the schedule: fewer heads
    per block or more blocks per SM need more partial states."""
    from .api._common import flashinfer_variant
    from .config import AttentionKey
    from .kv.formats import PagedKV
    from .registry import scheduled

    key = AttentionKey("decode", PagedKV(16, "NHD"), num_qo_heads, num_kv_heads, head_dim, "float16",
                       kv_dtype, flashinfer_variant(None), "cuda:sm_90a")
    if schedule is None:
        key = scheduled(key, gpu=gpu)
    else:
        key = dataclasses.replace(key, schedule=schedule)
    ws = decode_workspace(max_batch_size, num_qo_heads, num_kv_heads, head_dim, DecodeTiles.of(key), num_sms)
    return ws.int_bytes + ws.float_bytes


def prefill_workspace_size(max_num_tokens: int, max_batch_size: int, num_qo_heads: int, num_kv_heads: int,
                           head_dim: int, num_sms: int = 132) -> int:
    """Bytes of device workspace a CUDA prefill wrapper needs: the most of the FA2-class kernel's
    largest query tile and the Hopper kernel's (whose plan holds a work per KV head)."""
    from .schedule.hopper import HopperTiles
    from .schedule.prefill import choose_prefill_tiles

    sizes = []
    for tiles in (choose_prefill_tiles(head_dim), HopperTiles()):
        ws = prefill_workspace(max_num_tokens, max_batch_size, num_qo_heads, num_kv_heads, head_dim, tiles,
                               num_sms)
        sizes.append(ws.int_bytes + ws.float_bytes)
    return max(sizes)


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
        return aligned_zeros(n), None
    try:
        pinned = tvm.runtime.empty((n,), "int32", tvm.runtime.Device(_CUDA_HOST, device.index))
        host = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(pinned.data_ptr()))
        host[:] = np.arange(n, dtype=np.int32)
        if not np.array_equal(pinned.numpy(), host):  # the address is not where TVM's tensor lives
            return aligned_zeros(n), None
        host[:] = 0
        return host, pinned
    except Exception:  # noqa: BLE001 -- no page-locked memory here: plain memory works, slower
        return aligned_zeros(n), None


def _host_arg(a: np.ndarray):
    """A host int32 array as a TVM function argument: the array itself, which TVM takes through
    DLPack without a copy (~0.1 us faster per array than ``tvm_ffi.from_dlpack``), else a copy:
    numpy shares no read-only array, gives an empty one strides TVM does not take as compact, and
    may place an array off the 64-byte boundary the compiled planner assumes (:func:`aligned_zeros`)."""
    if a.size and a.flags.writeable and is_aligned(a):
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
        sizes = [_elems(shape) for _, shape in ws.int_regions()] + [max(int(c), 1) for c in index_capacity]
        starts = np.concatenate([[0], np.cumsum([region_size(size) for size in sizes])]).tolist()
        end = starts.pop()
        # every upload copies the fixed regions
        self._fixed_end = starts[self._FIXED] if len(sizes) > self._FIXED else end
        self._starts, self.index_capacity = starts, tuple(sizes[self._FIXED:])
        self.host, self._pinned = _staging(end, device)
        self._dev = tvm.runtime.empty((end,), "int32", device)
        self.host_work = self.host[starts[0]: starts[0] + sizes[0]].reshape(WORK_FIELDS, ws.max_works)
        self.host_cta = self.host[starts[1]: starts[1] + sizes[1]]
        self.host_merge = self.host[starts[2]: starts[2] + sizes[2]]
        self.host_stats = aligned_zeros(PLAN_STATS)
        #: the planner's output arguments (work_info, cta_indptr, merge_indptr, stats): zero-copy views
        self.planner_outputs = tuple(tvm_ffi.from_dlpack(a) for a in (self.host_work, self.host_cta,
                                                                       self.host_merge, self.host_stats))
        self.work_info = self._view(starts[0], (WORK_FIELDS, ws.max_works))
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
             **params):
        """Run the planner on host arrays (its output lands in the staging array; :meth:`upload`
        sends it); ``params``: the :class:`PlanParams` fields but ``max_partials`` (the workspace's).
        Returns (num_works, num_partials, quota)."""
        scalars = PlanParams(max_partials=self.ws.max_partials, **params)
        planner(_host_arg(qo_indptr), _host_arg(kv_indptr), _host_arg(last_page_len), *self.planner_outputs,
                *scalars.args())
        num_works, num_partials, quota, status = self.host_stats.tolist()
        if status:
            raise ValueError(self._capacity_message(status, len(kv_indptr) - 1, num_works, num_partials,
                                                    int(qo_indptr[-1]) * scalars.group_size))
        self.num_partials = num_partials
        return num_works, num_partials, quota

    def plan_decode(self, plan_fn, fmt, indptr: np.ndarray, indices: np.ndarray, last_page_len: np.ndarray,
                    allow_split: bool, pad: tuple[int, int] | None = None, window_left: int = NO_WINDOW):
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
            fields = dict(work_at=at[0], max_works=ws.max_works, cta_at=at[1], merge_at=at[2],
                          max_rows=ws.max_rows, indptr_at=at[4], indices_at=at[5], last_at=at[6],
                          max_partials=ws.max_partials)
            self._layout = aligned_zeros(len(DECODE_LAYOUT))
            self._layout[:] = [fields[f] for f in DECODE_LAYOUT]
            self._decode_stats = aligned_zeros(DECODE_PLAN_STATS)
            args = self._decode_args = tuple(tvm_ffi.from_dlpack(a) for a in (self.host, self._layout,
                                                                              self._decode_stats))
        scalars = DecodePlanParams(num_ctas=self.ws.num_ctas, page_size=fmt.page_size,
                                   allow_split=allow_split, pad_batch=pad_batch, pad_pages=pad_pages,
                                   window_left=window_left)
        plan_fn(_host_arg(indptr), _host_arg(indices), _host_arg(last_page_len), *args, *scalars.args())
        num_works, num_partials, _, status, max_page = self._decode_stats.tolist()
        if status in (Status.PAGE_TABLE, Status.LAYOUT):
            fmt.validate(indptr, indices, last_page_len)  # names the fault
            if status == Status.PAGE_TABLE:
                raise ValueError("plan: the page table breaks a rule of PagedKV.validate that it did not "
                                 "name")
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
           "prefill_workspace", "prefill_workspace_size", "PlanBuffers", "PlanParams", "DecodePlanParams",
           "Work", "Stat", "Status", "PLAN", "PLAN_DECODE"]

"""Hopper (sm_90a) prefill over ragged, paged or block-sparse K/V: TMA, wgmma and warp specialization
(FA3's recipe).

Lineage: FlashAttention-3 (a producer warpgroup feeds consumer warpgroups through an mbarrier ring;
``S = Q K^T`` and ``O += P V`` on wgmma with P from registers; register reallocation) over the
same planner, work records, variant hooks and online softmax as the FA2-class kernel
(:mod:`tvm_attn.tir.prefill_cuda`, whose mask, softmax and partial-state stages run here
unchanged: a wgmma accumulator holds, per warp, exactly an mma.sync m16n8 fragment per 8 columns).

Grid ``num_ctas`` (one CTA per SM), ``128 * (1 + consumers)`` threads. With TMA the plan folds the
KV heads into the work list (:attr:`~tvm_attn.schedule.hopper.HopperTiles.fold_heads`): each work
names its head, so every SM gets a CTA whatever the head count (a ``(num_sms // heads, heads)`` grid
left 4 of the H200's 132 SMs idle at 8 heads); the gather producer keeps that grid, the head its y
index. Warpgroup 0 is the producer:
its first thread walks the CTA's works and, per work, loads the GQA-packed query tile (one TMA box
of ``64 columns x group heads x tile_q / group tokens`` per 64-column chunk) and then each K/V tile
into the next stage of the ring::

    producer (1 thread)                       consumers (warpgroup c: query rows 64c .. 64c + 63)
    wait q_empty; Q -> q_smem (q_full)        wait q_full
    for each KV tile:                         for each KV tile (the serial loop):
        wait k_empty[s]; K -> stage s             wait k_full[s]; S = Q K^T (wgmma, A and B from
        wait v_empty[s]; V -> stage s                 shared memory); arrive k_empty[s] (and
                                                      q_empty after the work's last S)
                                                  logits transform / mask, online softmax (registers)
                                                  wait v_full[s]; O += P V (wgmma, P from registers,
                                                      V MN-major); arrive v_empty[s]
                                              o = O / l, lse -> global (or the partial state)

The overlapped loop (schedule suffix ``o``, the default) issues tile ``it``'s ``S`` and tile
``it - 1``'s ``P V`` back to back and runs tile ``it``'s softmax while both are in flight; the softmax
then leaves O's rescale for the next tile, after that ``P V`` has landed (FA3's intra-warpgroup
overlap). The ping-pong (``p``) makes the two consumer warpgroups take turns at issuing their GEMMs.
On the H200 the overlap is 1.12-1.23x the serial loop on dense head_dim-128 prefill from 4k keys
(1.03-1.12x at 1k); the ping-pong alone gains nothing, and on top of the overlap it is within the
noise between runs, either way by shape (``bench/results/prefill-h200.json``, rows
``tvm_attn_sm90_*``).

Paged KV: one tensor map over the whole cache (its page and K/V dimensions as one), and per KV tile
one TMA box per page (or the tile, of pages longer than it), whose page id the producer reads from
the page table. A box must start at a page boundary, so a work whose first key is inside a page
(the planner cuts works at any key; a window starts anywhere) starts its tiles at the page and masks
the keys before its own (:func:`tvm_attn.tir.prefill_cuda.open_work`'s ``align``).

Gather producer (schedule suffix ``g``; the default where TMA boxes cannot address the keys: pages
under 8 keys or not a power of two, block-sparse columns). All 128 producer threads walk the works;
thread 0 still loads the query tile through TMA. Per KV tile each thread reads one row's index entry
(the format's ``kv_addr``: a page and slot, a block column's row), the eight lanes of a row group hand
their entries round with shuffles, and each copies one 16-byte unit of every 64-column chunk of 8 of
the tile's rows with ``cp.async``, into the swizzled layout TMA would write. The stage's full
barrier counts one arrival per thread once its copies have landed (``cp.async.mbarrier.arrive``),
and the consumers fence the async proxy before their wgmma reads what the generic proxy wrote. V
rows past the work's end are zero-filled by the copies themselves, and tiles start at any key.

Every shared-memory tile is 128-byte swizzled (:mod:`tvm_attn.tir.hopper`). Keys past a work's end
in its last tile are loaded (the next request's, or zeros past the tensor) and masked, and their V
rows zeroed before ``P V`` (0 times an inf would be NaN).

Arguments: as the FA2-class kernel (:func:`tvm_attn.tir._cuda.kernel_params`), so the wrappers and
the planner serve both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tvm import tirx

from ..config import AttentionKey
from ..kv.formats import BlockSparseKV, PagedKV, RaggedKV
from ..planner import Work
from ..schedule.hopper import CHUNK, SMEM_LIMIT, HopperTiles, unsupported
from ..variants.base import HookContext
from ._builder import IRBuilder, T, let, local, loop, store, when
from ._cuda import FULL_MASK, cp_async, kernel_params, shfl_xor, smem_ptr, stage_tables
from .hopper import (
    SWIZZLE_ROWS, Barriers, advance, descriptor, fence_barrier_init, fence_proxy_async, named_barrier_arrive,
    named_barrier_sync, pin, set_max_registers, smem, tensor_map, tma_load, wgmma, wgmma_commit,
    wgmma_fence, wgmma_wait,
)
from .mma import alias32
from .prefill_cuda import CtaGeometry, open_work
from .prefill_stages import (
    _write_partial_row, init_state, logits_and_mask, online_softmax_update, rescale_o,
)
from .softmax import LOG2E, inv_sum, lse_of, neg_inf

PRODUCER_REGS, CONSUMER_REGS = 40, 232
#: the ping-pong's named barriers: consumer warpgroup c waits at TURN + c for its turn at Q K^T
TURN = 1
#: the named barrier of both consumer warpgroups after they zeroed the V rows past a work's end
V_TAIL = 3


@dataclass
class HopperBlock(CtaGeometry):
    """One CTA of the Hopper kernel, with the fields the shared prefill stages read (see
    :class:`tvm_attn.tir.prefill_cuda.Block`): one m-tile of 16 rows per consumer warp."""

    key: AttentionKey
    tiles: HopperTiles
    D: int
    G: int
    dt: str
    TK: int
    TQ: int
    has_mask: bool
    softmax: bool
    fold_scale: bool
    idx: object
    params: dict
    sm_scale: tirx.Var
    o: tirx.Buffer
    lse: tirx.Buffer
    tmp_o: tirx.Buffer
    tmp_lse: tirx.Buffer
    kv_head: tirx.PrimExpr | None  # the work's KV head, set per work (_open_work)
    tid: tirx.Var
    smem: tirx.Buffer  # Q chunks, then K stages, then V stages (elements of dt)
    s_frag: tirx.Buffer | None = None
    o_frag: tirx.Buffer | None = None
    m_i: tirx.Buffer | None = None
    l_i: tirx.Buffer | None = None
    p_frag32: tirx.Buffer | None = None
    p_frag: tirx.Buffer | None = None
    warp: tirx.PrimExpr | None = None  # the consumer warp: 0 .. 4 * consumers - 1
    lane: tirx.PrimExpr | None = None
    consumer: tirx.PrimExpr | None = None
    g: tirx.PrimExpr | None = None
    t4: tirx.PrimExpr | None = None
    scale2: tirx.Var | None = None
    tables: dict | None = None
    o_scale: tirx.Buffer | None = None  # O's deferred rescale (the overlapped loop)
    o_rescale: tirx.Buffer | None = None

    MT = 1

    chunks = property(lambda self: self.D // CHUNK)
    stages = property(lambda self: self.tiles.stages)

    # shared memory, in elements: Q's chunks of tile_q rows, K's then V's stages of kv_tile rows
    def q_at(self, c):
        return c * self.TQ * CHUNK

    def k_at(self, stage, c):
        return self.TQ * self.D + (stage * self.chunks + c) * self.TK * CHUNK

    def v_at(self, stage, c):
        return self.TQ * self.D + (self.stages * self.chunks + stage * self.chunks + c) * self.TK * CHUNK

    @property
    def gather(self):
        """The producer's threads copy K/V rows (cp.async) rather than issue TMA boxes."""
        return self.tiles.gather

    @property
    def box_rows(self):
        """Keys per TMA box of K or V: the whole tile of ragged KV, a page (or the tile, of pages
        longer than it) of paged KV."""
        if isinstance(self.key.kv, PagedKV):
            return min(self.key.kv.page_size, self.TK)
        return self.TK

    @property
    def kv_align(self):
        """Tiles start at a multiple of this many keys: page-sized boxes start at a page boundary."""
        return self.box_rows if isinstance(self.key.kv, PagedKV) and not self.gather else 1

    @property
    def smem_elems(self):
        return self.D * (self.TQ + 2 * self.stages * self.TK)


# barrier indices: K's full[s] and empty[s], V's, then the query tile's. K and V of a stage have their
# own barriers: the overlapped loop is done with a tile's K (after its S) a softmax before its V.
def _full(s, part="k"):
    return s if part == "k" else _STAGE_BARS + s


def _empty(b: HopperBlock, s, part="k"):
    return _full(s, part) + b.stages


def _q_full(b: HopperBlock):
    return 2 * _STAGE_BARS


def _q_empty(b: HopperBlock):
    return 2 * _STAGE_BARS + 1


#: barriers per part (K or V): full[s] and empty[s] for up to four stages
_STAGE_BARS = 8


def make_prefill_hopper(key: AttentionKey, tiles: HopperTiles | None = None) -> tirx.PrimFunc:
    reason = unsupported(key)
    if reason is not None or not isinstance(key.kv, (RaggedKV, PagedKV, BlockSparseKV)):
        raise ValueError(f"{key.uri}: the Hopper prefill kernel cannot build it: "
                         f"{reason or 'it reads ragged, paged or block-sparse KV only'}")
    tiles = tiles or HopperTiles.of(key)
    D, TK, TQ, G = key.head_dim, tiles.kv_tile, tiles.tile_q, key.group_size
    if not tiles.gather and isinstance(key.kv, PagedKV) and TK % key.kv.page_size and key.kv.page_size % TK:
        raise ValueError(f"schedule {key.schedule}: {TK}-key tiles are neither whole pages of "
                         f"{key.kv.page_size} keys nor inside one")
    if tiles.smem_bytes(D) > SMEM_LIMIT:
        raise ValueError(f"schedule {key.schedule}: {tiles.smem_bytes(D)} bytes of shared memory at "
                         f"head_dim {D}, more than {SMEM_LIMIT}")
    with IRBuilder() as ib, T.prim_func():
        idx, num_ctas, work_info, cta_indptr, tmp_o, tmp_lse, _, o, lse, sm_scale, params = kernel_params(
            key, key.num_kv_heads)
        maps = _tensor_maps(key, idx, tiles)
        with T.thread_binding(0, num_ctas, "blockIdx.x") as cta, contextlib.ExitStack() as grid:
            # the KV head: each work's (folded plans), else the grid's y dimension
            kv_head = None if tiles.fold_heads else grid.enter_context(
                T.thread_binding(0, key.num_kv_heads, "blockIdx.y"))
            tid = grid.enter_context(T.thread_binding(0, tiles.threads, "threadIdx.x"))
            variant = key.variant
            buf = T.alloc_buffer((D * (TQ + 2 * tiles.stages * TK),), key.kv_dtype, scope="shared.dyn",
                                 align=1024)
            IRBuilder.name("tiles_smem", buf)
            b = HopperBlock(key=key, tiles=tiles, D=D, G=G, dt=key.kv_dtype, TK=TK, TQ=TQ,
                            has_mask=variant.overrides("logits_mask"), softmax=variant.use_softmax,
                            fold_scale=variant.use_softmax and not variant.overrides("logits_transform"),
                            idx=idx, params=params, sm_scale=sm_scale, o=o, lse=lse, tmp_o=tmp_o,
                            tmp_lse=tmp_lse, kv_head=kv_head, tid=tid, smem=buf)
            bars = Barriers("bars", 2 * _STAGE_BARS + 2)
            b.tables = stage_tables(variant, D, params, tid, tiles.threads)
            consumer_warps = 4 * tiles.consumers
            # a stage's K or V is full after one TMA arrive (with its bytes), or after each gather
            # thread's copies completed (cp.async.mbarrier.arrive.noinc)
            fillers = GATHER_THREADS if tiles.gather else 1
            with when(tid == 0):
                for s in range(tiles.stages):
                    for part in ("k", "v"):
                        bars.init(_full(s, part), fillers)
                        bars.init(_empty(b, s, part), consumer_warps)
                bars.init(_q_full(b), 1)
                bars.init(_q_empty(b), consumer_warps)
            fence_barrier_init()
            T.evaluate(tirx.op.tvm_storage_sync("shared"))
            first_work = let("first_work", cta_indptr[cta])
            n_works = let("n_works", cta_indptr[cta + 1] - first_work)
            tiles_done = local("tiles_done", 1, "int32")  # KV tiles through the ring so far
            store(tiles_done, tirx.const(0, "int32"), 0)
            with T.If(tid < 128):
                with T.Then():
                    set_max_registers(PRODUCER_REGS, False)
                    if tiles.gather:
                        _produce_gather(b, bars, maps, work_info, first_work, n_works, tiles_done)
                    else:
                        with when(tid == 0):
                            _produce(b, bars, maps, work_info, first_work, n_works, tiles_done)
                with T.Else():
                    set_max_registers(CONSUMER_REGS, True)
                    _consume(b, bars, work_info, first_work, n_works, tiles_done)
    return ib.get()


def _tensor_maps(key: AttentionKey, idx, tiles: HopperTiles) -> dict:
    """Host side: TMA maps of q (boxes of the GQA-packed query tile) and of k and v (one head's
    kv_tile rows), 64 columns per box."""
    D, G, dt = key.head_dim, key.group_size, key.kv_dtype
    total_q = tirx.max(idx.num_q_rows, 1)
    q_map = tensor_map("q_map", idx.q.data, (D, key.num_qo_heads, total_q), (CHUNK, G, tiles.tile_q // G), dt)
    if tiles.gather:
        return {"q": q_map}
    if isinstance(key.kv, PagedKV):
        # one map of K and V: the cache's (page, K/V) dimensions as one, K of page p at 2p, V at 2p + 1
        page, rows = key.kv.page_size, min(key.kv.page_size, tiles.kv_tile)
        halves = 2 * tirx.max(idx.cache.shape[0], 1)
        if key.kv.layout == "NHD":
            dims, box = (D, key.num_kv_heads, page, halves), (CHUNK, 1, rows, 1)
        else:
            dims, box = (D, page, key.num_kv_heads, halves), (CHUNK, rows, 1, 1)
        kv_map = tensor_map("kv_map", idx.cache.data, dims, box, dt)
        return {"q": q_map, "k": kv_map, "v": kv_map}
    total_kv = tirx.max(idx.k.shape[0 if key.kv.layout == "NHD" else 1], 1)
    if key.kv.layout == "NHD":
        kv_dims, kv_box = (D, key.num_kv_heads, total_kv), (CHUNK, 1, tiles.kv_tile)
    else:
        kv_dims, kv_box = (D, total_kv, key.num_kv_heads), (CHUNK, tiles.kv_tile, 1)
    return {"q": q_map, "k": tensor_map("k_map", idx.k.data, kv_dims, kv_box, dt),
            "v": tensor_map("v_map", idx.v.data, kv_dims, kv_box, dt)}


def _kv_coords(b: HopperBlock, c, row):
    if b.key.kv.layout == "NHD":
        return (c * CHUNK, b.kv_head, row)
    return (c * CHUNK, row, b.kv_head)


def _page_coords(b: HopperBlock, c, page, slot, part):
    half = page * 2 + (0 if part == "k" else 1)
    if b.key.kv.layout == "NHD":
        return (c * CHUNK, b.kv_head, slot, half)
    return (c * CHUNK, slot, b.kv_head, half)


def _open_work(b: HopperBlock, work_info, w, tiles_done, align: int = 1):
    """:func:`~tvm_attn.tir.prefill_cuda.open_work`, and with folded heads the work's KV head
    (``b.kv_head``, in the scope of the work's loop body)."""
    if b.tiles.fold_heads:
        b.kv_head = let("kv_head", work_info[Work.KV_HEAD, w])
    return open_work(b, work_info, w, tiles_done, align)


# -- the producer ------------------------------------------------------------------------------------

def _produce(b: HopperBlock, bars: Barriers, maps: dict, work_info, first_work, n_works, tiles_done):
    """One thread: per work, the query tile, then its K/V tiles through the ring."""
    elem = 2
    with loop("wi", n_works) as wi:
        ws = _open_work(b, work_info, let("w", first_work + wi), tiles_done, b.kv_align)
        _load_q(b, bars, maps, ws, wi)
        with loop("it", ws.n_tiles) as it:
            n = tiles_done[0] + it
            stage = let("stage", n % b.stages)
            boxes = _tile_boxes(b, ws, it)
            for part, at in (("k", b.k_at), ("v", b.v_at)):
                bars.wait(_empty(b, stage, part), ((n // b.stages) % 2) ^ 1)
                bars.expect_tx(_full(stage, part), b.TK * b.D * elem)
                for i, box in enumerate(boxes):
                    for c in range(b.chunks):
                        dst = smem(b.smem, at(stage, c) + i * b.box_rows * CHUNK, b.box_rows * CHUNK)
                        tma_load(dst, maps[part], box(c, part), bars.ptr(_full(stage, part)))
        store(tiles_done, tiles_done[0] + ws.n_tiles, 0)


def _load_q(b: HopperBlock, bars: Barriers, maps: dict, ws, wi):
    """Work ``wi``'s GQA-packed query tile through TMA, once the consumers are done with the last."""
    bars.wait(_q_empty(b), (wi % 2) ^ 1)
    bars.expect_tx(_q_full(b), b.TQ * b.D * 2)
    tok0 = ws.q_row_begin + ws.row0 // b.G
    for c in range(b.chunks):
        tma_load(smem(b.smem, b.q_at(c), b.TQ * CHUNK), maps["q"], (c * CHUNK, b.kv_head * b.G, tok0),
                 bars.ptr(_q_full(b)))


def _tile_boxes(b: HopperBlock, ws, it) -> list:
    """The TMA boxes of KV tile ``it``, as functions (chunk, part) -> coordinates: one box of ragged
    KV; per box of paged KV, its page, read once for K and V. Boxes past the request's last page
    take that page again (their keys are masked, their V rows zeroed: _Loop.clear_v_tail)."""
    t0 = ws.begin + it * b.TK
    if not isinstance(b.key.kv, PagedKV):
        (row,) = b.idx.kv_addr(ws.req, t0)
        row = let("kv_row", row)
        return [lambda c, part: _kv_coords(b, c, row)]
    P, idx = b.key.kv.page_size, b.idx
    last = let("last_page", idx.indptr[ws.req + 1] - 1)
    boxes = []
    for i in range(b.TK // b.box_rows):
        pos = t0 + i * b.box_rows
        page = let(f"page{i}", idx.indices[tirx.min(idx.indptr[ws.req] + pos // P, last)])
        slot = let(f"slot{i}", pos % P) if P > b.box_rows else 0
        boxes.append(lambda c, part, page=page, slot=slot: _page_coords(b, c, page, slot, part))
    return boxes


# -- the gather producer ----------------------------------------------------------------------------

#: the gather producer's threads (its whole warpgroup), and the lanes that share a key row: each
#: copies one 16-byte unit of every 64-column chunk of the row, so a warp's copy covers four rows'
#: 128-byte segments
GATHER_THREADS, ROW_LANES = 128, 8
ROWS_PER_PASS = GATHER_THREADS // ROW_LANES


def _produce_gather(b: HopperBlock, bars: Barriers, maps: dict, work_info, first_work, n_works, tiles_done):
    """The producer warpgroup's 128 threads: per work, thread 0 loads the query tile (TMA); per KV
    tile, every thread looks up its share of the tile's index entries, then copies its units of K,
    then of V, with cp.async into the swizzled layout TMA would write. A stage's full barrier
    completes when every thread's copies into it have landed."""
    with loop("wi", n_works) as wi:
        ws = _open_work(b, work_info, let("w", first_work + wi), tiles_done)
        with when(b.tid == 0):
            _load_q(b, bars, maps, ws, wi)
        with loop("it", ws.n_tiles) as it:
            n = tiles_done[0] + it
            stage = let("stage", n % b.stages)
            t0 = let("t0", ws.begin + it * b.TK)
            entries = _row_entries(b, ws, t0)
            for part in ("k", "v"):
                bars.wait(_empty(b, stage, part), ((n // b.stages) % 2) ^ 1)
                _gather_rows(b, ws, entries, t0, stage, part)
                bars.arrive_on_copies(_full(stage, part))
        store(tiles_done, tiles_done[0] + ws.n_tiles, 0)


def _row_entries(b: HopperBlock, ws, t0):
    """This thread's index entry of the tile at key ``t0``: the address of row ``16 (tid % 8) + tid // 8``
    (the format's ``kv_addr``), so that the eight lanes of a row group read eight rows' entries at
    once and hand them round (FA3's split of the page-table reads). Rows past the work's end take
    its last key's address (their logits are masked). Returns the entry and, per address part, its
    value where it is a constant (the slot of a one-key page), which is not handed round."""
    lane8, group = b.tid % ROW_LANES, b.tid // ROW_LANES
    ent = local("kv_entry", (b.idx.addr_size,), "int32")
    consts = [None] * b.idx.addr_size
    row = lane8 * ROWS_PER_PASS + group
    with when(None if b.TK == GATHER_THREADS else row < b.TK):
        addr = b.idx.kv_addr(ws.req, tirx.min(t0 + row, ws.end - 1))
        for c, a in enumerate(addr):
            if isinstance(a, (int, tirx.IntImm)):
                consts[c] = a
            else:
                store(ent, a, c)
    return ent, consts


def _gather_rows(b: HopperBlock, ws, entries, t0, stage, part):
    """This thread's cp.async copies of the tile's K or V into ``stage``: in pass ``m``, unit
    ``tid % 8`` of each 64-column chunk of row ``16 m + tid // 8``, whose address lane ``m`` of the
    row group holds. V rows past the work's end are zeros (0 times a neighbour's inf is NaN)."""
    ent, consts = entries
    lane8, group = b.tid % ROW_LANES, b.tid // ROW_LANES
    at, elem = (b.k_at, b.idx.k_elem) if part == "k" else (b.v_at, b.idx.v_elem)
    # 128-byte swizzle: unit u of row r sits at u ^ (r % 8); every pass starts at a multiple of 8 rows
    unit = (lane8 ^ (group % SWIZZLE_ROWS)) * 8
    for m in range(b.TK // ROWS_PER_PASS):
        row = m * ROWS_PER_PASS + group
        addr = tuple(k if k is not None else let(f"{part}_addr{c}", tirx.op.tvm_warp_shuffle(
            FULL_MASK, ent[c], m, ROW_LANES, 32)) for c, k in enumerate(consts))
        valid = t0 + row < ws.end if part == "v" else None
        for c in range(b.chunks):
            src, ix = elem(addr, b.kv_head, c * CHUNK + lane8 * 8)
            cp_async(b.smem, (at(stage, c) + row * CHUNK + unit,), src, ix, valid)


# -- the consumers -----------------------------------------------------------------------------------

def _open_consumer(b: HopperBlock):
    """The consumer thread's registers: S and O accumulators, the row states, P as wgmma A operands."""
    ctid = b.tid - 128
    b.consumer = ctid // 128
    b.warp = ctid // 32
    b.lane = ctid % 32
    b.g, b.t4 = b.lane // 4, b.lane % 4
    b.s_frag = local("s_acc", (1, b.NB, 4))
    b.o_frag = local("o_acc", (1, b.ND, 4))
    b.m_i, b.l_i = local("m_i", (1, 2)), local("l_i", (1, 2))
    b.p_frag = local("pf", (b.KK * 8,), b.dt)
    b.p_frag32 = alias32(b.p_frag, b.KK * 4)
    b.scale2 = let("scale_log2", b.sm_scale * LOG2E)
    if b.tiles.overlap and b.softmax:
        b.o_scale, b.o_rescale = local("o_scale", (1, 2)), local("o_rescale", 1, "int32")


def _consume(b: HopperBlock, bars: Barriers, work_info, first_work, n_works, tiles_done):
    _open_consumer(b)
    descs = (descriptor("k_desc", smem(b.smem, 0, b.smem_elems), 16),
             descriptor("v_desc", smem(b.smem, 0, b.smem_elems), b.TK * CHUNK * 2))
    if b.tiles.pingpong:  # warpgroup 0 takes the first turn
        with when(b.consumer == 1):
            named_barrier_arrive(TURN, 256)
    with loop("wi", n_works) as wi:
        ws = _open_work(b, work_info, let("w", first_work + wi), tiles_done, b.kv_align)
        bars.wait(_q_full(b), wi % 2)
        init_state(b)
        loop_ = _Loop(b, bars, ws, descs, tiles_done, last_work=wi == n_works - 1)
        if b.tiles.overlap:
            _overlapped_tiles(loop_)
        else:
            _serial_tiles(loop_)
        with when(tirx.all(ws.n_tiles == 0, b.lane == 0)):
            bars.arrive(_q_empty(b))
        _epilogue(b, ws)
        store(tiles_done, tiles_done[0] + ws.n_tiles, 0)


@dataclass
class _Loop:
    """A consumer's walk over one work's KV tiles: the ring's stages and barrier phases of tile
    ``it``, the ping-pong's turns, and the GEMMs issued on them."""

    b: HopperBlock
    bars: Barriers
    ws: object
    descs: tuple
    tiles_done: tirx.Buffer
    last_work: tirx.PrimExpr

    def stage(self, it):
        return let("stage", (self.tiles_done[0] + it) % self.b.stages)

    def wait(self, it, part):
        n = self.tiles_done[0] + it
        self.bars.wait(_full(n % self.b.stages, part), (n // self.b.stages) % 2)
        if self.b.gather:
            # the gather's cp.async writes went through the generic proxy; wgmma reads the async one
            fence_proxy_async()

    def release(self, it, part):
        """This warp is done with tile ``it``'s K (and, after the work's last S, with Q) or V."""
        with when(self.b.lane == 0):
            self.bars.arrive(_empty(self.b, (self.tiles_done[0] + it) % self.b.stages, part))
            if part == "k":
                with when(it == self.ws.n_tiles - 1):
                    self.bars.arrive(_q_empty(self.b))

    def turn(self):
        """Wait for this warpgroup's turn at the tensor cores (ping-pong)."""
        if self.b.tiles.pingpong:
            named_barrier_sync(TURN + self.b.consumer, 256)

    def hand_over(self, it):
        """Give the other warpgroup its turn; warpgroup 1's last turn of the CTA has none to open."""
        if self.b.tiles.pingpong:
            last = tirx.all(self.b.consumer == 1, self.last_work, it == self.ws.n_tiles - 1)
            with when(tirx.Not(last)):
                named_barrier_arrive(TURN + 1 - self.b.consumer, 256)

    def clear_v_tail(self, it):
        """Zero tile ``it``'s V rows past the work's end (the next request's, which TMA loaded): their
        weights are 0, but 0 times an inf there would put NaN in this request's rows. Both consumer
        warpgroups share the rows, then meet before either reads the stage."""
        b = self.b
        if b.gather:  # the gather wrote zeros there
            return
        valid = let("valid_rows", self.ws.end - (self.ws.begin + it * b.TK))
        with when(valid < b.TK):
            units = b.D // 8  # 16-byte units of a row, over its 64-column chunks
            v0 = let("v_stage", b.v_at(self.stage(it), 0))
            ctid = b.tid - 128
            with loop("z", b.TK * units // 256, "unroll") as z:
                u = z * 256 + ctid
                row, c, part = u // units, (u % units) // 8, u % 8
                with when(row >= valid):
                    at = v0 + c * b.TK * CHUNK + row * CHUNK + part * 8
                    store(b.smem, tirx.Broadcast(tirx.const(0, b.dt), 8), tirx.Ramp(at, 1, 8))
            fence_proxy_async()
            named_barrier_sync(V_TAIL, 256)

    def qk(self, it):
        _issue_qk(self.b, self.descs[0], self.stage(it))

    def pv(self, it):
        _issue_pv(self.b, self.descs[1], self.stage(it))

    def softmax(self, it, defer_o=False):
        logits_and_mask(self.b, self.ws, self.ws.begin + it * self.b.TK)
        if self.b.softmax:
            online_softmax_update(self.b, defer_o)


def _serial_tiles(lp: _Loop):
    """Per tile: S = Q K^T, the softmax, O += P V, each waiting for the one before."""
    b = lp.b
    with loop("it", lp.ws.n_tiles) as it:
        lp.wait(it, "k")
        lp.turn()
        lp.qk(it)
        _wait_gemms(0, _acc(b.s_frag, b.NB))
        lp.hand_over(it)
        lp.release(it, "k")
        lp.softmax(it)
        _to_p(b)
        lp.wait(it, "v")
        lp.clear_v_tail(it)
        lp.pv(it)
        _wait_gemms(0, _acc(b.o_frag, b.ND))
        lp.release(it, "v")


def _overlapped_tiles(lp: _Loop):
    """S of tile it + 1 and P V of tile it are in flight together while the softmax of it + 1 runs:

        S_0; softmax_0
        for it in 1 .. n - 1:  issue S_it; O *= scale_{it-1}; issue O += P_{it-1} V_{it-1}
                               wait S_it; softmax_it (O's scale deferred); wait P V
        O *= scale_{n-1}; O += P_{n-1} V_{n-1}
    """
    b, n = lp.b, lp.ws.n_tiles
    s_regs, o_regs = _acc(b.s_frag, b.NB), _acc(b.o_frag, b.ND)
    with when(n > 0):
        lp.wait(0, "k")
        lp.turn()
        lp.qk(0)
        _wait_gemms(0, s_regs)
        lp.hand_over(0)
        lp.release(0, "k")
        lp.softmax(0, defer_o=True)
        _to_p(b)
        with loop("it1", n - 1) as j:
            it = j + 1
            lp.wait(it, "k")
            lp.turn()
            lp.qk(it)
            _rescale_o(b)
            lp.wait(j, "v")
            lp.pv(j)
            lp.hand_over(it)
            _wait_gemms(1, s_regs)
            lp.release(it, "k")
            lp.softmax(it, defer_o=True)
            _wait_gemms(0, o_regs)
            lp.release(j, "v")
            _to_p(b)
        _rescale_o(b)
        lp.wait(n - 1, "v")
        lp.clear_v_tail(n - 1)
        lp.pv(n - 1)
        _wait_gemms(0, o_regs)
        lp.release(n - 1, "v")


def _rescale_o(b: HopperBlock):
    """O's deferred rescale; a variant without softmax (sigmoid) has none."""
    if b.softmax:
        rescale_o(b)


def _acc(buf, n_blocks):
    return [buf[0, nb, j] for nb in range(n_blocks) for j in range(4)]


def _p_regs(b: HopperBlock):
    return [b.p_frag32[i] for i in range(b.KK * 4)]


def _wait_gemms(pending: int, regs):
    """Until at most ``pending`` wgmma groups are in flight; ``regs`` (the landed group's registers)
    stay where the wgmma wrote or read them."""
    wgmma_wait(pending)
    pin(regs)


def _issue_qk(b: HopperBlock, desc, stage):
    """Issue s_frag = Q K^T for this warpgroup's 64 rows: D / 16 wgmmas over the swizzled Q and K
    chunks, one commit group."""
    acc = _acc(b.s_frag, b.NB)
    pin(acc)
    wgmma_fence()
    elem = 2
    for kd in range(b.KD):
        c, kin = divmod(kd, CHUNK // 16)
        a = advance(desc, (b.q_at(c) + b.consumer * 64 * CHUNK + kin * 16) * elem)
        kb = advance(desc, (b.k_at(stage, c) + kin * 16) * elem)
        wgmma(b.dt, acc, b.TK, kb, kd > 0, a_desc=a)
    wgmma_commit()
    pin(acc)


def _to_p(b: HopperBlock):
    """P (s_frag in dt) as four A registers per 16 keys."""
    for kk in range(b.KK):
        for half in range(2):
            for j in range(4):
                store(b.p_frag, tirx.Cast(b.dt, b.s_frag[0, kk * 2 + half, j]), kk * 8 + half * 4 + j)


def _issue_pv(b: HopperBlock, desc, stage):
    """Issue O += P V: P from registers, V's stage as the MN-major B; one commit group."""
    acc = _acc(b.o_frag, b.ND)
    pin(acc)
    wgmma_fence()
    for kk in range(b.KK):
        vb = advance(desc, (b.v_at(stage, 0) + kk * 16 * CHUNK) * 2)
        wgmma(b.dt, acc, b.D, vb, True, a_regs=[b.p_frag32[kk * 4 + j] for j in range(4)], trans_b=1)
    wgmma_commit()
    pin(acc)


# -- epilogue ----------------------------------------------------------------------------------------

def _epilogue(b: HopperBlock, ws):
    """o = O / l and lse of the work's rows straight from registers, or the partial state."""
    o_pair = local("o_pair", (2,), b.key.o_dtype)
    o_pair32 = alias32(o_pair, 1)
    for h2 in range(2):
        r = let("r", b.frag_row(0, h2))
        tok, head = b.token_head(ws.row0 + r)
        tot = local("tot", 1)
        store(tot, b.l_i[0, h2], 0)
        store(tot, tot[0] + shfl_xor(tot[0], 1), 0)
        store(tot, tot[0] + shfl_xor(tot[0], 2), 0)
        denom = let("denom", tot[0])
        if b.softmax:
            inv, lse_val = let("inv", inv_sum(denom)), lse_of(b.m_i[0, h2], denom)
        else:
            inv, lse_val = tirx.const(1.0, "float32"), neg_inf()
        with when(r < ws.rows):
            with T.If(ws.out_row < 0):
                with T.Then():
                    _write_o_row(b, ws, h2, tok, head, inv, o_pair, o_pair32)
                    with when(b.t4 == 0):
                        store(b.lse, lse_val, ws.q_row_begin + tok, head)
                with T.Else():
                    _write_partial_row(b, ws, 0, h2, r, inv, lse_val)


def _write_o_row(b: HopperBlock, ws, h2, tok, head, inv, o_pair, o_pair32):
    """This lane's column pairs of the row (the variant's output transform applied), 4 bytes each."""
    octx = HookContext(ws.batch, b.idx.qo_idx(ws.req, tok), None, head, b.kv_head, ws.hook_qo_len,
                       ws.kv_len, b.D, b.params, b.tables)
    qrow = let("o_row", ws.q_row_begin + tok)
    with loop("nd", b.ND, "unroll") as nd:
        d0 = nd * 8 + b.t4 * 2
        for j in range(2):
            val = b.variant.output_transform(octx, b.o_frag[0, nd, h2 * 2 + j] * inv, d0 + j)
            store(o_pair, tirx.Cast(b.key.o_dtype, val), j)
        T.evaluate(T.ptx["st.global.b32"](smem_ptr(b.o, (qrow, head, d0), "w", 2), o_pair32[0]))

"""CUDA prefill / append / block-sparse attention on tensor cores (FA2's recipe), over a fixed grid.

Lineage: FlashAttention-2 (warps split the query tile, online softmax in registers, the P fragment
reused as the A operand of P.V) and FlashInfer's ``prefill.cuh`` (GQA heads folded into query rows,
K/V rows gathered through the page table into shared memory, a planner's work list). Same variant
hooks and the same KV index math (:mod:`tvm_attn.kv.index`) as the CPU kernel; every format runs
the same dense loop once its rows are in shared memory, so sparse layouts have no slow path.

Grid ``(num_ctas, num_kv_heads)``, block ``32 * warps`` threads; CTA ``c`` runs the planner's works
``cta_indptr[c]:cta_indptr[c+1]`` (:mod:`tvm_attn.tir.plan`). A work is one query tile of one
request (``tile_q`` GQA-packed rows: packed row ``p`` is token ``p // group`` of query head
``kv_head * group + p % group``) against keys ``[kv_begin, kv_end)``::

    Q tile -> smem (cp.async, or through registers when the variant transforms queries)
    for each KV tile (cp.async, 2 stages: tile i+1 loads while tile i computes):
        S = Q K^T            ldmatrix + mma.sync.m16n8k16, fp32 accumulators in registers
        logits transform; mask unless the tile is wholly visible (kv_range); online softmax
        O = O * scale + P V  P stays in registers as the A operand; V through ldmatrix.trans
    o = O / l, lse = m + log2(l)   (or, for a piece of a cut tile, the partial state)

One block barrier per KV tile, after the tile has landed and before the other stage is refilled
(the next tile's K and V copies are issued at two points of the tile's compute); none between
works: each warp loads only its own rows of the next query tile, and the stage the next work's
first tile goes to was last read two tiles earlier. The output leaves through the warp's own rows
of the query tile in shared memory, in 16-byte stores. Without a logits transform the
logits stay unscaled (q.k) and the scale goes into the exponent, ``exp2(s * scale_log2 - m)``
(one FFMA). The online softmax rescales O and l only when some row of the warp raised its max by
more than ``prefill_stages.RESCALE_SLACK`` (log2 units); otherwise rows keep their old max, and
weights stay below ``2^RESCALE_SLACK``.

Warp ``w`` owns rows ``16 * m_tiles * w ..`` of the tile. :func:`make_prefill_cuda` is the outline
above, one call per step: the stages (:mod:`tvm_attn.tir.prefill_stages`: ``load_q``, ``issue_kv``,
``qk``, ``logits_and_mask``, ``online_softmax_update``, ``pv``, ``epilogue``) work on the CTA's
:class:`Block` (the schedule's sizes, the tiles' buffers) and the work's :class:`WorkTile`; the
mma / ldmatrix fragments are :mod:`tvm_attn.tir.mma`'s.

Arguments: the format's query/KV arguments, ``work_info, cta_indptr, tmp_o, tmp_lse, o, lse,
sm_scale, *extras``; merge: ``merge_indptr, tmp_o, tmp_lse, o, lse, *extras``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx

from ..config import AttentionKey
from ..planner import Work
from ..schedule.prefill import PrefillTiles, check_key
from ..variants.base import HookContext
from ._builder import IRBuilder, T, let, local, loop, store, when
from ._cuda import kernel_params, merge_params, stage_tables
from .mma import alias32, mma_m16n8k16
from .prefill_stages import (
    commit_copies,
    epilogue,
    init_state,
    issue_kv,
    issue_next_kv,
    load_q,
    logits_and_mask,
    online_softmax_update,
    pv,
    qk,
    sync_block,
    transform_keys,
    wait_copies,
)
from .softmax import LOG2E, fold_partial, lse_of, neg_inf, nonempty, zero


def tiles_for(key: AttentionKey) -> PrefillTiles:
    if key.schedule == "default":
        raise ValueError("CUDA prefill keys name their schedule (tvm_attn.schedule.prefill.prefill_schedule)")
    return PrefillTiles.parse(key.schedule)


class CtaGeometry:
    """What the shared prefill stages (:mod:`tvm_attn.tir.prefill_stages`) read off a CTA of either
    prefill kernel (this one's :class:`Block`, the Hopper kernel's ``HopperBlock``): the fragments'
    sizes and the rows a lane holds. Needs the fields ``key, D, G, TK, MT, kv_head, warp, g``."""

    @property
    def variant(self):
        return self.key.variant

    NB = property(lambda self: self.TK // 8)
    ND = property(lambda self: self.D // 8)
    KD = property(lambda self: self.D // 16)
    KK = property(lambda self: self.TK // 16)

    def token_head(self, p):
        """The token and query head of GQA-packed row ``p`` of this block's KV head."""
        return p // self.G, self.kv_head * self.G + p % self.G

    def frag_row(self, mt, h):
        """The tile row of this lane's accumulator row ``h`` (0: ``g``, 1: ``g + 8``) of m-tile ``mt``."""
        return self.warp * (16 * self.MT) + mt * 16 + self.g + h * 8


@dataclass
class Block(CtaGeometry):
    """One CTA: the schedule's sizes, the variant's choices, the kernel's arguments, the thread's
    place, and the tiles' buffers. Sizes: ``TQ`` packed query rows, ``TK`` keys per KV tile, ``NT``
    threads; ``NB``/``ND`` 8-column blocks of S/O, ``KD``/``KK`` 16-deep k-steps of Q K^T / P V,
    ``CH`` 16-byte chunks of a row."""

    key: AttentionKey
    D: int
    G: int
    dt: str
    MT: int
    TK: int
    NT: int
    TQ: int
    stage_keys: bool  # the variant transforms keys: once per key, into kt_smem
    q_through_regs: bool  # the variant transforms queries: Q goes to q_smem through registers
    has_mask: bool
    softmax: bool
    fold_scale: bool  # logits stay raw q.k; the scale goes into the exp2
    copy_at: dict  # "k"/"v" -> where a tile's compute issues the next tile's copies
    mma: object  # the mma.sync instruction for dt
    idx: object  # the format's index math (tvm_attn.kv.index)
    params: dict
    sm_scale: tirx.Var
    o: tirx.Buffer
    lse: tirx.Buffer
    tmp_o: tirx.Buffer
    tmp_lse: tirx.Buffer
    kv_head: tirx.Var
    tid: tirx.Var
    q_smem: tirx.Buffer
    k_smem: tirx.Buffer
    v_smem: tirx.Buffer
    kt_smem: tirx.Buffer | None
    s_frag: tirx.Buffer
    o_frag: tirx.Buffer
    m_i: tirx.Buffer
    l_i: tirx.Buffer
    q_frag32: tirx.Buffer  # 32-bit views of the mma operand fragments (tvm_attn.tir.mma.alias32)
    k_frag32: tirx.Buffer
    v_frag32: tirx.Buffer
    p_frag: tirx.Buffer  # P (s_frag in dt): the A operand of P V
    p_frag32: tirx.Buffer
    lane: tirx.PrimExpr
    warp: tirx.Var
    g: tirx.PrimExpr  # the lane's accumulator row (and row + 8) in each 16-row block
    t4: tirx.PrimExpr  # the lane's column pair in each 8-column block
    scale2: tirx.Var  # sm_scale in log2 units
    tables: dict  # the variant's tables in shared memory (HookContext.tables)

    CH = property(lambda self: self.D // 8)

    @classmethod
    def open(cls, key: AttentionKey, tiles: PrefillTiles, args: dict, kv_head, tid) -> Block:
        """Allocate the tiles' buffers and the variant's tables (inside the kernel's thread bindings);
        ``args``: the kernel arguments the stages read (idx, params, sm_scale, o, lse, tmp_o, tmp_lse)."""
        variant, D, dt = key.variant, key.head_dim, key.kv_dtype
        MT, TK, TQ = tiles.m_tiles, tiles.kv_tile, tiles.tile_q
        stage_keys, has_mask = variant.overrides("key_transform"), variant.overrides("logits_mask")
        softmax = variant.use_softmax
        # softmax without a logits transform keeps raw q.k in registers and scales inside the exp2
        # (one FFMA); the row max of raw logits is the max of scaled ones since sm_scale > 0
        fold_scale = softmax and not variant.overrides("logits_transform")
        # where a tile's compute issues the next tile's K and V copies ("top": after the barrier, "s": after
        # S = Q K^T, "softmax": before P V). Spread over the tile: one burst of all of them stalls the warp
        # on registers that the queued copies still hold (ncu on the H100, 16k keys: 8% of the stall
        # samples; H200, 1 x 16384 non-causal: all at the top 12.76 ms, top / s 12.47, s / softmax 12.15).
        # Masked kernels keep top / s: their mask work takes registers, and s / softmax spills there.
        copy_at = {"k": "top", "v": "s"} if has_mask else {"k": "s", "v": "softmax"}
        q_smem = T.alloc_buffer((TQ, D + 8), dt, scope="shared.dyn")
        k_smem = T.alloc_buffer((2, TK, D + 8), dt, scope="shared.dyn")
        v_smem = T.alloc_buffer((2, TK, D + 8), dt, scope="shared.dyn")
        # static shared memory: TVM treats all dynamic shared buffers as one when it places
        # barriers, and would then order each transformed key store after the reads of k_smem
        kt_smem = T.alloc_buffer((TK, D + 8), dt, scope="shared") if stage_keys else None
        if stage_keys:
            IRBuilder.name("kt_s", kt_smem)
        s_frag, o_frag = local("s_acc", (MT, TK // 8, 4)), local("o_acc", (MT, D // 8, 4))
        m_i, l_i = local("m_i", (MT, 2)), local("l_i", (MT, 2))
        q_frag, k_frag = local("qf", (MT * 8,), dt), local("kf", (8,), dt)
        v_frag, p_frag = local("vf", (8,), dt), local("pf", (MT * 8,), dt)
        q_frag32, k_frag32, v_frag32 = alias32(q_frag, MT * 4), alias32(k_frag, 4), alias32(v_frag, 4)
        p_frag32 = alias32(p_frag, MT * 4)
        lane = tid % 32
        warp = let("warp", tid // 32)
        scale2 = let("scale_log2", args["sm_scale"] * LOG2E)
        tables = stage_tables(variant, D, args["params"], tid, tiles.threads)
        return cls(key=key, D=D, G=key.group_size, dt=dt, MT=MT, TK=TK, NT=tiles.threads, TQ=TQ,
                   stage_keys=stage_keys, q_through_regs=variant.overrides("query_transform"),
                   has_mask=has_mask, softmax=softmax, fold_scale=fold_scale, copy_at=copy_at,
                   mma=mma_m16n8k16(dt), **args, kv_head=kv_head, tid=tid,
                   q_smem=q_smem, k_smem=k_smem, v_smem=v_smem, kt_smem=kt_smem,
                   s_frag=s_frag, o_frag=o_frag, m_i=m_i, l_i=l_i, q_frag32=q_frag32, k_frag32=k_frag32,
                   v_frag32=v_frag32, p_frag=p_frag, p_frag32=p_frag32,
                   lane=lane, warp=warp, g=lane // 4, t4=lane % 4, scale2=scale2, tables=tables)



@dataclass
class WorkTile:
    """The work in hand (:func:`open_work` fills it): packed query rows ``row0 .. row0 + rows`` of
    request ``req`` against keys ``[begin, end)`` in ``n_tiles`` KV tiles, the first into stage
    ``parity % 2``; its output goes to o (``out_row < 0``) or to partial rows ``out_row + r * stride``."""

    req: tirx.Var
    row0: tirx.Var
    kv_len: tirx.Var
    q_row_begin: tirx.Var
    rows: tirx.Var
    batch: object
    hook_qo_len: tirx.Var
    begin: tirx.Var | None = None
    end: tirx.Var | None = None
    #: keys before this are hidden: the work's own first key when ``begin`` was aligned down to the
    #: boxes a TMA producer loads (:func:`open_work`'s ``align``); None: ``begin`` is it
    lo: tirx.Var | None = None
    n_tiles: tirx.Var | None = None
    range_skip: bool = False  # the variant bounds each row's keys (kv_range): keys outside are skipped
    full_lo: tirx.Var | None = None  # keys [full_lo, full_hi) are seen by every row of the tile
    full_hi: tirx.Var | None = None
    mask_free: bool = True  # some tiles need no mask work (which: prefill_stages.logits_and_mask)
    out_row: tirx.Var | None = None
    stride: tirx.Var | None = None
    parity: tirx.Var | None = None

    def ctx(self, b: Block, tok, pos=None, head=None) -> HookContext:
        kv_idx = None if pos is None else b.idx.kv_pos(self.req, pos)
        return HookContext(self.batch, b.idx.qo_idx(self.req, tok), kv_idx, head, b.kv_head, self.hook_qo_len,
                           self.kv_len, b.D, b.params, b.tables)

    def key_ctx(self, b: Block, pos) -> HookContext:
        return HookContext(self.batch, None, b.idx.kv_pos(self.req, pos), None, b.kv_head, self.hook_qo_len,
                           self.kv_len, b.D, b.params, b.tables)


def open_work(b: Block, work_info, w, tiles_done, align: int = 1) -> WorkTile:
    """Read work ``w``'s record; narrow its keys to those some row of the tile sees (kv_range).

    ``align``: the tiles start at a multiple of this many keys (a page-sized TMA box must start at a
    page boundary, and the planner cuts works at any key); the keys before the work's own first key
    are then masked (``ws.lo``)."""
    idx, variant = b.idx, b.variant
    req = let("req", tirx.max(work_info[Work.REQUEST, w], 0))
    row0 = let("row0", work_info[Work.ROW_BEGIN, w])
    ws = WorkTile(req, row0, let("kv_len", idx.kv_len(req)), let("q_row_begin", idx.row_begin(req)),
                  let("rows", tirx.min(b.TQ, idx.num_rows(req) * b.G - row0)), idx.batch_idx(req),
                  let("hook_qo_len", idx.qo_len(req)))  # hook_qo_len: read once, not per logit
    begin, end = work_info[Work.KV_BEGIN, w], work_info[Work.KV_END, w]
    # keys [full_lo, full_hi) are seen by every row of the tile (bounds are monotone)
    ws.range_skip = idx.steps_are_positions and variant.kv_range(ws.ctx(b, 0)) is not None
    if ws.range_skip:
        first = variant.kv_range(ws.ctx(b, row0 // b.G))
        last = variant.kv_range(ws.ctx(b, (row0 + ws.rows - 1) // b.G))
        begin, end = tirx.max(begin, first[0]), tirx.min(end, last[1])
        ws.full_lo, ws.full_hi = let("full_lo", last[0]), let("full_hi", first[1])
    if align > 1:
        ws.lo = let("kv_lo", begin)
        ws.begin = let("kv_begin", ws.lo - ws.lo % align)
        ws.end = let("kv_end", tirx.max(end, ws.lo))
        tiles = tirx.ceildiv(ws.end - ws.begin, b.TK)
        ws.n_tiles = let("n_tiles", tirx.if_then_else(ws.end > ws.lo, tiles, 0))
    else:
        ws.begin = let("kv_begin", begin)
        ws.end = let("kv_end", tirx.max(end, ws.begin))
        ws.n_tiles = let("n_tiles", tirx.ceildiv(ws.end - ws.begin, b.TK))
    # tiles that need no mask work: inside the keys and, for range masks, inside every row's range
    ws.mask_free = not b.has_mask or bool(variant.mask_is_range() and ws.range_skip)
    ws.out_row = let("out_row", work_info[Work.OUT_ROW, w])
    ws.stride = let("out_stride", work_info[Work.OUT_STRIDE, w])
    ws.parity = let("parity", tiles_done[0])
    return ws


def make_prefill_cuda(key: AttentionKey, tiles: PrefillTiles | None = None) -> tirx.PrimFunc:
    check_key(key)
    tiles = tiles or tiles_for(key)
    TK, TQ, NT, CH = tiles.kv_tile, tiles.tile_q, tiles.threads, key.head_dim // 8
    if (TK * CH) % NT or (TQ * CH) % NT:
        raise ValueError(f"schedule {key.schedule}: tiles do not divide among {NT} threads")
    with IRBuilder() as ib, T.prim_func():
        idx, num_ctas, work_info, cta_indptr, tmp_o, tmp_lse, _, o, lse, sm_scale, params = kernel_params(
            key, key.num_kv_heads)
        args = {"idx": idx, "params": params, "sm_scale": sm_scale, "o": o, "lse": lse, "tmp_o": tmp_o,
                "tmp_lse": tmp_lse}
        with T.thread_binding(0, num_ctas, "blockIdx.x") as cta, \
                T.thread_binding(0, key.num_kv_heads, "blockIdx.y") as kv_head, \
                T.thread_binding(0, NT, "threadIdx.x") as tid:
            b = Block.open(key, tiles, args, kv_head, tid)
            first_work = let("first_work", cta_indptr[cta])
            n_works = let("n_works", cta_indptr[cta + 1] - first_work)
            tiles_done = local("tiles_done", 1, "int32")  # KV tiles computed so far: the stage parity
            store(tiles_done, tirx.const(0, "int32"), 0)
            with loop("wi", n_works) as wi:
                ws = open_work(b, work_info, let("w", first_work + wi), tiles_done)
                # this warp's rows of the query tile and the first KV tile, with no block barrier:
                # the stage tile 0 goes to was last read two tiles ago (every warp has passed the
                # barrier of the tile in between)
                load_q(b, ws)
                with when(ws.n_tiles > 0):
                    issue_kv(b, ws, 0, ws.parity % 2)
                commit_copies()
                init_state(b)
                with loop("it", ws.n_tiles) as it:
                    stage = (ws.parity + it) % 2
                    # tile it has landed, and every warp is done with the other stage (tile it - 1)
                    wait_copies()
                    sync_block()
                    issue_next_kv(b, ws, it, stage, "top")
                    t0 = let("t0", ws.begin + it * TK)
                    if b.stage_keys:
                        transform_keys(b, ws, stage, t0)
                    qk(b, stage)
                    issue_next_kv(b, ws, it, stage, "s")
                    logits_and_mask(b, ws, t0)
                    if b.softmax:
                        online_softmax_update(b)
                    issue_next_kv(b, ws, it, stage, "softmax")
                    commit_copies()
                    pv(b, stage)
                epilogue(b, ws)
                store(tiles_done, ws.parity + ws.n_tiles, 0)
    return ib.get()


def make_prefill_merge_cuda(key: AttentionKey) -> tirx.PrimFunc:
    """``<uri>_merge(merge_indptr, tmp_o, tmp_lse, o, lse, *extras)``: grid (max packed rows, num_kv_heads).

    Folds the partial states of each GQA-packed row of a cut tile (rows ``merge_indptr[p] ..
    merge_indptr[p + 1]``) into o and lse. Variants with an output transform are planned without
    cuts (the wrappers see to it), so the merge applies none."""
    G, VEC = key.group_size, 4
    with IRBuilder() as ib, T.prim_func():
        rows_plus_one, merge_indptr, tmp_o, tmp_lse, o, lse, _ = merge_params(
            key, key.num_kv_heads, "max_rows", "num_q_rows")
        num_q = o.shape[0]
        with T.thread_binding(0, rows_plus_one - 1, "blockIdx.x") as p, \
                T.thread_binding(0, key.num_kv_heads, "blockIdx.y") as kv_head, \
                T.thread_binding(0, key.head_dim // VEC, "threadIdx.x") as tx:
            start = let("start", merge_indptr[p])
            n = let("n", merge_indptr[p + 1] - start)
            tok, head = p // G, kv_head * G + p % G
            with when(tirx.all(n >= 2, tok < num_q)):
                acc = local("acc", VEC)
                md = local("md", 2)  # the running (max, weight sum)
                with loop("v", VEC, "unroll") as v:
                    store(acc, zero(), v)
                store(md, neg_inf(), 0)
                store(md, zero(), 1)
                with loop("k", n) as k:
                    s_r = let("s_r", tmp_lse[start + k, kv_head])
                    fold_partial(key.variant.use_softmax, md, acc, (), VEC, [s_r],
                                 [lambda v, k=k: tmp_o[start + k, kv_head, tx * VEC + v]])
                _write_merged(key, acc, md, o, lse, tok, head, tx, VEC)
    return ib.get()


def _write_merged(key: AttentionKey, acc, md, o, lse, tok, head, tx, vec: int):
    """o and lse of a merged row: the folded state normalized (without softmax, the sum as it is)."""
    softmax, denom = key.variant.use_softmax, md[1]
    with loop("v", vec, "unroll") as v:
        val = tirx.if_then_else(nonempty(denom), acc[v] / denom, zero()) if softmax else acc[v]
        store(o, tirx.Cast(key.o_dtype, val), tok, head, tx * vec + v)
    with when(tx == 0):
        store(lse, lse_of(md[0], denom) if softmax else neg_inf(), tok, head)

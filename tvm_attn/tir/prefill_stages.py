"""The stages of the CUDA FA2 prefill kernel (:mod:`tvm_attn.tir.prefill_cuda`): each emits one step
of the kernel's main loop over the state of the CTA (``b``, a :class:`~tvm_attn.tir.prefill_cuda.Block`)
and of the work in hand (``ws``, a :class:`~tvm_attn.tir.prefill_cuda.WorkTile`).

Names: ``q_smem`` the query tile and ``k_smem``/``v_smem`` the two stages of the KV ring in shared
memory (``kt_smem`` the transformed keys), ``s_frag``/``o_frag`` the S and O accumulators (fp32, in
the mma layout of :mod:`tvm_attn.tir.mma`), ``m_i``/``l_i`` each row's running max (log2 units) and
weight sum, ``G`` the group size (query heads per KV head). Warp ``w`` owns rows ``16 * MT * w ..``
of the tile, ``MT`` m-tiles of 16; lane ``l``'s accumulator rows are ``g = l // 4`` and ``g + 8``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from tvm import tirx

from ._builder import T, let, local, loop, store, when
from ._cuda import cp_async, shfl_xor, smem_ptr, syncwarp, warp_any
from .mma import alias32, ldmatrix_x4, mma_pair
from .softmax import LOG2E, f32, inv_sum, lse_of, max_step, neg_inf, rescaled, safe_max, weight, zero

if TYPE_CHECKING:
    from .prefill_cuda import Block, WorkTile

RESCALE_SLACK = 8.0  # log2 units: a row's weights stay <= 256 before O and l are rescaled


def sync_block():
    T.evaluate(tirx.op.tvm_storage_sync("shared"))


def wait_copies():
    """Wait for all of this thread's cp.async copies."""
    T.evaluate(T.ptx["cp.async.wait_group"](0))


def commit_copies():
    T.evaluate(T.ptx["cp.async.commit_group"]())


# -- load Q, issue K/V -------------------------------------------------------------------------------

def load_q(b: Block, ws: WorkTile):
    """This warp's rows of the query tile -> q_smem: cp.async, or through registers when the variant
    transforms queries. Rows past the tile's end repeat its last row."""
    # no block barrier: each warp overwrites only its own rows of q_smem. A work with no tiles left
    # its query copies in flight: let them land first
    wait_copies()
    syncwarp()
    per_warp = 16 * b.MT
    with loop("i", per_warp * b.CH // 32, "unroll") as i:
        c = i * 32 + b.lane
        r, col = b.warp * per_warp + c // b.CH, (c % b.CH) * 8
        tok, head = b.token_head(ws.row0 + tirx.min(r, ws.rows - 1))
        if b.q_through_regs:
            _transform_q_chunk(b, ws, r, col, tok, head)
        else:
            cp_async(b.q_smem, (r, col), b.idx.q, (ws.q_row_begin + tok, head, col))


def _transform_q_chunk(b: Block, ws: WorkTile, r, col, tok, head):
    """q_smem[r, col .. col + 8] = the variant's query transform of token ``tok``, query head ``head``."""
    qrow = let("qrow", ws.q_row_begin + tok)
    qh = let("qh", head)
    qctx = ws.ctx(b, tok, head=qh)

    def load(dd):
        return f32(b.idx.q[qrow, qh, dd])

    with loop("v", 8, "unroll") as v:
        store(b.q_smem, tirx.Cast(b.dt, b.variant.query_transform(qctx, load, col + v)), r, col + v)


def issue_kv(b: Block, ws: WorkTile, tile, stage, parts=("k", "v")):
    """cp.async of KV tile ``tile`` (its K and/or V rows) into ``stage``. V rows past the keys are
    zeros: their weights are 0, and 0 times a neighbour's inf would be NaN; K rows there repeat the
    last key (their logits are masked)."""
    t0, idx = ws.begin + tile * b.TK, b.idx
    with loop("i", b.TK * b.CH // b.NT, "unroll") as i:
        c = i * b.NT + b.tid
        kr, col = c // b.CH, (c % b.CH) * 8
        addr = idx.kv_addr(ws.req, tirx.min(t0 + kr, ws.end - 1))
        if "k" in parts:
            kb, kix = idx.k_elem(addr, b.kv_head, col)
            cp_async(b.k_smem, (stage, kr, col), kb, kix)
        if "v" in parts:
            vb, vix = idx.v_elem(addr, b.kv_head, col)
            cp_async(b.v_smem, (stage, kr, col), vb, vix, valid=t0 + kr < ws.end)


def issue_next_kv(b: Block, ws: WorkTile, it, stage, point: str):
    """The next tile's K and/or V copies that ``b.copy_at`` places at ``point`` of tile ``it``'s compute."""
    parts = tuple(p for p in ("k", "v") if b.copy_at[p] == point)
    if parts:
        with when(it + 1 < ws.n_tiles):
            issue_kv(b, ws, it + 1, 1 - stage, parts)


def init_state(b: Block):
    """Empty running states: m_i = -inf (0 without softmax), l_i = 0, O = 0."""
    with loop("mt", b.MT, "unroll") as mt:
        for h2 in range(2):
            store(b.m_i, neg_inf() if b.softmax else zero(), mt, h2)
            store(b.l_i, zero(), mt, h2)
        with loop("nd", b.ND, "unroll") as nd, loop("j", 4, "unroll") as j:
            store(b.o_frag, zero(), mt, nd, j)


def transform_keys(b: Block, ws: WorkTile, stage, t0):
    """kt_smem = the variant's key transform of the tile's keys: once per key, for every query row."""
    with loop("i", b.TK * b.CH // b.NT, "unroll") as i:
        c = i * b.NT + b.tid
        kr, col = c // b.CH, (c % b.CH) * 8
        kctx = ws.key_ctx(b, t0 + kr)

        def load_k(dd):
            return f32(b.k_smem[stage, kr, dd])

        with loop("v", 8, "unroll") as v:
            store(b.kt_smem, tirx.Cast(b.dt, b.variant.key_transform(kctx, load_k, col + v)), kr, col + v)
    sync_block()


# -- S = Q K^T, mask, online softmax, O += P V --------------------------------------------------------

def qk(b: Block, stage):
    """s_frag = Q K^T for this warp's rows: Q and K fragments through ldmatrix, mma.sync per 16-deep step."""
    lane = b.lane
    with loop("mt", b.MT, "unroll") as mt, loop("nb", b.NB, "unroll") as nb, loop("j", 4, "unroll") as j:
        store(b.s_frag, zero(), mt, nb, j)
    with loop("kd", b.KD, "unroll") as kd:
        with loop("mt", b.MT, "unroll") as mt:
            qr = b.warp * (16 * b.MT) + mt * 16 + lane % 16
            ldmatrix_x4(b.q_frag32, mt * 4, smem_ptr(b.q_smem, (qr, kd * 16 + (lane // 16) * 8), "r"))
        with loop("nb2", b.NB // 2, "unroll") as nb2:
            kr = nb2 * 16 + (lane // 16) * 8 + lane % 8
            kcol = kd * 16 + ((lane // 8) % 2) * 8
            src = (kr, kcol) if b.stage_keys else (stage, kr, kcol)
            k_src = smem_ptr(b.kt_smem if b.stage_keys else b.k_smem, src, "r")
            ldmatrix_x4(b.k_frag32, 0, k_src)
            mma_pair(b.mma, b.s_frag, b.q_frag32, b.k_frag32, nb2, b.MT)


def _logit(b: Block, ws: WorkTile, t0, mt, nb, j, masked: bool):
    """s_frag[mt, nb, j] -> its logit (log2 units, or raw q.k under fold_scale); masked: -inf (0
    without softmax) where the key is past the end or the variant's mask hides it."""
    pos = t0 + nb * 8 + b.t4 * 2 + j % 2
    tok, head = b.token_head(ws.row0 + b.frag_row(mt, j // 2))
    sctx = ws.ctx(b, tok, pos, head)
    x = b.s_frag[mt, nb, j]
    if b.fold_scale:
        val = x  # scaled inside the exp2 (online_softmax_update)
    else:
        val = b.variant.logits_transform(sctx, x * b.sm_scale)
        val = val * LOG2E if b.softmax else val
    if masked:
        vis = pos < ws.end if ws.lo is None else tirx.all(pos >= ws.lo, pos < ws.end)
        m = b.variant.logits_mask(sctx)
        if m is not None:
            vis = tirx.all(vis, m)
        val = tirx.if_then_else(vis, val, neg_inf() if b.softmax else zero())
    store(b.s_frag, val, mt, nb, j)


def _all_logits(b: Block, ws: WorkTile, t0, masked: bool):
    with loop("mt", b.MT, "unroll") as mt, loop("nb", b.NB, "unroll") as nb, loop("j", 4, "unroll") as j:
        _logit(b, ws, t0, mt, nb, j, masked)


def logits_and_mask(b: Block, ws: WorkTile, t0):
    """The variant's logits transform and mask over the tile; a tile every row sees whole (inside the
    keys and, with kv_range, inside every row's range) takes no mask work."""
    full = None
    if ws.mask_free:
        full = t0 + b.TK <= ws.end
        if ws.lo is not None:
            full = tirx.all(full, t0 >= ws.lo)
        if ws.range_skip:
            full = tirx.all(full, t0 >= ws.full_lo, t0 + b.TK <= ws.full_hi)
    if full is None:
        _all_logits(b, ws, t0, True)
    elif b.fold_scale:  # nothing to do to a visible tile's raw logits
        with when(tirx.Not(full)):
            _all_logits(b, ws, t0, True)
    else:
        with T.If(full):
            with T.Then():
                _all_logits(b, ws, t0, False)
            with T.Else():
                _all_logits(b, ws, t0, True)


# The online softmax with a lazy rescale, on tvm_attn.tir.softmax's primitives: a row keeps its
# running max m while the tile's max stays within RESCALE_SLACK of it (weights <= 2^slack, safe in
# fp16 and fp32), so O and l are rescaled only when some row of the warp grows past that -- rarely
# after the first tiles.

def online_softmax_update(b: Block, defer_o: bool = False):
    """Fold the tile's logits (s_frag) into the running states m_i, l_i, O; s_frag becomes P.

    ``defer_o``: O is left as it is and its factor kept in ``b.o_scale`` (``b.o_rescale`` says
    whether any row of the warp has one), for :func:`rescale_o` to apply once the P V of the previous
    tile, still in flight on the accumulators, has landed (the Hopper kernel's overlapped loop)."""
    m_new = local("m_new", (b.MT, 2))
    grow = local("grow", 1, "int32")
    store(grow, tirx.const(0, "int32"), 0)
    with loop("mt", b.MT, "unroll") as mt:
        for h2 in range(2):
            _tile_row_max(b, m_new, grow, mt, h2)
    rescale = let("rescale", warp_any(grow[0]))
    if defer_o:
        store(b.o_rescale, rescale, 0)
    with when(rescale != 0), loop("mt", b.MT, "unroll") as mt:
        for h2 in range(2):
            _rescale_row(b, m_new, mt, h2, defer_o)
    with loop("mt", b.MT, "unroll") as mt:
        for h2 in range(2):
            _exp_row(b, mt, h2)


def rescale_o(b: Block):
    """O *= the factors a deferred :func:`online_softmax_update` left, where it left any."""
    with when(b.o_rescale[0] != 0), loop("mt", b.MT, "unroll") as mt:
        for h2 in range(2):
            with loop("nd", b.ND, "unroll") as nd:
                for j in (2 * h2, 2 * h2 + 1):
                    store(b.o_frag, b.o_frag[mt, nd, j] * b.o_scale[mt, h2], mt, nd, j)


def _tile_row_max(b: Block, m_new, grow, mt, h2):
    """m_new = the row's max over the tile (a quad of lanes holds a row); grow |= it passed m + slack."""
    row = [b.s_frag[mt, nb, j] for nb in range(b.NB) for j in (2 * h2, 2 * h2 + 1)]
    mx = let("mx", functools.reduce(tirx.max, row))
    mx = let("mx1", tirx.max(mx, shfl_xor(mx, 1)))
    mx = let("mx2", tirx.max(mx, shfl_xor(mx, 2)))
    store(m_new, mx * b.scale2 if b.fold_scale else mx, mt, h2)
    grows = m_new[mt, h2] > b.m_i[mt, h2] + RESCALE_SLACK
    store(grow, grow[0] | tirx.Cast("int32", grows), 0)


def _rescale_row(b: Block, m_new, mt, h2, defer_o: bool = False):
    """m = max(m, m_new); l and the row's O scaled by exp2(m_old - m) (O's factor kept: defer_o)."""
    st = max_step(b.m_i[mt, h2], [m_new[mt, h2]], ("m_up", None, "scale"))
    store(b.m_i, st.m_new, mt, h2)
    store(b.l_i, rescaled(b.l_i[mt, h2], st.scale, []), mt, h2)
    if defer_o:
        store(b.o_scale, st.scale, mt, h2)
        return
    with loop("nd", b.ND, "unroll") as nd:
        for j in (2 * h2, 2 * h2 + 1):
            store(b.o_frag, st.output(b.o_frag[mt, nd, j], []), mt, nd, j)


def _exp_row(b: Block, mt, h2):
    """P = exp2(s - m) over the row's logits (scaled here under fold_scale); l += this lane's sum of P."""
    m_safe = let("m_safe", safe_max(b.m_i[mt, h2]))
    rs = local("rs", 1)
    store(rs, zero(), 0)
    with loop("nb", b.NB, "unroll") as nb:
        for j in (2 * h2, 2 * h2 + 1):
            x = b.s_frag[mt, nb, j]
            pv = weight(x * b.scale2 if b.fold_scale else x, m_safe)
            store(b.s_frag, pv, mt, nb, j)
            store(rs, rs[0] + b.s_frag[mt, nb, j], 0)
    store(b.l_i, b.l_i[mt, h2] + rs[0], mt, h2)


def pv(b: Block, stage):
    """O += P V: P stays in registers as the A operand (s_frag cast to p_frag); V through ldmatrix.trans."""
    lane = b.lane
    with loop("kk", b.KK, "unroll") as kk:
        with loop("mt", b.MT, "unroll") as mt:
            for half in range(2):
                for j in range(4):
                    store(b.p_frag, tirx.Cast(b.dt, b.s_frag[mt, kk * 2 + half, j]), mt * 8 + half * 4 + j)
        with loop("nd2", b.ND // 2, "unroll") as nd2:
            vr = kk * 16 + ((lane // 8) % 2) * 8 + lane % 8
            v_src = smem_ptr(b.v_smem, (stage, vr, nd2 * 16 + (lane // 16) * 8), "r")
            ldmatrix_x4(b.v_frag32, 0, v_src, trans=True)
            mma_pair(b.mma, b.o_frag, b.p_frag32, b.v_frag32, nd2, b.MT)


# -- epilogue ----------------------------------------------------------------------------------------

def epilogue(b: Block, ws: WorkTile):
    """o = O / l and lse = m + log2(l) of the work's rows, or (a piece of a cut tile) the partial state."""
    # o (of the tile's dtype: check_key) goes out through this warp's own rows of q_smem, free once
    # its last Q fragments are read: each lane writes its fragment there, then the warp stores whole
    # 16-byte row pieces, instead of scattered 2-byte stores
    o_pair = local("o_pair", (2,), b.dt)
    o_pair32 = alias32(o_pair, 1)
    o_row = local("o_row", (4,), "uint32")
    # a work with no KV tiles never waited for its query copies: they must land before their rows
    # are overwritten (nothing else is in flight here)
    wait_copies()
    syncwarp()
    with loop("mt", b.MT, "unroll") as mt:
        for h2 in range(2):
            _finish_row(b, ws, mt, h2, o_pair, o_pair32)
    with when(ws.out_row < 0):
        _store_o_tile(b, ws, o_row)


def _finish_row(b: Block, ws: WorkTile, mt, h2, o_pair, o_pair32):
    """The row's total weight (over its quad of lanes), then its o row staged and its lse stored, or
    its partial state written."""
    r = let("r", b.frag_row(mt, h2))
    p = let("p", ws.row0 + r)
    tok, head = b.token_head(p)
    tot = local("tot", 1)
    store(tot, b.l_i[mt, h2], 0)
    store(tot, tot[0] + shfl_xor(tot[0], 1), 0)
    store(tot, tot[0] + shfl_xor(tot[0], 2), 0)
    denom = let("denom", tot[0])
    if b.softmax:
        inv = let("inv", inv_sum(denom))
        lse_val = lse_of(b.m_i[mt, h2], denom)
    else:
        inv = tirx.const(1.0, "float32")
        lse_val = neg_inf()
    with T.If(ws.out_row < 0):
        with T.Then():
            _stage_o_row(b, ws, mt, h2, r, inv, o_pair, o_pair32)
            with when(tirx.all(r < ws.rows, b.t4 == 0)):
                store(b.lse, lse_val, ws.q_row_begin + tok, head)
        with T.Else(), when(r < ws.rows):
            _write_partial_row(b, ws, mt, h2, r, inv, lse_val)


def _stage_o_row(b: Block, ws: WorkTile, mt, h2, r, inv, o_pair, o_pair32):
    """This lane's part of o row ``r`` (the variant's output transform applied) -> q_smem."""
    # rows past the tile's end are staged (as copies of its last row, so the hooks see a real
    # token) but never stored
    pc = let("p_in", ws.row0 + tirx.max(tirx.min(r, ws.rows - 1), 0))
    tok, head = b.token_head(pc)
    octx = ws.ctx(b, tok, head=head)
    with loop("nd", b.ND, "unroll") as nd:
        d0 = nd * 8 + b.t4 * 2
        for j in range(2):
            out = b.o_frag[mt, nd, h2 * 2 + j] * inv
            val = b.variant.output_transform(octx, out, d0 + j)
            store(o_pair, tirx.Cast(b.key.o_dtype, val), j)
        dst = smem_ptr(b.q_smem, (r, d0), "w", 2)
        T.evaluate(T.ptx["st.shared.b32"](dst, o_pair32[0]))


def _write_partial_row(b: Block, ws: WorkTile, mt, h2, r, inv, lse_val):
    """Row ``r``'s partial state (normalized o, lse) -> partial row ``out_row + r * stride``."""
    slot = ws.out_row + r * ws.stride
    with loop("nd", b.ND, "unroll") as nd:
        for j in range(2):
            d = nd * 8 + b.t4 * 2 + j
            store(b.tmp_o, b.o_frag[mt, nd, h2 * 2 + j] * inv, slot, b.kv_head, d)
    with when(b.t4 == 0):
        store(b.tmp_lse, lse_val, slot, b.kv_head)


def _store_o_tile(b: Block, ws: WorkTile, o_row):
    """The warp's staged o rows -> o, in 16-byte pieces (rows past the tile's end are not stored)."""
    syncwarp()
    per_warp = 16 * b.MT
    with loop("i", per_warp * b.CH // 32, "unroll") as i:
        c = i * 32 + b.lane
        r = let("r_out", b.warp * per_warp + c // b.CH)
        col = (c % b.CH) * 8
        with when(r < ws.rows):
            tok, head = b.token_head(ws.row0 + r)
            out_ix = (ws.q_row_begin + tok, head, col)
            regs = [o_row[k] for k in range(4)]
            T.evaluate(T.ptx["ld.shared.v4.b32"](*regs, smem_ptr(b.q_smem, (r, col), "r")))
            T.evaluate(T.ptx["st.global.v4.b32"](smem_ptr(b.o, out_ix, "w"), *regs))

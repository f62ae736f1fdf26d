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
more than RESCALE_SLACK (log2 units); otherwise rows keep their old max, and weights stay below
``2^RESCALE_SLACK``.

Warp ``w`` owns rows ``16 * m_tiles * w ..`` of the tile. Fragment layouts (PTX ISA, mma.m16n8k16):
lane ``l`` holds accumulator rows ``l // 4`` and ``l // 4 + 8``, columns ``2 * (l % 4) + {0, 1}`` of
each 16x8 block.

Arguments: the format's query/KV arguments, ``work_info, cta_indptr, tmp_o, tmp_lse, o, lse,
sm_scale, *extras``; merge: ``merge_indptr, tmp_o, tmp_lse, o, lse, *extras``.
"""

from __future__ import annotations

import functools
import math

from tvm import tirx

from ..config import AttentionKey
from ..schedule.prefill import PrefillTiles, check_key
from ..variants.base import HookContext
from ._builder import IRBuilder, T, let, local, loop, store, when
from ._cuda import (cp_async, f32, fold_partial, kernel_params, merge_params, neg_inf, shfl_xor, smem_ptr,
                    stage_tables, syncwarp, warp_any, zero)

LOG2E = math.log2(math.e)
RESCALE_SLACK = 8.0  # log2 units: a row's weights stay <= 256 before O and l are rescaled
_MMA = {"float16": "f16", "bfloat16": "bf16"}  # mma operand types


def tiles_for(key: AttentionKey) -> PrefillTiles:
    if key.schedule == "default":
        raise ValueError("CUDA prefill keys name their schedule (tvm_attn.schedule.prefill.prefill_schedule)")
    return PrefillTiles.parse(key.schedule)


def _sync():
    T.evaluate(tirx.op.tvm_storage_sync("shared"))


def _alias32(buf, n):
    """The 32-bit view of a fragment of ``2 * n`` fp16/bf16 registers (one mma operand register per pair)."""
    return T.decl_buffer((n,), "uint32", data=buf.data, scope="local")


def make_prefill_cuda(key: AttentionKey, tiles: PrefillTiles | None = None) -> tirx.PrimFunc:
    check_key(key)
    tiles = tiles or tiles_for(key)
    variant, D, G, dt = key.variant, key.head_dim, key.group_size, key.kv_dtype
    MT, TK, NT, TQ = tiles.m_tiles, tiles.kv_tile, tiles.threads, tiles.tile_q
    NB, ND, KD, KK, CH = TK // 8, D // 8, D // 16, TK // 16, D // 8
    if (TK * CH) % NT or (TQ * CH) % NT:
        raise ValueError(f"schedule {key.schedule}: tiles do not divide among {NT} threads")
    mma = T.ptx[f"mma.sync.aligned.m16n8k16.row.col.f32.{_MMA[dt]}.{_MMA[dt]}.f32"]
    ldm = T.ptx["ldmatrix.sync.aligned.m8n8.x4.shared.b16"]
    ldm_t = T.ptx["ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"]
    stage_keys = variant.overrides("key_transform")
    load_q_through_regs = variant.overrides("query_transform")
    has_mask = variant.overrides("logits_mask")
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
    with IRBuilder() as ib:
        with T.prim_func():
            idx, num_ctas, work_info, cta_indptr, tmp_o, tmp_lse, _, o, lse, sm_scale, params = kernel_params(
                key, key.num_kv_heads)

            with T.thread_binding(0, num_ctas, "blockIdx.x") as cta, \
                    T.thread_binding(0, key.num_kv_heads, "blockIdx.y") as kv_head, \
                    T.thread_binding(0, NT, "threadIdx.x") as tid:
                q_s = T.alloc_buffer((TQ, D + 8), dt, scope="shared.dyn")
                k_s = T.alloc_buffer((2, TK, D + 8), dt, scope="shared.dyn")
                v_s = T.alloc_buffer((2, TK, D + 8), dt, scope="shared.dyn")
                # static shared memory: TVM treats all dynamic shared buffers as one when it places
                # barriers, and would then order each transformed key store after the reads of k_s
                kt_s = T.alloc_buffer((TK, D + 8), dt, scope="shared") if stage_keys else None
                if stage_keys:
                    IRBuilder.name("kt_s", kt_s)
                s_acc = local("s_acc", (MT, NB, 4))
                o_acc = local("o_acc", (MT, ND, 4))
                m_i = local("m_i", (MT, 2))
                l_i = local("l_i", (MT, 2))
                qf = local("qf", (MT * 8,), dt)
                kf = local("kf", (8,), dt)
                vf = local("vf", (8,), dt)
                pf = local("pf", (MT * 8,), dt)
                qf32, kf32, vf32, pf32 = _alias32(qf, MT * 4), _alias32(kf, 4), _alias32(vf, 4), _alias32(pf, MT * 4)

                def mma_pair(acc, a32, b32, n2):
                    """acc[mt, 2 n2 + {0, 1}] += A[mt] . B for every m-tile: the two 16x8 blocks of one
                    x4 ldmatrix of B (registers 0-1 and 2-3)."""
                    with loop("mt", MT, "unroll") as mt:
                        for half in range(2):
                            c = [acc[mt, n2 * 2 + half, j] for j in range(4)]
                            a = [a32[mt * 4 + j] for j in range(4)]
                            T.evaluate(mma(*c, *a, b32[2 * half], b32[2 * half + 1], *c))

                lane = tid % 32
                warp = let("warp", tid // 32)
                g, t4 = lane // 4, lane % 4
                scale2 = let("scale_log2", sm_scale * LOG2E)
                tables = stage_tables(variant, D, params, tid, NT)
                first_work = let("first_work", cta_indptr[cta])
                n_works = let("n_works", cta_indptr[cta + 1] - first_work)
                tiles_done = local("tiles_done", 1, "int32")  # KV tiles computed so far: the stage parity
                store(tiles_done, tirx.const(0, "int32"), 0)
                with loop("wi", n_works) as wi:
                    w = let("w", first_work + wi)
                    req = let("req", tirx.max(work_info[0, w], 0))
                    row0 = let("row0", work_info[4, w])
                    kv_len = let("kv_len", idx.kv_len(req))
                    q_row_begin = let("q_row_begin", idx.row_begin(req))
                    rows = let("rows", tirx.min(TQ, idx.num_rows(req) * G - row0))
                    batch = idx.batch_idx(req)
                    hook_qo_len = let("hook_qo_len", idx.qo_len(req))  # read once, not per logit

                    def ctx(tok, pos=None, head=None):
                        kv_idx = None if pos is None else idx.kv_pos(req, pos)
                        return HookContext(batch, idx.qo_idx(req, tok), kv_idx, head, kv_head, hook_qo_len,
                                           kv_len, D, params, tables)

                    begin, end = work_info[1, w], work_info[2, w]
                    # keys [full_lo, full_hi) are seen by every row of the tile (bounds are monotone)
                    range_skip = idx.steps_are_positions and variant.kv_range(ctx(0)) is not None
                    if range_skip:
                        first = variant.kv_range(ctx(row0 // G))
                        last = variant.kv_range(ctx((row0 + rows - 1) // G))
                        begin, end = tirx.max(begin, first[0]), tirx.min(end, last[1])
                        full_lo, full_hi = let("full_lo", last[0]), let("full_hi", first[1])
                    begin = let("kv_begin", begin)
                    end = let("kv_end", tirx.max(end, begin))
                    n_tiles = let("n_tiles", tirx.ceildiv(end - begin, TK))
                    # tiles that need no mask work: inside the keys and, for range masks, inside every row's range
                    mask_free = None if has_mask and not (variant.mask_is_range() and range_skip) else True
                    out_row = let("out_row", work_info[3, w])
                    stride = let("out_stride", work_info[5, w])
                    parity = let("parity", tiles_done[0])

                    def issue(tile, stage, parts=("k", "v")):
                        """cp.async of KV tile ``tile`` (its K and/or V rows) into ``stage`` (rows past
                        the keys repeat the last)."""
                        t0 = begin + tile * TK
                        with loop("i", TK * CH // NT, "unroll") as i:
                            c = i * NT + tid
                            kr, col = c // CH, (c % CH) * 8
                            addr = idx.kv_addr(req, tirx.min(t0 + kr, end - 1))
                            if "k" in parts:
                                kb, kix = idx.k_elem(addr, kv_head, col)
                                cp_async(k_s, (stage, kr, col), kb, kix)
                            if "v" in parts:
                                vb, vix = idx.v_elem(addr, kv_head, col)
                                cp_async(v_s, (stage, kr, col), vb, vix)

                    # -- this warp's rows of the query tile and the first KV tile, with no block barrier:
                    # each warp overwrites only its own rows of q_s, and the stage tile 0 goes to was last
                    # read two tiles ago (every warp has passed the barrier of the tile in between)
                    # (a work with no tiles left its query copies in flight: let them land first)
                    T.evaluate(T.ptx["cp.async.wait_group"](0))
                    syncwarp()
                    per_warp = 16 * MT
                    with loop("i", per_warp * CH // 32, "unroll") as i:
                        c = i * 32 + lane
                        r, col = warp * per_warp + c // CH, (c % CH) * 8
                        p = row0 + tirx.min(r, rows - 1)
                        tok, head = p // G, kv_head * G + p % G
                        if not load_q_through_regs:
                            cp_async(q_s, (r, col), idx.q, (q_row_begin + tok, head, col))
                        else:
                            qrow = let("qrow", q_row_begin + tok)
                            qh = let("qh", head)
                            qctx = ctx(tok, head=qh)
                            load = lambda dd: f32(idx.q[qrow, qh, dd])  # noqa: E731
                            with loop("v", 8, "unroll") as v:
                                store(q_s, tirx.Cast(dt, variant.query_transform(qctx, load, col + v)), r, col + v)
                    with when(n_tiles > 0):
                        issue(0, parity % 2)
                    T.evaluate(T.ptx["cp.async.commit_group"]())

                    with loop("mt", MT, "unroll") as mt:
                        for h2 in range(2):
                            store(m_i, neg_inf() if softmax else zero(), mt, h2)
                            store(l_i, zero(), mt, h2)
                        with loop("nd", ND, "unroll") as nd:
                            with loop("j", 4, "unroll") as j:
                                store(o_acc, zero(), mt, nd, j)

                    # -- the KV loop ---------------------------------------------------------------
                    with loop("it", n_tiles) as it:
                        stage = (parity + it) % 2
                        # tile it has landed, and every warp is done with the other stage (tile it - 1)
                        T.evaluate(T.ptx["cp.async.wait_group"](0))
                        _sync()

                        def copies_at(point):
                            parts = tuple(p for p in ("k", "v") if copy_at[p] == point)
                            if parts:
                                with when(it + 1 < n_tiles):
                                    issue(it + 1, 1 - stage, parts)

                        copies_at("top")
                        t0 = let("t0", begin + it * TK)
                        if stage_keys:  # transformed once per key, for every query row of the tile
                            with loop("i", TK * CH // NT, "unroll") as i:
                                c = i * NT + tid
                                kr, col = c // CH, (c % CH) * 8
                                kctx = HookContext(batch, None, idx.kv_pos(req, t0 + kr), None, kv_head,
                                                   hook_qo_len, kv_len, D, params, tables)
                                load_k = lambda dd, kr=kr: f32(k_s[stage, kr, dd])  # noqa: E731
                                with loop("v", 8, "unroll") as v:
                                    store(kt_s, tirx.Cast(dt, variant.key_transform(kctx, load_k, col + v)), kr, col + v)
                            _sync()

                        # S = Q K^T
                        with loop("mt", MT, "unroll") as mt:
                            with loop("nb", NB, "unroll") as nb:
                                with loop("j", 4, "unroll") as j:
                                    store(s_acc, zero(), mt, nb, j)
                        with loop("kd", KD, "unroll") as kd:
                            with loop("mt", MT, "unroll") as mt:
                                qr = warp * (16 * MT) + mt * 16 + lane % 16
                                T.evaluate(ldm(qf32[mt * 4], qf32[mt * 4 + 1], qf32[mt * 4 + 2], qf32[mt * 4 + 3],
                                               smem_ptr(q_s, (qr, kd * 16 + (lane // 16) * 8), "r")))
                            with loop("nb2", NB // 2, "unroll") as nb2:
                                kr = nb2 * 16 + (lane // 16) * 8 + lane % 8
                                kcol = kd * 16 + ((lane // 8) % 2) * 8
                                src = (kr, kcol) if stage_keys else (stage, kr, kcol)
                                k_src = smem_ptr(kt_s if stage_keys else k_s, src, "r")
                                T.evaluate(ldm(kf32[0], kf32[1], kf32[2], kf32[3], k_src))
                                mma_pair(s_acc, qf32, kf32, nb2)

                        copies_at("s")

                        # logits, mask, online softmax
                        def logits(mt, nb, j, masked: bool):
                            r = warp * (16 * MT) + mt * 16 + g + (j // 2) * 8
                            pos = t0 + nb * 8 + t4 * 2 + j % 2
                            p = row0 + r
                            sctx = ctx(p // G, pos, kv_head * G + p % G)
                            x = s_acc[mt, nb, j]
                            if fold_scale:
                                val = x  # scaled inside the exp2 (softmax below)
                            else:
                                val = variant.logits_transform(sctx, x * sm_scale)
                                val = val * LOG2E if softmax else val
                            if masked:
                                vis = pos < end
                                m = variant.logits_mask(sctx)
                                if m is not None:
                                    vis = tirx.all(vis, m)
                                val = tirx.if_then_else(vis, val, neg_inf() if softmax else zero())
                            store(s_acc, val, mt, nb, j)

                        def all_logits(masked: bool):
                            with loop("mt", MT, "unroll") as mt:
                                with loop("nb", NB, "unroll") as nb:
                                    with loop("j", 4, "unroll") as j:
                                        logits(mt, nb, j, masked)

                        full = None
                        if mask_free:
                            full = t0 + TK <= end
                            if range_skip:
                                full = tirx.all(full, t0 >= full_lo, t0 + TK <= full_hi)
                        if full is None:
                            all_logits(True)
                        elif fold_scale:  # nothing to do to a visible tile's raw logits
                            with when(tirx.Not(full)):
                                all_logits(True)
                        else:
                            with T.If(full):
                                with T.Then():
                                    all_logits(False)
                                with T.Else():
                                    all_logits(True)

                        if softmax:
                            # Online softmax with a lazy rescale: a row keeps its running max m while
                            # the tile's max stays within RESCALE_SLACK of it (weights <= 2^slack, safe
                            # in fp16 and fp32), so O and l are rescaled only when some row of the warp
                            # grows past that -- rarely after the first tiles.
                            m_new = local("m_new", (MT, 2))
                            grow = local("grow", 1, "int32")
                            store(grow, tirx.const(0, "int32"), 0)
                            with loop("mt", MT, "unroll") as mt:
                                for h2 in range(2):
                                    row = [s_acc[mt, nb, j] for nb in range(NB) for j in (2 * h2, 2 * h2 + 1)]
                                    mx = let("mx", functools.reduce(tirx.max, row))
                                    mx = let("mx1", tirx.max(mx, shfl_xor(mx, 1)))
                                    mx = let("mx2", tirx.max(mx, shfl_xor(mx, 2)))
                                    store(m_new, mx * scale2 if fold_scale else mx, mt, h2)
                                    grows = m_new[mt, h2] > m_i[mt, h2] + RESCALE_SLACK
                                    store(grow, grow[0] | tirx.Cast("int32", grows), 0)
                            rescale = let("rescale", warp_any(grow[0]))
                            with when(rescale != 0):
                                with loop("mt", MT, "unroll") as mt:
                                    for h2 in range(2):
                                        m_up = let("m_up", tirx.max(m_i[mt, h2], m_new[mt, h2]))
                                        m_up_safe = tirx.if_then_else(m_up == neg_inf(), zero(), m_up)
                                        scale = let("scale", tirx.exp2(m_i[mt, h2] - m_up_safe))
                                        store(m_i, m_up, mt, h2)
                                        store(l_i, l_i[mt, h2] * scale, mt, h2)
                                        with loop("nd", ND, "unroll") as nd:
                                            for j in (2 * h2, 2 * h2 + 1):
                                                store(o_acc, o_acc[mt, nd, j] * scale, mt, nd, j)
                            with loop("mt", MT, "unroll") as mt:
                                for h2 in range(2):
                                    m_run = m_i[mt, h2]
                                    m_safe = let("m_safe", tirx.if_then_else(m_run == neg_inf(), zero(), m_run))
                                    rs = local("rs", 1)
                                    store(rs, zero(), 0)
                                    with loop("nb", NB, "unroll") as nb:
                                        for j in (2 * h2, 2 * h2 + 1):
                                            x = s_acc[mt, nb, j]
                                            pv = tirx.exp2(x * scale2 - m_safe if fold_scale else x - m_safe)
                                            store(s_acc, pv, mt, nb, j)
                                            store(rs, rs[0] + s_acc[mt, nb, j], 0)
                                    store(l_i, l_i[mt, h2] + rs[0], mt, h2)

                        copies_at("softmax")
                        T.evaluate(T.ptx["cp.async.commit_group"]())

                        # O += P V
                        with loop("kk", KK, "unroll") as kk:
                            with loop("mt", MT, "unroll") as mt:
                                for half in range(2):
                                    for j in range(4):
                                        store(pf, tirx.Cast(dt, s_acc[mt, kk * 2 + half, j]), mt * 8 + half * 4 + j)
                            with loop("nd2", ND // 2, "unroll") as nd2:
                                vr = kk * 16 + ((lane // 8) % 2) * 8 + lane % 8
                                T.evaluate(ldm_t(vf32[0], vf32[1], vf32[2], vf32[3],
                                                 smem_ptr(v_s, (stage, vr, nd2 * 16 + (lane // 16) * 8), "r")))
                                mma_pair(o_acc, pf32, vf32, nd2)

                    # -- epilogue: normalize, write o and lse (or the partial state) -----------------
                    # o (of the tile's dtype: check_key) goes out through this warp's own rows of q_s,
                    # free once its last Q fragments are read: each lane writes its fragment there, then
                    # the warp stores whole 16-byte row pieces, instead of scattered 2-byte stores
                    o_pair = local("o_pair", (2,), dt)
                    o_pair32 = _alias32(o_pair, 1)
                    o_row = local("o_row", (4,), "uint32")
                    # a work with no KV tiles never waited for its query copies: they must land before
                    # their rows are overwritten (nothing else is in flight here)
                    T.evaluate(T.ptx["cp.async.wait_group"](0))
                    syncwarp()
                    with loop("mt", MT, "unroll") as mt:
                        for h2 in range(2):
                            r = let("r", warp * (16 * MT) + mt * 16 + g + h2 * 8)
                            p = let("p", row0 + r)
                            tok, head = p // G, kv_head * G + p % G
                            tot = local("tot", 1)
                            store(tot, l_i[mt, h2], 0)
                            store(tot, tot[0] + shfl_xor(tot[0], 1), 0)
                            store(tot, tot[0] + shfl_xor(tot[0], 2), 0)
                            denom = let("denom", tot[0])
                            if softmax:
                                inv = let("inv", tirx.if_then_else(denom > 0, 1.0 / denom, zero()))
                                lse_val = tirx.if_then_else(denom > 0, m_i[mt, h2] + tirx.log2(denom), neg_inf())
                            else:
                                inv = tirx.const(1.0, "float32")
                                lse_val = neg_inf()
                            with T.If(out_row < 0):
                                with T.Then():
                                    # rows past the tile's end are staged (as copies of its last row, so
                                    # the hooks see a real token) but never stored
                                    pc = let("p_in", row0 + tirx.max(tirx.min(r, rows - 1), 0))
                                    octx = ctx(pc // G, head=kv_head * G + pc % G)
                                    with loop("nd", ND, "unroll") as nd:
                                        d0 = nd * 8 + t4 * 2
                                        for j in range(2):
                                            out = o_acc[mt, nd, h2 * 2 + j] * inv
                                            val = variant.output_transform(octx, out, d0 + j)
                                            store(o_pair, tirx.Cast(key.o_dtype, val), j)
                                        dst = smem_ptr(q_s, (r, d0), "w", 2)
                                        T.evaluate(T.ptx["st.shared.b32"](dst, o_pair32[0]))
                                    with when(tirx.all(r < rows, t4 == 0)):
                                        store(lse, lse_val, q_row_begin + tok, head)
                                with T.Else():
                                    with when(r < rows):
                                        slot = out_row + r * stride
                                        with loop("nd", ND, "unroll") as nd:
                                            for j in range(2):
                                                d = nd * 8 + t4 * 2 + j
                                                store(tmp_o, o_acc[mt, nd, h2 * 2 + j] * inv, slot, kv_head, d)
                                        with when(t4 == 0):
                                            store(tmp_lse, lse_val, slot, kv_head)
                    with when(out_row < 0):
                        syncwarp()
                        with loop("i", per_warp * CH // 32, "unroll") as i:
                            c = i * 32 + lane
                            r = let("r_out", warp * per_warp + c // CH)
                            col = (c % CH) * 8
                            with when(r < rows):
                                p = row0 + r
                                out_ix = (q_row_begin + p // G, kv_head * G + p % G, col)
                                regs = [o_row[k] for k in range(4)]
                                T.evaluate(T.ptx["ld.shared.v4.b32"](*regs, smem_ptr(q_s, (r, col), "r")))
                                T.evaluate(T.ptx["st.global.v4.b32"](smem_ptr(o, out_ix, "w"), *regs))
                    store(tiles_done, parity + n_tiles, 0)
    return ib.get()


def make_prefill_merge_cuda(key: AttentionKey) -> tirx.PrimFunc:
    """``<uri>_merge(merge_indptr, tmp_o, tmp_lse, o, lse, *extras)``: grid (max packed rows, num_kv_heads).

    Folds the partial states of each GQA-packed row of a cut tile (rows ``merge_indptr[p] ..
    merge_indptr[p + 1]``) into o and lse. Variants with an output transform are planned without
    cuts (the wrappers see to it), so the merge applies none."""
    D, G = key.head_dim, key.group_size
    VEC = 4
    TX = D // VEC
    with IRBuilder() as ib:
        with T.prim_func():
            rows_plus_one, merge_indptr, tmp_o, tmp_lse, o, lse, _ = merge_params(
                key, key.num_kv_heads, "max_rows", "num_q_rows")
            num_q = o.shape[0]
            with T.thread_binding(0, rows_plus_one - 1, "blockIdx.x") as p, \
                    T.thread_binding(0, key.num_kv_heads, "blockIdx.y") as kv_head, \
                    T.thread_binding(0, TX, "threadIdx.x") as tx:
                start = let("start", merge_indptr[p])
                n = let("n", merge_indptr[p + 1] - start)
                tok, head = p // G, kv_head * G + p % G
                with when(tirx.all(n >= 2, tok < num_q)):
                    acc = local("acc", VEC)
                    md = local("md", 2)
                    with loop("v", VEC, "unroll") as v:
                        store(acc, zero(), v)
                    store(md, neg_inf(), 0)
                    store(md, zero(), 1)
                    with loop("k", n) as k:
                        s_r = let("s_r", tmp_lse[start + k, kv_head])
                        fold_partial(key.variant.use_softmax, md, acc, (), VEC, [s_r],
                                     [lambda v, k=k: tmp_o[start + k, kv_head, tx * VEC + v]])
                    if key.variant.use_softmax:
                        denom = md[1]
                        with loop("v", VEC, "unroll") as v:
                            val = tirx.if_then_else(denom > 0, acc[v] / denom, zero())
                            store(o, tirx.Cast(key.o_dtype, val), tok, head, tx * VEC + v)
                        with when(tx == 0):
                            store(lse, tirx.if_then_else(denom > 0, md[0] + tirx.log2(denom), neg_inf()), tok, head)
                    else:
                        with loop("v", VEC, "unroll") as v:
                            store(o, tirx.Cast(key.o_dtype, acc[v]), tok, head, tx * VEC + v)
                        with when(tx == 0):
                            store(lse, neg_inf(), tok, head)
    return ib.get()

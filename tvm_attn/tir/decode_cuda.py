"""CUDA batch decode over a paged KV cache, split-KV over a fixed grid, with the merge of the split
requests' partial states in the same kernel.

Lineage: FlashInfer ``decode.cuh`` (``BatchDecodeWithPagedKVCacheKernel``: head-group fusion, a
work list from the planner, partial states merged afterwards). Same variant hooks and the same KV
index math (:mod:`tvm_attn.kv.index`) as the CPU kernel.

Persistent grid ``(num_ctas, num_kv_heads * head_splits)``, block ``tiles.threads`` (4 warps). CTA
``c`` runs the planner's works ``cta_indptr[c]:cta_indptr[c+1]`` in turn (``work_info[:, w] =
request, kv_begin, kv_end, out_row``: one piece of one request's keys); the grid depends only on
the GPU and the heads, never on the batch, so a captured CUDA graph stays valid. One block serves
the ``heads_per_block`` query heads of one KV head::

    q (heads x vec per thread, in registers)
    for each step: every key group loads `unroll` K and V rows (16-byte loads), then
        s = shuffle-reduce(q . k) over the lanes of the row; variant transform and mask;
        online softmax of the `unroll` logits into (m, d, o)
    merge the key groups' (m, d, o) through shared memory
    out_row < 0: write o and lse; else: write the partial state to tmp_o / tmp_lse, count the
        piece done in merge_count, and, in the block that finishes the request's last piece, fold
        its partial states (rows merge_indptr[req]:merge_indptr[req+1]) into o and lse

Arguments: ``q, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, work_info, cta_indptr,
tmp_o, tmp_lse, merge_indptr, merge_count, o, lse, sm_scale, *extras``; ``merge_count`` is int32
``[max_rows, num_kv_heads * head_splits]`` and must be zero at a launch (the plan's upload zeroes
it, and each launch leaves it zero).

Tried and not kept (H100, same-run pairs against this kernel): a dynamic tail. The pieces of a cut
request ran 3/4 of their planned keys, and warps that got free claimed the request's last keys in
chunks of 8-16 through an atomic counter. At 1 x 32768 it took 61-67 us against 58.8; where only
some pieces could claim, much longer (16 x 8192: 245 against 191 us; Zipf: 284 against 191); with
each warp walking its own key range, batches with no cut request lost 3% (the soft-cap and ALiBi
schedules gained 2-3%, the window lost 3%). Found on the way: ptxas turns one lane's integer atomic
add (or increment) into a warp-aggregated add whose result a SHFL reads at once, so the lane waits
the whole round trip where it issues the add (a float32 add it leaves alone); even so, an empty
pool, one failed claim per warp, cost 10% at 1 x 32768 (64.6 us), for reasons not yet known.
The sliding window at 1 x 32768 (4096 keys) went from 38.4 to 21.3 us: the plan cut the whole
length, and only the few pieces inside the window read keys; the decode plan now cuts only the
window when ``plan`` knows it (tvm_attn.tir.plan.make_decode_plan).

The cp.async ring (schedule suffix ``s<stages>``; no default picks it, the GPU tier checks it):
each thread copies its K/V pieces of a step ``stages - 1`` steps ahead into shared memory and reads
back only what it copied, so it needs no barrier. Same-run pairs on the H100 (32/8 heads): 2 stages
matched the register prefetch within 0.5% (186.1 against 187.0 us at 64 x 2048, 1 x 32768 equal);
3 or more were slower, by 0.5-5% (Zipf: 201-204 against 191 us), although a plain streaming read
gets 3.05 TB/s with 48-64 KB in flight per SM against 2.97-3.00 with the 32 KB this kernel keeps.
The shuffled page order of the benchmark costs 3%: 181.7 us over sequential page ids against 187.2
at 64 x 2048, NHD and HND alike (bench/logs/decode-ceiling-ring-h100.json).
"""

from __future__ import annotations

from tvm import tirx

from ..config import AttentionKey
from ..schedule.decode import DecodeTiles, per_16_bytes
from ..variants.base import HookContext
from ._builder import IRBuilder, T, let, local, loop, store, when
from ._cuda import atomic_add, cp_async, kernel_params, shfl_xor, stage_tables, thread_fence
from .softmax import LOG2E, Ref, f32, fold_partial, fold_states, neg_inf, online_update, rescaled
#: the kernel's merge of a cut request: partial rows each thread loads, and then folds at once (one
#: rescale). The merge waits on these loads: on an H100, timestamps in the kernel (%globaltimer) put
#: one round of them at 0.7-0.9 us while other blocks still stream K/V. 8 rows were 0-1 us faster at
#: 1 x 32768 but changed how nvcc schedules the key loop of the soft-cap kernel (10% slower there)
MERGE_ROWS = 4


def tiles_for(key: AttentionKey) -> DecodeTiles:
    """The tiles named by the key's schedule (``decode_schedule`` picks it; a tuned name works too)."""
    if key.schedule == "default":
        raise ValueError("CUDA decode keys name their schedule (tvm_attn.schedule.decode.decode_schedule)")
    tiles = DecodeTiles.parse(key.schedule, key.head_dim, key.kv_dtype)
    if key.group_size % tiles.heads_per_block:
        raise ValueError(f"schedule {key.schedule}: heads_per_block must divide the group size {key.group_size}")
    return tiles


def _thread(extent, tag):
    return T.thread_binding(0, extent, tag)


def make_batch_decode_cuda(key: AttentionKey, tiles: DecodeTiles | None = None) -> tirx.PrimFunc:
    tiles = tiles or tiles_for(key)
    variant, D, G = key.variant, key.head_dim, tiles.heads_per_block
    VEC, TX, U, NKG, S = tiles.vec, tiles.lanes_per_key, tiles.unroll, tiles.key_groups, tiles.stages
    CE = per_16_bytes(key.kv_dtype)  # elements of a 16-byte copy
    head_splits = key.group_size // G
    stage_keys = variant.overrides("key_transform")
    with IRBuilder() as ib:
        with T.prim_func():
            blocks_y = key.num_kv_heads * head_splits
            idx, num_ctas, work_info, cta_indptr, tmp_o, tmp_lse, merge, o, lse, sm_scale, params = kernel_params(
                key, key.num_qo_heads, merge_blocks=blocks_y)

            with _thread(num_ctas, "blockIdx.x") as cta, _thread(blocks_y, "blockIdx.y") as by:
                with _thread(tiles.threads, "threadIdx.x") as tid:
                    q_reg = local("q_reg", (G, VEC))
                    o_reg = local("o_reg", (G, VEC))
                    md = local("md", (G, 2))  # running max (log2 units) and sum per head
                    k_reg = local("k_reg", (U, VEC), key.kv_dtype)
                    v_reg = local("v_reg", (U, VEC), key.kv_dtype)
                    s_reg = local("s_reg", (U, G))
                    smem_o = T.alloc_buffer((NKG, G, D), "float32", scope="shared")
                    smem_md = T.alloc_buffer((NKG, G, 2), "float32", scope="shared")
                    smem_flag = T.alloc_buffer((1,), "int32", scope="shared")  # this block merges the request
                    k_smem = T.alloc_buffer((NKG, U, D), key.kv_dtype, scope="shared") if stage_keys else None
                    # the cp.async ring: [stage, key group, key of the step, K or V, dim]
                    kv_ring = None
                    if S:
                        kv_ring = T.alloc_buffer((S, NKG, U, 2, D), key.kv_dtype, scope="shared")
                        IRBuilder.name("kv_ring", kv_ring)

                    tables = stage_tables(variant, D, params, tid, tiles.threads)

                    # persistent CTA: its works, cta_indptr[cta]..cta_indptr[cta+1], one after another
                    first_work = let("first_work", cta_indptr[cta])
                    with loop("wi", cta_indptr[cta + 1] - first_work) as wi:
                        w = let("w", first_work + wi)
                        live = work_info[0, w] >= 0
                        req = let("req", tirx.max(work_info[0, w], 0))
                        kv_head = let("kv_head", by // head_splits)
                        head0 = let("head0", kv_head * key.group_size + (by % head_splits) * G)
                        lane, warp = tid % 32, tid // 32
                        tx = let("tx", lane % TX)
                        kg = let("kg", warp * tiles.keys_per_warp + lane // TX)
                        kv_len = let("kv_len", idx.kv_len(req))
                        ctx = HookContext(req, 0, None, None, kv_head, 1, kv_len, D, params, tables)
                        # a plan made from page counts alone (TVM's KV-cache decode slot) counts the
                        # last page full: the piece ends at the request's length
                        begin, end = work_info[1, w], tirx.min(work_info[2, w], kv_len)
                        bounds = variant.kv_range(ctx)
                        if bounds is not None:
                            begin, end = tirx.max(begin, bounds[0]), tirx.min(end, bounds[1])
                        begin = let("kv_begin", begin)
                        end = let("kv_end", tirx.if_then_else(live, tirx.max(end, begin), begin))

                        def qk_dim(v):
                            """Head dim of a lane's v-th q and key element in the q . k dot product. With
                            staged keys, a lane holds dims d and d + D/2 together (half its elements
                            each side), so a transform that pairs them (rotate-half RoPE) computes the
                            pair's shared angle once; otherwise the dims of its 16-byte K loads."""
                            if not stage_keys:
                                return tx * VEC + v
                            return tx * (VEC // 2) + tirx.floormod(v, VEC // 2) + (v // (VEC // 2)) * (D // 2)

                        # q for the fused heads, transformed once
                        with loop("g", G, "unroll") as g:
                            h = head0 + g
                            qctx = HookContext(req, 0, None, h, kv_head, 1, kv_len, D, params, tables)
                            load_q = lambda dd, h=h: f32(idx.q[req, h, dd])  # noqa: E731
                            with loop("v", VEC, "unroll") as v:
                                store(q_reg, variant.query_transform(qctx, load_q, qk_dim(v)), g, v)
                                store(o_reg, tirx.const(0.0, "float32"), g, v)
                            store(md, neg_inf(), g, 0)
                            store(md, tirx.const(0.0, "float32"), g, 1)

                        def load_step(it, k_dst, v_dst):  # all loads of a step first: bytes in flight
                            first = begin + it * (NKG * U) + kg
                            with loop("u", U, "unroll") as u:
                                addr = idx.kv_addr(req, tirx.min(first + u * NKG, end - 1))
                                with loop("v", VEC, "vectorized") as v:
                                    store(k_dst, idx.load_k(addr, kv_head, tx * VEC + v), u, v)
                                with loop("v", VEC, "vectorized") as v:
                                    store(v_dst, idx.load_v(addr, kv_head, tx * VEC + v), u, v)

                        def copy_step(step, stage):  # cp.async of a step's K and V pieces into the ring
                            first = begin + step * (NKG * U) + kg
                            with loop("u", U, "unroll") as u:
                                addr = idx.kv_addr(req, tirx.min(first + u * NKG, end - 1))
                                with loop("c", VEC // CE, "unroll") as c:
                                    d = tx * VEC + c * CE
                                    for part, elem in ((0, idx.k_elem), (1, idx.v_elem)):
                                        buf, ix = elem(addr, kv_head, d)
                                        cp_async(kv_ring, (stage, kg, u, part, d), buf, ix)

                        n_steps = let("n_steps", tirx.ceildiv(end - begin, NKG * U))
                        if S:  # the first S - 1 steps in flight (a group per step, empty past the work)
                            for st in range(S - 1):
                                with when(st < n_steps):
                                    copy_step(st, st)
                                T.evaluate(T.ptx["cp.async.commit_group"]())
                        if tiles.prefetch:
                            k_next = local("k_next", (U, VEC), key.kv_dtype)
                            v_next = local("v_next", (U, VEC), key.kv_dtype)
                            with when(n_steps > 0):
                                load_step(0, k_next, v_next)
                        with loop("it", n_steps) as it:
                            base = let("base", begin + it * (NKG * U) + kg)
                            if S:
                                # step it has landed; its ring slot's previous step (it - 1) was used up
                                # by this thread's own compute, so step it + S - 1 can take that slot
                                T.evaluate(T.ptx["cp.async.wait_group"](S - 2))
                                with when(it + S - 1 < n_steps):
                                    copy_step(it + S - 1, (it + S - 1) % S)
                                T.evaluate(T.ptx["cp.async.commit_group"]())
                                stage = let("stage", it % S)
                                with loop("u", U, "unroll") as u:
                                    with loop("v", VEC, "vectorized") as v:
                                        store(k_reg, kv_ring[stage, kg, u, 0, tx * VEC + v], u, v)
                                    with loop("v", VEC, "vectorized") as v:
                                        store(v_reg, kv_ring[stage, kg, u, 1, tx * VEC + v], u, v)
                            elif tiles.prefetch:  # take the step's rows, then issue the next step's loads
                                with loop("u", U, "unroll") as u:
                                    with loop("v", VEC, "unroll") as v:
                                        store(k_reg, k_next[u, v], u, v)
                                        store(v_reg, v_next[u, v], u, v)
                                with when(it + 1 < n_steps):
                                    load_step(it + 1, k_next, v_next)
                            else:
                                load_step(it, k_reg, v_reg)
                            if stage_keys:
                                with loop("u", U, "unroll") as u:
                                    with loop("v", VEC, "vectorized") as v:
                                        store(k_smem, k_reg[u, v], kg, u, tx * VEC + v)
                                T.evaluate(tirx.op.tvm_storage_sync("warp"))
                            with loop("u", U, "unroll") as u:
                                pos = let("pos", base + u * NKG)
                                sctx = HookContext(req, 0, pos, None, kv_head, 1, kv_len, D, params, tables)
                                kctx = HookContext(req, None, pos, None, kv_head, 1, kv_len, D, params, tables)
                                if stage_keys:  # transformed once per key, for every head of the group
                                    k_t = local("k_t", VEC)
                                    load_k = lambda dd, u=u: f32(k_smem[kg, u, dd])  # noqa: E731
                                    with loop("v", VEC, "unroll") as v:
                                        store(k_t, variant.key_transform(kctx, load_k, qk_dim(v)), v)
                                with loop("g", G, "unroll") as g:
                                    acc = local("acc", 1)
                                    store(acc, tirx.const(0.0, "float32"), 0)
                                    with loop("v", VEC, "unroll") as v:
                                        k_v = k_t[v] if stage_keys else f32(k_reg[u, v])
                                        store(acc, acc[0] + q_reg[g, v] * k_v, 0)
                                    off = TX // 2
                                    while off >= 1:
                                        store(acc, acc[0] + shfl_xor(acc[0], off, 32), 0)
                                        off //= 2
                                    sctx.qo_head_idx = head0 + g
                                    s = variant.logits_transform(sctx, acc[0] * sm_scale)
                                    visible = pos < end
                                    m = variant.logits_mask(sctx)
                                    if m is not None:
                                        visible = tirx.all(visible, m)
                                    if variant.use_softmax:
                                        store(s_reg, tirx.if_then_else(visible, s * LOG2E, neg_inf()), u, g)
                                    else:
                                        store(s_reg, tirx.if_then_else(visible, s, tirx.const(0.0, "float32")), u, g)
                            _update_state(variant.use_softmax, G, U, VEC, md, o_reg, s_reg, v_reg)

                        # the work's output row, and a cut request's partial rows (merge_indptr), loaded
                        # here so that the merge does not wait for them
                        out_row = let("out_row", work_info[3, w])
                        merge_indptr, merge_count = merge
                        first_row = let("m_first", merge_indptr[req])
                        rows = first_row, let("m_pieces", merge_indptr[req + 1] - first_row)
                        # merge the key groups of the block
                        with loop("g", G, "unroll") as g:
                            with loop("v", VEC, "unroll") as v:
                                store(smem_o, o_reg[g, v], kg, g, tx * VEC + v)
                            with when(tx == 0):
                                store(smem_md, md[g, 0], kg, g, 0)
                                store(smem_md, md[g, 1], kg, g, 1)
                        T.evaluate(tirx.op.tvm_storage_sync("shared"))
                        with loop("t", tirx.ceildiv(G * TX, tiles.threads)) as t:
                            slot = let("slot", t * tiles.threads + tid)
                            with when(tirx.all(live, slot < G * TX)):
                                g, c = slot // TX, slot % TX
                                h = let("h", head0 + g)
                                res = local("res", VEC)
                                tot = local("tot", 2)
                                _merge_groups(variant.use_softmax, NKG, smem_md, smem_o, g, c, VEC, res, tot)
                                octx = HookContext(req, 0, None, h, kv_head, 1, kv_len, D, params, tables)
                                with T.If(out_row < 0):
                                    with T.Then():
                                        with loop("v", VEC, "unroll") as v:
                                            val = variant.output_transform(octx, res[v], c * VEC + v)
                                            if variant.use_softmax:
                                                val = tirx.if_then_else(tot[1] > 0, val, tirx.const(0.0, "float32"))
                                            store(o, tirx.Cast(key.o_dtype, val), req, h, c * VEC + v)
                                        with when(c == 0):
                                            store(lse, tot[0], req, h)
                                    with T.Else():
                                        with loop("v", VEC, "unroll") as v:
                                            store(tmp_o, res[v], out_row, h, c * VEC + v)
                                        with when(c == 0):
                                            store(tmp_lse, tot[0], out_row, h)
                        with when(tirx.all(live, out_row >= 0)):  # uniform over the block
                            _merge_if_last(key, tiles, merge_count, rows, tmp_o, tmp_lse, o, lse, smem_o, smem_md,
                                           smem_flag, req, by, head0, kv_head, kv_len, tid, params, tables)
                        T.evaluate(tirx.op.tvm_storage_sync("shared"))  # the next work reuses smem_o / smem_md
    return ib.get()


def _merge_if_last(key, tiles, merge_count, rows, tmp_o, tmp_lse, o, lse, smem_o, smem_md, smem_flag, req, by,
                   head0, kv_head, kv_len, tid, params, tables):
    """After a piece of a cut request has written its partial state: the block that finishes the
    request's last piece (for its heads) folds all the pieces' states into o and lse, so no merge
    kernel runs after the decode kernel (on an H100 that launch cost 8-9 us at batch 1 and 64).

    ``merge_count[req, by]`` counts the request's finished pieces; the block that brings it to the
    number of pieces puts it back to 0, so the next launch (the next layer, or a graph replay)
    starts from 0, as it does after each plan's upload. The partial rows of ``req`` are
    ``rows = (merge_indptr[req], pieces)``. Thread ``(rg, slot)`` folds rows ``rg, rg + RG, ..``,
    ``UM`` at a time (their loads issued together); the row groups then meet in shared memory like
    the key groups.

    Measured on an H100 with timestamps in the kernel (%globaltimer), for the block that merges:
    the fence and count take 1.0 us; the merge ~0.9 us for the few pieces of 16 x 8192 and the Zipf
    batch, and 4.1 us for the 66 pieces of 1 x 32768 (3.5 us at 8 rows a thread): a round of loads
    takes 0.7-0.9 us while other blocks still stream."""
    variant, D, G, VEC, TX = key.variant, key.head_dim, tiles.heads_per_block, tiles.vec, tiles.lanes_per_key
    threads, slots = tiles.threads, G * TX
    per_pass = min(slots, threads)
    RG = threads // per_pass
    assert RG <= tiles.key_groups, "the row groups' states go through smem_o, sized by the key groups"
    UM = MERGE_ROWS
    first, n = rows  # merge_indptr[req], and the request's number of pieces
    # the block's partial-state stores happen before the barrier, the barrier before thread 0's
    # fence, the fence before its count (release, cumulative over the block, as CUTLASS's semaphore)
    T.evaluate(tirx.op.tvm_storage_sync("shared"))
    with when(tid == 0):
        thread_fence()
        done = let("m_done", atomic_add(merge_count, tirx.const(1, "int32"), req, by))
        last = done == n - 1
        with when(last):
            thread_fence()  # acquire: the other pieces' states, seen by the block after the barrier
            store(merge_count, 0, req, by)
        store(smem_flag, tirx.if_then_else(last, 1, 0), 0)
    T.evaluate(tirx.op.tvm_storage_sync("shared"))
    is_last = local("m_is_last", 1, "int32")
    store(is_last, smem_flag[0], 0)
    with when(is_last[0] != 0):
        rg = tid // per_pass
        with loop("m_pass", slots // per_pass) as ps:
            slot = ps * per_pass + tid % per_pass
            g, c = slot // TX, slot % TX
            h = let("m_h", head0 + g)
            md, acc = local("m_md", (1, 2)), local("m_acc", (1, VEC))
            store(md, neg_inf(), 0, 0)
            store(md, tirx.const(0.0, "float32"), 0, 1)
            with loop("v", VEC, "unroll") as v:
                store(acc, tirx.const(0.0, "float32"), 0, v)
            lse_l, part_l = local("m_lse", UM), local("m_part", (UM, VEC))
            ok = local("m_ok", UM, "int32")  # the row is one of the request's (else a repeat of its last)
            with loop("k", tirx.ceildiv(tirx.max(n - rg, 0), RG * UM)) as k:
                with loop("j", UM, "unroll") as j:  # loads first: UM rows in flight
                    r = (k * UM + j) * RG + rg
                    row = let("m_row", first + tirx.min(r, n - 1))
                    store(ok, tirx.if_then_else(r < n, 1, 0), j)
                    store(lse_l, tirx.if_then_else(r < n, tmp_lse[row, h], neg_inf()), j)
                    LV = min(VEC, 4)  # 16-byte loads
                    with loop("vc", VEC // LV, "unroll") as vc:
                        with loop("v", LV, "vectorized") as v:
                            store(part_l, tmp_o[row, h, c * VEC + vc * LV + v], j, vc * LV + v)
                # the UM rows fold at once; a repeated row weighs 0 (softmax: lse -inf) or adds 0
                parts = [lambda v, j=j: tirx.if_then_else(ok[j] != 0, part_l[j, v], tirx.const(0.0, "float32"))
                         for j in range(UM)]
                fold_partial(variant.use_softmax, md, acc, (0,), VEC, [lse_l[j] for j in range(UM)], parts)
            with loop("v", VEC, "unroll") as v:
                store(smem_o, acc[0, v], rg, g, c * VEC + v)
            with when(c == 0):
                store(smem_md, md[0, 0], rg, g, 0)
                store(smem_md, md[0, 1], rg, g, 1)
            T.evaluate(tirx.op.tvm_storage_sync("shared"))
            with when(rg == 0):
                res, tot = local("m_res", VEC), local("m_tot", 2)
                _merge_groups(variant.use_softmax, RG, smem_md, smem_o, g, c, VEC, res, tot)
                octx = HookContext(req, 0, None, h, kv_head, 1, kv_len, D, params, tables)
                with loop("v", VEC, "unroll") as v:
                    store(o, tirx.Cast(key.o_dtype, variant.output_transform(octx, res[v], c * VEC + v)),
                          req, h, c * VEC + v)
                with when(c == 0):
                    store(lse, tot[0], req, h)
            T.evaluate(tirx.op.tvm_storage_sync("shared"))  # the next pass reuses smem_o / smem_md


def _update_state(use_softmax, G, U, VEC, md, o_reg, s_reg, v_reg):
    """Fold ``U`` logits per head (``s_reg``, log2 units, -inf when hidden) and their V rows in."""
    with loop("g", G, "unroll") as g:
        step = None
        if use_softmax:
            step = online_update(Ref(md, (g, 0)), Ref(md, (g, 1)), U, lambda u: s_reg[u, g], p_local=True)
        with loop("v", VEC, "unroll") as v:
            if step is None:
                store(o_reg, rescaled(o_reg[g, v], None, [s_reg[u, g] * f32(v_reg[u, v]) for u in range(U)]), g, v)
            else:
                store(o_reg, step.output(o_reg[g, v], [f32(v_reg[u, v]) for u in range(U)]), g, v)


def _merge_groups(use_softmax, NKG, smem_md, smem_o, g, c, VEC, res, tot):
    fold_states(use_softmax, NKG, lambda k: smem_md[k, g, 0], lambda k: smem_md[k, g, 1],
                lambda k, v: smem_o[k, g, c * VEC + v], VEC, res, tot)

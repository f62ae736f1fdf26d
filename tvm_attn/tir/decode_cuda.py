"""CUDA batch decode over a paged KV cache, split-KV over a fixed grid, with the merge of the split
requests' partial states in the same kernel.

Lineage: FlashInfer ``decode.cuh`` (``BatchDecodeWithPagedKVCacheKernel``: head-group fusion, a
work list from the planner, partial states merged afterwards). Same variant hooks and the same KV
index math (:mod:`tvm_attn.kv.index`) as the CPU kernel.

Persistent grid ``(num_ctas, num_kv_heads * head_splits)``, block ``tiles.threads`` (4 warps). CTA
``c`` runs the planner's works ``cta_indptr[c]:cta_indptr[c+1]`` in turn (:class:`tvm_attn.planner.Work`:
one piece of one request's keys); the grid depends only on the GPU and the heads, never on the
batch, so a captured CUDA graph stays valid. One block serves the ``heads_per_block`` query heads of
one KV head, so each K/V row is read once for all of them. Its stages, per work::

    load q: the heads' q (vec elements per thread, in registers), transformed once
    for each step: issue K/V (every key group loads `unroll` K and V rows, 16-byte loads)
        Q.K^T: shuffle-reduce over the lanes of a row; the variant's logits and mask hooks
        online softmax of the `unroll` logits into (m, l, o), and P.V
    merge the key groups' (m, l, o) through shared memory
    epilogue: out_row < 0: write o and lse; else: write the partial state to tmp_o / tmp_lse,
        count the piece done in merge_count, and, in the block that finishes the request's last
        piece, fold its partial states (rows merge_indptr[req]:merge_indptr[req+1]) into o and lse

Arguments: ``q, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, work_info, cta_indptr,
tmp_o, tmp_lse, merge_indptr, merge_count, o, lse, sm_scale, *extras``; ``merge_count`` (int32
``[max_rows, num_kv_heads * head_splits]``) is zero at a launch (the plan's upload zeroes it, each
launch leaves it zero). The merge in the kernel saves a merge kernel's launch (8-9 us on an H100).

Tried and not kept (H100, bench/logs/decode-dynamic-tail-h100.json): a dynamic tail, warps that
got free claiming a cut request's last keys through an atomic counter, was slower on cut requests
(61-67 against 58.8 us at 1 x 32768; 10% even with nothing to claim), and much slower where only
some pieces could claim. The cp.async ring (schedule suffix ``s<stages>``, which no default picks;
the GPU tier checks it): each thread copies its K/V pieces ``stages - 1`` steps ahead into shared
memory and reads back only what it copied, so it needs no barrier; 2 stages matched the register
prefetch, 3 or more were slower (bench/logs/decode-ceiling-ring-h100.json).
"""

from __future__ import annotations

import dataclasses

from tvm import tirx

from ..config import AttentionKey
from ..planner import Work
from ..schedule.decode import DecodeTiles, per_16_bytes
from ..variants.base import HookContext
from ._builder import IRBuilder, T, let, local, loop, store, when
from ._cuda import KernelArgs, atomic_add, cp_async, kernel_params, shfl_xor, stage_tables, thread_fence
from .softmax import (
    LOG2E,
    Ref,
    f32,
    fold_partial,
    fold_states,
    neg_inf,
    nonempty,
    online_update,
    rescaled,
    zero,
)

#: the kernel's merge of a cut request: partial rows each thread loads, and then folds at once (one
#: rescale). The merge waits on these loads (0.7-0.9 us a round on an H100 while other blocks still
#: stream K/V); 8 rows were 0-1 us faster at 1 x 32768 but made nvcc schedule the key loop of the
#: soft-cap kernel worse (10% slower there)
MERGE_ROWS = 4


def tiles_for(key: AttentionKey) -> DecodeTiles:
    """The tiles named by the key's schedule (``decode_schedule`` picks it; a tuned name works too)."""
    if key.schedule == "default":
        raise ValueError("CUDA decode keys name their schedule (tvm_attn.schedule.decode.decode_schedule)")
    return DecodeTiles.of(key)


def _thread(extent, tag):
    return T.thread_binding(0, extent, tag)


def _sync(scope: str = "shared") -> None:
    T.evaluate(tirx.op.tvm_storage_sync(scope))


@dataclasses.dataclass
class _Block:
    """What the stages of one block share: the key and tiles, the kernel's arguments, the thread,
    and its registers and shared memory."""

    key: AttentionKey
    tiles: DecodeTiles
    args: KernelArgs
    by: tirx.Var  # the block's heads: KV head by // head_splits, a slice of HB of its G query heads
    tid: tirx.Var
    q_reg: tirx.Buffer  # [HB, VEC]: the heads' q elements of this lane
    o_reg: tirx.Buffer  # [HB, VEC]: their running outputs
    md: tirx.Buffer  # [HB, 2]: running max (log2 units) and sum of weights
    k_reg: tirx.Buffer  # [U, VEC]: this step's K rows (this lane's elements)
    v_reg: tirx.Buffer  # [U, VEC]: and V rows
    s_reg: tirx.Buffer  # [U, HB]: this step's logits (log2 units, -inf when hidden)
    o_smem: tirx.Buffer  # [NKG, HB, D]: the key groups' outputs, met to merge
    md_smem: tirx.Buffer  # [NKG, HB, 2]: and their (max, sum)
    flag_smem: tirx.Buffer  # [1]: this block merges the request
    k_smem: tirx.Buffer | None  # [NKG, U, D]: staged K rows (a variant with a key transform)
    kv_ring: tirx.Buffer | None  # [S, NKG, U, K or V, D]: the cp.async ring
    tables: dict  # the variant's tables in shared memory

    def __post_init__(self):
        # one name per concept: D head dim, G GQA group size, HB query heads per block (G over
        # head_splits blocks), VEC elements of a lane's 16-byte K/V load, TX lanes per K/V row, U rows
        # a key group loads per step, NKG key groups (rows read at the same time), S ring stages
        t, self.variant = self.tiles, self.key.variant
        self.D, self.G, self.HB, self.VEC = self.key.head_dim, self.key.group_size, t.heads_per_block, t.vec
        self.TX, self.U, self.NKG, self.S = t.lanes_per_key, t.unroll, t.key_groups, t.stages
        self.head_splits = self.G // self.HB

    @property
    def stage_keys(self) -> bool:
        """Keys go through k_smem, transformed once per key for every head of the block."""
        return self.k_smem is not None


@dataclasses.dataclass
class _Piece:
    """The work a block runs now: one piece ``[begin, end)`` of request ``req``'s keys (``live``:
    not padding), with the lane's place in it (``tx`` lane of key group ``kg``)."""

    w: tirx.Var
    live: tirx.PrimExpr
    req: tirx.Var
    kv_head: tirx.Var
    head0: tirx.Var  # the block's first query head
    tx: tirx.Var
    kg: tirx.Var
    kv_len: tirx.Var
    hooks: HookContext  # what the variant's hooks see of the work
    begin: tirx.Var = None
    end: tirx.Var = None
    k_next: tirx.Buffer | None = None  # the register prefetch's next K/V rows
    v_next: tirx.Buffer | None = None
    #: the piece is clipped to the variant's key range and its mask is exactly that range (a sliding
    #: window): every key of the piece is visible, no mask is evaluated
    mask_free: bool = False

    def ctx(self, kv=None, head=None, qo=0) -> HookContext:
        return dataclasses.replace(self.hooks, qo_idx=qo, kv_idx=kv, qo_head_idx=head)


def make_batch_decode_cuda(key: AttentionKey, tiles: DecodeTiles | None = None) -> tirx.PrimFunc:
    tiles = tiles or tiles_for(key)
    blocks_y = key.num_kv_heads * (key.group_size // tiles.heads_per_block)
    with IRBuilder() as ib:
        with T.prim_func():
            args = kernel_params(key, key.num_qo_heads, merge_blocks=blocks_y)
            with _thread(args.num_ctas, "blockIdx.x") as cta, _thread(blocks_y, "blockIdx.y") as by:
                with _thread(tiles.threads, "threadIdx.x") as tid:
                    b = _alloc_block(key, tiles, args, by, tid)
                    # persistent CTA: its works, cta_indptr[cta]..cta_indptr[cta+1], one after another
                    first_work = let("first_work", args.cta_indptr[cta])
                    with loop("wi", args.cta_indptr[cta + 1] - first_work) as wi:
                        pc = _begin_work(b, let("w", first_work + wi))
                        _load_q(b, pc)
                        n_steps = _issue_first_steps(b, pc)
                        with loop("it", n_steps) as it:
                            base = let("base", pc.begin + it * (b.NKG * b.U) + pc.kg)
                            _take_step(b, pc, it, n_steps)  # this step's K/V rows; the next ones issued
                            _qk_logits(b, pc, base)  # Q.K^T, the logits and mask hooks -> s_reg
                            _softmax_pv(b)  # online softmax of s_reg, and P.V
                        out_row, rows = _epilogue_rows(b, pc)
                        _merge_key_groups(b, pc, out_row)  # and write o, or the partial state
                        with when(tirx.all(pc.live, out_row >= 0)):  # uniform over the block
                            _merge_if_last(b, pc, rows)
                        _sync()  # the next work reuses o_smem / md_smem
    return ib.get()


def _alloc_block(key, tiles, args, by, tid) -> _Block:
    HB, VEC, U, NKG, S = tiles.heads_per_block, tiles.vec, tiles.unroll, tiles.key_groups, tiles.stages
    D = key.head_dim
    q_reg, o_reg = local("q_reg", (HB, VEC)), local("o_reg", (HB, VEC))
    md = local("md", (HB, 2))
    k_reg, v_reg = local("k_reg", (U, VEC), key.kv_dtype), local("v_reg", (U, VEC), key.kv_dtype)
    s_reg = local("s_reg", (U, HB))
    o_smem = T.alloc_buffer((NKG, HB, D), "float32", scope="shared")
    md_smem = T.alloc_buffer((NKG, HB, 2), "float32", scope="shared")
    flag_smem = T.alloc_buffer((1,), "int32", scope="shared")
    k_smem = None
    if key.variant.overrides("key_transform"):
        k_smem = T.alloc_buffer((NKG, U, D), key.kv_dtype, scope="shared")
    kv_ring = None
    if S:
        kv_ring = T.alloc_buffer((S, NKG, U, 2, D), key.kv_dtype, scope="shared")
        IRBuilder.name("kv_ring", kv_ring)
    tables = stage_tables(key.variant, D, args.params, tid, tiles.threads)
    return _Block(key, tiles, args, by, tid, q_reg, o_reg, md, k_reg, v_reg, s_reg, o_smem, md_smem,
                  flag_smem, k_smem, kv_ring, tables)


def _begin_work(b: _Block, w) -> _Piece:
    """The piece of work ``w``, clipped to the request's length and the variant's key range."""
    work_info, idx = b.args.work_info, b.args.idx
    live = work_info[Work.REQUEST, w] >= 0
    req = let("req", tirx.max(work_info[Work.REQUEST, w], 0))
    kv_head = let("kv_head", b.by // b.head_splits)
    head0 = let("head0", kv_head * b.G + (b.by % b.head_splits) * b.HB)
    lane, warp = b.tid % 32, b.tid // 32
    tx = let("tx", lane % b.TX)
    kg = let("kg", warp * b.tiles.keys_per_warp + lane // b.TX)
    kv_len = let("kv_len", idx.kv_len(req))
    hooks = HookContext(req, 0, None, None, kv_head, 1, kv_len, b.D, b.args.params, b.tables)
    pc = _Piece(w, live, req, kv_head, head0, tx, kg, kv_len, hooks)
    # a plan made from page counts alone (TVM's KV-cache decode slot) counts the last page full: the
    # piece ends at the request's length
    begin, end = work_info[Work.KV_BEGIN, w], tirx.min(work_info[Work.KV_END, w], kv_len)
    bounds = b.variant.kv_range(hooks)
    if bounds is not None:
        begin, end = tirx.max(begin, bounds[0]), tirx.min(end, bounds[1])
        # with a logits transform too (soft-cap) ptxas (nvcc 13, sm_90a) spills 20 bytes at the 128
        # registers of 4 blocks per SM once the window's compare is gone; keeping it spills none
        pc.mask_free = b.variant.mask_is_range() and not b.variant.overrides("logits_transform")
    pc.begin = let("kv_begin", begin)
    pc.end = let("kv_end", tirx.if_then_else(live, tirx.max(end, pc.begin), pc.begin))
    return pc


def _qk_dim(b: _Block, pc: _Piece, v):
    """Head dim of a lane's v-th q and key element in the q . k dot product. With staged keys, a
    lane holds dims d and d + D/2 together (half its elements each side), so a transform that pairs
    them (rotate-half RoPE) computes the pair's shared angle once; otherwise the dims of its 16-byte
    K loads."""
    if not b.stage_keys:
        return pc.tx * b.VEC + v
    half = b.VEC // 2
    return pc.tx * half + tirx.floormod(v, half) + (v // half) * (b.D // 2)


def _load_q(b: _Block, pc: _Piece) -> None:
    """q of the block's heads, transformed once; the running state empty."""
    q = b.args.idx.q
    with loop("g", b.HB, "unroll") as g:
        h = pc.head0 + g
        load_q = lambda dd, h=h: f32(q[pc.req, h, dd])  # noqa: E731
        qctx = pc.ctx(head=h)
        with loop("v", b.VEC, "unroll") as v:
            store(b.q_reg, b.variant.query_transform(qctx, load_q, _qk_dim(b, pc, v)), g, v)
            store(b.o_reg, zero(), g, v)
        store(b.md, neg_inf(), g, 0)
        store(b.md, zero(), g, 1)


def _step_addr(b: _Block, pc: _Piece, step, u):
    """Address of key ``u`` of this key group in ``step`` (past the piece: its last key again)."""
    first = pc.begin + step * (b.NKG * b.U) + pc.kg
    return b.args.idx.kv_addr(pc.req, tirx.min(first + u * b.NKG, pc.end - 1))


def _load_step(b: _Block, pc: _Piece, step, k_dst, v_dst) -> None:
    """Register loads of a step's K and V rows, all issued before any is used: bytes in flight."""
    idx = b.args.idx
    with loop("u", b.U, "unroll") as u:
        addr = _step_addr(b, pc, step, u)
        with loop("v", b.VEC, "vectorized") as v:
            store(k_dst, idx.load_k(addr, pc.kv_head, pc.tx * b.VEC + v), u, v)
        with loop("v", b.VEC, "vectorized") as v:
            store(v_dst, idx.load_v(addr, pc.kv_head, pc.tx * b.VEC + v), u, v)


def _copy_step(b: _Block, pc: _Piece, step, stage) -> None:
    """cp.async of a step's K and V pieces into ring slot ``stage``."""
    CE = per_16_bytes(b.key.kv_dtype)  # elements of a 16-byte copy
    with loop("u", b.U, "unroll") as u:
        addr = _step_addr(b, pc, step, u)
        with loop("c", b.VEC // CE, "unroll") as c:
            d = pc.tx * b.VEC + c * CE
            for part, elem in ((0, b.args.idx.k_elem), (1, b.args.idx.v_elem)):
                buf, ix = elem(addr, pc.kv_head, d)
                cp_async(b.kv_ring, (stage, pc.kg, u, part, d), buf, ix)


def _issue_first_steps(b: _Block, pc: _Piece):
    """The piece's number of steps; the loads issued before the key loop (the ring's first
    ``S - 1`` steps, or the register prefetch's first step)."""
    n_steps = let("n_steps", tirx.ceildiv(pc.end - pc.begin, b.NKG * b.U))
    if b.S:  # a group per step, empty past the work
        for st in range(b.S - 1):
            with when(st < n_steps):
                _copy_step(b, pc, st, st)
            T.evaluate(T.ptx["cp.async.commit_group"]())
    if b.tiles.prefetch:
        pc.k_next = local("k_next", (b.U, b.VEC), b.key.kv_dtype)
        pc.v_next = local("v_next", (b.U, b.VEC), b.key.kv_dtype)
        with when(n_steps > 0):
            _load_step(b, pc, 0, pc.k_next, pc.v_next)
    return n_steps


def _take_step(b: _Block, pc: _Piece, it, n_steps) -> None:
    """Step ``it``'s K/V rows into k_reg / v_reg (and staged keys into k_smem); the loads of a later
    step issued."""
    U, VEC, S = b.U, b.VEC, b.S
    if S:
        # step it has landed; its ring slot's previous step (it - 1) was used up by this thread's own
        # compute, so step it + S - 1 can take that slot
        T.evaluate(T.ptx["cp.async.wait_group"](S - 2))
        with when(it + S - 1 < n_steps):
            _copy_step(b, pc, it + S - 1, (it + S - 1) % S)
        T.evaluate(T.ptx["cp.async.commit_group"]())
        stage = let("stage", it % S)
        with loop("u", U, "unroll") as u:
            with loop("v", VEC, "vectorized") as v:
                store(b.k_reg, b.kv_ring[stage, pc.kg, u, 0, pc.tx * VEC + v], u, v)
            with loop("v", VEC, "vectorized") as v:
                store(b.v_reg, b.kv_ring[stage, pc.kg, u, 1, pc.tx * VEC + v], u, v)
    elif b.tiles.prefetch:  # take the step's rows, then issue the next step's loads
        with loop("u", U, "unroll") as u:
            with loop("v", VEC, "unroll") as v:
                store(b.k_reg, pc.k_next[u, v], u, v)
                store(b.v_reg, pc.v_next[u, v], u, v)
        with when(it + 1 < n_steps):
            _load_step(b, pc, it + 1, pc.k_next, pc.v_next)
    else:
        _load_step(b, pc, it, b.k_reg, b.v_reg)
    if b.stage_keys:
        with loop("u", U, "unroll") as u:
            with loop("v", VEC, "vectorized") as v:
                store(b.k_smem, b.k_reg[u, v], pc.kg, u, pc.tx * VEC + v)
        _sync("warp")


def _qk_logits(b: _Block, pc: _Piece, base) -> None:
    """``s_reg[u, g]``: the logit of key ``base + u * NKG`` for head ``g`` (log2 units with softmax),
    after the variant's logits transform; -inf (0 without softmax) where the key is hidden."""
    variant, VEC = b.variant, b.VEC
    with loop("u", b.U, "unroll") as u:
        pos = let("pos", base + u * b.NKG)
        if b.stage_keys:  # transformed once per key, for every head of the block
            k_t = local("k_t", VEC)
            load_k = lambda dd, u=u: f32(b.k_smem[pc.kg, u, dd])  # noqa: E731
            kctx = pc.ctx(kv=pos, qo=None)
            with loop("v", VEC, "unroll") as v:
                store(k_t, variant.key_transform(kctx, load_k, _qk_dim(b, pc, v)), v)
        with loop("g", b.HB, "unroll") as g:
            acc = local("acc", 1)
            store(acc, zero(), 0)
            with loop("v", VEC, "unroll") as v:
                k_v = k_t[v] if b.stage_keys else f32(b.k_reg[u, v])
                store(acc, acc[0] + b.q_reg[g, v] * k_v, 0)
            off = b.TX // 2
            while off >= 1:  # the row's dot product, over its lanes
                store(acc, acc[0] + shfl_xor(acc[0], off, 32), 0)
                off //= 2
            sctx = pc.ctx(kv=pos, head=pc.head0 + g)
            s = variant.logits_transform(sctx, acc[0] * b.args.sm_scale)
            visible = pos < pc.end
            m = None if pc.mask_free else variant.logits_mask(sctx)
            if m is not None:
                visible = tirx.all(visible, m)
            if variant.use_softmax:
                store(b.s_reg, tirx.if_then_else(visible, s * LOG2E, neg_inf()), u, g)
            else:
                store(b.s_reg, tirx.if_then_else(visible, s, zero()), u, g)


def _softmax_pv(b: _Block) -> None:
    """Fold the step's ``U`` logits per head and their V rows into (md, o_reg): the online softmax
    and P.V (without softmax the logits are the weights)."""
    with loop("g", b.HB, "unroll") as g:
        step = None
        if b.variant.use_softmax:
            logit = lambda u: b.s_reg[u, g]  # noqa: E731
            step = online_update(Ref(b.md, (g, 0)), Ref(b.md, (g, 1)), b.U, logit, p_local=True)
        with loop("v", b.VEC, "unroll") as v:
            values = [f32(b.v_reg[u, v]) for u in range(b.U)]
            if step is None:
                out = rescaled(b.o_reg[g, v], None, [b.s_reg[u, g] * x for u, x in enumerate(values)])
            else:
                out = step.output(b.o_reg[g, v], values)
            store(b.o_reg, out, g, v)


def _epilogue_rows(b: _Block, pc: _Piece):
    """The work's output row, and its request's partial rows ``(merge_indptr[req], pieces)``, loaded
    before the merge so that it does not wait for them."""
    out_row = let("out_row", b.args.work_info[Work.OUT_ROW, pc.w])
    merge_indptr = b.args.merge[0]
    first_row = let("m_first", merge_indptr[pc.req])
    return out_row, (first_row, let("m_pieces", merge_indptr[pc.req + 1] - first_row))


def _merge_key_groups(b: _Block, pc: _Piece, out_row) -> None:
    """Merge the key groups' states through shared memory; write o and lse (``out_row < 0``), or the
    piece's partial state to row ``out_row`` of tmp_o / tmp_lse."""
    HB, VEC, TX, threads, a = b.HB, b.VEC, b.TX, b.tiles.threads, b.args
    with loop("g", HB, "unroll") as g:
        with loop("v", VEC, "unroll") as v:
            store(b.o_smem, b.o_reg[g, v], pc.kg, g, pc.tx * VEC + v)
        with when(pc.tx == 0):
            store(b.md_smem, b.md[g, 0], pc.kg, g, 0)
            store(b.md_smem, b.md[g, 1], pc.kg, g, 1)
    _sync()
    with loop("t", tirx.ceildiv(HB * TX, threads)) as t:
        slot = let("slot", t * threads + b.tid)
        with when(tirx.all(pc.live, slot < HB * TX)):
            g, c = slot // TX, slot % TX
            h = let("h", pc.head0 + g)
            res, tot = local("res", VEC), local("tot", 2)
            _fold_smem_states(b, b.NKG, g, c, res, tot)
            octx = pc.ctx(head=h)
            with T.If(out_row < 0):
                with T.Then():
                    with loop("v", VEC, "unroll") as v:
                        val = b.variant.output_transform(octx, res[v], c * VEC + v)
                        if b.variant.use_softmax:
                            val = tirx.if_then_else(nonempty(tot[1]), val, zero())
                        store(a.o, tirx.Cast(b.key.o_dtype, val), pc.req, h, c * VEC + v)
                    with when(c == 0):
                        store(a.lse, tot[0], pc.req, h)
                with T.Else():
                    with loop("v", VEC, "unroll") as v:
                        store(a.tmp_o, res[v], out_row, h, c * VEC + v)
                    with when(c == 0):
                        store(a.tmp_lse, tot[0], out_row, h)


def _fold_smem_states(b: _Block, n: int, g, c, res, tot) -> None:
    """Fold the ``n`` states of head ``g`` in o_smem / md_smem for elements ``c * VEC ..``."""
    VEC = b.VEC
    fold_states(b.variant.use_softmax, n, lambda k: b.md_smem[k, g, 0], lambda k: b.md_smem[k, g, 1],
                lambda k, v: b.o_smem[k, g, c * VEC + v], VEC, res, tot)


def _count_piece(b: _Block, pc: _Piece, pieces):
    """Count the block's piece of ``pc.req`` done; true in the block that finishes the request's
    last piece (for its heads), which then puts ``merge_count[req, by]`` back to 0, so the next
    launch (the next layer, or a graph replay) starts from 0, as after each plan's upload."""
    merge_count, tid = b.args.merge[1], b.tid
    # the block's partial-state stores happen before the barrier, the barrier before thread 0's
    # fence, the fence before its count (release, cumulative over the block, as CUTLASS's semaphore)
    _sync()
    with when(tid == 0):
        thread_fence()
        done = let("m_done", atomic_add(merge_count, tirx.const(1, "int32"), pc.req, b.by))
        last = done == pieces - 1
        with when(last):
            thread_fence()  # acquire: the other pieces' states, seen by the block after the barrier
            store(merge_count, 0, pc.req, b.by)
        store(b.flag_smem, tirx.if_then_else(last, 1, 0), 0)
    _sync()
    is_last = local("m_is_last", 1, "int32")
    store(is_last, b.flag_smem[0], 0)
    return is_last[0] != 0


def _merge_if_last(b: _Block, pc: _Piece, rows) -> None:
    """After a piece of a cut request has written its partial state: the block that finishes the
    request's last piece folds all the pieces' states into o and lse, so no merge kernel runs after
    the decode kernel. The partial rows of ``req`` are ``rows = (merge_indptr[req], pieces)``.
    Thread ``(rg, slot)`` folds rows ``rg, rg + RG, ..``, ``MERGE_ROWS`` at a time (their loads
    issued together); the row groups then meet in shared memory like the key groups."""
    VEC, TX, threads, slots = b.VEC, b.TX, b.tiles.threads, b.HB * b.TX
    per_pass = min(slots, threads)
    RG = threads // per_pass
    assert RG <= b.NKG, "the row groups' states go through o_smem, sized by the key groups"
    first, n = rows
    with when(_count_piece(b, pc, n)):
        rg = b.tid // per_pass
        with loop("m_pass", slots // per_pass) as ps:
            slot = ps * per_pass + b.tid % per_pass
            g, c = slot // TX, slot % TX
            h = let("m_h", pc.head0 + g)
            md, acc = local("m_md", (1, 2)), local("m_acc", (1, VEC))
            store(md, neg_inf(), 0, 0)
            store(md, zero(), 0, 1)
            with loop("v", VEC, "unroll") as v:
                store(acc, zero(), 0, v)
            _fold_rows(b, first, n, rg, RG, h, c, md, acc)
            with loop("v", VEC, "unroll") as v:
                store(b.o_smem, acc[0, v], rg, g, c * VEC + v)
            with when(c == 0):
                store(b.md_smem, md[0, 0], rg, g, 0)
                store(b.md_smem, md[0, 1], rg, g, 1)
            _sync()
            with when(rg == 0):
                res, tot = local("m_res", VEC), local("m_tot", 2)
                _fold_smem_states(b, RG, g, c, res, tot)
                octx = pc.ctx(head=h)
                with loop("v", VEC, "unroll") as v:
                    val = b.variant.output_transform(octx, res[v], c * VEC + v)
                    store(b.args.o, tirx.Cast(b.key.o_dtype, val), pc.req, h, c * VEC + v)
                with when(c == 0):
                    store(b.args.lse, tot[0], pc.req, h)
            _sync()  # the next pass reuses o_smem / md_smem


def _fold_rows(b: _Block, first, n, rg, RG, h, c, md, acc) -> None:
    """Fold partial rows ``first + rg, first + rg + RG, ..`` (of ``n``) of head ``h``, elements
    ``c * VEC ..``, into (md, acc), ``MERGE_ROWS`` rows a round: their loads first, then one fold."""
    VEC, UM, tmp_o, tmp_lse = b.VEC, MERGE_ROWS, b.args.tmp_o, b.args.tmp_lse
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
        parts = [lambda v, j=j: tirx.if_then_else(ok[j] != 0, part_l[j, v], zero()) for j in range(UM)]
        fold_partial(b.variant.use_softmax, md, acc, (0,), VEC, [lse_l[j] for j in range(UM)], parts)

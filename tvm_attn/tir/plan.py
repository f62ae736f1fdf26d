"""The split-KV planner, as a host TIR function: callable from Python, from C++ through packed
functions, and compiled into the same module as the kernels it plans for. Decode and prefill use
this one planner; they differ only in its arguments.

Lineage: FlashInfer's load-balanced scheduler (paper §3.3, Algorithm 1). The grid is persistent and
fixed: ``num_ctas`` = SMs x resident blocks per SM / blocks per work, whatever the batch, so a CUDA
graph captured once stays valid.

Work items: request ``b`` has ``qo_len(b) * group_size`` GQA-packed query rows (token x head of the
group), cut into query tiles of ``tile_q`` rows; item ``(b, t)`` reads keys ``[0, extent)``, where
the extent is ``kv_len(b)``, or with ``causal`` the keys its last row sees; with a sliding window
(``window_left >= 0``) it starts at the first key the window shows its first row. Decode is the case
``qo_indptr = arange(B + 1)``, ``group_size = tile_q = 1``: one item per request. The cost of a piece
is ``keys + work_overhead`` (the paper's ``alpha * l_q + beta * l_kv`` with the query side folded
into the per-work overhead, since a tile's rows are fixed).

Two plans, the first that balances:

* **Packed** (no cuts, no merge work): items go whole, each to the CTA with the least cost so far
  (list scheduling), in request order and, with ``causal``, a request's tiles from the last (the
  most keys) down, so the longest go first. The plan packs when no CTA then exceeds the quota
  ``ceil(total cost / num_ctas)`` by more than 1/pack_slack_div. Each CTA runs its items in the
  order it took them, so at any moment the CTAs work on neighbouring tiles of one request and read
  the same keys. Measured on an H100 (ncu), prefill of 16 x 1024 tokens read 1.18 GB from DRAM
  when every CTA took a contiguous run of items, 2.9x torch flash; packed this way, 0.22 GB.
* **Cut**: the items' keys, laid end to end, are cut at each CTA's quota; an item cut into several
  pieces gets partial-state rows that are merged afterwards (prefill: the merge kernel; decode:
  the decode kernel, in the block that finishes the last piece).

With ``kv_heads = H > 1`` (a kernel over a one-dimensional grid, :func:`tvm_attn.planner.planned_heads`)
every item is a work per KV head (``Work.KV_HEAD``): the packed plan schedules them all, a request's
heads one after another; the cut plan cuts one head's items over ``num_ctas // H`` CTAs and repeats
that plan on the next CTAs for each head, so a cut tile's partial rows are the same for every head
(tmp_o holds a slice per head) and the merge stays per packed row. With more heads than CTAs the
plan always packs.

Without split-KV (the deterministic, batch-invariant mode) the plan is always packed::

    plan(qo_indptr[B+1], kv_indptr[B+1], kv_last_page_len[B], work_info[WORK_FIELDS, max_works],
         cta_indptr[num_ctas+1], merge_indptr[max_rows+1], stats[PLAN_STATS], *PlanParams)

with the scalars of :class:`tvm_attn.planner.PlanParams`, in its order (callers build one by name).

* ``kv_len(b) = (pages - 1) * page_size + last_page_len[b]`` (0 without pages); ragged KV passes
  ``page_size = 1`` and ones, block-sparse rows ``page_size = C`` and ``C``.
* ``work_info[:, w]``: the fields of :class:`tvm_attn.planner.Work` (request, kv_begin, kv_end,
  out_row, row_begin, out_stride, kv_head), works in CTA order; CTA ``c`` runs works
  ``cta_indptr[c]:cta_indptr[c+1]``; ``row_begin`` is the item's first packed row; ``out_row = -1``:
  write o directly, else packed row ``r`` of the piece writes partial row ``out_row + r * out_stride``.
* ``merge_indptr[p]..merge_indptr[p+1]``: the partial rows of global packed row
  ``p = qo_indptr[b] * group_size + row`` (empty unless its item was cut).
* ``stats``: the fields of :class:`tvm_attn.planner.Stat` (num_works, num_partials, quota, status);
  status (:class:`tvm_attn.planner.Status`) 0 is success, 1: more works than ``max_works``, 2: more
  partial rows than ``max_partials``, 3: more packed rows than ``max_rows``.
  Nothing is written past a buffer's end whatever the status, and a failed plan runs no work.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable

from tvm import tirx

from ..planner import (
    DECODE_LAYOUT, DECODE_PLAN_STATS, MIN_PIECE, PLAN, PLAN_DECODE, PLAN_STATS, WORK_FIELDS, DecodePlanParams,
    PlanParams, Stat, Status, Work,
)
from ._builder import IRBuilder, T, buffer_param, let, local, loop, scalar_param, store, sym, when

INT32_MAX = 2**31 - 1


def _scalar_params(params_type):
    """One int32 scalar parameter per field of ``params_type``, held in an instance of it."""
    return params_type(**{f.name: scalar_param(f.name, "int32") for f in dataclasses.fields(params_type)})


def make_planner(name: str = PLAN) -> tirx.PrimFunc:
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            batch, max_works = sym("batch_size"), sym("max_works")
            num_ctas_plus_one, max_rows_plus_one = sym("num_ctas_plus_1"), sym("max_rows_plus_1")
            qo_indptr = buffer_param("qo_indptr", (batch + 1,), "int32")
            pl = _Plan(
                qo_begin=lambda b: qo_indptr[b], batch=batch,
                kv_indptr=buffer_param("kv_indptr", (batch + 1,), "int32"),
                last_page_len=buffer_param("kv_last_page_len", (batch,), "int32"),
                work_info=buffer_param("work_info", (WORK_FIELDS, max_works), "int32"),
                cta_indptr=buffer_param("cta_indptr", (num_ctas_plus_one,), "int32"),
                merge_indptr=buffer_param("merge_indptr", (max_rows_plus_one,), "int32"),
                stats=buffer_param("stats", (PLAN_STATS,), "int32"),
                num_ctas_plus_one=num_ctas_plus_one, max_rows_plus_one=max_rows_plus_one,
                p=_scalar_params(PlanParams))
            _emit_plan(pl)
    return ib.get()


class _S(enum.IntEnum):
    """Slots of the planner's local state."""

    COST = 0  # total cost of the items (then with the overhead of every possible cut)
    QUOTA = 1  # each CTA's share
    CTA = 2  # cut plan: the CTA being filled
    USED = 3  # cut plan: that CTA's cost so far; packed: the most loaded CTA's cost
    WORKS = 4
    PARTIALS = 5
    STATUS = 6
    POS = 7  # cut plan: keys of the item given out so far
    FIRST = 8  # cut plan: 1 until the item's first piece is out
    ITEM_WORK = 9  # cut plan: the item's first work
    ONE_HEAD = 10  # the cost of one head's items (the cut plan cuts one head's and repeats it per head)


@dataclass
class _Plan:
    """What the planner's stages share: its arrays, its scalars (a :class:`PlanParams` of TIR
    expressions), the items' geometry, and (from :func:`_plan_totals` on) the local state ``s``."""

    qo_begin: Callable[[Any], Any]  # b -> qo_indptr[b]
    batch: Any
    kv_indptr: tirx.Buffer
    last_page_len: tirx.Buffer
    work_info: tirx.Buffer
    cta_indptr: tirx.Buffer
    merge_indptr: tirx.Buffer
    stats: tirx.Buffer
    num_ctas_plus_one: Any
    max_rows_plus_one: Any
    p: PlanParams
    s: Any = None
    n_batch: Any = None
    total_rows: Any = None
    few: Any = None  # every item gets a CTA of its own
    cut_ctas: Any = None  # the CTAs a cut plan cuts one head's items over

    @property
    def num_ctas(self):
        return self.num_ctas_plus_one - 1

    @property
    def heads(self):
        """KV heads in the work list (``PlanParams.kv_heads``): each item is a work per head."""
        return self.p.kv_heads

    @property
    def max_works(self):
        return self.work_info.shape[1]

    @property
    def quota(self):
        return self.s[_S.QUOTA]

    def kv_len(self, b):
        pages = self.kv_indptr[b + 1] - self.kv_indptr[b]
        return tirx.if_then_else(pages > 0, (pages - 1) * self.p.page_size + self.last_page_len[b], 0)

    def qo_len(self, b):
        return self.qo_begin(b + 1) - self.qo_begin(b)

    def packed(self, b):
        return self.qo_len(b) * self.p.group_size

    def n_tiles(self, b):
        return tirx.ceildiv(self.packed(b), self.p.tile_q)

    def rows_of(self, b, t):
        return tirx.min(self.p.tile_q, self.packed(b) - t * self.p.tile_q)

    def extent(self, b, t):
        """Keys the item reads: all, or with causal those its last row sees."""
        length = self.kv_len(b)
        last_tok = (t * self.p.tile_q + self.rows_of(b, t) - 1) // self.p.group_size
        seen = last_tok + length - self.qo_len(b) + 1
        return tirx.if_then_else(self.p.causal != 0, tirx.max(tirx.min(seen, length), 0), length)

    def first_key(self, b, t):
        """The item's first key: 0, or with a window the first its first row sees (its other rows,
        later positions, see no earlier key)."""
        window = self.p.window_left
        pos = (t * self.p.tile_q) // self.p.group_size + self.kv_len(b) - self.qo_len(b)
        return tirx.if_then_else(window < 0, 0, tirx.max(tirx.min(pos - window, self.extent(b, t)), 0))

    def span(self, b, t):
        return self.extent(b, t) - self.first_key(b, t)

    def emit(self, w, req, begin, end, row0, head=0):
        """Work ``w``: a whole item, written directly (a cut sets its out_row and out_stride later)."""
        record = {Work.REQUEST: req, Work.KV_BEGIN: begin, Work.KV_END: end, Work.OUT_ROW: -1,
                  Work.ROW_BEGIN: row0, Work.OUT_STRIDE: 0, Work.KV_HEAD: head}
        with when(w < self.max_works):
            for field in Work:
                store(self.work_info, record[field], field, w)


def _emit_plan(pl: _Plan) -> None:
    """The planner's body (see the module docstring)."""
    _plan_totals(pl)
    sched = _ListScheduler(pl)
    pack = sched.count()
    with T.If(pack):
        with T.Then():
            _packed_plan(pl, sched)
        with T.Else():
            _cut_plan(pl)
    _finish(pl)


def _plan_totals(pl: _Plan) -> None:
    """The local state, the items' total cost, the quota and whether every item gets its own CTA."""
    s = pl.s = local("s", len(_S), "int32")
    for i in _S:
        store(s, 0, i)
    pl.n_batch = let("n_batch", pl.batch)
    pl.total_rows = let("total_rows", pl.qo_begin(pl.batch) * pl.p.group_size)
    too_many = pl.total_rows > pl.max_rows_plus_one - 1
    store(s, tirx.if_then_else(too_many, Status.MAX_ROWS, Status.OK), _S.STATUS)
    overhead = pl.p.work_overhead
    with loop("b", pl.n_batch) as b:
        store(s, s[_S.WORKS] + pl.n_tiles(b), _S.WORKS)
        with loop("t", pl.n_tiles(b)) as t:
            store(s, s[_S.ONE_HEAD] + pl.span(b, t) + overhead, _S.ONE_HEAD)
    pl.few = let("few", s[_S.WORKS] * pl.heads <= pl.num_ctas)
    store(s, 0, _S.WORKS)
    pl.cut_ctas = let("cut_ctas", tirx.max(pl.num_ctas // pl.heads, 1))
    # each CTA boundary may cut an item, adding one more piece (and its overhead)
    store(s, s[_S.ONE_HEAD] * pl.heads + overhead * tirx.max(pl.num_ctas - 1, 0), _S.COST)
    store(s, s[_S.ONE_HEAD] + overhead * (pl.cut_ctas - 1), _S.ONE_HEAD)
    store(s, tirx.max(tirx.ceildiv(s[_S.COST], tirx.max(pl.num_ctas, 1)), 1), _S.QUOTA)


class _ListScheduler:
    """List scheduling of whole items: each, in planning order, to the CTA with the least cost so
    far. The least-loaded CTA comes from a tournament tree over the CTAs' costs (leaves padded to a
    power of two with never-chosen CTAs), O(log num_ctas) per item: a scan of 66 CTAs per item made
    a batch-64 decode plan 3.6 us slower."""

    def __init__(self, pl: _Plan):
        self.pl = pl
        quota = pl.quota
        self.limit = let("pack_limit", quota + quota // tirx.max(pl.p.pack_slack_div, 1))
        pw = local("pw", 2, "int32")  # leaves (a power of two >= num_ctas), tree levels
        store(pw, 1, 0)
        store(pw, 0, 1)
        with T.While(pw[0] < pl.num_ctas):
            store(pw, pw[0] * 2, 0)
            store(pw, pw[1] + 1, 1)
        self.leaves, self.levels = let("leaves", pw[0]), let("levels", pw[1])
        # (sized by num_ctas, known on entry: leaves < 2 * num_ctas)
        # each CTA's cost, and the least-loaded CTA below each node
        self.load = T.alloc_buffer((2 * pl.num_ctas_plus_one,), "int32", scope="global")
        self.tree = T.alloc_buffer((4 * pl.num_ctas_plus_one,), "int32", scope="global")
        IRBuilder.name("load", self.load)
        IRBuilder.name("tree", self.tree)
        self.taken = local("taken", 1, "int32")  # items given out so far

    def _pick(self, node):  # the lesser of the node's children (the left one of equals)
        tree, load = self.tree, self.load
        a, b = tree[2 * node], tree[2 * node + 1]
        store(tree, tirx.if_then_else(load[b] < load[a], b, a), node)

    def run(self, take):
        """Give every item, in planning order (request, head, and with causal a request's tiles from
        the last, the longest), to the least-loaded CTA (the first of equals); ``take(b, h, t, cta)``
        records it. With no more works than CTAs that is work i -> CTA i. (Heads before tiles: the
        CTAs working at one time read one head's keys, which stay in L2.)"""
        pl, leaves, load, tree, taken = self.pl, self.leaves, self.load, self.tree, self.taken
        store(taken, 0, 0)
        with loop("c", leaves) as c:
            store(load, tirx.if_then_else(c < pl.num_ctas, 0, INT32_MAX), c)
            store(tree, c, leaves + c)
        with when(tirx.Not(pl.few)):
            with loop("i", leaves - 1) as i:
                self._pick(leaves - 1 - i)
        with loop("b", pl.n_batch) as b, loop("h", pl.heads) as h:
            with loop("i", pl.n_tiles(b)) as i:
                t = let("t", tirx.if_then_else(pl.p.causal != 0, pl.n_tiles(b) - 1 - i, i))
                cta = let("cta", tirx.if_then_else(pl.few, taken[0], tree[1]))
                store(taken, taken[0] + 1, 0)
                store(load, load[cta] + pl.span(b, t) + pl.p.work_overhead, cta)
                with when(tirx.Not(pl.few)):
                    with loop("l", self.levels) as lv:
                        self._pick(tirx.shift_right(leaves + cta, lv + 1))
                take(b, h, t, cta)

    def count(self):
        """Count each CTA's items into ``cta_indptr[c + 1]``; returns whether to pack: no split
        allowed, no CTA then exceeds the quota by more than the slack, or more heads than CTAs (a
        cut plan gives each head CTAs of its own)."""
        pl, s = self.pl, self.pl.s
        with loop("c", pl.num_ctas_plus_one) as c:
            store(pl.cta_indptr, 0, c)
        self.run(lambda b, h, t, cta: store(pl.cta_indptr, pl.cta_indptr[cta + 1] + 1, cta + 1))
        store(s, 0, _S.USED)
        with loop("c", pl.num_ctas) as c:
            store(s, tirx.max(s[_S.USED], self.load[c]), _S.USED)
        return let("pack", tirx.any(pl.p.allow_split == 0, s[_S.USED] <= self.limit, pl.heads > pl.num_ctas))


def _packed_plan(pl: _Plan, sched: _ListScheduler) -> None:
    """Whole items, placed as :meth:`_ListScheduler.count` counted them; no merge."""
    cta_indptr, num_ctas = pl.cta_indptr, pl.num_ctas
    with loop("c", num_ctas) as c:  # counts -> offsets: CTA c starts at cta_indptr[c]
        store(cta_indptr, cta_indptr[c + 1] + cta_indptr[c], c + 1)
    store(pl.s, cta_indptr[num_ctas], _S.WORKS)

    def place(b, h, t, cta):
        pl.emit(cta_indptr[cta], b, pl.first_key(b, t), pl.extent(b, t), t * pl.p.tile_q, h)
        store(cta_indptr, cta_indptr[cta] + 1, cta)

    sched.run(place)
    # cta_indptr[c] now holds CTA c's end, which is CTA c + 1's start
    with loop("i", tirx.max(num_ctas - 1, 0)) as i:
        store(cta_indptr, cta_indptr[num_ctas - 2 - i], num_ctas - 1 - i)
    store(cta_indptr, 0, 0)
    with loop("p", pl.max_rows_plus_one) as p:
        store(pl.merge_indptr, 0, p)


def _cut_plan(pl: _Plan) -> None:
    """The items' keys laid end to end and cut at each CTA's quota, item after item; with several
    heads in the work list, one head's items over ``cut_ctas`` CTAs, then that plan for each head."""
    s, num_ctas, overhead = pl.s, pl.cut_ctas, pl.p.work_overhead
    store(s, tirx.max(tirx.ceildiv(s[_S.ONE_HEAD], num_ctas), 1), _S.QUOTA)
    quota = let("cut_quota", s[_S.QUOTA])
    store(s, 0, _S.USED)
    with loop("b", pl.n_batch) as b:
        with loop("t", pl.n_tiles(b)) as t:
            key0 = let("key0", pl.first_key(b, t))
            length = let("len", pl.extent(b, t) - key0)
            rows = let("rows", pl.rows_of(b, t))
            row0 = t * pl.p.tile_q
            store(s, 0, _S.POS)
            store(s, 1, _S.FIRST)
            store(s, s[_S.WORKS], _S.ITEM_WORK)
            with T.While(tirx.any(s[_S.POS] < length, s[_S.FIRST] == 1)):
                # the last CTA takes whatever is left
                take = let("take", tirx.if_then_else(
                    s[_S.CTA] >= num_ctas - 1, length - s[_S.POS],
                    tirx.min(length - s[_S.POS], tirx.max(quota - s[_S.USED] - overhead, MIN_PIECE))))
                pl.emit(s[_S.WORKS], b, key0 + s[_S.POS], key0 + s[_S.POS] + take, row0)
                store(s, s[_S.WORKS] + 1, _S.WORKS)
                store(s, s[_S.USED] + take + overhead, _S.USED)
                store(s, s[_S.POS] + take, _S.POS)
                store(s, 0, _S.FIRST)
                with when(tirx.all(s[_S.USED] >= quota, s[_S.CTA] < num_ctas - 1)):
                    store(pl.cta_indptr, s[_S.WORKS], s[_S.CTA] + 1)
                    store(s, s[_S.CTA] + 1, _S.CTA)
                    store(s, 0, _S.USED)
            _merge_offsets(pl, b, row0, rows)
    with loop("c", pl.num_ctas_plus_one) as c:  # CTAs past the last one used: no works
        with when(c > s[_S.CTA]):
            store(pl.cta_indptr, s[_S.WORKS], c)
    store(pl.cta_indptr, 0, 0)
    with loop("p", pl.max_rows_plus_one) as p:
        with when(p >= pl.total_rows):
            store(pl.merge_indptr, s[_S.PARTIALS], p)
    if not (isinstance(pl.heads, int) and pl.heads == 1):
        _repeat_per_head(pl)


def _repeat_per_head(pl: _Plan) -> None:
    """The cut plan of head 0 (works ``[0, n)`` on CTAs ``[0, cut_ctas)``) again for heads 1..H-1,
    head h's on CTAs ``[h * cut_ctas, (h + 1) * cut_ctas)``; later CTAs get no works. The pieces
    of every head write the same partial rows, in their own head's slice of tmp_o."""
    s, ctas = pl.s, pl.cut_ctas
    n = let("head_works", s[_S.WORKS])
    with loop("h1", pl.heads - 1) as h1:
        h = h1 + 1
        with loop("w", n) as w:
            with when(h * n + w < pl.max_works):
                for field in Work:
                    value = h if field == Work.KV_HEAD else pl.work_info[field, w]
                    store(pl.work_info, value, field, h * n + w)
        with loop("c", ctas) as c:
            store(pl.cta_indptr, h * n + pl.cta_indptr[c], h * ctas + c)
    with loop("c", pl.num_ctas_plus_one) as c:
        with when(c >= pl.heads * ctas):
            store(pl.cta_indptr, pl.heads * n, c)
    store(s, pl.heads * n, _S.WORKS)


def _merge_offsets(pl: _Plan, b, row0, rows) -> None:
    """After the pieces of item (b, row0): each packed row's partial rows in ``merge_indptr``, and
    for a cut item each piece's ``out_row`` / ``out_stride`` (packed row r of piece i writes partial
    row ``out_row + r * n``, so a row's n partials are contiguous)."""
    s = pl.s
    n = let("n_pieces", s[_S.WORKS] - s[_S.ITEM_WORK])
    grow0 = let("grow0", pl.qo_begin(b) * pl.p.group_size + row0)
    with loop("r", rows) as r:  # packed row r's partial rows: r * n .. r * n + n
        with when(grow0 + r < pl.max_rows_plus_one):
            store(pl.merge_indptr, s[_S.PARTIALS] + tirx.if_then_else(n > 1, r * n, 0), grow0 + r)
    with when(n > 1):  # cut: its pieces write partial states, merged afterwards
        with loop("i", n) as i:
            with when(s[_S.ITEM_WORK] + i < pl.max_works):
                store(pl.work_info, s[_S.PARTIALS] + i, Work.OUT_ROW, s[_S.ITEM_WORK] + i)
                store(pl.work_info, n, Work.OUT_STRIDE, s[_S.ITEM_WORK] + i)
        store(s, s[_S.PARTIALS] + n * rows, _S.PARTIALS)


def _finish(pl: _Plan) -> None:
    """The capacity checks (a failed plan runs nothing) and the stats."""
    s = pl.s
    with when(s[_S.WORKS] > pl.max_works):
        store(s, Status.MAX_WORKS, _S.STATUS)
    with when(s[_S.PARTIALS] > pl.p.max_partials):
        store(s, Status.MAX_PARTIALS, _S.STATUS)
    with when(s[_S.STATUS] != Status.OK):
        with loop("c", pl.num_ctas_plus_one) as c:
            store(pl.cta_indptr, 0, c)
        with loop("p", pl.max_rows_plus_one) as p:
            store(pl.merge_indptr, 0, p)
    for stat, slot in ((Stat.NUM_WORKS, _S.WORKS), (Stat.NUM_PARTIALS, _S.PARTIALS), (Stat.QUOTA, _S.QUOTA),
                       (Stat.STATUS, _S.STATUS)):
        store(pl.stats, s[slot], stat)


def _emit_page_table_check(indptr, indices, last, batch, page_size):
    """The page table's checks in one pass (numpy takes a dozen array passes for the same); returns
    a local ``r`` with ``r[0] = ok``, ``r[1]`` the largest page id in use (-1 for none).

    ``ok`` is 1 when ``kv_indptr`` starts at 0, never decreases and ends within ``kv_indices``,
    every ``kv_last_page_len[b]`` lies in ``[1, page_size]`` for a request with pages (0 for one
    without), and every page id in use is >= 0: the rules of
    :meth:`tvm_attn.kv.formats.PagedKV.validate`, which says what is wrong when ``ok`` is 0.
    (The pass over the page ids keeps ``r`` in registers only while it stores nothing: a copy of
    the ids in the same loop made it 3x slower.)"""
    r = local("r", 3, "int32")  # ok, max page, min page
    store(r, tirx.if_then_else(tirx.all(indptr[0] == 0, indptr[batch] <= indices.shape[0]), 1, 0), 0)
    store(r, -1, 1)
    store(r, 0, 2)
    with loop("b", batch) as b:
        pages = indptr[b + 1] - indptr[b]
        bad_last = tirx.if_then_else(pages > 0, tirx.any(last[b] < 1, last[b] > page_size), last[b] != 0)
        with when(tirx.any(pages < 0, bad_last)):
            store(r, 0, 0)
    with when(r[0] == 1):
        with loop("i", indptr[batch]) as i:
            store(r, tirx.max(r[1], indices[i]), 1)
            store(r, tirx.min(r[2], indices[i]), 2)
    with when(r[2] < 0):
        store(r, 0, 0)
    return r


def make_decode_plan(name: str = PLAN_DECODE) -> tirx.PrimFunc:
    """A decode wrapper's whole host plan in one call: check the page table, copy it into the
    staging array (padded to a fixed batch and page count under CUDA graphs) and run the planner
    there, so that one host-to-device copy then sends plan and page table together::

        plan_decode(kv_indptr[B+1], kv_indices[N], kv_last_page_len[B], staging[S],
                    layout[len(DECODE_LAYOUT)], stats[DECODE_PLAN_STATS], *DecodePlanParams)

    * ``layout`` (:data:`DECODE_LAYOUT`): the starts of the regions ``work_info [WORK_FIELDS,
      max_works]``, ``cta_indptr [num_ctas + 1]``, ``merge_indptr [max_rows + 1]``, and of the staged
      ``kv_indptr [pad_batch + 1]``, ``kv_indices [pad_pages]`` and ``kv_last_page_len [pad_batch]``,
      in that order, and the planner's ``max_partials``. The staged table is the caller's, padded
      with requests that have no pages (``pad_batch >= B``) and page id 0 (``pad_pages >=
      kv_indptr[B]``; -1: exactly ``kv_indptr[B]``); the planner plans the padded batch.
    * ``stats``: :class:`~tvm_attn.planner.Stat`, with ``MAX_PAGE``; the status is 0 on success,
      the planner's capacity faults, ``Status.PAGE_TABLE`` for a page table that breaks a rule of
      :meth:`~tvm_attn.kv.formats.PagedKV.validate`, ``Status.LAYOUT`` for a layout too small for
      the padded table. Nothing is written outside the staging array whatever the status, and with
      the last two nothing at all.
    * ``window_left >= 0``: plan only each request's last ``window_left + 1`` keys, the ones a
      sliding window of that size lets the query see (-1: all keys). A kernel run with a wider
      window than the plan's would miss keys: the wrapper refuses that run.

    Decode: one query row per request (``qo_indptr = arange(B + 1)``, group and tile 1, no causal)."""
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            batch, num, size = sym("batch_size"), sym("num_indices"), sym("staging_size")
            table = (buffer_param("kv_indptr", (batch + 1,), "int32"),
                     buffer_param("kv_indices", (num,), "int32"),
                     buffer_param("kv_last_page_len", (batch,), "int32"))
            staging = buffer_param("staging", (size,), "int32")
            layout = buffer_param("layout", (len(DECODE_LAYOUT),), "int32")
            stats = buffer_param("stats", (DECODE_PLAN_STATS,), "int32")
            # (num_ctas sizes the planner's host scratch, whose shape must come from the arguments)
            dp = _scalar_params(DecodePlanParams)
            at = {f: let(f, layout[i]) for i, f in enumerate(DECODE_LAYOUT)}
            used = let("used", table[0][batch])
            pad_pages = let("pages", tirx.if_then_else(dp.pad_pages < 0, used, dp.pad_pages))

            def region(name, start, *shape):
                buf = T.decl_buffer(shape, "int32", data=staging.data, elem_offset=start)
                IRBuilder.name(name, buf)
                return buf

            pad_batch, num_ctas = dp.pad_batch, dp.num_ctas
            fits = tirx.all(
                at["work_at"] >= 0, at["max_works"] >= 0, num_ctas >= 1, at["max_rows"] >= 0,
                at["work_at"] + WORK_FIELDS * at["max_works"] <= at["cta_at"],
                at["cta_at"] + num_ctas + 1 <= at["merge_at"],
                at["merge_at"] + at["max_rows"] + 1 <= at["indptr_at"],
                pad_batch >= batch, at["indptr_at"] + pad_batch + 1 <= at["indices_at"],
                used <= pad_pages, at["indices_at"] + pad_pages <= at["last_at"],
                at["last_at"] + pad_batch <= size)
            for i in range(DECODE_PLAN_STATS):
                store(stats, 0, i)
            store(stats, Status.LAYOUT, Stat.STATUS)
            with when(fits):
                staged = (region("s_kv_indptr", at["indptr_at"], pad_batch + 1),
                          region("s_kv_indices", at["indices_at"], pad_pages),
                          region("s_kv_last_page_len", at["last_at"], pad_batch))
                r = _emit_page_table_check(*table, batch, dp.page_size)
                store(stats, r[1], Stat.MAX_PAGE)
                store(stats, tirx.if_then_else(r[0] == 1, Status.OK, Status.PAGE_TABLE), Stat.STATUS)
                with when(r[0] == 1):
                    _stage_table(table, staged, batch, used, pad_batch, pad_pages)
                    _emit_plan(_Plan(
                        qo_begin=lambda b: b, batch=pad_batch, kv_indptr=staged[0], last_page_len=staged[2],
                        work_info=region("s_work_info", at["work_at"], WORK_FIELDS, at["max_works"]),
                        cta_indptr=region("s_cta_indptr", at["cta_at"], num_ctas + 1),
                        merge_indptr=region("s_merge_indptr", at["merge_at"], at["max_rows"] + 1),
                        stats=stats,
                        num_ctas_plus_one=num_ctas + 1, max_rows_plus_one=at["max_rows"] + 1,
                        p=PlanParams(max_partials=at["max_partials"], page_size=dp.page_size,
                                     allow_split=dp.allow_split, window_left=dp.window_left,
                                     work_overhead=dp.work_overhead, pack_slack_div=dp.pack_slack_div)))
    return ib.get()


def _stage_table(table, staged, batch, used, pad_batch, pad_pages) -> None:
    """Copy the page table ``(kv_indptr, kv_indices, kv_last_page_len)`` into its staged regions,
    padded with requests that have no pages and with page id 0."""
    (indptr, indices, last), (s_indptr, s_indices, s_last) = table, staged
    with loop("i", used) as i:
        store(s_indices, indices[i], i)
    with loop("i", pad_pages - used) as i:
        store(s_indices, 0, used + i)
    with loop("b", batch + 1) as b:
        store(s_indptr, indptr[b], b)
    with loop("b", batch) as b:
        store(s_last, last[b], b)
    with loop("b", pad_batch - batch) as b:  # padded requests: no pages
        store(s_indptr, used, batch + 1 + b)
        store(s_last, 0, batch + b)

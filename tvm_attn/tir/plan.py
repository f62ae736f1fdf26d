"""The split-KV planner, as a host TIR function: callable from Python, from C++ through packed
functions, and compiled into the same module as the kernels it plans for. Decode and prefill use
this one planner; they differ only in its arguments.

Lineage: FlashInfer's load-balanced scheduler (paper §3.3, Algorithm 1). The grid is persistent and
fixed: ``num_ctas`` = SMs x resident blocks per SM / blocks per work, whatever the batch, so a CUDA
graph captured once stays valid.

Work items: request ``b`` has ``qo_len(b) * group_size`` GQA-packed query rows (token x head of the
group), cut into query tiles of ``tile_q`` rows; item ``(b, t)`` reads keys ``[0, extent)``, where
the extent is ``kv_len(b)``, or with ``causal`` the keys its last row sees (the decode plan with a
sliding window starts at the first key the window shows). Decode is the case
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

Without split-KV (the deterministic, batch-invariant mode) the plan is always packed::

    plan(qo_indptr[B+1], kv_indptr[B+1], kv_last_page_len[B], work_info[6, max_works],
         cta_indptr[num_ctas+1], merge_indptr[max_rows+1], stats[4], max_partials, page_size,
         allow_split, group_size, tile_q, causal, work_overhead, pack_slack_div)

* ``kv_len(b) = (pages - 1) * page_size + last_page_len[b]`` (0 without pages); ragged KV passes
  ``page_size = 1`` and ones, block-sparse rows ``page_size = C`` and ``C``.
* ``work_info[:, w] = (request, kv_begin, kv_end, out_row, row_begin, out_stride)``, works in CTA
  order; CTA ``c`` runs works ``cta_indptr[c]:cta_indptr[c+1]``; ``row_begin`` is the item's first
  packed row; ``out_row = -1``: write o directly, else packed row ``r`` of the piece writes partial
  row ``out_row + r * out_stride``.
* ``merge_indptr[p]..merge_indptr[p+1]``: the partial rows of global packed row
  ``p = qo_indptr[b] * group_size + row`` (empty unless its item was cut).
* ``stats = (num_works, num_partials, quota, status)``; status 0 is success, 1: more works than
  ``max_works``, 2: more partial rows than ``max_partials``, 3: more packed rows than ``max_rows``.
  Nothing is written past a buffer's end whatever the status, and a failed plan runs no work.
"""

from __future__ import annotations

from tvm import tirx

from ..planner import DECODE_LAYOUT, MIN_PIECE, PLAN, PLAN_DECODE, STATUS_LAYOUT, STATUS_PAGE_TABLE, WORK_FIELDS
from ._builder import IRBuilder, T, buffer_param, let, local, loop, scalar_param, store, sym, when

INT32_MAX = 2**31 - 1


def make_planner(name: str = PLAN) -> tirx.PrimFunc:
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            batch, max_works = sym("batch_size"), sym("max_works")
            num_ctas_plus_one, max_rows_plus_one = sym("num_ctas_plus_1"), sym("max_rows_plus_1")
            qo_indptr = buffer_param("qo_indptr", (batch + 1,), "int32")
            kv_indptr = buffer_param("kv_indptr", (batch + 1,), "int32")
            last_page_len = buffer_param("kv_last_page_len", (batch,), "int32")
            work_info = buffer_param("work_info", (WORK_FIELDS, max_works), "int32")
            cta_indptr = buffer_param("cta_indptr", (num_ctas_plus_one,), "int32")
            merge_indptr = buffer_param("merge_indptr", (max_rows_plus_one,), "int32")
            stats = buffer_param("stats", (4,), "int32")
            scalars = [scalar_param(n, "int32") for n in _PLAN_SCALARS]
            _emit_plan(lambda b: qo_indptr[b], batch, kv_indptr, last_page_len, work_info, cta_indptr, merge_indptr,
                       stats, num_ctas_plus_one, max_rows_plus_one, *scalars)
    return ib.get()


#: the planner's scalar arguments, in order
_PLAN_SCALARS = ("max_partials", "page_size", "allow_split", "group_size", "tile_q", "causal", "work_overhead",
                 "pack_slack_div")


def _emit_plan(qo_begin, batch, kv_indptr, last_page_len, work_info, cta_indptr, merge_indptr, stats,
               num_ctas_plus_one, max_rows_plus_one, max_partials, page_size, allow_split, group, tile_q, causal,
               overhead, slack_div, window=None) -> None:
    """The planner's body (see the module docstring); ``qo_begin(b)`` is ``qo_indptr[b]``; ``window``
    (an int32 expression, < 0 for none) plans only the keys a sliding window of that many keys left
    of the query lets an item's first row see."""
    max_works = work_info.shape[1]
    num_ctas = num_ctas_plus_one - 1
    max_rows = max_rows_plus_one - 1

    pages = lambda b: kv_indptr[b + 1] - kv_indptr[b]  # noqa: E731
    kv_len = lambda b: tirx.if_then_else(pages(b) > 0, (pages(b) - 1) * page_size + last_page_len[b], 0)  # noqa: E731
    packed = lambda b: (qo_begin(b + 1) - qo_begin(b)) * group  # noqa: E731
    n_tiles = lambda b: tirx.ceildiv(packed(b), tile_q)  # noqa: E731

    def rows_of(b, t):
        return tirx.min(tile_q, packed(b) - t * tile_q)

    def extent(b, t):
        """Keys the item reads: all, or with causal those its last row sees."""
        length = kv_len(b)
        last_tok = (t * tile_q + rows_of(b, t) - 1) // group
        seen = last_tok + length - (qo_begin(b + 1) - qo_begin(b)) + 1
        return tirx.if_then_else(causal != 0, tirx.max(tirx.min(seen, length), 0), length)

    def first_key(b, t):
        """The item's first key: 0, or with a window the first its first row sees (its other rows,
        later positions, see no earlier key)."""
        if window is None:
            return 0
        pos = (t * tile_q) // group + kv_len(b) - (qo_begin(b + 1) - qo_begin(b))
        return tirx.if_then_else(window < 0, 0, tirx.max(tirx.min(pos - window, extent(b, t)), 0))

    def span(b, t):
        return extent(b, t) - first_key(b, t)

    # s: 0 total cost, 1 quota, 2 cta, 3 used (packed: the most loaded CTA's cost), 4 works,
    #    5 partials, 6 status, 7 pos, 8 first, 9 first work of the item
    s = local("s", 10, "int32")
    for i in range(10):
        store(s, 0, i)
    n_batch = let("n_batch", batch)
    total_rows = let("total_rows", qo_begin(batch) * group)
    store(s, tirx.if_then_else(total_rows > max_rows, 3, 0), 6)
    with loop("b", n_batch) as b:
        store(s, s[4] + n_tiles(b), 4)
        with loop("t", n_tiles(b)) as t:
            store(s, s[0] + span(b, t) + overhead, 0)
    few = let("few", s[4] <= num_ctas)  # every item gets a CTA of its own
    store(s, 0, 4)
    # each CTA boundary may cut an item, adding one more piece (and its overhead)
    store(s, s[0] + overhead * tirx.max(num_ctas - 1, 0), 0)
    store(s, tirx.max(tirx.ceildiv(s[0], tirx.max(num_ctas, 1)), 1), 1)
    quota = s[1]
    limit = let("pack_limit", quota + quota // tirx.max(slack_div, 1))

    def emit(w, req, begin, end, row0):
        with when(w < max_works):
            for field, value in enumerate((req, begin, end, -1, row0, 0)):
                store(work_info, value, field, w)

    # -- packed: list scheduling, twice: to count each CTA's items (and find the most loaded
    # CTA), then to place them. The least-loaded CTA comes from a tournament tree over the
    # CTAs' costs (leaves padded to a power of two with never-chosen CTAs), O(log num_ctas)
    # per item: a scan of 66 CTAs per item made a batch-64 decode plan 3.6 us slower.
    pw = local("pw", 2, "int32")  # leaves (a power of two >= num_ctas), tree levels
    store(pw, 1, 0)
    store(pw, 0, 1)
    with T.While(pw[0] < num_ctas):
        store(pw, pw[0] * 2, 0)
        store(pw, pw[1] + 1, 1)
    leaves, levels = let("leaves", pw[0]), let("levels", pw[1])
    # (sized by num_ctas, known on entry: leaves < 2 * num_ctas)
    load = T.alloc_buffer((2 * num_ctas_plus_one,), "int32", scope="global")  # each CTA's cost
    tree = T.alloc_buffer((4 * num_ctas_plus_one,), "int32", scope="global")  # least-loaded CTA below
    IRBuilder.name("load", load)
    IRBuilder.name("tree", tree)

    def pick(node):  # the lesser of the node's children (the left one of equals)
        a, b = tree[2 * node], tree[2 * node + 1]
        store(tree, tirx.if_then_else(load[b] < load[a], b, a), node)

    taken = local("taken", 1, "int32")  # items given out so far

    def list_schedule(take):
        """Give every item, in planning order, to the least-loaded CTA (the first of equals);
        ``take(b, t, cta)`` records it. With no more items than CTAs that is item i -> CTA i."""
        store(taken, 0, 0)
        with loop("c", leaves) as c:
            store(load, tirx.if_then_else(c < num_ctas, 0, INT32_MAX), c)
            store(tree, c, leaves + c)
        with when(tirx.Not(few)):
            with loop("i", leaves - 1) as i:
                pick(leaves - 1 - i)
        with loop("b", n_batch) as b:
            with loop("i", n_tiles(b)) as i:
                t = let("t", tirx.if_then_else(causal != 0, n_tiles(b) - 1 - i, i))
                cta = let("cta", tirx.if_then_else(few, taken[0], tree[1]))
                store(taken, taken[0] + 1, 0)
                store(load, load[cta] + span(b, t) + overhead, cta)
                with when(tirx.Not(few)):
                    with loop("l", levels) as lv:
                        pick(tirx.shift_right(leaves + cta, lv + 1))
                take(b, t, cta)

    with loop("c", num_ctas_plus_one) as c:
        store(cta_indptr, 0, c)
    list_schedule(lambda b, t, cta: store(cta_indptr, cta_indptr[cta + 1] + 1, cta + 1))
    store(s, 0, 3)
    with loop("c", num_ctas) as c:
        store(s, tirx.max(s[3], load[c]), 3)
    pack = let("pack", tirx.any(allow_split == 0, s[3] <= limit))

    with T.If(pack):
        with T.Then():
            with loop("c", num_ctas) as c:  # counts -> offsets: CTA c starts at cta_indptr[c]
                store(cta_indptr, cta_indptr[c + 1] + cta_indptr[c], c + 1)
            store(s, cta_indptr[num_ctas], 4)

            def place(b, t, cta):
                emit(cta_indptr[cta], b, first_key(b, t), extent(b, t), t * tile_q)
                store(cta_indptr, cta_indptr[cta] + 1, cta)

            list_schedule(place)
            # cta_indptr[c] now holds CTA c's end, which is CTA c + 1's start
            with loop("i", tirx.max(num_ctas - 1, 0)) as i:
                store(cta_indptr, cta_indptr[num_ctas - 2 - i], num_ctas - 1 - i)
            store(cta_indptr, 0, 0)
            with loop("p", max_rows_plus_one) as p:
                store(merge_indptr, 0, p)
        with T.Else():  # -- cut at the quotas, item after item
            store(s, 0, 3)
            with loop("b", n_batch) as b:
                with loop("t", n_tiles(b)) as t:
                    key0 = let("key0", first_key(b, t))
                    length = let("len", extent(b, t) - key0)
                    rows = let("rows", rows_of(b, t))
                    row0 = t * tile_q
                    store(s, 0, 7)
                    store(s, 1, 8)
                    store(s, s[4], 9)
                    with T.While(tirx.any(s[7] < length, s[8] == 1)):
                        # the last CTA takes whatever is left
                        take = let("take", tirx.if_then_else(
                            s[2] >= num_ctas - 1, length - s[7],
                            tirx.min(length - s[7], tirx.max(quota - s[3] - overhead, MIN_PIECE))))
                        emit(s[4], b, key0 + s[7], key0 + s[7] + take, row0)
                        store(s, s[4] + 1, 4)
                        store(s, s[3] + take + overhead, 3)
                        store(s, s[7] + take, 7)
                        store(s, 0, 8)
                        with when(tirx.all(s[3] >= quota, s[2] < num_ctas - 1)):
                            store(cta_indptr, s[4], s[2] + 1)
                            store(s, s[2] + 1, 2)
                            store(s, 0, 3)
                    n = let("n_pieces", s[4] - s[9])
                    grow0 = let("grow0", qo_begin(b) * group + row0)
                    with loop("r", rows) as r:  # packed row r's partial rows: r * n .. r * n + n
                        with when(grow0 + r < max_rows_plus_one):
                            store(merge_indptr, s[5] + tirx.if_then_else(n > 1, r * n, 0), grow0 + r)
                    with when(n > 1):  # cut: its pieces write partial states, merged afterwards
                        with loop("i", n) as i:
                            with when(s[9] + i < max_works):
                                store(work_info, s[5] + i, 3, s[9] + i)
                                store(work_info, n, 5, s[9] + i)
                        store(s, s[5] + n * rows, 5)
            with loop("c", num_ctas_plus_one) as c:  # CTAs past the last one used: no works
                with when(c > s[2]):
                    store(cta_indptr, s[4], c)
            store(cta_indptr, 0, 0)
            with loop("p", max_rows_plus_one) as p:
                with when(p >= total_rows):
                    store(merge_indptr, s[5], p)
    with when(s[4] > max_works):
        store(s, 1, 6)
    with when(s[5] > max_partials):
        store(s, 2, 6)
    with when(s[6] != 0):  # a failed plan runs nothing
        with loop("c", num_ctas_plus_one) as c:
            store(cta_indptr, 0, c)
        with loop("p", max_rows_plus_one) as p:
            store(merge_indptr, 0, p)
    store(stats, s[4], 0)
    store(stats, s[5], 1)
    store(stats, quota, 2)
    store(stats, s[6], 3)


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

        plan_decode(kv_indptr[B+1], kv_indices[N], kv_last_page_len[B], staging[S], layout[9],
                    stats[5], num_ctas, page_size, allow_split, pad_batch, pad_pages, work_overhead,
                    pack_slack_div, window_left)

    * ``layout`` (:data:`DECODE_LAYOUT`): the starts of the regions ``work_info [6, max_works]``,
      ``cta_indptr [num_ctas + 1]``, ``merge_indptr [max_rows + 1]``, and of the staged
      ``kv_indptr [pad_batch + 1]``, ``kv_indices [pad_pages]`` and ``kv_last_page_len [pad_batch]``,
      in that order, and the planner's ``max_partials``. The staged table is the caller's, padded
      with requests that have no pages (``pad_batch >= B``) and page id 0 (``pad_pages >=
      kv_indptr[B]``; -1: exactly ``kv_indptr[B]``); the planner plans the padded batch.
    * ``stats = (num_works, num_partials, quota, status, max_page)``: status 0 is success, 1-3 the
      planner's capacity faults, 4 a page table that breaks a rule of
      :meth:`~tvm_attn.kv.formats.PagedKV.validate`, 5 a layout too small for the padded table.
      Nothing is written outside the staging array whatever the status, and with status 4 or 5
      nothing at all.

    * ``window_left >= 0``: plan only each request's last ``window_left + 1`` keys, the ones a
      sliding window of that size lets the query see (-1: all keys). A kernel run with a wider
      window than the plan's would miss keys: the wrapper refuses that run.

    Decode: one query row per request (``qo_indptr = arange(B + 1)``, group and tile 1, no causal)."""
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            batch, num, size = sym("batch_size"), sym("num_indices"), sym("staging_size")
            indptr = buffer_param("kv_indptr", (batch + 1,), "int32")
            indices = buffer_param("kv_indices", (num,), "int32")
            last = buffer_param("kv_last_page_len", (batch,), "int32")
            staging = buffer_param("staging", (size,), "int32")
            layout = buffer_param("layout", (len(DECODE_LAYOUT),), "int32")
            stats = buffer_param("stats", (5,), "int32")
            # (num_ctas sizes the planner's host scratch, whose shape must come from the arguments)
            num_ctas, page_size, allow_split, pad_batch, pad_pages_arg, overhead, slack_div, window = (
                scalar_param(n, "int32") for n in ("num_ctas", "page_size", "allow_split", "pad_batch", "pad_pages",
                                                   "work_overhead", "pack_slack_div", "window_left"))
            at = {f: let(f, layout[i]) for i, f in enumerate(DECODE_LAYOUT)}
            used = let("used", indptr[batch])
            pad_pages = let("pages", tirx.if_then_else(pad_pages_arg < 0, used, pad_pages_arg))

            def region(name, start, *shape):
                buf = T.decl_buffer(shape, "int32", data=staging.data, elem_offset=start)
                IRBuilder.name(name, buf)
                return buf

            fits = tirx.all(
                at["work_at"] >= 0, at["max_works"] >= 0, num_ctas >= 1, at["max_rows"] >= 0,
                at["work_at"] + WORK_FIELDS * at["max_works"] <= at["cta_at"],
                at["cta_at"] + num_ctas + 1 <= at["merge_at"],
                at["merge_at"] + at["max_rows"] + 1 <= at["indptr_at"],
                pad_batch >= batch, at["indptr_at"] + pad_batch + 1 <= at["indices_at"],
                used <= pad_pages, at["indices_at"] + pad_pages <= at["last_at"], at["last_at"] + pad_batch <= size)
            for i in range(5):
                store(stats, 0, i)
            store(stats, STATUS_LAYOUT, 3)
            with when(fits):
                s_indptr = region("s_kv_indptr", at["indptr_at"], pad_batch + 1)
                s_indices = region("s_kv_indices", at["indices_at"], pad_pages)
                s_last = region("s_kv_last_page_len", at["last_at"], pad_batch)
                r = _emit_page_table_check(indptr, indices, last, batch, page_size)
                store(stats, r[1], 4)
                store(stats, tirx.if_then_else(r[0] == 1, 0, STATUS_PAGE_TABLE), 3)
                with when(r[0] == 1):
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
                    work_info = region("s_work_info", at["work_at"], WORK_FIELDS, at["max_works"])
                    cta_indptr = region("s_cta_indptr", at["cta_at"], num_ctas + 1)
                    merge_indptr = region("s_merge_indptr", at["merge_at"], at["max_rows"] + 1)
                    _emit_plan(lambda b: b, pad_batch, s_indptr, s_last, work_info, cta_indptr, merge_indptr, stats,
                               num_ctas + 1, at["max_rows"] + 1, at["max_partials"], page_size, allow_split,
                               1, 1, 0, overhead, slack_div, window)
    return ib.get()

"""The split-KV planner, as a host TIR function: callable from Python, from C++ through packed
functions, and compiled into the same module as the kernels it plans for.

Lineage: FlashInfer ``scheduler.cuh`` ``DecodePlan`` / paper Algorithm 1. Cost of a chunk is its
number of keys (decode has one query row); the planner picks the smallest chunk (in pages, at least
``min_chunk_pages``) such that the number of works stays within ``target_works`` (SM count x resident
blocks per SM / blocks per work), then lays the works out in request order::

    plan_decode(kv_indptr[B+1], kv_last_page_len[B], work_info[4, max_works], merge_indptr[max_batch+1],
                stats[4], max_partials, page_size, target_works, min_chunk_pages, allow_split)

* ``work_info[:, w] = (request, kv_begin, kv_end, out_row)``; ``out_row = -1``: write o directly;
  works past the plan have ``request = -1`` (their blocks exit), so the grid is always ``max_works``.
* ``merge_indptr[b]..merge_indptr[b+1]``: the partial-state rows of request ``b`` (empty unless split).
* ``stats = (num_works, num_partials, chunk_tokens, status)``; status 0 is success, 1: more works than
  ``max_works``, 2: more partial rows than ``max_partials``, 3: more requests than ``max_batch``.
  Nothing is written past a buffer's end whatever the status.
"""

from __future__ import annotations

from tvm import tirx

from ..planner import PLAN_DECODE
from ._builder import IRBuilder, T, buffer_param, let, local, loop, scalar_param, store, sym, when



def make_decode_planner(name: str = PLAN_DECODE) -> tirx.PrimFunc:
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            batch, max_works, max_batch_plus_one = sym("batch_size"), sym("max_works"), sym("max_batch_plus_1")
            kv_indptr = buffer_param("kv_indptr", (batch + 1,), "int32")
            last_page_len = buffer_param("kv_last_page_len", (batch,), "int32")
            work_info = buffer_param("work_info", (4, max_works), "int32")
            merge_indptr = buffer_param("merge_indptr", (max_batch_plus_one,), "int32")
            stats = buffer_param("stats", (4,), "int32")
            max_partials = scalar_param("max_partials", "int32")
            page_size = scalar_param("page_size", "int32")
            target_works = scalar_param("target_works", "int32")
            min_chunk_pages = scalar_param("min_chunk_pages", "int32")
            allow_split = scalar_param("allow_split", "int32")

            pages = lambda b: kv_indptr[b + 1] - kv_indptr[b]  # noqa: E731
            kv_len = lambda b: tirx.if_then_else(pages(b) > 0, (pages(b) - 1) * page_size + last_page_len[b], 0)  # noqa: E731
            n_chunks = lambda b, c: tirx.max(1, tirx.ceildiv(pages(b), c))  # noqa: E731
            s = local("s", 8, "int32")  # 0 max_pages, 1 lo, 2 hi, 3 count, 4 work, 5 partial, 6 status
            store(s, 0, 0)
            with loop("b", batch) as b:
                store(s, tirx.max(s[0], pages(b)), 0)
            max_pages = let("max_pages", tirx.max(s[0], 1))
            # smallest chunk (pages) whose works fit target_works; no split when the batch fills the GPU
            no_split = tirx.any(allow_split == 0, batch >= target_works)
            store(s, tirx.if_then_else(no_split, max_pages, tirx.min(tirx.max(min_chunk_pages, 1), max_pages)), 1)
            store(s, max_pages, 2)
            with T.While(s[1] < s[2]):
                mid = let("mid", (s[1] + s[2]) // 2)
                store(s, 0, 3)
                with loop("b", batch) as b:
                    store(s, s[3] + n_chunks(b, mid), 3)
                with T.If(s[3] <= target_works):
                    with T.Then():
                        store(s, mid, 2)
                    with T.Else():
                        store(s, mid + 1, 1)
            chunk = let("chunk_pages", s[1])
            chunk_tokens = let("chunk_tokens", chunk * page_size)
            store(s, 0, 4)
            store(s, 0, 5)
            store(s, tirx.if_then_else(batch + 1 > max_batch_plus_one, 3, 0), 6)
            with loop("b", tirx.min(batch, max_batch_plus_one - 1)) as b:
                n = let("n", n_chunks(b, chunk))
                length = let("len", kv_len(b))
                store(merge_indptr, s[5], b)
                with loop("i", n) as i:
                    with T.If(s[4] < max_works):
                        with T.Then():
                            store(work_info, b, 0, s[4])
                            store(work_info, tirx.min(i * chunk_tokens, length), 1, s[4])
                            store(work_info, tirx.min((i + 1) * chunk_tokens, length), 2, s[4])
                            store(work_info, tirx.if_then_else(n > 1, s[5] + i, -1), 3, s[4])
                    store(s, s[4] + 1, 4)
                with when(n > 1):
                    store(s, s[5] + n, 5)
            with loop("b", max_batch_plus_one) as b:  # rows past the batch: empty
                with when(b >= tirx.min(batch, max_batch_plus_one - 1)):
                    store(merge_indptr, s[5], b)
            with when(s[4] > max_works):
                store(s, 1, 6)
            with when(s[5] > max_partials):
                store(s, 2, 6)
            with loop("w", max_works) as w:
                with when(w >= s[4]):
                    store(work_info, -1, 0, w)
                    store(work_info, 0, 1, w)
                    store(work_info, 0, 2, w)
                    store(work_info, -1, 3, w)
            with when(s[6] != 0):  # a failed plan launches nothing
                with loop("w", max_works) as w:
                    store(work_info, -1, 0, w)
                with loop("b", max_batch_plus_one) as b:
                    store(merge_indptr, 0, b)
            store(stats, s[4], 0)
            store(stats, s[5], 1)
            store(stats, chunk_tokens, 2)
            store(stats, s[6], 3)
    return ib.get()

"""KV formats: paged, ragged and block-sparse, all views of one block-sparse matrix.

Basics
    Attention of a query row over its keys is a row of a sparse matrix whose non-zeros are the
    visible (query, key) pairs. FlashInfer stores the keys of every format as *blocks* of ``C``
    consecutive rows: a paged cache is BSR with ``C = page_size``, ragged KV is one dense block per
    request, vector-sparse is ``C = 1``.

Details
    * ``PagedKV(page_size, layout)``: ``paged_kv_cache`` is ``(num_pages, 2, page_size, num_kv_heads,
      head_dim)`` for ``"NHD"`` or ``(num_pages, 2, num_kv_heads, page_size, head_dim)`` for ``"HND"``
      (index 0 of dim 1 is K, 1 is V). Request ``b`` owns pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``;
      its length is ``(num_pages_b - 1) * page_size + kv_last_page_len[b]``, and 0 with no pages.
    * ``RaggedKV(layout)``: ``k``, ``v`` of shape ``(total_kv, num_kv_heads, head_dim)`` (``"NHD"``) or
      ``(num_kv_heads, total_kv, head_dim)`` (``"HND"``); request ``b`` owns rows
      ``kv_indptr[b]:kv_indptr[b+1]``.
    * ``BlockSparseKV(R, C)``: ``q`` of shape ``(M, num_qo_heads, head_dim)`` and ``k``, ``v`` of shape
      ``(N, num_kv_heads, head_dim)`` with ``M % R == 0`` and ``N % C == 0``; block row ``r`` (query rows
      ``r*R .. r*R+R-1``) sees the key blocks ``indices[indptr[r]:indptr[r+1]]`` (key rows
      ``c*C .. c*C+C-1``). The whole matrix is one request: hooks see absolute row and column.

    Reconstruct to dense (what the reference does)::

        for b in range(batch_size):                        # paged
            pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
            k_b = paged_kv_cache[pages, 0].reshape(-1, num_kv_heads, head_dim)[:kv_len[b]]   # NHD

The TIR side of each format, the one place that turns (request, position) into an address, lives
in :mod:`tvm_attn.kv.index`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .validate import as_index_array, check_indptr, check_layout, check_positive, check_range


@dataclass(frozen=True)
class PagedKV:
    page_size: int
    layout: str = "NHD"

    def __post_init__(self):
        check_positive("page_size", self.page_size)
        check_layout(self.layout)

    def uri(self) -> str:
        return f"paged{self.page_size}{self.layout.lower()}"

    def validate(self, indptr, indices, last_page_len, num_pages: int | None = None):
        """Checked int32 copies of the page table, and each request's kv length."""
        indptr = as_index_array("kv_indptr", indptr)
        indices = as_index_array("kv_indices", indices)
        last_page_len = as_index_array("kv_last_page_len", last_page_len)
        check_indptr("kv_indptr", indptr, indices.size, "len(kv_indices)")
        batch = indptr.size - 1
        if last_page_len.size != batch:
            raise ValueError(
                f"kv_last_page_len: has {last_page_len.size} entries but kv_indptr describes {batch} requests"
            )
        if num_pages is not None:
            check_range("kv_indices", indices[: indptr[-1]], 0, num_pages, "page ids of paged_kv_cache")
        else:
            check_range("kv_indices", indices[: indptr[-1]], 0, np.iinfo(np.int32).max, "page ids")
        pages = np.diff(indptr)
        has_pages = pages > 0
        # one pass for the common case: last_page_len in [1, page_size] where there are pages, else 0
        expected = np.clip(last_page_len, has_pages, has_pages * self.page_size)
        if last_page_len.size and not np.array_equal(expected, last_page_len):
            self._explain_last_page_len(pages, last_page_len)
        kv_lens = np.where(has_pages, (pages - 1) * self.page_size + last_page_len, 0).astype(np.int64)
        return indptr, indices, last_page_len, kv_lens

    def _explain_last_page_len(self, pages, last_page_len):
        bad_full = np.nonzero((pages > 0) & ((last_page_len < 1) | (last_page_len > self.page_size)))[0]
        if bad_full.size:
            b = int(bad_full[0])
            raise ValueError(
                f"kv_last_page_len: kv_last_page_len[{b}] = {int(last_page_len[b])} must be in "
                f"[1, page_size = {self.page_size}] for a request with {int(pages[b])} pages"
            )
        bad_empty = np.nonzero((pages == 0) & (last_page_len != 0))[0]
        if bad_empty.size:
            b = int(bad_empty[0])
            raise ValueError(
                f"kv_last_page_len: kv_last_page_len[{b}] = {int(last_page_len[b])} "
                "must be 0 for a request with no pages"
            )

    def cache_shape(self, num_pages: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        if self.layout == "NHD":
            return (num_pages, 2, self.page_size, num_kv_heads, head_dim)
        return (num_pages, 2, num_kv_heads, self.page_size, head_dim)


@dataclass(frozen=True)
class RaggedKV:
    layout: str = "NHD"

    def __post_init__(self):
        check_layout(self.layout)

    def uri(self) -> str:
        return f"ragged{self.layout.lower()}"

    def validate(self, kv_indptr):
        kv_indptr = as_index_array("kv_indptr", kv_indptr)
        check_indptr("kv_indptr", kv_indptr)
        return kv_indptr, np.diff(kv_indptr).astype(np.int64)

    def kv_shape(self, total_kv: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        if self.layout == "NHD":
            return (total_kv, num_kv_heads, head_dim)
        return (num_kv_heads, total_kv, head_dim)


@dataclass(frozen=True)
class BlockSparseKV:
    R: int
    C: int

    def __post_init__(self):
        check_positive("R", self.R)
        check_positive("C", self.C)

    def uri(self) -> str:
        return f"bsr{self.R}x{self.C}"

    def validate(self, indptr, indices, M: int, N: int):
        check_positive("M", M)
        check_positive("N", N)
        if M % self.R:
            raise ValueError(f"M: {M} is not a multiple of the block row size R = {self.R}")
        if N % self.C:
            raise ValueError(f"N: {N} is not a multiple of the block column size C = {self.C}")
        indptr = as_index_array("indptr", indptr)
        indices = as_index_array("indices", indices)
        if indptr.size != M // self.R + 1:
            raise ValueError(f"indptr: has {indptr.size} entries, expected M / R + 1 = {M // self.R + 1}")
        check_indptr("indptr", indptr, indices.size, "len(indices)")
        check_range("indices", indices[: indptr[-1]], 0, N // self.C, "block columns N / C")
        return indptr, indices

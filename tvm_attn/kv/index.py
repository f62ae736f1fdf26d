"""The KV index math: the one place that turns (request, logical position) into a memory address.

Every kernel generator asks :func:`declare_layout` for an index object while it builds its
``PrimFunc``. The object declares the query and KV arguments of its format (in the order of
:meth:`tvm_attn.config.AttentionKey.param_names`) and answers, as TIR expressions:

* ``num_segments`` and, per segment ``b``: ``row_begin(b)``/``num_rows(b)`` (query rows),
  ``qo_idx(b, i)``, ``qo_len(b)``, ``batch_idx(b)``, ``kv_steps(b)``, ``kv_len(b)``
  (a segment is a request; for block-sparse attention, a block row);
* ``kv_addr(b, j)``: the address of the ``j``-th key of the segment (a tuple of ``addr_size`` int32
  expressions), bound once per step, then
  ``kv_idx(b, j, addr)`` (the logical key position), ``load_k(addr, head, d)`` and
  ``load_v(addr, head, d)``.

A segment's ``kv_steps`` keys are visited in order; ``kv_idx`` maps a step to the logical key
position that variant hooks see.
"""

from __future__ import annotations

from tvm import tirx

from ..config import AttentionKey
from ..tir._builder import buffer_param, let, sym
from .formats import BlockSparseKV, PagedKV


class _Loads:
    """``load_k``/``load_v`` from the format's ``k_elem``/``v_elem``."""

    def load_k(self, addr, h, d):
        buf, ix = self.k_elem(addr, h, d)
        return buf[ix]

    def load_v(self, addr, h, d):
        buf, ix = self.v_elem(addr, h, d)
        return buf[ix]


class _Queries(_Loads):
    """Query side of decode (one row per request) and prefill (rows given by ``qo_indptr``)."""

    #: key step j is logical position j, so a variant's kv_range bounds the steps directly
    steps_are_positions = True

    def __init__(self, key: AttentionKey, offsets: bool = False):
        # Each symbolic dim must appear alone in some shape for TVM to bind it from the arguments:
        # decode binds batch_size from q, prefill binds the indptr length from qo_indptr.
        if key.kind == "decode":
            self.batch = sym("batch_size")
            self.num_q_rows = self.batch
            self.q = buffer_param("q", (self.batch, key.num_qo_heads, key.head_dim), key.q_dtype)
            self.qo_indptr = None
        else:
            self.num_q_rows = sym("total_qo")
            self.q = buffer_param("q", (self.num_q_rows, key.num_qo_heads, key.head_dim), key.q_dtype)
            batch_plus_one = sym("batch_size_plus_1")
            self.batch = batch_plus_one - 1
            self.qo_indptr = buffer_param("qo_indptr", (batch_plus_one,), "int32", offsets)

    def row_begin(self, b):
        return b if self.qo_indptr is None else self.qo_indptr[b]

    def num_rows(self, b):
        return 1 if self.qo_indptr is None else self.qo_indptr[b + 1] - self.qo_indptr[b]

    # a segment is a request: hooks see positions within it
    def qo_len(self, b):
        return self.num_rows(b)

    def qo_idx(self, b, i):
        return i

    def batch_idx(self, b):
        return b

    def kv_idx(self, b, j, addr):
        return j

    def kv_pos(self, b, j):
        """The logical key position of step ``j`` as an expression (no binding)."""
        return j


class PagedIndex(_Queries):
    addr_size = 2  # kv_addr: (page, slot)

    def __init__(self, key: AttentionKey, offsets: bool = False):
        fmt: PagedKV = key.kv
        self.page_size, self.layout = fmt.page_size, fmt.layout
        super().__init__(key, offsets)
        batch, num_pages, nnz = self.batch, sym("num_pages"), sym("nnz_pages")
        shape = fmt.cache_shape(num_pages, key.num_kv_heads, key.head_dim)
        self.cache = buffer_param("paged_kv_cache", shape, key.kv_dtype)
        self.indptr = buffer_param("kv_indptr", (batch + 1,), "int32", offsets)
        self.indices = buffer_param("kv_indices", (nnz,), "int32", offsets)
        self.last_page_len = buffer_param("kv_last_page_len", (batch,), "int32", offsets)
        self.num_segments = batch

    def kv_len(self, b):
        pages = self.indptr[b + 1] - self.indptr[b]
        return tirx.if_then_else(pages > 0, (pages - 1) * self.page_size + self.last_page_len[b], 0)

    kv_steps = kv_len


    def kv_addr(self, b, j):
        page = let("page", self.indices[self.indptr[b] + j // self.page_size])
        return page, j % self.page_size

    def _elem(self, kv, addr, h, d):
        page, slot = addr
        if self.layout == "NHD":
            return self.cache, (page, kv, slot, h, d)
        return self.cache, (page, kv, h, slot, d)

    def k_elem(self, addr, h, d):
        """(buffer, indices) of K element ``d`` of head ``h`` at ``addr`` (for copies by address)."""
        return self._elem(0, addr, h, d)

    def v_elem(self, addr, h, d):
        return self._elem(1, addr, h, d)


class RaggedIndex(_Queries):
    addr_size = 1  # kv_addr: (row,)

    def __init__(self, key: AttentionKey, offsets: bool = False):
        self.layout = key.kv.layout
        super().__init__(key, offsets)
        batch, total_kv = self.batch, sym("total_kv")
        shape = key.kv.kv_shape(total_kv, key.num_kv_heads, key.head_dim)
        self.k = buffer_param("k", shape, key.kv_dtype)
        self.v = buffer_param("v", shape, key.kv_dtype)
        self.indptr = buffer_param("kv_indptr", (batch + 1,), "int32", offsets)
        self.num_segments = batch

    def kv_len(self, b):
        return self.indptr[b + 1] - self.indptr[b]

    kv_steps = kv_len


    def kv_addr(self, b, j):
        return (self.indptr[b] + j,)

    def _elem(self, buf, addr, h, d):
        (row,) = addr
        return buf, ((row, h, d) if self.layout == "NHD" else (h, row, d))

    def k_elem(self, addr, h, d):
        return self._elem(self.k, addr, h, d)

    def v_elem(self, addr, h, d):
        return self._elem(self.v, addr, h, d)


class BlockSparseIndex(_Loads):
    """Block row ``r`` is a segment of ``R`` query rows; its keys are ``C``-row column blocks."""

    steps_are_positions = False  # steps walk the block list, not positions
    addr_size = 1  # kv_addr: (row,)

    def __init__(self, key: AttentionKey, offsets: bool = False):
        fmt: BlockSparseKV = key.kv
        self.R, self.C = fmt.R, fmt.C
        # M is bound by q and checked against the block rows of indptr; plan checks N % C == 0 and
        # that every block column lies inside k.
        block_rows_plus_one, nnz = sym("num_block_rows_plus_1"), sym("nnz_blocks")
        block_rows = block_rows_plus_one - 1
        self.M, self.N = block_rows * self.R, sym("N")
        self.num_q_rows = self.M
        self.q = buffer_param("q", (self.M, key.num_qo_heads, key.head_dim), key.q_dtype)
        self.k = buffer_param("k", (self.N, key.num_kv_heads, key.head_dim), key.kv_dtype)
        self.v = buffer_param("v", (self.N, key.num_kv_heads, key.head_dim), key.kv_dtype)
        self.indptr = buffer_param("indptr", (block_rows_plus_one,), "int32", offsets)
        self.indices = buffer_param("indices", (nnz,), "int32", offsets)
        self.num_segments = block_rows

    def row_begin(self, b):
        return b * self.R

    def num_rows(self, b):
        return self.R

    def qo_idx(self, b, i):
        return b * self.R + i

    def qo_len(self, b):
        return self.M

    def kv_len(self, b):
        return self.N

    def batch_idx(self, b):
        return 0

    def kv_steps(self, b):
        return (self.indptr[b + 1] - self.indptr[b]) * self.C

    def kv_addr(self, b, j):
        row = let("kv_row", self.indices[self.indptr[b] + j // self.C] * self.C + j % self.C)
        return (row,)

    def kv_idx(self, b, j, addr):
        return addr[0]  # block-sparse hooks see the absolute key row

    def kv_pos(self, b, j):
        """The logical key position of step ``j`` as an expression (no binding)."""
        return self.indices[self.indptr[b] + j // self.C] * self.C + j % self.C

    def k_elem(self, addr, h, d):
        return self.k, (addr[0], h, d)

    def v_elem(self, addr, h, d):
        return self.v, (addr[0], h, d)


def declare_layout(key: AttentionKey, offsets: bool = False):
    """Declare the query/KV arguments of ``key``'s format in the current PrimFunc; return its index.

    ``offsets=True`` lets the index arrays (indptr, indices, last_page_len) be views with an element
    offset, as TVM's runtime KV cache passes them.
    """
    if isinstance(key.kv, BlockSparseKV):
        return BlockSparseIndex(key, offsets)
    if isinstance(key.kv, PagedKV):
        return PagedIndex(key, offsets)
    return RaggedIndex(key, offsets)

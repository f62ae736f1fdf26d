"""The portable attention kernel: every kind (decode, prefill, block-sparse), every KV format, every
variant, from one generator. It targets the CPU (``llvm``) and is the semantic ground truth that the
CUDA kernels share hooks and index math with.

Lineage: TVM's ``_attention_decode_cpu`` / ``_attention_prefill_cpu`` (``relax/frontend/nn/llm``),
rebuilt around the variant hooks and :mod:`tvm_attn.kv.index` instead of one copy per format.

Query rows in blocks, keys in tiles staged in float32, online softmax per row (schedule.cpu)::

    for (head group, segment b) in parallel:         # a group: one query head, or (decode) the
      for block of query rows of b:                  #   query heads of one KV head
        q_tile = query_transform(q[rows])            # float32, once per block
        o, m, d = 0, -inf, 0                         # per row
        for tile of keys in the block's kv_range:    # kv_idx = index.kv_idx(b, j)
          k_tile = key_transform(k[tile]); v_tile = v[tile]    # float32, once per block and tile
          for row of the block, key of the tile in the row's kv_range:
            if logits_mask(...):
              s = logits_transform(sm_scale * dot(q_tile[row], k_tile[key]))
              m, d, o = online-softmax update with (s, v_tile[key])
        o[row] = output_transform(o / d);  lse = m * log2(e) + log2(d)

Widening to float32 once per tile, not in the inner products, is what makes float16 and bfloat16
as fast as float32: float16 widens in hardware where the target has it (F16C, :func:`native_half`),
else by integer operations (:func:`widen_half`), which vectorize.

Arguments, in order: the format's query/KV arguments, ``o``, ``lse`` (float32, log2 units),
``sm_scale`` (float32), then the variant's extra tensors and scalars
(:meth:`tvm_attn.config.AttentionKey.param_names`).
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import tirx

from ..config import AttentionKey
from ..kv.index import declare_layout
from ..schedule.cpu import CPU_LOOP_ORDER
from ..variants.base import CONFIG_DIMS, HookContext, ScalarParam
from ._builder import IRBuilder, T, buffer_param, let, local, loop, scalar_param, store, sym, when
from .softmax import LOG2E, NEG_INF, Ref, online_update


def declare_extra_params(key: AttentionKey) -> dict:
    """Declare the variant's extra tensors and scalars; return them by name."""
    consts = {"num_qo_heads": key.num_qo_heads, "num_kv_heads": key.num_kv_heads, "head_dim": key.head_dim}
    dims: dict[str, tirx.Var] = {}
    out = {}
    for p in key.extra_params():
        if isinstance(p, ScalarParam):
            out[p.name] = scalar_param(p.name, p.dtype)
            continue
        shape = []
        for dim in p.shape:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in CONFIG_DIMS:
                shape.append(consts[dim])
            else:
                shape.append(dims.setdefault(dim, sym(dim)))
        out[p.name] = buffer_param(p.name, shape, p.dtype)
    return out


def make_attention(key: AttentionKey, abi=None) -> tirx.PrimFunc:
    """Generate the CPU kernel for ``key`` (see the module docstring).

    ``abi`` (a :class:`tvm_attn.tir.abi.KernelABI`) gives the kernel the argument order another
    caller expects (Relax ``call_tir``, TVM's runtime KV cache); the body is the same.
    """
    if not key.target.startswith("llvm"):
        raise ValueError(f"make_attention builds the portable CPU kernel; target {key.target!r} is not llvm")
    variant, D = key.variant, key.head_dim
    BQ, BK = CPU_LOOP_ORDER.row_block, CPU_LOOP_ORDER.kv_tile
    with IRBuilder() as ib:
        with T.prim_func():
            symbol = key.uri if abi is None else abi.symbol(key)
            T.func_name(symbol)
            T.func_attr({"global_symbol": symbol, "tir.noalias": True})
            idx = declare_layout(key, offsets=abi is not None and abi.index_offsets)
            o = buffer_param("o", (idx.num_q_rows, key.num_qo_heads, D), key.o_dtype)
            lse = buffer_param("lse", (idx.num_q_rows, key.num_qo_heads), "float32")
            sm_scale = scalar_param("sm_scale", "float32")
            params = declare_extra_params(key)
            if abi is not None:
                abi.declare(key, idx, params)

            # a task is (group of HB query heads of one KV head, segment); a row block holds BR
            # query rows of each of its heads, so they share every staged K/V tile
            HB = CPU_LOOP_ORDER.heads_per_block(key)
            BR = max(1, BQ // HB)
            segments = idx.num_segments
            with loop("task", key.num_qo_heads // HB * segments, CPU_LOOP_ORDER.head_loop) as task:
                b, h0 = let("b", task % segments), let("h0", task // segments * HB)
                kv_head = let("kv_head", h0 // key.group_size)
                # allocated once per task: buffers over 1 KB are heap workspaces on the CPU
                tiles = _Tiles(D, HB * BR, BK, _stage_tables(variant, D, params))
                qo_len, kv_len = let("qo_len", idx.qo_len(b)), let("kv_len", idx.kv_len(b))
                n_rows = let("n_rows", idx.num_rows(b))
                with loop("ib", (n_rows + BR - 1) // BR) as blk:
                    rows = let("rows", tirx.min(BR, n_rows - blk * BR))  # query rows per head
                    # block row r: head h0 + r // rows, query row blk * BR + r % rows
                    head_of = (lambda r: h0) if HB == 1 else (lambda r: h0 + r // rows)
                    row_in = (lambda r: r) if HB == 1 else (lambda r: r % rows)

                    def ctx_of(r):
                        qo_idx = idx.qo_idx(b, blk * BR + row_in(r))
                        return HookContext(idx.batch_idx(b), qo_idx, None, head_of(r), kv_head, qo_len,
                                           kv_len, D, params, tiles.tables)

                    def row_of(r):
                        return idx.row_begin(b) + blk * BR + row_in(r)

                    block_rows = rows * HB
                    _stage_queries(key, idx, tiles, block_rows, ctx_of, row_of, head_of)
                    steps = idx.kv_steps(b)
                    ranged = idx.steps_are_positions and variant.kv_range(ctx_of(0)) is not None
                    range_mask = ranged and variant.mask_is_range()

                    def kv_bounds(ctx):
                        lo_, hi_ = variant.kv_range(ctx)
                        lo_ = tirx.max(lo_, 0)
                        return lo_, tirx.max(tirx.min(hi_, steps), lo_)

                    # kv_range is non-decreasing in qo_idx: the block's keys span from the first
                    # row's lower bound to the last row's upper bound
                    lo = let("kv_lo", kv_bounds(ctx_of(0))[0]) if ranged else 0
                    hi = let("kv_hi", tirx.max(kv_bounds(ctx_of(block_rows - 1))[1], lo)) if ranged else steps
                    with loop("jt", (hi - lo + BK - 1) // BK) as jt:
                        j0 = let("j0", lo + jt * BK)
                        n_keys = let("n_keys", tirx.min(BK, hi - j0))
                        _stage_keys(key, idx, tiles, b, j0, n_keys, kv_head, qo_len, kv_len, params)
                        with loop("r", block_rows) as r:
                            ctx = ctx_of(r)
                            c_lo, c_hi = 0, n_keys
                            if ranged:  # the row's own keys within the tile
                                r_lo, r_hi = kv_bounds(ctx)
                                c_lo = let("c_lo", tirx.max(r_lo - j0, 0))
                                c_hi = let("c_hi", tirx.max(tirx.min(r_hi - j0, n_keys), c_lo))
                            state, o_row = tiles.state_row(r), tiles.o_row(r)
                            with loop("cc", c_hi - c_lo) as cc:
                                c = let("c", c_lo + cc)
                                sctx = dataclasses.replace(ctx, kv_idx=tiles.kv_idx[c])
                                # a range mask is exactly the row's bounds applied above
                                with when(None if range_mask else variant.logits_mask(sctx)):
                                    s = let("s", variant.logits_transform(sctx, tiles.dot(r, c) * sm_scale))
                                    _accumulate(variant.use_softmax, state, o_row, s, tiles.v_loader(c), D)
                    with loop("r", block_rows) as r:
                        _write_output(key, ctx_of(r), tiles.state_row(r), tiles.o_row(r), o, lse, row_of(r),
                                      head_of(r))
    func = ib.get()
    return func if abi is None else abi.reorder(key, func)


class _Tiles:
    """The float32 working set of one task: the staged query rows of a row block, their outputs
    and softmax states, the staged (converted, key-transformed) K/V tile, the variant's tables."""

    def __init__(self, D: int, rows: int, keys: int, tables: dict):
        self.D, self.tables = D, tables
        self.q, self.o = local("q_tile", rows * D), local("o_tile", rows * D)
        self.state = local("state", rows * 2)  # per row: m (running max, natural units), d (sum)
        self.k, self.v = local("k_tile", keys * D), local("v_tile", keys * D)
        self.kv_idx = local("kv_idx_tile", keys, "int32")
        self.lanes = next(n for n in (16, 8, 4, 2, 1) if D % n == 0 and n <= CPU_LOOP_ORDER.dot_lanes)
        self.acc = local("dot_acc", self.lanes)

    @staticmethod
    def _view(buf, size: int, offset):
        """Row ``offset / size`` of ``buf`` as a buffer of its own (for :func:`_accumulate`)."""
        return T.decl_buffer((size,), "float32", data=buf.data, elem_offset=offset, scope="local")

    def state_row(self, r):
        return self._view(self.state, 2, r * 2)

    def o_row(self, r):
        return self._view(self.o, self.D, r * self.D)

    def v_loader(self, c):
        return lambda d: self.v[c * self.D + d]

    def dot(self, r, c):
        """``q_tile[r] . k_tile[c]`` in float32: ``lanes`` independent partial sums over d (one
        running sum is a serial chain that neither vectorizes nor pipelines), then their sum."""
        D, L, acc = self.D, self.lanes, self.acc
        with loop("l", L, "vectorized") as l:
            store(acc, tirx.const(0.0, "float32"), l)
        with loop("d0", D // L) as d0:
            with loop("l", L, "vectorized") as l:
                d = d0 * L + l
                store(acc, acc[l] + self.q[r * D + d] * self.k[c * D + d], l)
        parts = [acc[i] for i in range(L)]
        while len(parts) > 1:
            parts = [parts[i] + parts[i + len(parts) // 2] for i in range(len(parts) // 2)]
        return parts[0]


def _stage_tables(variant, D: int, params: dict) -> dict:
    """Each of the variant's DimTables, computed once per task (else RoPE's powf runs for every
    element of every key)."""
    tables = {}
    ctx = HookContext(None, None, None, None, None, None, None, D, params)
    for table in variant.tables(D):
        buf = local(table.name, table.size)
        with loop("ti", table.size) as ti:
            store(buf, tirx.Cast("float32", table.value(ctx, ti)), ti)
        tables[table.name] = buf
    return tables


def _stage_queries(key, idx, tiles, rows, ctx_of, row_of, head_of) -> None:
    """The block's query rows, transformed, into ``tiles.q``; zero outputs and empty states."""
    D = key.head_dim
    with loop("r", rows) as r:
        ctx, row, h = ctx_of(r), let("row", row_of(r)), let("h", head_of(r))
        q_bits = _half_bits(idx.q, key.q_dtype)
        with loop("d", D) as d:
            load_q = lambda dd: _load_f32((idx.q, (row, h, dd)), key.q_dtype, q_bits)  # noqa: E731
            store(tiles.q, key.variant.query_transform(ctx, load_q, d), r * D + d)
            store(tiles.o, tirx.const(0.0, "float32"), r * D + d)
        store(tiles.state, tirx.const(NEG_INF, "float32"), r * 2)
        store(tiles.state, tirx.const(0.0, "float32"), r * 2 + 1)


def _stage_keys(key, idx, tiles, b, j0, n_keys, kv_head, qo_len, kv_len, params) -> None:
    """Keys ``j0 .. j0 + n_keys`` of segment ``b``: K (key-transformed) and V in float32 into the
    tile, and their logical positions, once for all the rows of the block."""
    D = key.head_dim
    with loop("c", n_keys) as c:
        j = let("j", j0 + c)
        # bound once: a load inside the row's address would be re-read for every element
        addr = tuple(let(f"addr{n}", a) for n, a in enumerate(idx.kv_addr(b, j)))
        kv_idx = let("kv_idx", idx.kv_idx(b, j, addr))
        store(tiles.kv_idx, kv_idx, c)
        kctx = HookContext(idx.batch_idx(b), None, kv_idx, None, kv_head, qo_len, kv_len, D, params,
                           tiles.tables)
        k_bits = _half_bits(idx.k_elem(addr, kv_head, 0)[0], key.kv_dtype)
        v_bits = _half_bits(idx.v_elem(addr, kv_head, 0)[0], key.kv_dtype)
        load_k = lambda dd: _load_f32(idx.k_elem(addr, kv_head, dd), key.kv_dtype, k_bits)  # noqa: E731
        with loop("d", D) as d:
            store(tiles.k, key.variant.key_transform(kctx, load_k, d), c * D + d)
        with loop("d", D) as d:
            store(tiles.v, _load_f32(idx.v_elem(addr, kv_head, d), key.kv_dtype, v_bits), c * D + d)


def native_half() -> bool:
    """Whether the target being generated for (``with target:``, as :func:`tvm_attn.build.compile_key`
    does) widens float16 in hardware: x86's F16C, where a cast is one ``vcvtph2ps`` per vector. Without
    a target, or on LLVM's generic x86-64 (SSE2), float16 widens by integer operations."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return False
    return bool(tvm.target.codegen.llvm_cpu_has_features("f16c", target))


def _half_bits(buf, dtype: str):
    """A uint16 view of a float16 buffer, for :func:`widen_half`; None for other dtypes, and where
    the target widens float16 in hardware (:func:`native_half`)."""
    if dtype != "float16" or native_half():
        return None
    return T.decl_buffer(buf.shape, "uint16", data=buf.data, strides=buf.strides, elem_offset=buf.elem_offset)


def _load_f32(elem, dtype: str, bits):
    """Element ``(buffer, indices)`` in float32; float16 through its ``bits`` view."""
    buf, ix = elem
    return tirx.Cast("float32", buf[ix]) if bits is None else widen_half(bits[ix])


def widen_half(bits):
    """The float32 value of a float16 given by its ``bits`` (uint16), by integer operations: LLVM's
    generic x86-64 target has no half-precision conversion instruction and calls ``__extendhfsf2``
    per element (which made float16 10x slower than float32), while these vectorize. Exact for
    every half (normals, subnormals, zeros, inf, NaN) where float32 subnormals are not flushed
    (the default floating-point environment)."""
    i32 = lambda v: tirx.const(v, "int32")  # noqa: E731
    h = tirx.Cast("int32", tirx.reinterpret("int16", bits))  # sign-extended
    # sign, exponent and mantissa into float32's places, scaled by 2^(127 - 15): exact for normals,
    # and for subnormals too (their shifted bits are a float32 subnormal, which the scaling normalizes)
    placed = tirx.bitwise_and(tirx.shift_left(h, i32(13)), i32(-0x70002000))  # 0x8FFFE000
    scaled = tirx.reinterpret("float32", placed) * tirx.const(2.0**112, "float32")
    # inf and NaN: the all-ones exponent (the scaling kept their mantissa, NaN payloads included);
    # Select, not if_then_else, which branches (LLVM made a switch of it, and no vector loop)
    inf_nan = tirx.Select(tirx.bitwise_and(h, i32(0x7FFF)) > i32(0x7BFF), i32(0x7F800000), i32(0))
    bits32 = tirx.bitwise_or(tirx.reinterpret("int32", scaled), inf_nan)
    return tirx.reinterpret("float32", bits32)


def _accumulate(use_softmax: bool, state, o_local, s, load_v, D: int) -> None:
    """Fold one (logit, value row) into the running state: online softmax (natural units), or a
    plain weighted sum."""
    if not use_softmax:
        with loop("d", D) as d:
            store(o_local, o_local[d] + s * load_v(d), d)
        return
    # a -inf logit weighs 0: the safe max keeps exp2(-inf + inf) = NaN out of the weights
    step = online_update(Ref(state, (0,)), Ref(state, (1,)), 1, lambda _: s, names=("m_new", None, "rescale"),
                         natural=True)
    with loop("d", D) as d:
        store(o_local, step.output(o_local[d], [load_v(d)]), d)


def _write_output(key: AttentionKey, ctx: HookContext, state, o_local, o, lse, row, h) -> None:
    variant, D = key.variant, key.head_dim
    if not variant.use_softmax:
        with loop("d", D) as d:
            store(o, tirx.Cast(key.o_dtype, variant.output_transform(ctx, o_local[d], d)), row, h, d)
        store(lse, tirx.const(NEG_INF, "float32"), row, h)  # no softmax, no LSE: wrappers refuse return_lse
        return
    # d is 0 for a row that saw no key (o = 0, LSE = -inf) and NaN once a NaN or +inf logit came in,
    # which must come out as NaN, not as an empty row
    seen = tirx.any(state[1] > 0, tirx.isnan(state[1]))
    with loop("d", D) as d:
        out = variant.output_transform(ctx, o_local[d] / state[1], d)
        store(o, tirx.Cast(key.o_dtype, tirx.if_then_else(seen, out, tirx.const(0.0, "float32"))), row, h, d)
    store(lse, tirx.if_then_else(seen, state[0] * LOG2E + tirx.log2(state[1]),
                                 tirx.const(NEG_INF, "float32")), row, h)

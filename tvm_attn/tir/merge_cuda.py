"""CUDA kernels that merge attention states (``merge_state``, ``merge_state_in_place``,
``merge_states``), with the arguments, shapes and math of the CPU kernels (:mod:`tvm_attn.tir.merge`).

They are pure streaming, so they are written for the memory bandwidth:

* a ``(row, head)`` item belongs to a group of ``G`` lanes of one warp, ``G`` the power of two at
  or above the item's 16-byte chunks (capped at 32; ``head_dim`` 128 in fp16 gives 16 chunks, so a
  warp merges two items). Each lane loads whole 16-byte chunks of ``v`` (8 fp16/bf16 or 4 fp32
  elements) and, for ``merge_states``, the chunks of ``UNROLL`` states before it adds any of them
  (bytes in flight). The first of these loads are issued before the item's LSEs are read, so the
  two round trips to memory overlap instead of following each other. Consecutive groups take
  consecutive items, so a warp reads one contiguous span of every state;
* every lane of a group reads the item's LSEs itself (the same addresses: one transaction per warp),
  so a group needs no shuffle. It computes the merged LSE as the CPU kernel does (max, sum of
  ``exp2``, ``-inf`` for an item whose states are all empty) and the weights once per item; a state
  of weight 0 adds nothing, whatever its ``v`` holds, and a NaN LSE makes the item NaN;
* a persistent grid (at most ``MAX_BLOCKS`` blocks of ``THREADS``) strides over the items, so any
  number of rows, heads and states runs. A ``head_dim`` that is not a multiple of the 16-byte
  width takes a scalar copy of the same loop (one element per chunk).

All sizes are symbolic, as in the CPU kernels: one kernel per op and dtype serves every shape.
"""

from __future__ import annotations

from tvm import tirx

from ..config import MergeKey
from .merge import merge_params
from ._builder import IRBuilder, T, let, local, loop, store, sym, when
from ._cuda import syncwarp
from .softmax import f32, neg_inf, nonempty, safe_max, zero

THREADS = 256
WARPS = THREADS // 32
#: the persistent grid's size limit: an SM holds at most 8 blocks of 256 threads (4-6 at these
#: kernels' 38-64 registers), so 4096 blocks are several waves of a 132-SM H100/H200 and of an A100;
#: larger inputs take more strides
MAX_BLOCKS = 4096
#: states of ``merge_states`` whose chunks a lane loads before it adds them (64 bytes in flight)
UNROLL = 4
DTYPES = ("float16", "bfloat16", "float32")


def vec_width(dtype: str) -> int:
    """Elements of ``dtype`` in a 16-byte load."""
    return 16 // (4 if dtype == "float32" else 2)


def check_merge_key(key: MergeKey) -> None:
    """ValueError unless the CUDA merge kernels cover ``key``."""
    if not isinstance(key, MergeKey):
        raise TypeError(f"key: expected a MergeKey, got {type(key).__name__}")
    kind, _, arch = key.target.partition(":")
    if kind != "cuda" or not arch.startswith("sm_"):
        raise ValueError(f"target: the CUDA merge kernels need 'cuda:sm_<arch>', got {key.target!r}")
    if key.dtype not in DTYPES:
        raise ValueError(f"dtype: the CUDA merge kernels take {DTYPES}, got {key.dtype!r}")


def _lanes_log2(chunks):
    """log2 of the group size: the power of two at or above ``chunks``, at most 32 lanes."""
    bits = 32 - tirx.clz(tirx.max(chunks, 1) - 1)  # clz(0) = 32: one chunk, one lane
    return tirx.min(bits, 5)


def _num_blocks(items, head_dim, vec: int):
    groups = tirx.shift_right(tirx.const(32, "int32"), _lanes_log2(tirx.ceildiv(head_dim, vec)))
    return tirx.max(1, tirx.min(tirx.ceildiv(items, WARPS * groups), MAX_BLOCKS))


class _States:
    """The kernel's arguments, and flat views of them (a 16-byte load is emitted only where TVM can
    prove its index a multiple of the vector width, which the 3-D index ``row * head_dim + d`` with a
    symbolic ``head_dim`` is not; the flat index ``(row * chunks + c) * vec`` is). A row is one
    state's ``v[.., h, :]``: ``rows(item)`` gives the first state's row and the step between states
    (0 for two states, which have a buffer each); ``v[st]``, ``s[st]`` the state's buffers
    (``v[0]``, ``s[0]`` for every state of ``merge_states``); ``num_states`` an int for two states."""

    def __init__(self, key: MergeKey, n, H, D):
        self.H = H
        self.num_states, vs, ss, v_out, s_out = merge_params(key, n, H, D)
        self.v = [_flat(v, v.name + "_flat") for v in vs]
        self.s = [_flat(s, s.name + "_flat") for s in ss]
        if key.op == "merge_state_in_place":
            # the same views, so the kernel has one pointer to v (and to s), read and written
            self.v_out, self.s_out = self.v[0], self.s[0]
        else:
            self.v_out, self.s_out = _flat(v_out, "v_out_flat"), _flat(s_out, "s_out_flat")

    def rows(self, item):
        """(row of the item's first state, row step from one state to the next)."""
        if isinstance(self.num_states, int):
            return item, 0
        H = self.H
        return tirx.truncdiv(item, H) * (self.num_states * H) + tirx.truncmod(item, H), H


def _flat(buf, name):
    size = 1
    for extent in buf.shape:
        size = size * extent
    view = T.decl_buffer((size,), buf.dtype, data=buf.data)
    IRBuilder.name(name, view)
    return view


def make_merge_cuda(key: MergeKey) -> tirx.PrimFunc:
    """``key.uri``: the CUDA merge kernel of ``key.op`` over ``key.dtype`` (arguments as the CPU
    kernel's). Raises ValueError for a key it does not cover."""
    check_merge_key(key)
    vec = vec_width(key.dtype)
    n, H, D = sym("n"), sym("num_heads"), sym("head_dim")
    in_place = key.op == "merge_state_in_place"
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(key.uri)
            T.func_attr({"global_symbol": key.uri, "tir.noalias": not in_place, "tirx.is_scheduled": True})
            io = _States(key, n, H, D)
            blocks = _num_blocks(n * H, D, vec)
            with T.thread_binding(0, blocks, "blockIdx.x") as bx, \
                    T.thread_binding(0, THREADS, "threadIdx.x") as tx:
                # 16-byte chunks when every row of v starts on one (the tensors themselves are
                # 64-byte aligned: TVM allocates them so, and the API checks DLPack inputs)
                with T.If(tirx.floormod(D, vec) == 0):
                    with T.Then():
                        _merge_items(key, io, n * H, D // vec, vec, blocks, bx, tx, in_place)
                    with T.Else():
                        _merge_items(key, io, n * H, D, 1, blocks, bx, tx, in_place)
    return ib.get()


def _merge_items(key, io, items, chunks, vec: int, blocks, bx, tx, in_place: bool) -> None:
    """The grid-stride loop over the items, ``chunks`` chunks of ``vec`` elements per row."""
    lg = let("lanes_log2", _lanes_log2(chunks))
    lanes = tirx.shift_left(tirx.const(1, "int32"), lg)
    lane = tx % 32
    li = let("li", tirx.bitwise_and(lane, lanes - 1))  # lane in the group
    groups = tirx.shift_right(tirx.const(32, "int32"), lg)  # groups of a warp
    total = let("total_groups", blocks * WARPS * groups)
    first = let("first_item", (bx * WARPS + tx // 32) * groups + tirx.shift_right(lane, lg))
    lse_out = local("lse_out", 1)
    # the trip count is the same for every thread, so a warp meets at the barrier of each step
    with loop("it", tirx.ceildiv(items, total)) as it:
        item = let("item", it * total + first)
        live = item < items
        with when(live):
            first_row, step = io.rows(item)
            row_reg = local("row", 1, "int32")  # a register: a let would be substituted into every use
            store(row_reg, first_row, 0)
            row = row_reg[0]
            def at(r, c):
                return (r * chunks + c) * vec  # provably a multiple of vec

            # the first states of the lane's first chunk are loaded before the LSEs are read, so
            # both are in flight at once (a lane past the row's end loads the last chunk again: no
            # extra traffic; it stores nothing)
            buf = local("v_in", (_block_states(io), vec), key.dtype)
            with when(chunks > 0):
                _load_block(io, buf, row, step, lambda r: at(r, tirx.min(li, chunks - 1)), vec, 0)
            weights = _state_weights(io, row, step, lse_out)
            with loop("j", tirx.shift_right(chunks + lanes - 1, lg)) as j:
                c = let("c", j * lanes + li)
                with when(j > 0):
                    _load_block(io, buf, row, step, lambda r: at(r, tirx.min(c, chunks - 1)), vec, 0)
                with when(c < chunks):
                    _merge_chunk(key.dtype, io, buf, row, step, lambda r: at(r, c), at(item, c), vec, weights)
            if not in_place:
                with when(li == 0):
                    store(io.s_out, lse_out[0], item)
        if in_place:  # every lane of the group has read the old LSE before it is overwritten
            syncwarp()
            with when(tirx.all(live, li == 0)):
                store(io.s_out, lse_out[0], item)


def _state_weights(io, row, step, lse_out):
    """The item's merged LSE into ``lse_out[0]`` (the CPU kernel's: ``m`` the states' max, ``-inf``
    when every state is empty, else ``m + log2(sum 2**(s - m))``); returns the states' normalized
    weights: a buffer of them for two states, else ``(safe_max, 1 / sum)`` to weigh each state with.
    The values live in registers (local buffers), which TVM's simplifier does not substitute into
    every use as it does a let."""
    md = local("md", 4)  # the max, the sum of the weights, the max to subtract and 1 / sum
    if isinstance(io.num_states, int):
        s = [io.s[st][row] for st in range(io.num_states)]
        w = local("w", io.num_states)
        m = s[0]
        for s_st in s[1:]:
            m = tirx.max(m, s_st)
        store(md, m, 0)
        store(md, safe_max(md[0]), 2)
        for st, s_st in enumerate(s):
            store(w, tirx.exp2(s_st - md[2]), st)
        denom = w[0]
        for st in range(1, io.num_states):
            denom = denom + w[st]
        store(md, denom, 1)
    else:
        store(md, neg_inf(), 0)
        with loop("st", io.num_states) as st:
            store(md, tirx.max(md[0], io.s[0][row + st * step]), 0)
        store(md, safe_max(md[0]), 2)
        store(md, zero(), 1)
        with loop("st", io.num_states) as st:
            store(md, md[1] + tirx.exp2(io.s[0][row + st * step] - md[2]), 1)
    # by the sum, not the max: CUDA's max drops a NaN operand, so a NaN LSE beside empty states
    # leaves the max at -inf, but its weight, and so the sum, NaN
    seen = nonempty(md[1])
    store(lse_out, tirx.if_then_else(seen, md[2] + tirx.log2(md[1]), neg_inf()), 0)
    store(md, tirx.if_then_else(seen, tirx.const(1.0, "float32") / md[1], zero()), 3)
    if isinstance(io.num_states, int):
        for st in range(io.num_states):
            store(w, w[st] * md[3], st)
        return w
    return md


def _block_states(io) -> int:
    """States whose chunks a lane loads before it adds them: both of two, else UNROLL."""
    return io.num_states if isinstance(io.num_states, int) else UNROLL


def _load_block(io, buf, row, step, at, vec: int, sb) -> None:
    """``buf[u]``: the chunk at element ``at(row)`` of state ``sb * U + u`` (``U`` states a block)."""
    U = _block_states(io)
    for u in range(U):
        if isinstance(io.num_states, int):
            with loop("v", vec, "vectorized") as v:
                store(buf, io.v[u][at(row) + v], u, v)
            continue
        st = sb * U + u
        with when(st < io.num_states):
            with loop("v", vec, "vectorized") as v:
                store(buf, io.v[0][at(row + st * step) + v], u, v)


def _merge_chunk(dtype, io, buf, row, step, at, out_at, vec: int, weights) -> None:
    """One chunk of the item's output, at element ``out_at``: the weighted sum of the states'
    chunks (``at(row)`` in each; the first block already in ``buf``), added in float32."""
    acc = local("acc", vec)
    with loop("v", vec, "unroll") as v:
        store(acc, zero(), v)
    if isinstance(io.num_states, int):
        _fold_block(acc, buf, vec, weights)
    else:
        md, k, U = weights, io.num_states, UNROLL
        w = local("w", U)

        def fold(sb):
            for u in range(U):  # a state past the last weighs 0
                st = sb * U + u
                s_st = tirx.if_then_else(st < k, io.s[0][row + st * step], neg_inf())
                store(w, tirx.exp2(s_st - md[2]) * md[3], u)
            _fold_block(acc, buf, vec, w)

        fold(0)
        with loop("sb", tirx.ceildiv(k, U) - 1) as sb:
            _load_block(io, buf, row, step, at, vec, sb + 1)  # the loads of U states, then their sums
            fold(sb + 1)
    res = local("v_res", vec, dtype)
    with loop("v", vec, "unroll") as v:
        store(res, tirx.Cast(dtype, acc[v]), v)
    with loop("v", vec, "vectorized") as v:
        store(io.v_out, res[v], out_at + v)


def _fold_block(acc, buf, vec: int, w) -> None:
    """``acc += sum_u w[u] * buf[u]``; a state of weight 0 may hold anything: it adds 0 (a NaN
    weight adds NaN)."""
    with loop("v", vec, "unroll") as v:
        total = acc[v]
        for u in range(int(buf.shape[0])):
            total = total + tirx.Select(nonempty(w[u]), w[u] * f32(buf[u, v]), zero())
        store(acc, total, v)

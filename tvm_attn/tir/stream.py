"""A streaming read of a large fp16 array, for the decode benchmark's read ceiling.

The decode kernel's floor is the time to read K and V once, so its benchmark needs the fastest read
this GPU manages, measured in the same run. A torch reduction is one such read; this kernel is the
other, written the way the decode kernel reads: each thread issues ``unroll`` 16-byte loads before
it adds any of them (bytes in flight), the grid is persistent (``num_blocks`` from the shape of
``out``) and strides over the array. The benchmark times each build
(:data:`tvm_attn.benchmark.READ_CONFIGS`) and keeps the fastest.

``read_sum_t{threads}u{unroll}(x [n, 8] fp16, out [num_blocks, threads] fp32)``: ``out`` gets each
thread's sum of its rows, so nothing is optimized away and the write is ~1/1000 of the read.
"""

from __future__ import annotations

from tvm import tirx

from ..benchmark import read_sum_name
from ._builder import IRBuilder, T, buffer_param, let, local, loop, store, sym, when


def make_read_sum(threads: int, unroll: int) -> tirx.PrimFunc:
    name = read_sum_name(threads, unroll)
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True, "tirx.is_scheduled": True})
            n, blocks = sym("n", "int64"), sym("num_blocks")
            x = buffer_param("x", (n, 8), "float16")
            out = buffer_param("out", (blocks, threads), "float32")
            with (T.thread_binding(0, blocks, "blockIdx.x") as bx,
                  T.thread_binding(0, threads, "threadIdx.x") as tx):
                stride = let("stride", blocks * threads)
                first = let("first", bx * threads + tx)
                acc = local("acc", 1)
                row = local("row", (unroll, 8), "float16")
                store(acc, tirx.const(0.0, "float32"), 0)
                with loop("it", tirx.ceildiv(n, stride * unroll)) as it:
                    with loop("u", unroll, "unroll") as u:  # the loads of a step, then their sums
                        r = (it * unroll + u) * stride + first
                        with when(r < n):
                            with loop("v", 8, "vectorized") as v:
                                store(row, x[r, v], u, v)
                    with loop("u", unroll, "unroll") as u:
                        r = (it * unroll + u) * stride + first
                        total = acc[0]
                        for v in range(8):
                            total = total + tirx.Cast("float32", row[u, v])
                        store(acc, tirx.if_then_else(r < n, total, acc[0]), 0)
                store(out, acc[0], bx, tx)
    return ib.get()

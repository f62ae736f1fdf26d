"""Tensor-core fragments of ``mma.sync.aligned.m16n8k16`` (fp32 accumulators) and the ``ldmatrix``
loads of its operands from shared memory, as the FA2 prefill kernel uses them.

Fragment layouts (PTX ISA, mma.m16n8k16): lane ``l`` holds accumulator rows ``l // 4`` and
``l // 4 + 8``, columns ``2 * (l % 4) + {0, 1}`` of each 16x8 block. An operand fragment of
``2 * n`` fp16/bf16 registers goes to the instructions as ``n`` 32-bit registers (:func:`alias32`).
"""

from __future__ import annotations

from ._builder import T, loop

#: mma operand type of each fp16/bf16 dtype
MMA_TYPES = {"float16": "f16", "bfloat16": "bf16"}
_LDMATRIX = "ldmatrix.sync.aligned.m8n8.x4.shared.b16"
_LDMATRIX_T = "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"


def alias32(buf, n):
    """The 32-bit view of a fragment of ``2 * n`` fp16/bf16 registers (one mma operand register per pair)."""
    return T.decl_buffer((n,), "uint32", data=buf.data, scope="local")


def mma_m16n8k16(dtype: str):
    """The ``D = A B + C`` instruction for operands of ``dtype`` (fp32 C and D)."""
    t = MMA_TYPES[dtype]
    return T.ptx[f"mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32"]


def ldmatrix_x4(regs, at, ptr, trans: bool = False):
    """Four 8x8 b16 matrices from shared memory into the 32-bit registers ``regs[at .. at + 3]``;
    ``ptr`` is this lane's row address (lanes ``8 i .. 8 i + 7`` give matrix ``i``'s rows);
    ``trans``: each matrix transposed (the B operand of P V from row-major V)."""
    op = T.ptx[_LDMATRIX_T if trans else _LDMATRIX]
    T.evaluate(op(regs[at], regs[at + 1], regs[at + 2], regs[at + 3], ptr))


def mma_pair(mma, acc, a32, b32, n2, m_tiles: int):
    """``acc[mt, 2 n2 + {0, 1}] += A[mt] . B`` for every m-tile ``mt < m_tiles``: the two 16x8 blocks
    of one x4 ldmatrix of B (registers 0-1 and 2-3)."""
    with loop("mt", m_tiles, "unroll") as mt:
        for half in range(2):
            c = [acc[mt, n2 * 2 + half, j] for j in range(4)]
            a = [a32[mt * 4 + j] for j in range(4)]
            T.evaluate(mma(*c, *a, b32[2 * half], b32[2 * half + 1], *c))

"""The online softmax, in one place: its constants, and (as the kernels move here) the update of a
running (max, sum, output) state by new logits and the fold of two states.

Every kernel keeps logits in log2 units (``s * log2(e)``) so that ``exp2`` is one instruction, and
its LSE is in log2 units too. A state whose max is ``-inf`` has seen no visible key.
"""

from __future__ import annotations

import math

from tvm import tirx

LOG2E = math.log2(math.e)
NEG_INF = -math.inf


def f32(x):
    return tirx.Cast("float32", x)


def neg_inf():
    return tirx.const(NEG_INF, "float32")


def zero():
    return tirx.const(0.0, "float32")


def safe_max(m):
    """The running max to subtract inside ``exp2``: 0 for a state that has seen no visible key
    (max ``-inf``), so that ``exp2(-inf - 0) = 0`` rather than ``exp2(-inf + inf) = NaN``."""
    return tirx.if_then_else(m == neg_inf(), zero(), m)


# -- added for the CUDA prefill kernel and its merge (tvm_attn.tir.prefill_stages, prefill_cuda) --------

def lse_of(m, total):
    """The log2 LSE of a state with running max ``m`` (log2 units) and weight sum ``total``:
    ``m + log2(total)``, or -inf for a state that has seen no visible key (``total`` 0)."""
    return tirx.if_then_else(total > 0, m + tirx.log2(total), neg_inf())

"""Loop order of the portable CPU kernel (:mod:`tvm_attn.tir.attention`).

The parallel loop is the query head, not the request: serving batches are often one long prefill
plus a few short requests, so parallelizing over requests leaves cores idle, while every model has
at least 8 query heads to spread over a CPU's cores. For example, one 2k-token prefill with 32 heads
runs on all cores this way and on one core with request parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CPULoopOrder:
    #: loop kind of the outermost (query head) loop: "parallel" or "serial"
    head_loop: str = "parallel"


CPU_LOOP_ORDER = CPULoopOrder()

"""Loop order of the portable CPU kernel (:mod:`tvm_attn.tir.attention`).

The parallel loop runs over (query head, segment) pairs, head-major, not over requests alone:
serving batches are often one long prefill plus a few short requests, so parallelizing over
requests leaves cores idle, while every model has at least 8 query heads to spread over a CPU's
cores. For example, one 2k-token prefill with 32 heads runs on all cores this way and on one core
with request parallelism. Decode takes the query heads of one KV head together (one task per KV
head and request): with one query row per request, the group's heads are the only rows that can
share a staged tile.

Inside a task, query rows go in blocks of ``row_block`` and keys in tiles of ``kv_tile``: each tile
is converted to float32 (and key-transformed) once for all the rows of a block, so a float16 or
bfloat16 cache costs one conversion per key element per block, not per query row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CPULoopOrder:
    #: loop kind of the outermost (head group, segment) loop: "parallel" or "serial"
    head_loop: str = "parallel"
    #: query rows that share each staged K/V tile (float16 prefill at 1024 tokens: 10% over float32
    #: with 16 rows, 5% with 64)
    row_block: int = 64
    #: keys per staged tile (its K and V in float32: 2 * kv_tile * head_dim * 4 bytes)
    kv_tile: int = 32
    #: independent float32 partial sums of a dot product (vector lanes)
    dot_lanes: int = 16

    def heads_per_block(self, key) -> int:
        """Query heads of one KV head whose rows share a row block: the whole group for decode
        (one query row per request, so a tile is reused only across the group's heads), else one."""
        return key.group_size if key.kind == "decode" else 1


CPU_LOOP_ORDER = CPULoopOrder()

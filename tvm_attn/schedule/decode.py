"""Tile choices of the CUDA paged-decode kernel (:mod:`tvm_attn.tir.decode_cuda`).

Decode reads every K/V row of a request once and does ~2 flops per byte, so the kernel is a
streaming read; the choices below are about bytes in flight and coalescing, not arithmetic:

* ``vec``: each thread loads 16 bytes (8 fp16/bf16 elements, 4 fp32), the widest load (LDG.128).
* ``lanes_per_key = head_dim / vec``: that many lanes read one K (or V) row, 256 contiguous bytes for
  head_dim 128 fp16; a warp reads ``32 / lanes_per_key`` rows at a time.
* ``unroll``: each key group issues the loads of ``unroll`` keys before using any, so a thread keeps
  ``2 * unroll * 16`` bytes in flight. With 4 warps and ~4 resident blocks per SM that is
  16 KB/SM per round trip; Little's law at 3.3 TB/s and ~700 ns asks for ~18 KB/SM, so
  ``unroll = 4`` (with several blocks per SM) is about the minimum, and 8 costs registers.
* ``heads_per_block``: the query heads of one GQA group are fused into one block, so each K/V row is
  read once for all of them (FlashInfer's head-group fusion). Groups larger than 8 are split over
  ``blockIdx.y`` to bound the registers that hold q and o (2 * heads * vec floats per thread).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeTiles:
    vec: int
    lanes_per_key: int
    num_warps: int
    unroll: int
    heads_per_block: int
    #: blocks resident per SM, the planner's unit of parallelism: ptxas reports 128 registers for
    #: head_dim 128 fp16 (4 heads, unroll 4), and 65536 / (128 x 128 threads) = 4
    blocks_per_sm: int = 4

    @property
    def keys_per_warp(self) -> int:
        return 32 // self.lanes_per_key

    @property
    def key_groups(self) -> int:
        """Keys read at the same time by one block."""
        return self.num_warps * self.keys_per_warp

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    def uri(self) -> str:
        return f"w{self.num_warps}u{self.unroll}g{self.heads_per_block}"


def choose_decode_tiles(head_dim: int, kv_dtype: str, group_size: int) -> DecodeTiles:
    """Example: head_dim 128, fp16, 32/8 heads -> vec 8, 16 lanes per key, 8 keys in flight per block
    per unrolled step, all 4 query heads of a group in one block."""
    elem = 4 if kv_dtype == "float32" else 2
    vec = max(16 // elem, head_dim // 32)  # at most one warp per row
    lanes = head_dim // vec
    # registers: q and o take 2 * heads * vec floats per thread; keep heads * vec <= 64
    heads = max(h for h in range(1, group_size + 1) if group_size % h == 0 and h * vec <= 64)
    unroll = 4 if head_dim * elem <= 256 else 2
    return DecodeTiles(vec=vec, lanes_per_key=lanes, num_warps=4, unroll=unroll, heads_per_block=heads)


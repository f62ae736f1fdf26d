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

import re
from dataclasses import dataclass

from ..dtypes import to_numpy_dtype

#: a decode schedule name: warps, unroll, heads per block, blocks per SM, then ``p`` (register
#: prefetch) or ``s<stages>`` (cp.async ring)
_NAME = re.compile(r"w(\d+)u(\d+)g(\d+)b(\d+)(p?)(?:s(\d+))?")


@dataclass(frozen=True)
class DecodeTiles:
    vec: int
    lanes_per_key: int
    num_warps: int
    unroll: int
    heads_per_block: int
    #: blocks resident per SM, which sizes the persistent grid; the kernel gets it as its minimum in
    #: __launch_bounds__ (cuda_runtime.prepare_source): 4 caps registers at 65536 / (128 x 4) = 128
    blocks_per_sm: int = 4
    #: register double buffer: each key group issues the next step's loads before it computes on the
    #: current ones, so a block keeps its loads in flight while it computes (2x the K/V registers)
    prefetch: bool = False
    #: cp.async pipeline (0: none): each thread copies its K/V pieces of a step into a ring of
    #: ``stages`` steps in shared memory, ``stages - 1`` steps ahead of the one it computes on, and
    #: reads back only what it copied itself (no barrier)
    stages: int = 0

    def __post_init__(self):
        if self.prefetch and self.stages:
            raise ValueError("decode tiles: the register prefetch and the cp.async stages exclude each other")
        if self.stages == 1 or self.stages < 0:
            raise ValueError(f"decode tiles: a cp.async pipeline needs >= 2 stages, got {self.stages}")

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
        """The schedule part of the kernel name, e.g. ``w4u4g4b4``; :meth:`parse` reads it back."""
        return (f"w{self.num_warps}u{self.unroll}g{self.heads_per_block}b{self.blocks_per_sm}"
                + "p" * self.prefetch + (f"s{self.stages}" if self.stages else ""))

    @staticmethod
    def parse(schedule: str, head_dim: int, kv_dtype: str) -> "DecodeTiles":
        m = _NAME.fullmatch(schedule)
        if m is None:
            raise ValueError(f"schedule: {schedule!r} is not a decode schedule like 'w4u4g4b4', 'w4u4g4b3p' "
                             "or 'w4u2g4b4s3'")
        vec = _vec(head_dim, kv_dtype)
        w, u, g, b = (int(x) for x in m.groups()[:4])
        if min(w, u, g, b) < 1:
            raise ValueError(f"schedule: {schedule!r}: warps, unroll, heads and blocks must be >= 1")
        try:
            return DecodeTiles(vec, head_dim // vec, w, u, g, b, bool(m.group(5)), int(m.group(6) or 0))
        except ValueError as e:
            raise ValueError(f"schedule: {schedule!r}: {e}") from None

    @staticmethod
    def of(key) -> DecodeTiles:
        """The tiles named by ``key.schedule``."""
        return DecodeTiles.parse(key.schedule, key.head_dim, key.kv_dtype)

    @staticmethod
    def launch_bounds(schedule: str) -> tuple[int, int] | None:
        """(threads, minimum resident blocks per SM) of a kernel of this schedule; None if
        ``schedule`` is not a decode schedule name."""
        m = _NAME.fullmatch(schedule)
        return None if m is None else (32 * int(m.group(1)), int(m.group(4)))


def per_16_bytes(kv_dtype: str) -> int:
    """Elements of ``kv_dtype`` in one 16-byte load or cp.async copy."""
    return 16 // to_numpy_dtype(kv_dtype).itemsize


def _vec(head_dim: int, kv_dtype: str) -> int:
    return max(per_16_bytes(kv_dtype), head_dim // 32)  # 16-byte loads, at most one warp per row


def choose_decode_tiles(head_dim: int, kv_dtype: str, group_size: int, heavy_variant: bool = False,
                        logits_hooks: bool = False) -> DecodeTiles:
    """Example: head_dim 128, fp16, 32/8 heads -> vec 8, 16 lanes per key, all 4 query heads of a
    group in one block, 2 keys per key group and step with the next step's 2 already in flight
    (``w4u2g4b4p``), 4 blocks per SM; 32/32 heads -> 4 unbuffered keys per step (``w4u4g1b4``).

    ``heavy_variant`` (a key transform such as RoPE, or a mask read from tensors) needs more than 128
    registers with 4 unbuffered keys: ptxas spills 40-192 bytes at 4 blocks per SM, none at 3 (170
    registers). ``logits_hooks`` (a logits transform or mask): the double buffer spills 2-4 bytes at
    128 registers (sliding window, soft-cap), so those keep 4 unbuffered keys."""
    elem = 16 // per_16_bytes(kv_dtype)
    vec = _vec(head_dim, kv_dtype)
    lanes = head_dim // vec
    # registers: q and o take 2 * heads * vec floats per thread; heads * vec <= 32 keeps the kernel
    # within 128 registers (4 resident blocks, the grid the planner assumes)
    heads = max(h for h in range(1, group_size + 1) if group_size % h == 0 and h * vec <= 32)
    unroll = 4 if head_dim * elem <= 256 else 2
    if heads >= 2 and unroll == 4 and not logits_hooks:
        # fused heads make a step's compute long enough to hide loads behind: the double buffer
        # of 2 keys keeps the registers of 4 unbuffered ones and the 4 resident blocks. Measured on
        # an H100 (32/8 heads, d128): 1.5-2% faster than 4 unbuffered keys at 64x2048, 16x8192,
        # 128x1024 and 1x32768, 4% on the Zipf batch; and 3 resident blocks (4 keys, buffered or
        # not) cut 64 requests over 49 CTAs per head, which costs a merge
        return DecodeTiles(vec=vec, lanes_per_key=lanes, num_warps=4, unroll=2, heads_per_block=heads,
                           blocks_per_sm=4, prefetch=True)
    blocks = 3 if heavy_variant else 4
    return DecodeTiles(vec=vec, lanes_per_key=lanes, num_warps=4, unroll=unroll, heads_per_block=heads,
                       blocks_per_sm=blocks)


def is_heavy(variant) -> bool:
    """Variants whose hooks need registers beyond the 128 of 4 resident blocks."""
    return variant.overrides("key_transform") or (variant.overrides("logits_mask")
                                                  and variant.reads_tensors())


def decode_schedule(head_dim: int, kv_dtype: str, group_size: int, variant) -> str:
    """The schedule name the CUDA decode kernel of these parameters is built with."""
    logits_hooks = variant.overrides("logits_transform") or variant.overrides("logits_mask")
    return choose_decode_tiles(head_dim, kv_dtype, group_size, is_heavy(variant), logits_hooks).uri()


def default_schedule(key, arch: str, shape=None) -> str:
    """The schedule of ``key``'s CUDA decode kernel on ``arch`` (``shape`` is not used: decode has one
    query row per request). The same on sm_80 and sm_90a: the choice is about registers (128 per
    thread at 4 blocks of 128 threads) and bytes in flight, and both have 64K registers per SM."""
    return decode_schedule(key.head_dim, key.kv_dtype, key.group_size, key.variant)

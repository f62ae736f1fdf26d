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

import itertools
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
        """The tiles named by ``key.schedule``, whose heads per block divide the key's GQA group."""
        tiles = DecodeTiles.parse(key.schedule, key.head_dim, key.kv_dtype)
        check_group(key.schedule, tiles, key.group_size)
        return tiles

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


def check_group(schedule: str, tiles: DecodeTiles, group_size: int) -> None:
    """A block serves ``heads_per_block`` query heads of one GQA group: a ValueError naming the
    schedule unless they divide ``group_size``."""
    if group_size % tiles.heads_per_block:
        raise ValueError(f"schedule {schedule!r}: heads_per_block {tiles.heads_per_block} must divide the "
                         f"GQA group size {group_size}")


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


def has_logits_hooks(variant) -> bool:
    """Variants with a logits transform or mask, run per key and head in the key loop."""
    return variant.overrides("logits_transform") or variant.overrides("logits_mask")


def decode_schedule(head_dim: int, kv_dtype: str, group_size: int, variant) -> str:
    """The hand-written schedule of the CUDA decode kernel of these parameters."""
    return choose_decode_tiles(head_dim, kv_dtype, group_size, is_heavy(variant),
                               has_logits_hooks(variant)).uri()


def default_schedule(key, arch: str, shape=None) -> str:
    """The hand-written schedule of ``key``'s CUDA decode kernel on ``arch`` (``shape`` is not used:
    decode has one query row per request). The same on sm_80 and sm_90a: the choice is about
    registers (128 per thread at 4 blocks of 128 threads) and bytes in flight, and both have 64K
    registers per SM. A tuned table (:mod:`tvm_attn.schedule.tuned`) may replace it per GPU."""
    return decode_schedule(key.head_dim, key.kv_dtype, key.group_size, key.variant)


# -- workload classes: what a decode schedule may depend on ------------------------------------------

#: the variant classes of :func:`variant_class`, which the hand-written choice tells apart
VARIANT_CLASSES = ("plain", "logits", "heavy", "heavy_logits")

_CLASS = re.compile(r"d(\d+)-([a-z0-9]+)-g(\d+)-(" + "|".join(VARIANT_CLASSES) + ")")


def variant_class(variant) -> str:
    """``"plain"``, ``"logits"`` (:func:`has_logits_hooks`), ``"heavy"`` (:func:`is_heavy`) or
    ``"heavy_logits"`` (both): the part of a variant a decode schedule may depend on."""
    heavy, logits = is_heavy(variant), has_logits_hooks(variant)
    if heavy:
        return "heavy_logits" if logits else "heavy"
    return "logits" if logits else "plain"


def workload_class(key) -> str:
    """The workload class of a decode key, e.g. ``"d128-float16-g4-plain"``: head_dim, KV dtype, GQA
    group size and :func:`variant_class`, the inputs of the hand-written choice. Keys of one class
    take the same schedule; tuned tables (:mod:`tvm_attn.schedule.tuned`) are keyed by it."""
    return f"d{key.head_dim}-{key.kv_dtype}-g{key.group_size}-{variant_class(key.variant)}"


def parse_class(name: str) -> tuple[int, str, int, str]:
    """``"d128-float16-g4-plain"`` -> (128, "float16", 4, "plain"); a ValueError naming ``name`` if
    it is not a decode workload class."""
    m = _CLASS.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"class: {name!r} is not a decode workload class like 'd128-float16-g4-plain' "
                         f"(variant classes: {', '.join(VARIANT_CLASSES)})")
    head_dim, dtype, group = int(m.group(1)), m.group(2), int(m.group(3))
    if head_dim < 1 or group < 1:
        raise ValueError(f"class: {name!r}: head_dim and group size must be >= 1")
    to_numpy_dtype(dtype)  # raises for an unknown dtype
    return head_dim, dtype, group, m.group(4)


def check_class_schedule(schedule: str, cls: str) -> DecodeTiles:
    """The tiles of ``schedule`` for keys of workload class ``cls`` (a ValueError naming the schedule
    if it does not parse or its heads per block do not divide the class's group)."""
    head_dim, dtype, group, _ = parse_class(cls)
    tiles = DecodeTiles.parse(schedule, head_dim, dtype)
    check_group(schedule, tiles, group)
    return tiles


# -- the search space of `tvm-attn tune` -----------------------------------------------------------

#: the raw space :func:`candidate_schedules` walks, in this order (warps, unroll, blocks per SM,
#: pipeline: none, register prefetch, cp.async ring of 2-4 stages); heads per block follow from
#: the registers
SEARCH_WARPS, SEARCH_UNROLL, SEARCH_BLOCKS = (4, 8), (1, 2, 4, 8), (2, 3, 4)
SEARCH_PIPELINES = ("", "p", "s2", "s3", "s4")
#: resident warps per SM a candidate may have: fewer leave too few warps to hide one warp's compute
#: behind the others' loads; more leave fewer than 128 registers a thread, under q and o alone
SEARCH_WARPS_PER_SM = (12, 16)
#: K/V bytes in flight per SM a candidate may keep: the H100's streaming reads level off from 32 KB
#: and are fastest at 48 KB (bench/logs/decode-ceiling-ring-h100.json, "knee"); twice that covers
#: the H200's higher bandwidth, and more only costs registers or shared memory
SEARCH_FLIGHT_BYTES = (32 << 10, 96 << 10)
#: rows a cp.async ring copies per step at least: on the H100 the 1-row rings (w4u1g4b4s4, s6) were
#: slower than the 2-row ones at every workload (same log, "stages")
SEARCH_RING_ROWS = 2
#: registers a thread needs beyond q, o and its K/V rows (addresses, loop state, the softmax state),
#: from ptxas on sm_90a at the 128-register bound: w4u4g4b4 uses 127, w4u4g4b4p (8 rows) spills
#: 244 bytes, w8u1g4b3 (85 registers) spills
REGISTER_RESERVE = 24
#: static shared memory of one block (the kernel declares its buffers statically)
STATIC_SHARED_BYTES = 48 << 10
#: shared memory per SM by arch number (KB), less the 1 KB each resident block reserves
_SHARED_PER_SM_KB = {80: 164, 87: 164, 90: 228, 100: 228}


def registers_needed(tiles: DecodeTiles, kv_dtype: str) -> int:
    """Estimated registers a thread of ``tiles`` needs: q and o (float32, ``heads * vec`` each), the
    K and V rows it holds (twice as many with the register prefetch), and :data:`REGISTER_RESERVE`."""
    rows = tiles.unroll * (2 if tiles.prefetch else 1)
    kv_words = 2 * tiles.vec * to_numpy_dtype(kv_dtype).itemsize // 4  # a K and a V piece, 32-bit words
    return 2 * tiles.heads_per_block * tiles.vec + rows * kv_words + REGISTER_RESERVE


def register_bound(tiles: DecodeTiles) -> int:
    """Registers a thread may use: ``__launch_bounds__(threads, blocks_per_sm)`` over 64K per SM."""
    return min(255, 65536 // (tiles.threads * tiles.blocks_per_sm))


def flight_bytes(tiles: DecodeTiles, kv_dtype: str) -> int:
    """K/V bytes an SM keeps in flight: each thread's ``unroll`` rows of a step (``stages - 1`` steps
    of them with the cp.async ring), over its resident blocks."""
    steps = tiles.stages - 1 if tiles.stages else 1
    per_thread = 2 * tiles.vec * to_numpy_dtype(kv_dtype).itemsize * tiles.unroll * steps
    return tiles.blocks_per_sm * tiles.threads * per_thread


def shared_bytes(tiles: DecodeTiles, head_dim: int, kv_dtype: str, variant) -> int:
    """Shared memory of one block, as :mod:`tvm_attn.tir.decode_cuda` allocates it: the key groups'
    outputs and (max, sum), the merge flag, staged keys (a key transform), the cp.async ring and the
    variant's tables."""
    elem = to_numpy_dtype(kv_dtype).itemsize
    nkg, heads, u = tiles.key_groups, tiles.heads_per_block, tiles.unroll
    total = nkg * heads * head_dim * 4 + nkg * heads * 2 * 4 + 4
    if variant.overrides("key_transform"):
        total += nkg * u * head_dim * elem
    total += tiles.stages * nkg * u * 2 * head_dim * elem
    return total + sum(4 * t.size for t in variant.tables(head_dim))


def fits_sm(tiles: DecodeTiles, head_dim: int, kv_dtype: str, variant, arch: str) -> bool:
    """Whether ``blocks_per_sm`` blocks of ``tiles`` fit an SM of ``arch`` by shared memory (the
    persistent grid assumes they are all resident)."""
    smem = shared_bytes(tiles, head_dim, kv_dtype, variant)
    m = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
    per_sm = _SHARED_PER_SM_KB.get(int(m.group(1)) if m else 0, 100) << 10
    return smem <= STATIC_SHARED_BYTES and tiles.blocks_per_sm * (smem + 1024) <= per_sm


def candidate_schedules(head_dim: int, kv_dtype: str, group_size: int, variant, arch: str = "sm_90a"
                        ) -> list[str]:
    """The decode schedules ``tvm-attn tune`` builds and times for a workload class, in a fixed order.

    It walks :data:`SEARCH_WARPS` x :data:`SEARCH_UNROLL` x :data:`SEARCH_BLOCKS` x
    :data:`SEARCH_PIPELINES` (in that nesting) and keeps a schedule when:

    * its resident warps per SM lie in :data:`SEARCH_WARPS_PER_SM`;
    * a cp.async ring copies :data:`SEARCH_RING_ROWS` rows a step or more;
    * heads per block: the largest divisor of the group whose :func:`registers_needed` fits the
      :func:`register_bound` and whose blocks fit an SM of ``arch`` by shared memory
      (:func:`fits_sm`): fusion reads each K/V row once for all of a block's heads; none: out;
    * its :func:`flight_bytes` lie in :data:`SEARCH_FLIGHT_BYTES`.

    ptxas has the last word: the build drops candidates that spill. For the default classes of
    :mod:`tvm_attn.tuning` (head_dim 128, fp16, groups 1, 4 and 8) that leaves 19-20 a class."""
    vec = _vec(head_dim, kv_dtype)
    out = []
    for warps, unroll, blocks, pipeline in itertools.product(SEARCH_WARPS, SEARCH_UNROLL, SEARCH_BLOCKS,
                                                             SEARCH_PIPELINES):
        if not SEARCH_WARPS_PER_SM[0] <= warps * blocks <= SEARCH_WARPS_PER_SM[1]:
            continue
        stages = int(pipeline[1:]) if pipeline.startswith("s") else 0
        if stages and unroll < SEARCH_RING_ROWS:
            continue
        for heads in sorted((h for h in range(1, group_size + 1) if group_size % h == 0), reverse=True):
            tiles = DecodeTiles(vec, head_dim // vec, warps, unroll, heads, blocks, pipeline == "p", stages)
            if (registers_needed(tiles, kv_dtype) <= register_bound(tiles)
                    and fits_sm(tiles, head_dim, kv_dtype, variant, arch)):
                break
        else:
            continue
        lo, hi = SEARCH_FLIGHT_BYTES
        if lo <= flight_bytes(tiles, kv_dtype) <= hi:
            out.append(tiles.uri())
    return out

"""Tile choices of the Hopper (sm_90a) prefill kernel (:mod:`tvm_attn.tir.prefill_hopper`).

The kernel is FlashAttention-3's shape: one producer warpgroup that streams the query tile and the
K/V tiles into shared memory through TMA, and ``consumers`` warpgroups of 64 query rows each that
run ``wgmma`` on them. The choices:

* ``tile_q = 64 * consumers`` GQA-packed query rows per CTA (128 with two consumer warpgroups).
* ``kv_tile``: keys per pipeline stage, the N of ``S = Q K^T`` (``wgmma.m64n<kv_tile>k16``). Each
  consumer thread holds ``kv_tile / 2`` logits and ``head_dim / 2`` output floats, so head_dim 256
  takes 64-key stages and the others 128.
* ``overlap``: the consumer loop that keeps a GEMM in flight through the softmax (``o`` in the name).
* ``stages``: K/V tiles in the shared-memory ring (the producer runs that far ahead).
* ``gather`` (``g`` in the name): the producer's 128 threads copy K/V rows with ``cp.async``
  through the format's index, for what TMA boxes cannot address (pages under 8 keys or not a power
  of two, block-sparse columns: :func:`tma_reason`); the default there, never elsewhere.
* One CTA per SM (``blocks_per_sm`` 1): the consumers raise their register budget to 232 with
  ``setmaxnreg`` and the producer lowers its own to 40, which fills the register file. ptxas
  allocates each warpgroup's code within its budget; at 24 the producer's barrier and tensor-map
  addresses spilled (28 bytes, nvcc 13).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"wsq(\d+)k(\d+)s(\d+)(p?)(o?)(g?)")

#: TMA boxes and the 128-byte swizzle of wgmma's operands work on 64-element (128-byte) columns
CHUNK = 64


@dataclass(frozen=True)
class HopperTiles:
    consumers: int = 2
    kv_tile: int = 128
    stages: int = 2
    #: the two consumer warpgroups take turns at S = Q K^T (named barriers), so that one's softmax
    #: runs while the other's GEMM has the tensor cores (FA3's ping-pong)
    pingpong: bool = False
    #: each consumer issues the next tile's S = Q K^T before the softmax of this one, and this tile's
    #: O += P V after it, so that the tensor cores work through the softmax (FA3's intra-warpgroup
    #: overlap); O's rescale waits for the P V in flight
    overlap: bool = False
    #: the producer warpgroup's 128 threads gather K/V rows with cp.async through the format's index
    #: (any page size, block-sparse) instead of one thread issuing TMA boxes (pages of at least 8 keys)
    gather: bool = False

    def __post_init__(self):
        if self.consumers not in (1, 2):
            raise ValueError(f"hopper tiles: consumers must be 1 or 2, got {self.consumers}")
        if self.kv_tile % 16 or not 16 <= self.kv_tile <= 256:
            raise ValueError(f"hopper tiles: kv_tile must be a multiple of 16 in [16, 256], "
                             f"got {self.kv_tile}")
        if not 2 <= self.stages <= 4:
            raise ValueError(f"hopper tiles: stages must be 2, 3 or 4, got {self.stages}")
        if self.gather and self.kv_tile > 128:
            # one index entry per producer thread covers 128 rows; a second one spills the producer's
            # 40 registers (ptxas, nvcc 13, sm_90a: 4 bytes at 176 keys)
            raise ValueError(f"hopper tiles: the gather producer takes kv_tile up to 128, got {self.kv_tile}")
        if self.pingpong and self.consumers != 2:
            raise ValueError("hopper tiles: ping-pong takes two consumer warpgroups")

    @property
    def tile_q(self) -> int:
        return 64 * self.consumers

    @property
    def threads(self) -> int:
        return 128 * (1 + self.consumers)

    blocks_per_sm = 1

    @property
    def fold_heads(self) -> int:
        """1: the plan puts every KV head's items in the work list over a one-dimensional grid of
        ``num_sms`` CTAs (:func:`tvm_attn.planner.planned_heads`), since with one CTA per SM a grid
        of ``(num_sms // num_kv_heads, num_kv_heads)`` leaves the remainder of the SMs idle. 0 for the
        gather producer, which keeps that grid: folded, it ran 16-24% slower on pages of 1 and 16
        (H200, 4 x 4096 causal) while the TMA producer gained up to 11%."""
        return 0 if self.gather else 1

    def uri(self) -> str:
        return (f"wsq{self.tile_q}k{self.kv_tile}s{self.stages}{'p' if self.pingpong else ''}"
                f"{'o' if self.overlap else ''}{'g' if self.gather else ''}")

    @staticmethod
    def parse(schedule: str) -> HopperTiles:
        m = _NAME.fullmatch(schedule)
        if m is None:
            raise ValueError(f"schedule: {schedule!r} is not a Hopper prefill schedule like 'wsq128k128s2' "
                             "(p: ping-pong, o: overlap, g: gather producer)")
        tq, kv, s = (int(x) for x in m.groups()[:3])
        if tq % 64:
            raise ValueError(f"schedule {schedule!r}: the query tile must be 64 x consumer warpgroups")
        return HopperTiles(consumers=tq // 64, kv_tile=kv, stages=s, pingpong=m.group(4) == "p",
                           overlap=m.group(5) == "o", gather=m.group(6) == "g")

    @staticmethod
    def of(key) -> HopperTiles:
        return HopperTiles.parse(key.schedule)

    @staticmethod
    def launch_bounds(schedule: str) -> tuple[int, int] | None:
        if _NAME.fullmatch(schedule) is None:
            return None
        return HopperTiles.parse(schedule).threads, 1

    def smem_bytes(self, head_dim: int) -> int:
        return 2 * head_dim * (self.tile_q + 2 * self.stages * self.kv_tile)


#: shared memory a CTA may use on sm_90 (227 KiB), less what the barriers take
SMEM_LIMIT = 227 * 1024 - 1024


def unsupported(key) -> str | None:
    """Why the Hopper kernel cannot build ``key`` (None: it can); the FA2-class family takes it then."""
    from ..registry import arch_of

    if arch_of(key.target) != "sm_90a":
        return f"wgmma and TMA need sm_90a, not {arch_of(key.target)}"
    if key.q_dtype != key.kv_dtype or key.kv_dtype not in ("float16", "bfloat16"):
        return f"q and kv must both be float16 or both bfloat16, got {key.q_dtype} / {key.kv_dtype}"
    if key.head_dim not in (64, 128, 256):
        return f"head_dim must be 64, 128 or 256, got {key.head_dim}"
    g = key.group_size
    if g & (g - 1) or g > 64:
        # the query tile's TMA box is (64 columns, g heads, tile_q / g tokens)
        return f"the GQA group size must be a power of two up to 64, got {g}"
    tma = tma_reason(key.kv)
    if tma is not None and key.schedule != "default" and not HopperTiles.of(key).gather:
        return (f"{tma}: schedule {key.schedule} loads K/V through TMA; the gather producer (suffix g) "
                "reads them")
    for hook in ("query_transform", "key_transform"):
        if key.variant.overrides(hook):
            # Q and K reach shared memory through TMA only; the FA2-class kernel applies these
            return f"variants with a {hook} are not implemented here ({key.variant.name})"
    return None


def tma_reason(kv) -> str | None:
    """Why TMA boxes cannot load K/V of format ``kv`` (the gather producer then does), or None."""
    from ..kv.formats import BlockSparseKV

    if isinstance(kv, BlockSparseKV):
        return f"block-sparse KV ({kv.R} x {kv.C} blocks) is a gather of block columns"
    page = getattr(kv, "page_size", None)
    if page is not None and (page < 8 or page & (page - 1)):
        # a page is a TMA box of the 128-byte swizzled tile: whole 8-row swizzle atoms
        return f"pages of {page} keys are not a power of two of at least 8"
    return None


def choose_hopper_tiles(head_dim: int, variant=None, kv=None) -> HopperTiles:
    """128-key stages; 64 at head_dim 256 (128 output floats per consumer thread) and for logits
    hooks that read a tensor (ALiBi's slopes, a custom mask:
    :func:`tvm_attn.schedule.prefill.logits_weight` 2), whose index math spills at 128 keys (ptxas,
    nvcc 13, sm_90a: 212 bytes for ALiBi)."""
    from .prefill import logits_weight

    narrow = head_dim == 256 or logits_weight(variant) >= 2
    return HopperTiles(consumers=2, kv_tile=64 if narrow else 128, stages=2, overlap=True,
                       gather=kv is not None and tma_reason(kv) is not None)


#: at most this many GQA-packed query rows per request, the 128-row tile is mostly empty and the
#: FA2-class kernel's 16- and 64-row tiles are preferred
MIN_PACKED_ROWS = 64


def prefers(key, arch: str | None, shape: int | None = None) -> bool:
    """The Hopper kernel is the better choice for requests of ``shape`` GQA-packed query rows
    (None: long queries)."""
    return shape is None or shape > MIN_PACKED_ROWS


def default_schedule(key, arch: str, shape: int | None = None) -> str:
    return choose_hopper_tiles(key.head_dim, key.variant, key.kv).uri()

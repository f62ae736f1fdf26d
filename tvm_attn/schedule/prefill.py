"""Tile choices of the CUDA tensor-core prefill kernel (:mod:`tvm_attn.tir.prefill_cuda`).

Prefill does ``4 * qo * kv * head_dim`` flops over ``2 * kv * head_dim`` K/V elements per query
tile, so it is compute-bound and the choices are about keeping the tensor cores fed (FA2's recipe):

* ``m_tiles``: each warp owns ``16 * m_tiles`` query rows. Every K/V fragment read from shared
  memory by ``ldmatrix`` feeds ``m_tiles`` mma instructions, so ``m_tiles = 2`` halves the shared
  memory traffic per flop; ``m_tiles = 1`` at head_dim 256, where the output accumulator alone is
  ``16 * 256 / 32 = 128`` floats per thread and tile.
* ``kv_tile``: keys per pipeline stage. Logits take ``m_tiles * kv_tile / 8 * 4`` floats per thread,
  the output ``m_tiles * head_dim / 8 * 4``; both stay in registers.
* ``warps``: 4, so the query tile is ``64 * m_tiles`` rows (FlashInfer's CTA_TILE_Q of 64/128);
  with one warp the tile is 16 rows, for short queries (append of a few tokens, decode-like).
* ``stages``: K/V tiles in flight through ``cp.async`` (2: load tile i+1 while computing tile i).
* ``blocks_per_sm``: resident CTAs per SM, which sizes the persistent grid and the register cap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"fa2q(\d+)k(\d+)w(\d+)s(\d+)b(\d+)")


@dataclass(frozen=True)
class PrefillTiles:
    m_tiles: int
    kv_tile: int
    warps: int = 4
    stages: int = 2
    blocks_per_sm: int = 2

    def __post_init__(self):
        if self.m_tiles not in (1, 2) or self.warps not in (1, 2, 4, 8):
            raise ValueError(f"prefill tiles: m_tiles must be 1 or 2 and warps 1, 2, 4 or 8, got {self}")
        if self.kv_tile % 16 or not 16 <= self.kv_tile <= 128:
            raise ValueError(f"prefill tiles: kv_tile must be a multiple of 16 in [16, 128], "
                             f"got {self.kv_tile}")
        if self.stages != 2:
            raise ValueError(f"prefill tiles: only 2 pipeline stages are implemented, got {self.stages}")

    #: the grid's y dimension is the KV head (the plan's work list holds one head's items)
    fold_heads = 0

    @property
    def tile_q(self) -> int:
        """Query rows (GQA-packed rows: token x head of the group) per CTA tile."""
        return 16 * self.m_tiles * self.warps

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def uri(self) -> str:
        return f"fa2q{self.tile_q}k{self.kv_tile}w{self.warps}s{self.stages}b{self.blocks_per_sm}"

    @staticmethod
    def parse(schedule: str) -> "PrefillTiles":
        m = _NAME.fullmatch(schedule)
        if m is None:
            raise ValueError(f"schedule: {schedule!r} is not a prefill schedule like 'fa2q128k64w4s2b2'")
        tq, kv, w, s, b = (int(x) for x in m.groups())
        if tq % (16 * w):
            raise ValueError(f"schedule {schedule!r}: the query tile must be 16 x warps x m_tiles")
        return PrefillTiles(m_tiles=tq // (16 * w), kv_tile=kv, warps=w, stages=s, blocks_per_sm=b)

    @staticmethod
    def of(key) -> PrefillTiles:
        """The tiles named by ``key.schedule``."""
        return PrefillTiles.parse(key.schedule)

    @staticmethod
    def launch_bounds(schedule: str) -> tuple[int, int] | None:
        """(threads, minimum resident blocks per SM) of a kernel of this schedule; None if
        ``schedule`` is not a prefill schedule name."""
        if _NAME.fullmatch(schedule) is None:
            return None
        tiles = PrefillTiles.parse(schedule)
        return tiles.threads, tiles.blocks_per_sm

    def smem_bytes(self, head_dim: int, stage_keys: bool) -> int:
        row = (head_dim + 8) * 2  # rows padded by 16 bytes: ldmatrix reads 8 rows without bank conflicts
        kv_tiles = 2 * self.stages + (1 if stage_keys else 0)
        return row * (self.tile_q + kv_tiles * self.kv_tile)


def unsupported(key) -> str | None:
    """Why the tensor-core kernel cannot build ``key`` (None: it can)."""
    if key.q_dtype != key.kv_dtype or key.kv_dtype not in ("float16", "bfloat16"):
        return (f"CUDA prefill: q and kv must both be float16 or both bfloat16 (tensor cores), got "
                f"{key.q_dtype} / {key.kv_dtype}")
    if key.head_dim not in (64, 128, 256):
        return f"CUDA prefill: head_dim must be 64, 128 or 256, got {key.head_dim}"
    return None


def check_key(key) -> None:
    """What the tensor-core kernel supports (checked in plan, before any kernel is looked up)."""
    reason = unsupported(key)
    if reason is not None:
        raise ValueError(reason)


def logits_weight(variant) -> int:
    """What a variant's logits hooks add to the registers of the tensor-core loop, where every
    thread holds ``m_tiles * kv_tile / 2`` logits: 0 for none, an index-only mask (causal) or weights
    without softmax (sigmoid); 1 for a logits transform under softmax (soft-cap) or a mask that reads
    a run-time scalar (RuntimeCausal's ``is_causal``, SlidingWindow's ``window_left``: the scalar and
    the bounds it selects stay live across the tile loop); 2 for logits hooks that read a tensor
    (ALiBi's slopes, a custom mask)."""
    if variant is None:
        return 0
    logits = variant.overrides("logits_transform") or variant.overrides("logits_mask")
    if logits and variant.reads_tensors():
        return 2
    transform = variant.overrides("logits_transform") and variant.use_softmax
    return int(transform or _mask_reads_scalars(variant))


def _mask_reads_scalars(variant) -> bool:
    """Whether a part of ``variant`` with a logits mask takes run-time scalars."""
    from ..variants.base import ScalarParam

    return any(part.overrides("logits_mask") and any(isinstance(p, ScalarParam) for p in part.extra_params())
               for part in getattr(variant, "parts", (variant,)))


#: head_dim 128, the 128-row tile: keys per stage by :func:`logits_weight`. ptxas (nvcc 13.0,
#: sm_90a) spills 48 bytes for soft-cap, 184 for ALiBi and 16 for a custom mask with 64-key stages
#: (255 registers), none with 32-key stages for soft-cap and none with 16-key stages for the others;
#: RuntimeCausal spills 48 bytes with 64-key stages, none with 32 (251 registers); causal +
#: SlidingWindow, at 254 registers with 64-key stages, is on that edge.
#: Measured on the H100 (4 x 4096 tokens, causal, 32/8 heads): soft-cap 32 keys 1870 us against
#: 1890 spilling; ALiBi 16 keys 2420 us against 2272 spilling (8 warps x 16 rows over 32 keys, also
#: spill-free: 2382); a custom mask 16 keys 4953 us against 4600 spilling
_KV_TILE_D128 = {0: 64, 1: 32, 2: 16}


def choose_prefill_tiles(head_dim: int, packed_rows: int | None = None, variant=None) -> PrefillTiles:
    """The tiles for a head_dim, the typical number of GQA-packed query rows per request
    (``qo_len * group_size``) and the variant: a 128-row tile for long queries, 64 below 128 rows,
    and a one-warp 16-row tile when requests have at most 16 packed rows (append of a token or a
    few). Variants whose logits hooks take registers get shorter key stages (:data:`_KV_TILE_D128`).

    Measured on the H100 (a sweep of this module's schedules, kernel time against
    torch flash SDPA in one run): at head_dim 128, 4 warps x 32 rows with 64-key tiles beat 8 warps
    x 16 rows by 10-20% (each K/V fragment feeds two m-tiles, half the ldmatrix traffic per mma),
    and 64-row tiles lose 30%; at head_dim 256, 8 warps x 16 rows over a 128-row tile beat the
    64-row tile by 25% (the output accumulator of 32 rows would not fit in registers). Its 32-key
    stages keep the CTA at 135 KiB of shared memory, under sm_80's 163 KiB (64-key stages, 202 KiB,
    were 6% faster on the H100 only)."""
    if packed_rows is not None and packed_rows <= 16:
        return PrefillTiles(m_tiles=1, kv_tile=64 if head_dim <= 128 else 32, warps=1, blocks_per_sm=8)
    if packed_rows is not None and packed_rows <= 64:
        return PrefillTiles(m_tiles=1, kv_tile=64 if head_dim <= 128 else 32, warps=4, blocks_per_sm=2)
    if head_dim >= 256:
        return PrefillTiles(m_tiles=1, kv_tile=32, warps=8, blocks_per_sm=1)
    kv_tile = _KV_TILE_D128[logits_weight(variant)] if head_dim == 128 else 64
    return PrefillTiles(m_tiles=2, kv_tile=kv_tile, warps=4, blocks_per_sm=2)


def prefill_schedule(head_dim: int, packed_rows: int | None = None, variant=None) -> str:
    return choose_prefill_tiles(head_dim, packed_rows, variant).uri()


def default_schedule(key, arch: str, shape: int | None = None) -> str:
    """The schedule of ``key``'s tensor-core kernel on ``arch``; ``shape``: the typical number of
    GQA-packed query rows per request (None: long queries). The same on sm_80 and sm_90a: every
    choice fits sm_80's 163 KiB of shared memory per block (see :func:`choose_prefill_tiles`)."""
    return prefill_schedule(key.head_dim, shape, key.variant)

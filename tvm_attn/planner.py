"""The decode planner's host side: workspace sizes, and the call of the planner kernel.

The split-KV plan itself is computed by a host TIR function compiled into the kernel's own module
(:mod:`tvm_attn.tir.plan`), so Python and C++ callers run the same code. This module sizes the
workspace once per wrapper (``decode_workspace_size`` tells the bytes), runs the planner on host
tensors, and turns a failed plan into a ValueError that says which capacity was too small.

Workspace (all sized by ``max_batch_size``, never by a step's lengths, so the buffers and the grid
stay put for CUDA graphs):

* ``work_info`` int32 ``[4, max_works]``, ``cta_indptr`` int32 ``[num_ctas + 1]`` and ``merge_indptr``
  int32 ``[max_batch_size + 1]``;
* ``tmp_o`` float32 ``[max_partials, num_qo_heads, head_dim]`` and ``tmp_lse`` float32
  ``[max_partials, num_qo_heads]``, the partial states of split requests.

The grid is ``num_ctas = num_sms * blocks_per_sm / (num_kv_heads * head_splits)`` persistent CTAs;
``max_works = max_batch_size + num_ctas`` (each CTA boundary cuts at most one request) and
``max_partials = max_works``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

from .schedule.decode import DecodeTiles

#: name of the planner function inside every CUDA decode module (see tvm_attn.tir.plan)
PLAN_DECODE = "tvm_attn_plan_decode"
#: the planner's failure codes -> the capacity that was too small
STATUS = {1: "max_works", 2: "max_partials", 3: "max_batch_size"}

#: cost of a work beyond its keys (loading q, merging key groups, storing), in keys: ~ one unrolled step
WORK_OVERHEAD = 32
#: whole requests are packed (no cuts) when every CTA stays within quota * (1 + 1/PACK_SLACK_DIV)
PACK_SLACK_DIV = 10
#: the shortest piece cut to fill a CTA's last room (a CTA then exceeds its quota by at most this)
MIN_PIECE = 16


@dataclass(frozen=True)
class DecodeWorkspace:
    max_batch_size: int
    num_ctas: int
    max_works: int
    max_partials: int
    num_qo_heads: int
    head_dim: int

    @property
    def int_bytes(self) -> int:
        return 4 * (4 * self.max_works + self.num_ctas + 1 + self.max_batch_size + 1)

    @property
    def float_bytes(self) -> int:
        return 4 * self.max_partials * self.num_qo_heads * (self.head_dim + 1)


def decode_workspace(max_batch_size: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                     tiles: DecodeTiles, num_sms: int) -> DecodeWorkspace:
    """Grid and buffer sizes. Every CTA boundary cuts at most one request, so a plan has at most
    ``batch + num_ctas`` works and as many partial rows."""
    head_splits = (num_qo_heads // num_kv_heads) // tiles.heads_per_block
    num_ctas = max(1, num_sms * tiles.blocks_per_sm // (num_kv_heads * head_splits))
    max_works = max_batch_size + num_ctas
    return DecodeWorkspace(max_batch_size, num_ctas, max_works, max_works, num_qo_heads, head_dim)


def decode_workspace_size(max_batch_size: int, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                          kv_dtype: str = "float16", num_sms: int = 132) -> int:
    """Bytes of device workspace a CUDA decode wrapper needs (int + float parts)."""
    from .schedule.decode import choose_decode_tiles

    tiles = choose_decode_tiles(head_dim, kv_dtype, num_qo_heads // num_kv_heads)  # plain variants
    ws = decode_workspace(max_batch_size, num_qo_heads, num_kv_heads, head_dim, tiles, num_sms)
    return ws.int_bytes + ws.float_bytes


class DecodePlanBuffers:
    """Host and device buffers of one wrapper's plan, allocated once."""

    def __init__(self, ws: DecodeWorkspace, device):
        cpu = tvm.cpu()
        self.ws = ws
        self.host_work = tvm.runtime.empty((4, ws.max_works), "int32", cpu)
        self.host_cta = tvm.runtime.empty((ws.num_ctas + 1,), "int32", cpu)
        self.host_merge = tvm.runtime.empty((ws.max_batch_size + 1,), "int32", cpu)
        self.host_stats = tvm.runtime.empty((4,), "int32", cpu)
        self.work_info = tvm.runtime.empty((4, ws.max_works), "int32", device)
        self.cta_indptr = tvm.runtime.empty((ws.num_ctas + 1,), "int32", device)
        self.merge_indptr = tvm.runtime.empty((ws.max_batch_size + 1,), "int32", device)
        self.tmp_o = tvm.runtime.empty((ws.max_partials, ws.num_qo_heads, ws.head_dim), "float32", device)
        self.tmp_lse = tvm.runtime.empty((ws.max_partials, ws.num_qo_heads), "float32", device)

    def plan(self, planner, kv_indptr: np.ndarray, last_page_len: np.ndarray, page_size: int, allow_split: bool):
        """Run the planner on host arrays and upload the result; returns (num_works, num_partials, quota)."""
        cpu = tvm.cpu()
        planner(
            tvm.runtime.tensor(kv_indptr, cpu), tvm.runtime.tensor(last_page_len, cpu), self.host_work,
            self.host_cta, self.host_merge, self.host_stats, self.ws.max_partials, page_size, int(allow_split),
        )
        num_works, num_partials, quota, status = (int(x) for x in self.host_stats.numpy())
        if status:
            what = STATUS[status]
            raise ValueError(
                f"plan: the workspace is too small ({what}): the batch has {len(kv_indptr) - 1} requests and "
                f"needs {num_works} works / {num_partials} partial rows, but the wrapper was sized for "
                f"max_batch_size={self.ws.max_batch_size}, max_works={self.ws.max_works}, "
                f"max_partials={self.ws.max_partials}; create the wrapper with a larger max_batch_size"
            )
        self.work_info.copyfrom(self.host_work)
        self.cta_indptr.copyfrom(self.host_cta)
        self.merge_indptr.copyfrom(self.host_merge)
        return num_works, num_partials, quota


GLOBAL_NAME = "tvm_attn.plan_decode"


def register_global_planner(cache=None):
    """Register the planner as the global packed function ``tvm_attn.plan_decode`` (same arguments as
    :func:`tvm_attn.tir.plan.make_decode_planner`); returns it. C++ callers of an exported kernel
    module can equally call its ``tvm_attn_plan_decode`` function."""
    import tvm_ffi

    from .cache import get_cache
    from .config import PlannerKey

    key = PlannerKey()
    fn = (cache or get_cache()).get(key)
    tvm_ffi.register_global_func(GLOBAL_NAME, fn, override=True)
    return fn


__all__ = ["register_global_planner", "GLOBAL_NAME", "DecodeWorkspace", "decode_workspace", "decode_workspace_size", "DecodePlanBuffers", "PLAN_DECODE"]

"""The Hopper prefill kernels (tvm_attn.tir.prefill_hopper) as generated, without a GPU: every kernel
the GPU tier runs with backend="fa3" is generated and its CUDA source checked for the recipe (TMA
loads through tensor-map parameters, or the gather producer's cp.async copies with their barrier
arrivals, wgmma from shared memory for Q K^T and from registers for P V,
register reallocation, no block barrier after the warpgroups split); where nvcc is installed, ptxas
compiles each for sm_90a with no spills and no serialized wgmma. The kernels run in tests/gpu."""

import re

import pytest

from gpu.prefill_cases import (
    BASE, BSR, HOPPER_CASES, HOPPER_EDGES, HOPPER_SCHEDULES, bsr_key, case_id, key_of,
)
from tvm_attn.build import compile_key, cuda_source
from tvm_attn.kv.formats import PagedKV
from tvm_attn.cuda_runtime import find_nvcc, nvcc_compile
from tvm_attn.schedule.hopper import HopperTiles
from tvm_attn.tir.prefill_hopper import CONSUMER_REGS, PRODUCER_REGS

from test_cuda_codegen import _kernel_body


_KERNELS = ([(case_id(c), key_of(c, HOPPER_EDGES, "cuda:sm_90a", "fa3")) for c in HOPPER_CASES]
            + [(f"{case_id(BASE)}-{s}", key_of(BASE, HOPPER_EDGES, "cuda:sm_90a", "fa3", s))
               for s in HOPPER_SCHEDULES]
            + [(f"bsr{b[2]}x{b[3]}", bsr_key(*b)) for b in BSR])
_KERNELS = [(name, key) for name, key in _KERNELS if key.schedule.startswith("wsq")]


@pytest.mark.parametrize("key", [k for _, k in _KERNELS], ids=[name for name, _ in _KERNELS])
def test_hopper_kernel_source_and_ptxas(key):
    """Every Hopper kernel of the GPU tier: its variant cases, the schedules timed side by side, and
    the block-sparse ones."""
    tiles = HopperTiles.of(key)
    src = cuda_source(compile_key(key))
    body = _kernel_body(src, key.uri)
    head = body[: body.index("{")]
    chunks = key.head_dim // 64
    paged = isinstance(key.kv, PagedKV)
    # the KV head: with TMA each work's (a one-dimensional grid, a CTA per SM), with the gather
    # producer the grid's y index
    assert ("blockIdx.y" in body) == (not tiles.fold_heads), "the grid's y dimension"
    if tiles.gather:
        # Q through TMA; per tile and part, a copy per 16-row pass and chunk, then one arrival on
        # the stage's barrier when they have landed
        assert head.count("__grid_constant__ CUtensorMap") == 1, "q's tensor map"
        assert len(re.findall(r"cp_async_bulk_tensor\w*3d\w*\(", body)) == chunks
        assert len(re.findall(r"cp_async_cg\w*\(", body)) == 2 * tiles.kv_tile // 16 * chunks
        assert len(re.findall(r"cp_async_mbarrier_arrive\w*\(", body)) == 2
    elif paged:
        # one map of the cache; per tile, K and V boxes of a page (or the tile) per 64-column chunk
        boxes = tiles.kv_tile // min(key.kv.page_size, tiles.kv_tile)
        assert head.count("__grid_constant__ CUtensorMap") == 2, "q and kv tensor maps"
        assert len(re.findall(r"cp_async_bulk_tensor\w*4d\w*\(", body)) == 2 * chunks * boxes
    else:
        assert head.count("__grid_constant__ CUtensorMap") == 3, "q, k and v tensor maps"
    if not tiles.gather:
        assert len(re.findall(r"cp_async_bulk_tensor\w*3d\w*\(", body)) == chunks * (1 if paged else 3)
    ss = len(re.findall(r"wgmma_\w+_ss_mma_async\w*\(", body))
    rs = len(re.findall(r"wgmma_\w+_rs_mma_async\w*\(", body))
    issues = 2 if tiles.overlap else 1  # the overlapped loop peels the first S and the last P V
    assert (ss, rs) == (issues * key.head_dim // 16, issues * tiles.kv_tile // 16), (ss, rs)
    assert f"setmaxnreg_dec_sync_aligned_u32_{PRODUCER_REGS}()" in body
    assert f"setmaxnreg_inc_sync_aligned_u32_{CONSUMER_REGS}()" in body
    # one block barrier, after the barriers' init and before the producer / consumer split
    assert body.count("__syncthreads()") == 1
    assert body.index("__syncthreads()") < body.index("setmaxnreg")
    if find_nvcc() is None:
        pytest.skip("nvcc is not installed: the source was checked, ptxas was not run")
    _, log = nvcc_compile(src, "sm_90a")
    report = re.search(rf"Function properties for {key.uri}_kernel\n\s*(.*)\n.*Used (\d+) registers", log)
    assert report, log
    assert "0 bytes spill stores, 0 bytes spill loads" in report.group(1), report.group(0)
    assert "serialized" not in log, [line for line in log.splitlines() if "serialized" in line]

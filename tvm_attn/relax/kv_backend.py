"""tvm_attn's CUDA kernels in TVM's runtime paged KV cache, through its ``("flashinfer", run, plan)`` slots.

TVM's cache calls a ``"flashinfer"`` slot's ``plan`` once per forward with host copies of the index
arrays and its ``run`` once per layer (``attn_backend.h``). That is tvm_attn's plan/run split, so the
CUDA slots run the same kernels and the same planner as the wrappers:

* the kernels (:mod:`tvm_attn.tir.prefill_cuda` for ragged and paged prefill at each query tile
  the schedule may pick, with their merge kernels, and :mod:`tvm_attn.tir.decode_cuda` for decode,
  which merges the requests it cuts itself) and the planner (:mod:`tvm_attn.tir.plan`) are added
  to the model's IRModule and compiled with it;
* ``kv_backend.cc`` (C++, linked into the model's library) holds the six plan/run functions the
  cache calls: ``plan`` picks the kernel and tile, runs the planner into the cache's page-locked int
  workspace and copies the work lists to the device; ``run`` calls the kernels on the cache's
  tensors. It is compiled here with a generated header naming the kernels and the schedule's
  constants, so the choices stay in :mod:`tvm_attn.schedule` and :mod:`tvm_attn.planner`.

With the GQA group at 4 or more the cache sends decode steps to the paged-prefill slot; its plan
sees one query token per request and runs the decode kernel.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from ..config import AttentionKey
from ..kv.formats import PagedKV, RaggedKV
from ..variants import compose
from ..variants.masks import RuntimeCausal

SOURCE = Path(__file__).with_name("kv_backend.cc")
PLAN_PAGED, PLAN_RAGGED, PLAN_DECODE = "tvm_attn_kv_plan_paged", "tvm_attn_kv_plan_ragged", "tvm_attn_kv_plan_decode"
RUN_PAGED, RUN_RAGGED, RUN_DECODE = "tvm_attn_kv_run_paged", "tvm_attn_kv_run_ragged", "tvm_attn_kv_run_decode"
SYMBOLS = (PLAN_PAGED, PLAN_RAGGED, PLAN_DECODE, RUN_PAGED, RUN_RAGGED, RUN_DECODE)
_DLPACK_DTYPE = {"float16": "{kDLFloat, 16, 1}", "bfloat16": "{kDLBfloat, 16, 1}"}


def prefill_tile_table(head_dim: int, variant=None, max_rows: int = 1 << 12) -> list[tuple[int, object]]:
    """``(max mean packed rows, tiles)`` in increasing order: :func:`choose_prefill_tiles` as a table
    (the C++ plan looks the tile up here; the last entry covers every larger mean)."""
    from ..schedule.prefill import choose_prefill_tiles

    table = []
    for rows in range(1, max_rows + 1):
        tiles = choose_prefill_tiles(head_dim, rows, variant)
        if table and table[-1][1] == tiles:
            table[-1] = (rows, tiles)
        else:
            table.append((rows, tiles))
    table[-1] = ((1 << 31) - 1, table[-1][1])
    return table


class CudaKVBackend:
    """The kernels, planner and plan/run functions of one cache configuration on a CUDA target.

    ``variant``: the user's variant (composed after the run-time causal mask in the prefill slots);
    its run-time scalars are bound to their defaults, as in the ``tirx`` slots
    (:func:`tvm_attn.tir.abi.kv_cache_kernel`).
    """

    def __init__(self, config, variant=None):
        from ..schedule.decode import DecodeTiles, decode_schedule
        from ..schedule.prefill import check_key
        from ..tir.abi import fixed_scalars

        c = self.config = config
        user = compose(variant)
        self.fixed = fixed_scalars(user)
        hq, hkv, d, dt = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.dtype
        if dt not in _DLPACK_DTYPE:
            raise ValueError(f"dtype: tvm_attn's CUDA KV-cache kernels take float16 or bfloat16, got {dt!r}")
        prefill_variant = compose(RuntimeCausal(), user)
        self.tiles = prefill_tile_table(d, prefill_variant)
        self.prefill_keys = []
        for _, tiles in self.tiles:
            pair = tuple(AttentionKey("prefill", kv, hq, hkv, d, dt, dt, prefill_variant, c.target, tiles.uri())
                         for kv in (PagedKV(c.page_size, "HND"), RaggedKV("NHD")))
            check_key(pair[0])
            self.prefill_keys.append(pair)
        group = hq // hkv
        self.decode_key = AttentionKey("decode", PagedKV(c.page_size, "HND"), hq, hkv, d, dt, dt, user, c.target,
                                       decode_schedule(d, dt, group, user))
        self.decode_tiles = DecodeTiles.parse(self.decode_key.schedule, d, dt)

    # -- the TIR side ---------------------------------------------------------------------------------
    def functions(self) -> dict:
        """name -> PrimFunc: every kernel, merge kernel and the planner, with the variant's scalars bound."""
        from ..build import generate
        from ..planner import PLAN_DECODE as DECODE_PLAN  # (not this module's PLAN_DECODE slot)
        from ..tir.abi import bind_scalars

        out = {}
        keys = [k for pair in self.prefill_keys for k in pair] + [self.decode_key]
        for key in keys:
            for gv, func in generate(key).functions.items():
                if gv.name_hint != DECODE_PLAN:  # the cache stages its page tables itself
                    out[gv.name_hint] = bind_scalars(func, self.fixed)
        return out

    # -- the C++ side ---------------------------------------------------------------------------------
    def header(self) -> str:
        """The generated header ``kv_backend.cc`` includes: the kernels' symbols and the constants."""
        from ..planner import PACK_SLACK_DIV, PLAN, PREFILL_PACK_SLACK_DIV, WORK_OVERHEAD, prefill_work_overhead

        c, dt = self.config, self.decode_tiles
        sym = lambda name: f"__tvm_ffi_{name}"  # noqa: E731  (the exported symbol of a host function)
        names = [PLAN, self.decode_key.uri]
        rows = []
        for (max_rows, tiles), (paged, ragged) in zip(self.tiles, self.prefill_keys):
            names += [paged.uri, paged.uri + "_merge", ragged.uri, ragged.uri + "_merge"]
            rows.append(f"    {{{max_rows}, {tiles.tile_q}, {tiles.blocks_per_sm}, {prefill_work_overhead(tiles.tile_q)}, "
                        f"{sym(paged.uri)}, {sym(paged.uri + '_merge')}, {sym(ragged.uri)}, "
                        f"{sym(ragged.uri + '_merge')}}},")
        group = c.num_attention_heads // c.num_key_value_heads
        head_splits = group // dt.heads_per_block
        lines = ["// generated by tvm_attn.relax.kv_backend: the kernels of one KV-cache configuration", "#pragma once",
                 'extern "C" {']
        lines += [f"int {sym(n)}(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);" for n in names]
        lines += ["}", "namespace tvm_attn_kv {",
                  f"constexpr int64_t kNumQoHeads = {c.num_attention_heads}, kNumKvHeads = {c.num_key_value_heads};",
                  f"constexpr int64_t kHeadDim = {c.head_dim}, kPageSize = {c.page_size};",
                  f"constexpr DLDataType kDType = {_DLPACK_DTYPE[c.dtype]};",
                  f"constexpr int64_t kPrefillPackSlackDiv = {PREFILL_PACK_SLACK_DIV};",
                  "constexpr PrefillTile kPrefillTiles[] = {", *rows, "};",
                  f"constexpr DecodeKernel kDecode = {{{dt.blocks_per_sm}, {c.num_key_value_heads * head_splits}, "
                  f"{WORK_OVERHEAD}, {PACK_SLACK_DIV}, {sym(self.decode_key.uri)}}};",
                  f"constexpr TVMFFISafeCallType kPlanner = {sym(PLAN)};",
                  "}  // namespace tvm_attn_kv", ""]
        return "\n".join(lines)

    def compile_object(self, directory) -> Path:
        """Compile ``kv_backend.cc`` with this configuration's header into ``directory/kv_backend.o``."""
        import tvm
        import tvm_ffi

        directory = Path(directory)
        (directory / "kv_backend_config.h").write_text(self.header())
        obj = directory / "kv_backend.o"
        cmd = [os.environ.get("CXX", "g++"), "-c", "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden",
               f"-I{tvm.libinfo.find_include_path()}", f"-I{tvm_ffi.libinfo.find_include_path()}",
               f"-I{tvm_ffi.libinfo.find_dlpack_include_path()}", f"-I{directory}",
               '-DTVM_ATTN_KV_CONFIG="kv_backend_config.h"', str(SOURCE), "-o", str(obj)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        return obj

    def static_library(self):
        """The compiled plan/run functions as a runtime static library (linked into the model's .so)."""
        from tvm.runtime import load_static_library

        with tempfile.TemporaryDirectory(prefix="tvm_attn_kv_") as d:
            return load_static_library(str(self.compile_object(d)), func_names=list(SYMBOLS))

    def slots(self):
        """The ragged-prefill, paged-prefill and decode slot tuples of ``paged_attention_kv_cache_create``."""
        import tvm
        from tvm import relax as rx

        def slot(run, plan):
            return rx.Tuple([tvm.ir.StringImm("flashinfer"), rx.ExternFunc(run), rx.ExternFunc(plan)])

        return slot(RUN_RAGGED, PLAN_RAGGED), slot(RUN_PAGED, PLAN_PAGED), slot(RUN_DECODE, PLAN_DECODE)

"""tvm_attn's CUDA kernels in TVM's runtime paged KV cache, through its ``("flashinfer", run, plan)`` slots.

TVM's cache calls a ``"flashinfer"`` slot's ``plan`` once per forward with host copies of the index
arrays and its ``run`` once per layer (``attn_backend.h``). That is tvm_attn's plan/run split, so the
CUDA slots run the same kernels and the same planner as the wrappers:

* the kernels (:mod:`tvm_attn.tir.prefill_cuda` for ragged and paged prefill at each query tile
  the schedule may pick, and on sm_90a :mod:`tvm_attn.tir.prefill_hopper` for steps of long queries
  where the registry prefers it, with their merge kernels, and :mod:`tvm_attn.tir.decode_cuda` for decode,
  which merges the requests it cuts itself) and the planner (:mod:`tvm_attn.tir.plan`) are added
  to the model's IRModule and compiled with it;
* ``kv_backend.cc`` (C++, linked into the model's library) holds the six plan/run functions the
  cache calls: ``plan`` picks the kernel and tile, runs the planner into the cache's page-locked int
  workspace and copies the work lists to the device; ``run`` calls the kernels on the cache's
  tensors. It is compiled here with a generated header naming the kernels and holding the
  schedule's tile table and the planner's interface (work-record and stats fields, status codes,
  the scalars in signature order, the workspace regions and their sizing rules, run on C++
  expressions), so the choices stay in :mod:`tvm_attn.schedule` and :mod:`tvm_attn.planner`.

With the GQA group at 4 or more the cache sends decode steps to the paged-prefill slot; its plan
sees one query token per request and runs the decode kernel.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path

from ..config import AttentionKey
from ..kv.formats import PagedKV, RaggedKV
from ..variants import compose
from ..variants.masks import RuntimeCausal

SOURCE = Path(__file__).with_name("kv_backend.cc")
PLAN_PAGED, PLAN_RAGGED, PLAN_DECODE = ("tvm_attn_kv_plan_paged", "tvm_attn_kv_plan_ragged",
                                       "tvm_attn_kv_plan_decode")
RUN_PAGED, RUN_RAGGED, RUN_DECODE = ("tvm_attn_kv_run_paged", "tvm_attn_kv_run_ragged",
                                    "tvm_attn_kv_run_decode")
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


def _slot_keys(config, variant, schedule: str = "default") -> tuple:
    """The paged-prefill (HND pages) and ragged-prefill (NHD) keys of a KV-cache configuration."""
    c = config
    heads = (c.num_attention_heads, c.num_key_value_heads)
    return tuple(AttentionKey("prefill", kv, *heads, c.head_dim, c.dtype, c.dtype, variant, c.target,
                              schedule)
                 for kv in (PagedKV(c.page_size, "HND"), RaggedKV("NHD")))


def hopper_tiles(config, variant):
    """The Hopper kernel's tiles for the cache's long-query prefill steps, when the registry prefers
    that family for both slots' keys (sm_90a, pages it reads, a variant it has); else None."""
    from ..registry import preferred_family
    from ..schedule.hopper import MIN_PACKED_ROWS, HopperTiles, default_schedule

    if not config.target.startswith("cuda"):
        return None
    keys = _slot_keys(config, variant)
    if any(preferred_family(k, MIN_PACKED_ROWS + 1).name != "cuda_prefill_sm90" for k in keys):
        return None
    return HopperTiles.parse(default_schedule(keys[0], "sm_90a"))


def with_long_queries(table, tiles) -> list:
    """``table`` (:func:`prefill_tile_table`) with ``tiles`` for every mean above the Hopper family's
    short-query bound (:data:`tvm_attn.schedule.hopper.MIN_PACKED_ROWS`)."""
    from ..schedule.hopper import MIN_PACKED_ROWS

    short = []
    for rows, t in table:
        short.append((min(rows, MIN_PACKED_ROWS), t))
        if rows >= MIN_PACKED_ROWS:
            break
    return short + [((1 << 31) - 1, tiles)]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.lower().split("_"))


def _product(shape) -> str:
    return " * ".join(f"({d})" if " " in str(d) and not str(d).startswith("(") else str(d) for d in shape)


def planner_header() -> list[str]:
    """C++ of :mod:`tvm_attn.planner`'s interface, for ``kv_backend.cc``: the work-record and stats
    fields and the status codes (``kWorkKvEnd``, ``kStatStatus``, ``kStatusMaxWorks``, ...) with
    ``StatusName``; ``PlanParams``, the planner's scalars by name with their defaults, whose ``Call``
    passes them in the planner's order; and ``Layout`` (:func:`_layout_struct`)."""
    from ..planner import NO_WINDOW, PLAN_STATS, REGION_ALIGN, PlanParams, Stat, Status, Work

    lines = ["// -- tvm_attn.planner: the planner's interface"]
    for enum_type, name, prefix, count in ((Work, "WorkField", "kWork", "kWorkFields"),
                                           (Stat, "StatField", "kStat", None),
                                           (Status, "PlanStatus", "kStatus", None)):
        fields = [f"{prefix}{_camel(m.name)} = {m.value}" for m in enum_type]
        fields += [f"{count} = {len(enum_type)}"] if count else []
        lines.append(f"enum {name} : int {{ {', '.join(fields)} }};")
    names = ", ".join(f'"{m.name.lower()}"' for m in Status)
    lines += [f"constexpr int kPlanStats = {PLAN_STATS};  // entries of the planner's stats",
              f"constexpr int64_t kRegionAlign = {REGION_ALIGN};  // int32 elements: array starts, 64 bytes",
              f"constexpr int64_t kNoWindow = {NO_WINDOW};",
              "inline const char* StatusName(int64_t s) {",
              f"  static const char* names[] = {{{names}}};",
              f'  return s >= 0 && s < {len(Status)} ? names[s] : "unknown";',
              "}",
              "// the planner's scalars by name (PlanParams); Call passes them in the planner's order",
              "struct PlanParams {"]
    fields = dataclasses.fields(PlanParams)
    for f in fields:
        default = "" if f.default is dataclasses.MISSING else f" = {int(f.default)}"
        lines.append(f"  int64_t {f.name}{default};  // {f.metadata['meaning']}")
    lines += ["  template <typename... Tensors>",
              "  void Call(TVMFFISafeCallType fn, Tensors... tensors) const {",
              f"    tvm_attn_kv::Call(fn, tensors..., {', '.join(f.name for f in fields)});",
              "  }",
              "};"]
    return lines + _layout_struct()


def _layout_struct() -> list[str]:
    """``Layout``: a :class:`~tvm_attn.planner.Workspace` whose regions are views
    (``work_info(base, device)``, ...) at the offsets Python lays them out at (each start a multiple
    of :data:`~tvm_attn.planner.REGION_ALIGN` elements), and which
    ``Save`` / ``Load`` into and from a plan_info array."""
    from ..planner import CExpr, Workspace, region_size

    names = [f.name for f in dataclasses.fields(Workspace)]
    ws = Workspace(*(CExpr(n) for n in names))
    lines = ["// one plan's capacities (tvm_attn.planner.Workspace) and the workspace regions they size",
             "struct Layout {", f"  int64_t {', '.join(names)};",
             f"  static constexpr int kFields = {len(names)};"]
    for kind, regions, ptr, dtype in (("int", ws.int_regions(), "int32_t", "kInt32"),
                                      ("float", ws.float_regions(), "float", "kFloat32")):
        at = "0"
        for name, shape in regions:
            dims = ", ".join(str(d) for d in shape)
            lines += [f"  int64_t {name}_at() const {{ return {at}; }}",
                      f"  View {name}({ptr}* base, DLDevice dev) const {{",
                      f"    return View(base + {name}_at(), dev, {dtype}, {{{dims}}});",
                      "  }"]
            at = str(region_size(CExpr(f"{name}_at() + {_product(shape)}")))  # the next aligned start
        lines.append(f"  int64_t {kind}_elems() const {{ return {at}; }}")
    loads = ", ".join(f"info[at + {i}]" for i in range(len(names)))
    lines += ["  void Save(Array<int64_t>* info) const {",
              *(f"    info->push_back({n});" for n in names),
              "  }",
              "  static Layout Load(const Array<int64_t>& info, int64_t at) {",
              f"    return Layout{{{loads}}};",
              "  }",
              "};"]
    return lines


def _symbol(name: str) -> str:
    """The exported symbol of a host function of a TVM module."""
    return f"__tvm_ffi_{name}"


class CudaKVBackend:
    """The kernels, planner and plan/run functions of one cache configuration on a CUDA target.

    ``variant``: the user's variant (composed after the run-time causal mask in the prefill slots);
    its run-time scalars are bound to their defaults, as in the ``tirx`` slots
    (:func:`tvm_attn.tir.abi.kv_cache_kernel`).
    """

    def __init__(self, config, variant=None):
        from ..registry import scheduled
        from ..schedule.decode import DecodeTiles
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
        hopper = hopper_tiles(c, prefill_variant)
        if hopper is not None:
            self.tiles = with_long_queries(self.tiles, hopper)
        self.prefill_keys = []
        for _, tiles in self.tiles:
            pair = _slot_keys(c, prefill_variant, tiles.uri())
            if tiles is not hopper:
                check_key(pair[0])
            self.prefill_keys.append(pair)
        # the registry's choice, as a wrapper's: a tuned table's for $TVM_ATTN_GPU, where it has one
        self.decode_key = scheduled(AttentionKey("decode", PagedKV(c.page_size, "HND"), hq, hkv, d, dt, dt,
                                                 user, c.target))
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
        """The generated header ``kv_backend.cc`` includes: the kernels' symbols, the model's shape and
        kernel tables, and the planner's interface and workspace rules (:func:`planner_header`)."""
        from ..planner import PACK_SLACK_DIV, PLAN, PREFILL_PACK_SLACK_DIV, WORK_OVERHEAD

        c = self.config
        names = [PLAN, self.decode_key.uri]
        for paged, ragged in self.prefill_keys:
            names += [paged.uri, paged.uri + "_merge", ragged.uri, ragged.uri + "_merge"]
        lines = ["// generated by tvm_attn.relax.kv_backend: the kernels of one KV-cache configuration",
                 "#pragma once", 'extern "C" {']
        lines += [f"int {_symbol(n)}(void*, const TVMFFIAny*, int32_t, TVMFFIAny*);" for n in names]
        decode = f"{WORK_OVERHEAD}, {PACK_SLACK_DIV}, {_symbol(self.decode_key.uri)}"
        lines += ["}", "namespace tvm_attn_kv {",
                  f"constexpr int64_t kNumQoHeads = {c.num_attention_heads}, "
                  f"kNumKvHeads = {c.num_key_value_heads};",
                  f"constexpr int64_t kHeadDim = {c.head_dim}, kPageSize = {c.page_size};",
                  f"constexpr DLDataType kDType = {_DLPACK_DTYPE[c.dtype]};",
                  f"constexpr int64_t kPrefillPackSlackDiv = {PREFILL_PACK_SLACK_DIV};",
                  "// schedule.prefill.choose_prefill_tiles by mean GQA-packed query rows",
                  "constexpr PrefillTile kPrefillTiles[] = {", *self._tile_rows(), "};",
                  f"constexpr DecodeKernel kDecode = {{{decode}}};",
                  f"constexpr TVMFFISafeCallType kPlanner = {_symbol(PLAN)};",
                  *planner_header(), *self._sizing(), "}  // namespace tvm_attn_kv", ""]
        return "\n".join(lines)

    def _tile_rows(self) -> list[str]:
        from ..planner import prefill_work_overhead

        rows = []
        for (max_rows, tiles), (paged, ragged) in zip(self.tiles, self.prefill_keys):
            kernels = ", ".join(_symbol(k.uri + suffix) for k in (paged, ragged) for suffix in ("", "_merge"))
            rows.append(f"    {{{max_rows}, {tiles.tile_q}, {tiles.blocks_per_sm}, {tiles.fold_heads}, "
                        f"{prefill_work_overhead(tiles.tile_q)}, {kernels}}},  // {tiles.uri()}")
        return rows

    def _sizing(self) -> list[str]:
        """DecodeLayout / PrefillLayout: :func:`tvm_attn.planner.decode_workspace` and
        :func:`~tvm_attn.planner.prefill_workspace` run on C++ expressions of a step's sizes."""
        from types import SimpleNamespace

        from ..planner import CExpr, decode_workspace, prefill_workspace

        c = self.config
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dec = decode_workspace(CExpr("batch"), hq, hkv, d, self.decode_tiles, CExpr("num_sms"))
        tile = SimpleNamespace(tile_q=CExpr("tile.tile_q"), blocks_per_sm=CExpr("tile.blocks_per_sm"),
                               fold_heads=CExpr("tile.fold_heads"))
        pre = prefill_workspace(CExpr("tokens"), CExpr("batch"), hq, hkv, d, tile, CExpr("num_sms"))
        init = lambda ws: ", ".join(str(getattr(ws, f.name)) for f in dataclasses.fields(ws))  # noqa: E731
        return ["// tvm_attn.planner.decode_workspace: a decode plan of `batch` requests",
                "inline Layout DecodeLayout(int64_t num_sms, int64_t batch) {",
                f"  return Layout{{{init(dec)}}};",
                "}",
                "// tvm_attn.planner.prefill_workspace: `tokens` query rows in `batch` requests",
                "inline Layout PrefillLayout(int64_t num_sms, int64_t tokens, int64_t batch, "
                "const PrefillTile& tile) {",
                f"  return Layout{{{init(pre)}}};",
                "}"]

    def cxx_flags(self, directory) -> list[str]:
        """Write this configuration's header into ``directory``; the compiler flags that build
        ``kv_backend.cc`` with it."""
        import tvm
        import tvm_ffi

        (Path(directory) / "kv_backend_config.h").write_text(self.header())
        return ["-std=c++17", f"-I{tvm.libinfo.find_include_path()}",
                f"-I{tvm_ffi.libinfo.find_include_path()}", f"-I{tvm_ffi.libinfo.find_dlpack_include_path()}",
                f"-I{directory}", '-DTVM_ATTN_KV_CONFIG="kv_backend_config.h"']

    def compile_object(self, directory) -> Path:
        """Compile ``kv_backend.cc`` with this configuration's header into ``directory/kv_backend.o``."""

        directory = Path(directory)
        obj = directory / "kv_backend.o"
        cmd = [os.environ.get("CXX", "g++"), "-c", "-O2", "-fPIC", "-fvisibility=hidden",
               *self.cxx_flags(directory), str(SOURCE), "-o", str(obj)]
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

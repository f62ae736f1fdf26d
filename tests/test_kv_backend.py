"""The CUDA KV-cache backend (tvm_attn.relax.kv_backend) on the build machine: the schedule table the
C++ plan reads, the generated header, and the compiled plan/run object's link contract. Running it
needs a GPU: tests/gpu/test_kv_cache_cuda.py."""

import shutil
import subprocess

import pytest

from tvm_attn.planner import PLAN
from tvm_attn.relax.kv_backend import SYMBOLS, CudaKVBackend, prefill_tile_table
from tvm_attn.relax.kv_cache import KVCacheConfig
from tvm_attn.schedule.prefill import choose_prefill_tiles


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_tile_table_is_the_schedule(head_dim):
    table = prefill_tile_table(head_dim)
    assert [m for m, _ in table] == sorted(m for m, _ in table)
    for rows in list(range(1, 300)) + [1000, 5000, 100000]:
        pick = next(t for m, t in table if rows <= m)
        assert pick == choose_prefill_tiles(head_dim, rows), rows


def _backend(**kw):
    c = dict(num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             dtype="float16", target="cuda:sm_90a")
    c.update(kw)
    return CudaKVBackend(KVCacheConfig(**c))


def test_header_names_every_kernel():
    b = _backend()
    funcs = b.functions()
    header = b.header()
    for name in funcs:
        assert f"__tvm_ffi_{name}(" in header, name
    assert PLAN in funcs and "kNumQoHeads = 32, kNumKvHeads = 8" in header
    assert "kDType = {kDLFloat, 16, 1}" in header
    assert len(b.prefill_keys) == 3  # 16- and 64-row query tiles, then the Hopper kernel's 128 rows


@pytest.mark.parametrize("target, page_size, hopper", [("cuda:sm_90a", 16, True), ("cuda:sm_80", 16, False),
                                                       ("cuda:sm_90a", 4, True)])
def test_long_prefill_steps_take_the_hopper_kernel_where_the_registry_does(target, page_size, hopper):
    """Above the Hopper family's short-query bound the cache's prefill slots run its kernel on sm_90a
    (both slots' keys: HND pages, NHD ragged, one schedule: the gather producer's where TMA boxes
    cannot address the pages); short steps keep the FA2-class tiles. On sm_80 the table is the
    FA2-class schedule's."""
    from tvm_attn.schedule.hopper import MIN_PACKED_ROWS, HopperTiles

    b = _backend(target=target, page_size=page_size)
    rows = [m for m, _ in b.tiles]
    assert rows == sorted(rows) and rows[-1] == (1 << 31) - 1
    last = b.tiles[-1][1]
    assert isinstance(last, HopperTiles) == hopper
    for paged, ragged in b.prefill_keys:
        assert paged.schedule == ragged.schedule
    if hopper:
        assert rows[-2] == MIN_PACKED_ROWS
        assert all(not isinstance(t, HopperTiles) for _, t in b.tiles[:-1])
        assert b.prefill_keys[-1][0].schedule == last.uri() and "wsq128" in b.header()
        assert last.gather == (page_size < 8)
    else:
        assert b.tiles == prefill_tile_table(128, b.prefill_keys[0][0].variant)


def test_refusals():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        _backend(dtype="float32")
    import tvm_attn as ta

    with pytest.raises(ValueError, match="cannot pass the argument"):
        CudaKVBackend(KVCacheConfig(2, 4, 2, 64, "float16", target="cuda:sm_90a"), ta.ALiBi())


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None, reason="needs g++ and nm")
def test_plan_run_object_links_against_the_kernels(tmp_path):
    b = _backend(num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    obj = b.compile_object(tmp_path)
    syms = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout.splitlines()
    defined = {s.split()[-1] for s in syms if " T " in s}
    undefined = {s.split()[-1] for s in syms if s.strip().startswith("U ")}
    assert {f"__tvm_ffi_{s}" for s in SYMBOLS} <= defined
    # the kernels and the planner come from the model's own library (resolved when it is linked)
    assert {f"__tvm_ffi_{n}" for n in b.functions()} <= undefined


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_generated_planner_interface_matches_python(tmp_path):
    """The C++ backend's planner interface comes from the Python description: PlanParams.Call passes
    the scalars in the TIR planner's signature order, and DecodeLayout / PrefillLayout size the
    workspace as planner.decode_workspace / prefill_workspace do (a host program over the generated
    header, with stub kernels and a stub planner that records its scalar arguments)."""
    import dataclasses
    from pathlib import Path

    import tvm
    import tvm_ffi

    from tvm_attn.planner import REGION_ALIGN, PlanParams, Workspace, decode_workspace, prefill_workspace
    from tvm_attn.relax.kv_backend import SOURCE
    from tvm_attn.tir.plan import make_planner

    b = _backend(num_attention_heads=12, num_key_value_heads=2, head_dim=64)
    names = [f.name for f in dataclasses.fields(PlanParams)]
    assert [v.name for v in make_planner().params[-len(names):]] == names
    cases = [(132, 1, 1), (132, 64, 300), (78, 7, 5000), (1, 3, 17)]
    stubs = "\n".join(f'extern "C" int __tvm_ffi_{n}(void*, const TVMFFIAny*, int32_t, TVMFFIAny*) '
                      "{ return 0; }" for n in b.functions() if n != PLAN)
    set_fields = " ".join(f"p.{n} = {100 + i};" for i, n in enumerate(names))
    probe = Workspace(*range(1, len(dataclasses.fields(Workspace)) + 1))
    regions = [name for name, _ in probe.int_regions() + probe.float_regions()]
    values = [f"l.{f.name}" for f in dataclasses.fields(Workspace)] + ["l.int_elems()", "l.float_elems()"]
    values += [f"l.{name}_at()" for name in regions]
    show = f'printf("{" ".join(["%lld"] * len(values))}\\n", {", ".join(f"(long long){v}" for v in values)});'
    layouts = "\n".join(f"{{ Layout l = DecodeLayout({s}, {bt}); {show} }}" for s, bt, _ in cases)
    layouts += "\n" + "\n".join(f"{{ Layout l = PrefillLayout({s}, {tok}, {bt}, kPrefillTiles[{i}]); "
                                f"{show} }}" for s, bt, tok in cases for i in range(len(b.tiles)))
    (tmp_path / "harness.cc").write_text(f"""#include <cstdio>
#include "{SOURCE}"
static long long seen[32];
static int seen_n = 0;
extern "C" int __tvm_ffi_{PLAN}(void*, const TVMFFIAny* args, int32_t n, TVMFFIAny*) {{
  seen_n = n;
  for (int i = 0; i < n && i < 32; ++i) seen[i] = args[i].v_int64;
  return 0;
}}
{stubs}
int main() {{
  using namespace tvm_attn_kv;
  PlanParams p; {set_fields}
  p.Call(kPlanner, 0, 0, 0, 0, 0, 0, 0);
  for (int i = 7; i < seen_n; ++i) printf("%lld ", seen[i]);
  printf("\\n");
{layouts}
  return 0;
}}
""")
    runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
    libs = [tvm_ffi.libinfo.find_libtvm_ffi(), str(runtime)]
    exe = tmp_path / "harness"
    cmd = ["g++", "-O1", *b.cxx_flags(tmp_path), str(tmp_path / "harness.cc"), "-o", str(exe), *libs,
           *(f"-Wl,-rpath,{Path(x).parent}" for x in libs)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert [int(x) for x in out[0].split()] == [100 + i for i in range(len(names))]
    heads = (b.config.num_attention_heads, b.config.num_key_value_heads, b.config.head_dim)
    want = [decode_workspace(bt, *heads, b.decode_tiles, s) for s, bt, _ in cases]
    want += [prefill_workspace(tok, bt, *heads, tiles, s) for s, bt, tok in cases for _, tiles in b.tiles]
    got = [[int(x) for x in line.split()] for line in out[1:]]
    assert got == [[*dataclasses.astuple(w), w.int_bytes // 4, w.float_bytes // 4, *_region_starts(w)]
                   for w in want]
    # every region on a 64-byte boundary (TVM's compiled planner assumes it of its array arguments)
    assert all(start % REGION_ALIGN == 0 for line in got for start in line[-len(regions):])


def _region_starts(ws):
    """Where a layout starts each int region, then each float region (planner.region_size apart)."""
    import math

    from tvm_attn.planner import region_size

    starts = []
    for regions in (ws.int_regions(), ws.float_regions()):
        at = 0
        for _, shape in regions:
            starts.append(at)
            at += region_size(math.prod(shape))
    return starts

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
    c = dict(num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, head_dim=128, dtype="float16",
             target="cuda:sm_90a")
    c.update(kw)
    return CudaKVBackend(KVCacheConfig(**c))


def test_header_names_every_kernel():
    b = _backend()
    funcs = b.functions()
    header = b.header()
    for name in funcs:
        assert f"__tvm_ffi_{name}(" in header, name
    assert PLAN in funcs and "kNumQoHeads = 32, kNumKvHeads = 8" in header and "kDType = {kDLFloat, 16, 1}" in header
    assert len(b.prefill_keys) == 3  # 16-, 64- and 128-row query tiles at head_dim 128


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

"""Kernel cache: deterministic names, build in one process, serve from another with no compiler."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import tvm_attn as ta
from tvm_attn.cache import KernelCache, KernelNotBuiltError
from tvm_attn.config import AttentionKey, key_from_spec


def test_uri_is_deterministic_and_distinct():
    a = AttentionKey("decode", ta.PagedKV(16), 32, 8, 128, variant=ta.SlidingWindow(5))
    b = AttentionKey("decode", ta.PagedKV(16), 32, 8, 128, variant=ta.SlidingWindow(7))
    assert a.uri == b.uri  # window_left is a run-time scalar: same kernel
    assert a.uri != AttentionKey("decode", ta.PagedKV(16, "HND"), 32, 8, 128).uri
    assert a.uri != AttentionKey("decode", ta.PagedKV(8), 32, 8, 128, variant=ta.SlidingWindow()).uri
    r1, r2 = AttentionKey("prefill", ta.RaggedKV(), 4, 4, 64, variant=ta.RoPE()), AttentionKey(
        "prefill", ta.RaggedKV(), 4, 4, 64, variant=ta.RoPE("llama3.1"))
    assert r1.uri != r2.uri
    assert all(c.isalnum() or c == "_" for c in r2.uri), r2.uri  # a valid C symbol for C++ callers


def test_key_from_spec_roundtrip():
    key = key_from_spec({"kind": "prefill", "kv": {"format": "paged", "page_size": 16, "layout": "HND"},
                         "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128,
                         "variant": ["causal", {"name": "sliding_window", "window_left": 64}]})
    assert key.variant == ta.Causal() + ta.SlidingWindow(64)
    assert key.kv == ta.PagedKV(16, "HND")
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        key_from_spec({"kind": "decode", "kv": {"format": "paged", "page_size": 1}, "num_qo_heads": 1,
                       "num_kv_heads": 1, "head_dim": 64, "variant": "nope"})


def test_disk_cache_hit_skips_compile(tmp_path):
    key = AttentionKey("decode", ta.PagedKV(4), 4, 2, 64)
    first = KernelCache(tmp_path)
    first.get(key)
    assert key.uri in first.build_seconds and first.path(key).exists()
    meta = json.loads(first.path(key).with_suffix(".json").read_text())
    assert meta["uri"] == key.uri and meta["build_seconds"] > 0
    second = KernelCache(tmp_path)
    second.get(key)
    assert second.build_seconds == {}  # loaded, not rebuilt


RUNTIME_ONLY = textwrap.dedent(
    """
    import sys, numpy as np, tvm
    assert tvm._RUNTIME_ONLY
    import tvm_attn as ta
    from tvm_attn import reference as R
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((6, 2, 16, 8, 128)).astype(np.float16)
    q = rng.standard_normal((2, 32, 128)).astype(np.float16)
    indptr, indices = np.array([0, 2, 3], np.int32), np.array([4, 0, 5], np.int32)
    last = np.array([7, 16], np.int32)
    w = ta.BatchDecodeWithPagedKVCacheWrapper("NHD")
    w.plan(indptr, indices, last, 32, 8, 128, 16)
    o = w.run(q, cache)
    ref, _ = R.paged_attention(q, None, cache, indptr, indices, last)
    err = float(np.abs(o.astype(np.float32) - ref).max())
    assert err < 2e-3, err
    try:
        w.plan(indptr, indices, np.array([7, 8], np.int32), 32, 8, 128, 8)  # page size 8 was never built
    except ta.KernelNotBuiltError as e:
        assert "tvm-attn build" in str(e)
    else:
        raise AssertionError("expected KernelNotBuiltError")
    print("RUNTIME_ONLY_OK", err)
    """
)


def test_build_then_serve_without_compiler(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tvm_attn", "build", "-o", str(tmp_path)], capture_output=True, text=True,
        timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "attn_decode_paged16nhd" in out.stdout
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", TVM_ATTN_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", RUNTIME_ONLY], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "RUNTIME_ONLY_OK" in run.stdout


def test_no_compile_mode_reports_missing_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_ATTN_NO_COMPILE", "1")
    with pytest.raises(KernelNotBuiltError, match="tvm-attn build"):
        KernelCache(tmp_path).get(AttentionKey("decode", ta.PagedKV(2), 4, 4, 64))


def test_cpu_kernels_are_filed_under_the_cpu_they_were_built_for(tmp_path, monkeypatch):
    """A CPU kernel built for this host's CPU is filed under its tag and never loaded on a CPU of
    another tag; there a runtime-only process takes the portable kernel (TVM_ATTN_CPU_TARGET=generic),
    or names both files when neither is there."""
    import tvm_attn.cpu_target as cpu_target

    key = AttentionKey("decode", ta.PagedKV(4), 4, 2, 64)
    tag = cpu_target.host_tag()
    if tag is None:
        pytest.skip("no /proc/cpuinfo: the portable kernels only")
    cache = KernelCache(tmp_path)
    assert cache.path(key).name == f"{key.uri}_{tag}.so"
    cache.get(key)
    meta = json.loads((tmp_path / f"{key.uri}_{tag}.json").read_text())
    assert meta["uri"] == key.uri and '"mcpu"' in meta["target"] and "mattr" in meta["target"]
    assert not (tmp_path / f"{key.uri}.so").exists()

    monkeypatch.setenv("TVM_ATTN_NO_COMPILE", "1")  # a runtime-only process on a CPU of another tag
    monkeypatch.setattr(cpu_target, "host_tag", lambda: "cpu000000000000")
    with pytest.raises(KernelNotBuiltError, match=r"TVM_ATTN_CPU_TARGET=generic"):
        KernelCache(tmp_path).get(key)
    monkeypatch.setenv("TVM_ATTN_CPU_TARGET", "generic")
    monkeypatch.delenv("TVM_ATTN_NO_COMPILE")
    generic = KernelCache(tmp_path)
    assert generic.path(key).name == f"{key.uri}.so"
    generic.get(key)
    assert '"mcpu"' not in json.loads((tmp_path / f"{key.uri}.json").read_text())["target"]
    monkeypatch.delenv("TVM_ATTN_CPU_TARGET")
    monkeypatch.setenv("TVM_ATTN_NO_COMPILE", "1")
    other = KernelCache(tmp_path)
    assert other.module(key) is not None  # the portable kernel, which runs on any CPU
    assert other.path(key).name == f"{key.uri}_cpu000000000000.so" and not other.path(key).exists()


def test_cpu_target_setting_is_checked(monkeypatch):
    from tvm_attn.cpu_target import mode

    monkeypatch.setenv("TVM_ATTN_CPU_TARGET", "native")
    with pytest.raises(ValueError, match=r"TVM_ATTN_CPU_TARGET: must be one of .*, got 'native'"):
        mode()

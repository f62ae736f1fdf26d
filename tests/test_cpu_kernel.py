"""The CPU kernel's float16 path: exact widening, and no per-element conversion calls."""

import numpy as np
import pytest
import tvm

import tvm_attn as ta
from tvm_attn.build import compile_key
from tvm_attn.config import AttentionKey
from tvm_attn.kv.formats import BlockSparseKV, PagedKV, RaggedKV
from tvm_attn.tir._builder import IRBuilder, T, buffer_param, loop, store
from tvm_attn.tir.attention import widen_half


def test_widen_half_is_exact_for_every_half():
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name("widen")
            T.func_attr({"global_symbol": "widen", "tir.noalias": True})
            src = buffer_param("src", (65536,), "uint16")
            dst = buffer_param("dst", (65536,), "float32")
            with loop("i", 65536) as i:
                store(dst, widen_half(src[i]), i)
    f = tvm.compile(ib.get(), target=tvm.target.Target({"kind": "llvm"}))
    bits = np.arange(65536, dtype=np.uint16)
    out = tvm.runtime.tensor(np.zeros(65536, np.float32))
    f(tvm.runtime.tensor(bits), out)
    want = bits.view(np.float16).astype(np.float32).view(np.uint32)
    got = out.numpy().view(np.uint32)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} wrong, e.g. {bits[bad[:4]]} -> {got[bad[:4]]}, want {want[bad[:4]]}"


@pytest.mark.parametrize("kind,fmt,variant", [
    ("prefill", RaggedKV("NHD"), ta.Causal()),
    ("decode", PagedKV(16, "HND"), ta.RoPE()),
    ("bsr", BlockSparseKV(4, 8), ta.AttentionVariant()),
])
def test_float16_kernel_converts_without_calls(kind, fmt, variant):
    """float16 loads widen in line: LLVM's generic x86-64 target has no conversion instruction and
    called ``__extendhfsf2`` for every element the kernel read (10x the float32 kernel's time)."""
    key = AttentionKey(kind, fmt, 4, 2, 64, "float16", "float16", variant)
    ll = compile_key(key).mod.inspect_source("ll")
    calls = [line for line in ll.splitlines() if "call" in line and "@__extendhfsf2" in line]
    assert not calls, f"{len(calls)} calls of __extendhfsf2, e.g. {calls[0].strip()}"

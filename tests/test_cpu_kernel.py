"""The CPU kernel's float16 path: exact widening, no per-element conversion calls, and hardware
widening (F16C) where the kernels are built for this host's CPU."""

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


def host_has_f16c() -> bool:
    from tvm_attn.cpu_target import host_tag, llvm_target_config

    return host_tag() is not None and "+f16c" in llvm_target_config().get("mattr", ())


@pytest.mark.parametrize("cpu", ["host", "generic"])
@pytest.mark.parametrize("kind,fmt,variant", [
    ("prefill", RaggedKV("NHD"), ta.Causal()),
    ("decode", PagedKV(16, "HND"), ta.RoPE()),
    ("bsr", BlockSparseKV(4, 8), ta.AttentionVariant()),
])
def test_float16_kernel_converts_without_calls(kind, fmt, variant, cpu, monkeypatch):
    """float16 loads widen in line: LLVM's generic x86-64 target has no conversion instruction and
    called ``__extendhfsf2`` for every element the kernel read (10x the float32 kernel's time), so the
    portable kernels widen by integer operations; built for a host with F16C, the kernels widen with
    ``vcvtph2ps`` (the integer widening cost 1.2-1.7x the float32 kernel's time there)."""
    monkeypatch.setenv("TVM_ATTN_CPU_TARGET", cpu)
    key = AttentionKey(kind, fmt, 4, 2, 64, "float16", "float16", variant)
    asm = compile_key(key).mod.inspect_source("asm")  # the IR's fpext becomes the call here
    calls = [line for line in asm.splitlines() if "call" in line and "__extendhfsf2" in line]
    assert not calls, f"{len(calls)} calls of __extendhfsf2, e.g. {calls[0].strip()}"
    widen = [line for line in asm.splitlines() if "vcvtph2ps" in line]
    if cpu == "generic":
        assert not widen, widen[0]  # SSE2 has no such instruction: this would not run everywhere
    elif host_has_f16c():
        assert widen and any("mm" in line for line in widen), "no vcvtph2ps in the host kernel"
    else:
        pytest.skip("this host has no F16C")


@pytest.mark.parametrize("variant,args", [
    (ta.Causal() + ta.RoPE(), {}),
    (ta.CustomMask() + ta.LogitsSoftCap(30.0), None),  # a mask that is not a range: checked per key
], ids=["causal_rope", "custom_mask_softcap"])
@pytest.mark.parametrize("cpu", ["host", "generic"])
def test_prefill_over_many_row_blocks_and_tiles(variant, args, cpu, monkeypatch):
    """Rows over several row blocks and keys over several tiles, the last of each partial (the
    property tests stay shorter), with float16 subnormals among the values; built for this host's
    CPU (hardware widening) and for the generic one (integer widening)."""
    monkeypatch.setenv("TVM_ATTN_CPU_TARGET", cpu)
    from conftest import assert_attention_close, randn
    from tvm_attn import reference as R
    from tvm_attn.schedule.cpu import CPU_LOOP_ORDER

    rng = np.random.default_rng(7)
    qo_len = 2 * CPU_LOOP_ORDER.row_block + 5
    kv_len = 4 * CPU_LOOP_ORDER.kv_tile + qo_len + 3
    q = randn(rng, (qo_len, 4, 64), "float16")
    k, v = randn(rng, (kv_len, 2, 64), "float16"), randn(rng, (kv_len, 2, 64), "float16")
    v[::7, :, ::5] = np.float16(3e-6)  # float16 subnormals
    if args is None:
        packed, indptr = ta.pack_custom_mask([rng.random((qo_len, kv_len)) < 0.5])
        args = {"custom_mask": packed, "mask_indptr": indptr}
    o, lse = ta.single_prefill_with_kv_cache(q, k, v, variant=variant, return_lse=True, **args)
    ref_o, ref_lse = R.dense_attention(q, k, v, variant=variant, params=R.variant_params(variant, args))
    assert_attention_close(o, lse, ref_o, ref_lse, "float16", str(variant))

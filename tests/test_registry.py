"""The kernel-family registry (which family builds a key, its default schedule, its launch bounds)
and specs that round-trip: every key and variant -> to_json / spec -> key_from_spec -> the same key."""

import dataclasses
import json
import re
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tvm_attn as ta
from tvm_attn import registry
from tvm_attn.cli import main
from tvm_attn.config import KINDS, MERGE_OPS, AttentionKey, MergeKey, PlannerKey, key_from_spec
from tvm_attn.cuda_runtime import prepare_source
from tvm_attn.variants import BUILTIN, RuntimeCausal, variant_from_spec

TARGETS = ("llvm", "cuda:sm_90a", "cuda:sm_80")

#: every built-in variant, with its constructor arguments drawn
VARIANTS = {
    "default": st.just(ta.AttentionVariant()),
    "causal": st.just(ta.Causal()),
    "runtime_causal": st.just(RuntimeCausal()),
    "sliding_window": st.integers(-1, 1 << 20).map(ta.SlidingWindow),
    "custom_mask": st.just(ta.CustomMask()),
    "logits_soft_cap": st.floats(0.125, 1000).map(ta.LogitsSoftCap),
    "alibi": st.just(ta.ALiBi()),
    "rope": st.one_of(
        st.builds(ta.RoPE, st.just("llama"), st.floats(0.25, 64), st.floats(100, 1e7)),
        st.builds(lambda lo, gap, omax, scale: ta.RoPE("llama3.1", scale, 500000.0, lo, lo + gap, omax),
                  st.floats(0.5, 4), st.floats(0.5, 8), st.integers(1024, 1 << 17), st.floats(1, 32)),
    ),
    "sigmoid": st.floats(-8, 8).map(ta.SigmoidAttention),
}
#: a built-in or several distinct ones composed, in any order
ANY_VARIANT = st.lists(st.sampled_from(sorted(VARIANTS)), unique=True, max_size=4).flatmap(
    lambda names: st.tuples(*(VARIANTS[n] for n in names))).map(lambda parts: ta.compose(*parts))

#: (kind, KV format) pairs a key may have
LAYOUTS, NOT_BSR = st.sampled_from(["NHD", "HND"]), st.sampled_from(["decode", "prefill"])
FORMATS = st.one_of(
    st.tuples(NOT_BSR, st.builds(ta.PagedKV, st.sampled_from([1, 16, 32]), LAYOUTS)),
    st.tuples(NOT_BSR, st.builds(ta.RaggedKV, LAYOUTS)),
    st.tuples(st.just("bsr"), st.builds(ta.BlockSparseKV, *[st.sampled_from([1, 16])] * 2)),
)


def _roundtrip(spec):
    return json.loads(json.dumps(spec))  # through JSON text, as a --kernels file


def test_every_builtin_variant_has_a_strategy():
    assert set(VARIANTS) == set(BUILTIN)


@settings(max_examples=300, deadline=None)
@given(ANY_VARIANT)
def test_variant_spec_roundtrip(variant):
    back = variant_from_spec(_roundtrip(variant.spec()))
    assert back.spec() == variant.spec() and back.uri() == variant.uri()
    def parts(v):
        return [type(p) for p in getattr(v, "parts", [v])]

    assert parts(back) == parts(variant)
    # the run-time defaults (window, cap, RoPE scale and theta, bias) come back too, not only the kernel
    assert [(p.name, getattr(p, "default", None)) for p in back.extra_params()] == [
        (p.name, getattr(p, "default", None)) for p in variant.extra_params()]


def test_composed_variant_spec_is_a_list():
    v = ta.Causal() + ta.SlidingWindow(128) + ta.LogitsSoftCap(30)
    assert v.spec() == ["causal", {"name": "sliding_window", "window_left": 128},
                        {"name": "logits_soft_cap", "cap": 30.0}]
    rope = ta.RoPE("llama3.1", rope_scale=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position=8192)
    assert variant_from_spec(rope.spec()).spec() == rope.spec()
    assert rope.spec()["rope_theta"] == 500000.0 and rope.spec()["original_max_position"] == 8192


class Plain(ta.AttentionVariant):
    def logits_transform(self, ctx, logits):
        return logits


class Tagged(ta.AttentionVariant):
    """Keeps a constructor argument that is not its config: must define spec()."""

    def __init__(self, scale: float = 1.0):
        self._scale = scale


class TaggedWithSpec(Tagged):
    def spec(self):
        return self.named_spec(scale=self._scale)


def test_user_variant_spec():
    assert Plain().spec() == "test_registry:Plain"
    assert type(variant_from_spec(Plain().spec())) is Plain
    with pytest.raises(TypeError, match=r"Tagged.spec: .*'_scale'.*define spec\(\)"):
        Tagged(2.0).spec()
    back = variant_from_spec(_roundtrip(TaggedWithSpec(2.0).spec()))
    assert type(back) is TaggedWithSpec and back._scale == 2.0
    with pytest.raises(TypeError, match="not an AttentionVariant"):
        variant_from_spec("json:dumps")


def _key(kind_kv, heads, head_dim, dtype, variant, target):
    """The key, with the schedule its family chooses where one builds it."""
    kind, kv = kind_kv
    key = AttentionKey(kind, kv, heads[0], heads[1], head_dim, dtype, dtype, variant, target)
    try:
        return registry.scheduled(key)
    except ValueError:  # e.g. decode over ragged KV on CUDA: no family, the key still round-trips
        return key


@settings(max_examples=300, deadline=None)
@given(FORMATS, st.sampled_from([(32, 8), (4, 4), (8, 1)]), st.sampled_from([64, 128, 256]),
       st.sampled_from(["float16", "bfloat16", "float32"]), ANY_VARIANT, st.sampled_from(TARGETS))
def test_key_spec_roundtrip(kind_kv, heads, head_dim, dtype, variant, target):
    key = _key(kind_kv, heads, head_dim, dtype, variant, target)
    back = key_from_spec(_roundtrip(key.to_json()))
    assert back == key and back.uri == key.uri and back.to_json() == key.to_json()
    assert type(back.variant) is type(key.variant)


@pytest.mark.parametrize("target", TARGETS[:2])
def test_merge_and_planner_spec_roundtrip(target):
    for op in MERGE_OPS:
        for dtype in ("float16", "bfloat16", "float32"):
            key = MergeKey(op, dtype, target)
            assert key_from_spec(_roundtrip(key.to_json())) == key
    assert key_from_spec(_roundtrip(PlannerKey(target).to_json())) == PlannerKey(target)


def test_format_names():
    """``to_json`` writes paged / ragged / bsr; specs may also name the classes."""
    spec = {"kind": "prefill", "num_qo_heads": 4, "num_kv_heads": 4, "head_dim": 64}
    cases = [({"page_size": 16}, ta.PagedKV(16), ("paged", "PagedKV")),
             ({}, ta.RaggedKV(), ("ragged", "RaggedKV")),
             ({"R": 16, "C": 1}, ta.BlockSparseKV(16, 1), ("bsr", "BlockSparseKV"))]
    for args, kv, names in cases:
        for fmt in names:
            key = key_from_spec({**spec, "kind": "bsr" if names[0] == "bsr" else "prefill",
                                 "kv": {"format": fmt, **args}})
            assert key.kv == kv and key.to_json()["kv"]["format"] == names[0]


DECODE_SPEC = {"kind": "decode", "kv": {"format": "paged", "page_size": 16}, "num_qo_heads": 32,
               "num_kv_heads": 8, "head_dim": 128}


def test_spec_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"unknown keys \['schedul'\]"):
        key_from_spec({**DECODE_SPEC, "schedul": "w4u4g4b4"})
    with pytest.raises(ValueError, match="missing 'kv'"):
        key_from_spec({k: v for k, v in DECODE_SPEC.items() if k != "kv"})
    with pytest.raises(ValueError, match=r"kv: unknown keys \['pages'\]"):
        key_from_spec({**DECODE_SPEC, "kv": {"format": "paged", "pages": 16}})
    with pytest.raises(ValueError, match="kv.format: must be one of"):
        key_from_spec({**DECODE_SPEC, "kv": {"format": "dense"}})
    with pytest.raises(ValueError, match=r"unknown keys \['head_dim'\]"):
        key_from_spec({"merge": "merge_states", "head_dim": 64})
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        key_from_spec({**DECODE_SPEC, "variant": "nope"})


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_cuda_spec_without_schedule_gets_the_default(arch):
    target = f"cuda:{arch}"
    decode = key_from_spec({**DECODE_SPEC, "target": target})
    assert decode.schedule == "w4u2g4b4p"  # today's choice, on both archs
    window = key_from_spec({**DECODE_SPEC, "target": target,
                            "variant": {"name": "sliding_window", "window_left": 64}})
    assert window.schedule == "w4u4g4b4"
    prefill = key_from_spec({**DECODE_SPEC, "kind": "prefill", "variant": "causal", "target": target})
    # paged prefill: the Hopper kernel on sm_90a (page-sized TMA boxes), the FA2-class one on sm_80
    assert prefill.schedule == ("wsq128k128s2o" if arch == "sm_90a" else "fa2q128k64w4s2b2")
    short = registry.scheduled(dataclasses.replace(prefill, schedule="default"), 8)
    assert short.schedule == "fa2q16k64w1s2b8"
    assert key_from_spec({**DECODE_SPEC, "schedule": "w4u4g4b4", "target": target}).schedule == "w4u4g4b4"
    assert key_from_spec(DECODE_SPEC).schedule == "default"  # CPU kernels have one schedule


def test_family_of():
    names = {
        AttentionKey("prefill", ta.RaggedKV(), 4, 4, 64): "cpu_generic",
        AttentionKey("decode", ta.PagedKV(16), 4, 4, 64, target="cuda:sm_90a"): "cuda_decode",
        AttentionKey("prefill", ta.RaggedKV(), 4, 4, 64, target="cuda:sm_80"): "cuda_prefill_fa2",
        AttentionKey("prefill", ta.RaggedKV(), 4, 4, 64, target="cuda:sm_90a"): "cuda_prefill_sm90",
        AttentionKey("prefill", ta.PagedKV(16), 4, 4, 64, target="cuda:sm_90a"): "cuda_prefill_sm90",
        AttentionKey("prefill", ta.PagedKV(1), 4, 4, 64, target="cuda:sm_90a"): "cuda_prefill_sm90",
        AttentionKey("bsr", ta.BlockSparseKV(16, 16), 4, 4, 64, target="cuda:sm_90a"): "cuda_prefill_sm90",
        AttentionKey("bsr", ta.BlockSparseKV(16, 16), 4, 4, 64, target="cuda:sm_80"): "cuda_prefill_fa2",
        MergeKey("merge_states"): "cpu_merge",
        MergeKey("merge_state_in_place", "bfloat16", "cuda:sm_90a"): "cuda_merge",
        PlannerKey(): "planner",
    }
    for key, name in names.items():
        assert registry.family_of(key).name == name
    assert {f.name for f in registry.FAMILIES} == set(names.values())
    assert set(registry.FAMILIES[0].kinds) == set(KINDS)


def test_unsupported_keys_say_why():
    ragged = AttentionKey("decode", ta.RaggedKV(), 4, 4, 64, target="cuda:sm_90a")
    with pytest.raises(ValueError, match=rf"no kernel family builds {ragged.uri}: "
                                         r".*cuda_decode reads paged KV, not ragged"
                                         r".*On cuda: cuda_decode \(decode over paged KV\)"):
        registry.family_of(ragged)
    fp32 = AttentionKey("prefill", ta.RaggedKV(), 4, 4, 64, "float32", "float32", target="cuda:sm_90a")
    with pytest.raises(ValueError, match="cuda_prefill_fa2 CUDA prefill: q and kv must both be float16"):
        registry.scheduled(fp32)
    old = AttentionKey("prefill", ta.RaggedKV(), 4, 4, 64, target="cuda:sm_75")
    with pytest.raises(ValueError, match="needs sm_80 or newer, not sm_75"):
        registry.family_of(old)
    bad = AttentionKey("decode", ta.PagedKV(16), 4, 4, 64, target="cuda:sm_90a", schedule="w4u4")
    with pytest.raises(ValueError, match="is not a decode schedule"):
        registry.family_of(bad)
    with pytest.raises(ValueError, match="'cuda' needs an arch"):
        registry.family_of(AttentionKey("decode", ta.PagedKV(16), 4, 4, 64, target="cuda"))
    with pytest.raises(TypeError, match="expected an AttentionKey"):
        registry.family_of("attn_decode")


def test_a_new_family_is_one_entry(monkeypatch):
    """What adding a family takes: its entry (here the CUDA merge family again, with the CPU
    generator standing in for tvm_attn/tir/merge_cuda.py)."""
    entry = registry.KernelFamily("cuda_merge", MergeKey, MERGE_OPS, "cuda", min_sm=80,
                                  kernels=(("{uri}", "tvm_attn.tir.merge:make_merge"),))
    others = tuple(f for f in registry.FAMILIES if f.name != "cuda_merge")
    monkeypatch.setattr(registry, "FAMILIES", others + (entry,))
    key = MergeKey("merge_states", "float16", "cuda:sm_90a")
    assert registry.family_of(key) is entry
    assert list(entry.generate(key)) == [key.uri]
    assert registry.launch_bounds(key.uri) is None


def test_cuda_key_without_schedule_is_refused_at_generation():
    key = AttentionKey("decode", ta.PagedKV(16), 32, 8, 128, target="cuda:sm_90a")
    with pytest.raises(ValueError, match="cuda_decode kernels name their schedule; "
                                         "this key's default is 'w4u2g4b4p'"):
        registry.family_of(key).generate(key)


RING = "attn_decode_paged16nhd_qf16_kvf16_h32x8_d128_default_cudasm90a_w4u2g4b4s3"


def test_launch_bounds():
    assert registry.launch_bounds(RING) == (128, 4)
    assert registry.launch_bounds(RING.replace("w4u2g4b4s3", "w4u2g4b3p")) == (128, 3)
    prefill = "attn_prefill_raggednhd_qf16_kvf16_h32x8_d256_causal_cudasm80_fa2q128k32w8s2b1"
    assert registry.launch_bounds(prefill) == (256, 1)
    assert registry.launch_bounds(prefill + "_merge") is None  # the merge kernel keeps TVM's bounds
    assert registry.launch_bounds(prefill.replace("cudasm80", "llvm")) is None
    assert registry.launch_bounds("tvm_attn_plan") is None


def test_prepare_source_bounds_the_ring_kernels():
    src = f'extern "C" __global__ void __launch_bounds__(128) {RING}_kernel(half* q) {{}}\n'
    assert f"__launch_bounds__(128, 4) {RING}_kernel(" in prepare_source(src)
    other = 'extern "C" __global__ void __launch_bounds__(256) read_sum_kernel(float* x) {}\n'
    assert prepare_source(other) == other
    with pytest.raises(ValueError, match="TVM launches 64 threads, its schedule names 128"):
        prepare_source(src.replace("(128)", "(64)"))


RUNTIME_ONLY = textwrap.dedent(
    """
    import sys, tvm
    assert tvm._RUNTIME_ONLY
    ir = lambda: {m for m in sys.modules if m.startswith(("tvm.tirx", "tvm.script", "tvm_attn.tir"))}
    before = ir()  # what TVM's runtime loads itself
    import tvm_attn as ta
    from tvm_attn import registry
    from tvm_attn.config import key_from_spec
    key = key_from_spec({"kind": "prefill", "kv": {"format": "paged", "page_size": 16}, "num_qo_heads": 32,
                         "num_kv_heads": 8, "head_dim": 128, "target": "cuda:sm_90a"})
    assert registry.family_of(key).name == "cuda_prefill_sm90" and registry.launch_bounds(key.uri) == (384, 1)
    assert ir() == before, sorted(ir() - before)
    print("REGISTRY_OK", key.schedule)
    """
)


def test_registry_needs_only_the_runtime():
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    run = subprocess.run([sys.executable, "-c", RUNTIME_ONLY], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "REGISTRY_OK wsq128k128s2o" in run.stdout


@pytest.fixture
def no_nvcc(monkeypatch):
    """CUDA builds without the cubin step (TVM's part is what the registry routes)."""
    monkeypatch.setattr("tvm_attn.cuda_runtime.find_nvcc", lambda: None)


def _built_keys(directory):
    return {json.loads(p.read_text())["uri"]: key_from_spec(json.loads(p.read_text())["key"])
            for p in directory.glob("*.json")}


@pytest.mark.slow
def test_cli_build_cuda_default_list(tmp_path, capsys, no_nvcc):
    assert main(["build", "--target", "cuda:sm_90a", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "building 2 kernels for cuda:sm_90a" in out
    keys = _built_keys(tmp_path)
    assert {k.schedule for k in keys.values()} == {"w4u2g4b4p", "wsq128k128s2o"}
    assert all(uri == k.uri and (tmp_path / f"{uri}.so").exists() for uri, k in keys.items())


def test_cli_build_cuda_spec_without_schedule(tmp_path, capsys, no_nvcc):
    spec = {"kind": "decode", "kv": {"format": "paged", "page_size": 16, "layout": "HND"}, "num_qo_heads": 4,
            "num_kv_heads": 4, "head_dim": 64, "variant": ["causal", {"name": "logits_soft_cap", "cap": 30}]}
    kernels = tmp_path / "kernels.json"
    kernels.write_text(json.dumps([spec]))
    out = tmp_path / "out"
    assert main(["build", "--kernels", str(kernels), "--target", "cuda:sm_90a", "-o", str(out)]) == 0
    (key,) = _built_keys(out).values()
    assert key == key_from_spec({**spec, "target": "cuda:sm_90a"}) and key.schedule == "w4u4g1b4"
    assert key.variant.spec()[1] == {"name": "logits_soft_cap", "cap": 30.0}


def test_cli_build_refuses_bad_specs_before_building(tmp_path, capsys):
    kernels = tmp_path / "kernels.json"
    kernels.write_text(json.dumps([DECODE_SPEC, {**DECODE_SPEC, "heads": 3}]))
    assert main(["build", "--kernels", str(kernels), "-o", str(tmp_path / "out")]) == 2
    assert re.search(r"spec 1: kernel spec: unknown keys \[.heads.\]", capsys.readouterr().err)
    ragged = {**DECODE_SPEC, "kv": {"format": "ragged"}, "schedule": "w4u4g4b4"}
    kernels.write_text(json.dumps([ragged]))
    assert main(["build", "--kernels", str(kernels), "--target", "cuda:sm_90a", "-o",
                 str(tmp_path / "out")]) == 2
    assert "no kernel family builds attn_decode_raggednhd" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_hopper_family_takes_what_it_builds_and_prefers():
    """On sm_90a ragged, paged and block-sparse prefill of long queries goes to the Hopper family, with
    the gather producer where TMA boxes cannot address the keys (pages under 8 keys or not a power of
    two, block columns); short queries, sm_90 without "a", and variants it does not implement go to
    the FA2-class family; a backend the key cannot use is a ValueError naming why."""
    ragged = AttentionKey("prefill", ta.RaggedKV(), 32, 8, 128, variant=ta.Causal(), target="cuda:sm_90a")
    assert registry.scheduled(ragged, 4096).schedule == "wsq128k128s2o"
    assert registry.scheduled(ragged).schedule == "wsq128k128s2o"
    for change in ({"variant": ta.ALiBi()}, {"head_dim": 256}):  # 64-key stages
        assert registry.scheduled(dataclasses.replace(ragged, **change), 4096).schedule == "wsq128k64s2o"
    assert registry.scheduled(ragged, 40).schedule.startswith("fa2")
    assert registry.scheduled(ragged, 4096, family="cuda_prefill_fa2").schedule.startswith("fa2")
    assert registry.scheduled(ragged, 40, family="cuda_prefill_sm90").schedule == "wsq128k128s2o"
    for page in (8, 16, 256):
        paged = dataclasses.replace(ragged, kv=ta.PagedKV(page, "HND"))
        assert registry.scheduled(paged, 4096).schedule == "wsq128k128s2o", page
    for kv in (ta.PagedKV(1), ta.PagedKV(4, "HND"), ta.PagedKV(24)):
        gathered = registry.scheduled(dataclasses.replace(ragged, kv=kv), 4096)
        assert gathered.schedule == "wsq128k128s2og", kv
        with pytest.raises(ValueError, match="loads K/V through TMA; the gather producer"):
            registry.family_of(dataclasses.replace(gathered, schedule="wsq128k128s2o"))
    bsr = AttentionKey("bsr", ta.BlockSparseKV(64, 16), 32, 8, 128, target="cuda:sm_90a")
    assert registry.scheduled(bsr, 256).schedule == "wsq128k128s2og"
    assert registry.scheduled(bsr, 64).schedule.startswith("fa2")  # 16-row block rows
    assert registry.scheduled(ragged, 4096, family="cuda_prefill_sm90").schedule == "wsq128k128s2o"
    changes = ({"target": "cuda:sm_90"}, {"variant": ta.RoPE()}, {"num_qo_heads": 24})
    for other in (dataclasses.replace(ragged, **c) for c in changes):
        assert registry.scheduled(other, 4096).schedule.startswith("fa2"), other.uri
        with pytest.raises(ValueError, match="cuda_prefill_sm90 cannot build"):
            registry.scheduled(other, 4096, family="cuda_prefill_sm90")
    hopper = registry.scheduled(ragged, 4096)
    assert registry.family_of(hopper).name == "cuda_prefill_sm90"
    assert registry.launch_bounds(hopper.uri) == (384, 1)
    with pytest.raises(ValueError, match="backend: must be one of"):
        ta.BatchPrefillWithRaggedKVCacheWrapper(backend="fa4")

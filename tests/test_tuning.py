"""Per-GPU tuned schedules (tvm_attn.schedule.tuned, tvm_attn.tuning): workload classes, the table
lookup and its precedence, bad tables, the winner's selection from fixed timings, the candidate
space, and ``tvm-attn tune --build --small``. The GPU step (``--run``) runs on a GPU host."""

import dataclasses
import json
import re

import numpy as np
import pytest

import tvm_attn as ta
from tvm_attn import registry
from tvm_attn.cli import load_kernel_specs
from tvm_attn.cli import main as cli_main
from tvm_attn.config import AttentionKey, key_from_spec
from tvm_attn.schedule import decode as D
from tvm_attn.schedule import tuned
from tvm_attn.tuning import DECODE_CLASSES, TIE, plan_build, scores, select, table_entry
from tvm_attn.variants import AttentionVariant

H200, CLS = "NVIDIA H200", "d128-float16-g4-plain"


def decode_key(hq=32, hkv=8, variant=None, head_dim=128, dtype="float16", schedule="default", layout="NHD"):
    return AttentionKey("decode", ta.PagedKV(16, layout), hq, hkv, head_dim, dtype, dtype,
                        variant or AttentionVariant(), "cuda:sm_90a", schedule)


SHIPPED = tuned.PACKAGE_TABLE


@pytest.fixture(autouse=True)
def no_tables(monkeypatch, tmp_path):
    """No GPU name and no user table from the environment, an empty package table (the shipped
    one has its own test); use_table undone after each test."""
    monkeypatch.delenv(tuned.GPU_ENV, raising=False)
    monkeypatch.delenv(tuned.TABLE_ENV, raising=False)
    monkeypatch.setattr(tuned, "PACKAGE_TABLE", write(tmp_path / "empty.json", []))
    yield
    tuned.use_table(None)


def test_the_shipped_table():
    """The package's table: its entries check, each schedule is one ``tvm-attn tune`` builds for its
    class (so the GPU tier's kernels for that GPU are among the candidates measured), and it is the
    table of the committed tuning run."""
    from pathlib import Path

    entries = tuned.load_table(SHIPPED)
    assert entries and {e.gpu for e in entries} == {H200}
    built = {c["class"]: c for c in plan_build(classes=[e.workload_class for e in entries])}
    for e in entries:
        assert e.family == "cuda_decode" and e.schedule in built[e.workload_class]["candidates"]
        assert dict(e.record)["default_schedule"] == built[e.workload_class]["default_schedule"]
    run = Path(__file__).resolve().parents[1] / "bench" / "results" / "tuned-decode-h200.json"
    if run.exists():  # the committed run (not installed with the package)
        assert json.loads(run.read_text())["entries"] == json.loads(SHIPPED.read_text())["entries"]


def write(path, entries, version=1):
    path.write_text(json.dumps({"version": version, "entries": entries}))
    return path


def entry(schedule="w4u4g4b3", cls=CLS, gpu=H200, family="cuda_decode", **extra):
    return {"family": family, "gpu": gpu, "class": cls, "schedule": schedule, **extra}


# -- workload classes --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, cls", [
    (None, "plain"), (ta.RoPE(), "heavy"), (ta.LogitsSoftCap(), "logits"), (ta.ALiBi(), "logits"),
    (ta.SlidingWindow(4096), "logits"), (ta.SigmoidAttention(), "logits"), (ta.CustomMask(), "heavy_logits"),
    (ta.RoPE() + ta.LogitsSoftCap(), "heavy_logits"),
])
def test_workload_class(variant, cls):
    for hq, hkv in ((32, 8), (32, 32), (64, 8)):
        name = tuned.workload_class("cuda_decode", decode_key(hq, hkv, variant))
        assert name == f"d128-float16-g{hq // hkv}-{cls}"
        assert D.parse_class(name) == (128, "float16", hq // hkv, cls)
    # page size, layout and the schedule are not part of the class
    assert (D.workload_class(decode_key(variant=variant, layout="HND", schedule="w4u4g4b4"))
            == D.workload_class(decode_key(variant=variant)))


@pytest.mark.parametrize("name", ["d128-float16-g4", "d128-float16-g4-fancy", "128-float16-g4-plain",
                                  "d128-float99-g4-plain", "d0-float16-g4-plain", 7])
def test_parse_class_rejects(name):
    with pytest.raises((ValueError, TypeError)):
        D.parse_class(name)


def test_every_default_class_has_one_name():
    names = [c.name() for c in DECODE_CLASSES]
    assert names == ["d128-float16-g4-plain", "d128-float16-g4-heavy", "d128-float16-g4-logits",
                     "d128-float16-g1-plain", "d128-float16-g8-plain"]


# -- the lookup -----------------------------------------------------------------------------------

def test_without_a_table_every_key_keeps_the_hand_written_schedule(monkeypatch):
    from gpu.cases import CASES, key_of

    variants = [None, ta.RoPE(), ta.LogitsSoftCap(), ta.ALiBi(), ta.SlidingWindow(100), ta.CustomMask(),
                ta.SigmoidAttention(), ta.SlidingWindow() + ta.LogitsSoftCap()]
    keys = [decode_key(hq, hkv, v, d, dt) for hq, hkv in ((32, 8), (32, 32), (8, 1), (64, 8), (12, 4))
            for v in variants for d in (64, 128, 256) for dt in ("float16", "bfloat16", "float32")]
    for gpu in (None, H200):  # a GPU name with no entries changes nothing either
        if gpu:
            monkeypatch.setenv(tuned.GPU_ENV, gpu)
        for key in keys:
            want = D.decode_schedule(key.head_dim, key.kv_dtype, key.group_size, key.variant)
            assert registry.scheduled(key).schedule == want, key.uri
            assert registry.scheduled(key, gpu=H200).schedule == want
        for c in CASES:  # the GPU tier's keys, which build_gpu_kernels.py builds
            variant = key_of(c).variant
            assert key_of(c).schedule == D.decode_schedule(c["head_dim"], c["dtype"],
                                                           c["heads"][0] // c["heads"][1], variant)


def test_a_user_table_overrides_its_gpu_and_class_only(tmp_path, monkeypatch):
    tuned.use_table(write(tmp_path / "t.json", [entry("w4u4g4b3")]))
    plain, rope, mha = decode_key(), decode_key(variant=ta.RoPE()), decode_key(32, 32)
    assert registry.scheduled(plain, gpu=H200).schedule == "w4u4g4b3"
    hnd = dataclasses.replace(plain, kv=ta.PagedKV(1, "HND"))
    assert registry.scheduled(hnd, gpu=H200).schedule == "w4u4g4b3"
    assert registry.scheduled(rope, gpu=H200).schedule == "w4u2g4b4p"  # another class
    assert registry.scheduled(mha, gpu=H200).schedule == "w4u4g1b4"
    assert registry.scheduled(plain, gpu="NVIDIA H100 80GB HBM3").schedule == "w4u2g4b4p"
    assert registry.scheduled(plain).schedule == "w4u2g4b4p"  # no GPU: hand-written
    monkeypatch.setenv(tuned.GPU_ENV, H200)
    assert registry.scheduled(plain).schedule == "w4u4g4b3"
    assert registry.scheduled(plain, gpu="none").schedule == "w4u2g4b4p"  # explicit beats the environment
    monkeypatch.setenv(tuned.GPU_ENV, "none")
    assert registry.scheduled(plain).schedule == "w4u2g4b4p"
    # prefill families take no tables: the same schedule with or without a GPU
    prefill = AttentionKey("prefill", ta.RaggedKV("NHD"), 32, 8, 128, target="cuda:sm_90a")
    assert registry.scheduled(prefill, 4096, gpu=H200) == registry.scheduled(prefill, 4096)


def test_table_precedence(tmp_path, monkeypatch):
    package = write(tmp_path / "package.json", [entry("w4u4g4b4")])
    monkeypatch.setattr(tuned, "PACKAGE_TABLE", package)
    key = decode_key()
    assert registry.scheduled(key, gpu=H200).schedule == "w4u4g4b4"  # the package's
    monkeypatch.setenv(tuned.TABLE_ENV, str(write(tmp_path / "env.json", [entry("w4u8g4b3")])))
    assert registry.scheduled(key, gpu=H200).schedule == "w4u8g4b3"  # the environment's over it
    tuned.use_table(write(tmp_path / "use.json", [entry("w8u2g4b2p")]))
    assert registry.scheduled(key, gpu=H200).schedule == "w8u2g4b2p"  # use_table over both
    tuned.use_table(None)
    assert registry.scheduled(key, gpu=H200).schedule == "w4u8g4b3"
    monkeypatch.delenv(tuned.TABLE_ENV)
    assert registry.scheduled(key, gpu=H200).schedule == "w4u4g4b4"
    # a user table without this class leaves the package's entry in force
    tuned.use_table(write(tmp_path / "other.json", [entry("w4u4g1b3", cls="d128-float16-g1-plain")]))
    assert registry.scheduled(key, gpu=H200).schedule == "w4u4g4b4"


def test_kernels_built_for_a_gpu_take_its_schedule(tmp_path, monkeypatch):
    """``tvm-attn build --gpu``, a spec without a schedule, and the KV-cache backend of a model
    (which reads $TVM_ATTN_GPU) pick what a wrapper on that GPU picks."""
    from tvm_attn.relax.kv_backend import CudaKVBackend
    from tvm_attn.relax.kv_cache import KVCacheConfig

    tuned.use_table(write(tmp_path / "t.json", [entry("w4u4g4b3")]))
    spec = {"kind": "decode", "kv": {"format": "paged", "page_size": 16, "layout": "NHD"},
            "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "target": "cuda:sm_90a"}
    assert key_from_spec(spec, gpu=H200).schedule == "w4u4g4b3"
    assert key_from_spec(spec).schedule == "w4u2g4b4p"
    (key,) = load_kernel_specs(json.dumps(spec), "llvm", H200)
    assert key.schedule == "w4u4g4b3"
    config = KVCacheConfig(2, 32, 8, 128, "float16", target="cuda:sm_90a")
    assert CudaKVBackend(config).decode_key.schedule == "w4u2g4b4p"
    monkeypatch.setenv(tuned.GPU_ENV, H200)
    backend = CudaKVBackend(config)
    assert backend.decode_key.schedule == "w4u4g4b3" and backend.decode_tiles.blocks_per_sm == 3


def test_gpu_name():
    assert tuned.gpu_name() is None
    assert tuned.gpu_name("  NVIDIA H200 ") == H200
    assert tuned.gpu_name("none") is None and tuned.gpu_name("") is None
    import tvm

    assert tuned.gpu_name(device=tvm.cpu(0)) is None  # only a CUDA device has a name here
    assert ta.BatchDecodeWithPagedKVCacheWrapper().gpu is None
    with pytest.raises(TypeError, match="gpu"):
        tuned.gpu_name(7)


# -- bad tables -------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, match", [
    ("{not json", r"not valid JSON"),
    (json.dumps({"version": 2, "entries": []}), r"version 2"),
    (json.dumps([]), r"version 'list'"),
    (json.dumps({"version": 1, "entries": {}}), r"'entries' must be a list"),
    (json.dumps({"version": 1, "entries": [], "extra": 1}), r"unknown top-level keys \['extra'\]"),
    (json.dumps({"version": 1, "entries": [entry(), entry("w4u4g4b4")]}), r"entry 1: a second entry"),
    (json.dumps({"version": 1, "entries": ["x"]}), r"entry 0: expected an object"),
    (json.dumps({"version": 1, "entries": [entry(family="cuda_prefill_fa2")]}),
     r"entry 0 \(cuda_prefill_fa2/NVIDIA H200/d128-float16-g4-plain\): family: 'cuda_prefill_fa2' takes no"),
    (json.dumps({"version": 1, "entries": [entry(family="cuda_mla")]}), r"entry 0 .*'cuda_mla' takes no"),
    (json.dumps({"version": 1, "entries": [entry("w4u4g4")]}),
     r"entry 0 .*'w4u4g4' is not a decode schedule"),
    (json.dumps({"version": 1, "entries": [entry("w4u4g8b4")]}),
     r"entry 0 .*heads_per_block 8 must divide the GQA group size 4"),
    (json.dumps({"version": 1, "entries": [entry(cls="d128-float16-g4")]}),
     r"entry 0 .*'d128-float16-g4' is not a decode workload class"),
    (json.dumps({"version": 1, "entries": [entry(default_schedule="w4u2g4b4ps3")]}),
     r"entry 0 .*w4u2g4b4ps3"),
    (json.dumps({"version": 1, "entries": [{"family": "cuda_decode", "gpu": H200, "class": CLS}]}),
     r"entry 0 .*needs the strings \['schedule'\]"),
    (json.dumps({"version": 1, "entries": [entry(shedule="w4u4g4b4")]}),
     r"entry 0 .*unknown keys \['shedule'\]"),
])
def test_bad_tables_name_the_file_and_entry(tmp_path, monkeypatch, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"tuned table {path}") + ".*" + match):
        tuned.use_table(path)
    monkeypatch.setenv(tuned.TABLE_ENV, str(path))  # through the environment: at the first lookup
    with pytest.raises(ValueError, match=re.escape(str(path))):
        registry.scheduled(decode_key(), gpu=H200)
    registry.scheduled(decode_key())  # with no GPU no table is read


def test_missing_table(tmp_path):
    with pytest.raises(ValueError, match=r"tuned table .*missing.json: cannot read it"):
        tuned.use_table(tmp_path / "missing.json")


def test_package_table_ships_as_package_data():
    assert "tuned.json" in (SHIPPED.parent.parent.parent / "pyproject.toml").read_text()


# -- choosing the winner --------------------------------------------------------------------------

DEFAULT = "w4u2g4b4p"
ORDER = [DEFAULT, "w4u2g4b3s3", "w4u4g4b3", "w4u4g4b4", "w8u2g4b2"]


def fake_times(factors):
    base = {"b64 l2048": 200.0, "b1 l32768": 60.0, "b64 zipf": 210.0}
    return {s: {w: t * f for w, t in base.items()} for s, f in factors.items()}


def test_scores_are_geometric_means_relative_to_the_default():
    times = fake_times({DEFAULT: 1.0, "w4u4g4b3": 0.9})
    times["w4u4g4b3"]["b1 l32768"] = 60.0  # 0.9, 1.0, 0.9
    sc = scores(times, DEFAULT)
    assert sc[DEFAULT] == 1.0 and sc["w4u4g4b3"] == pytest.approx((0.9 * 1.0 * 0.9) ** (1 / 3))
    del times["w4u4g4b3"]["b64 zipf"]  # a candidate missing a workload is not scored
    assert "w4u4g4b3" not in scores(times, DEFAULT)


def test_select_ties_go_to_the_default_then_the_earliest():
    assert select(fake_times({DEFAULT: 1.0, "w4u4g4b3": 0.9, "w4u4g4b4": 0.95}), DEFAULT, ORDER) == "w4u4g4b3"
    # within 0.5% of the best: the default keeps it
    assert select(fake_times({DEFAULT: 1.0, "w4u4g4b3": 1 / (1 + TIE / 2)}), DEFAULT, ORDER) == DEFAULT
    assert select(fake_times({DEFAULT: 1.0, "w4u4g4b3": 0.98}), DEFAULT, ORDER) == "w4u4g4b3"
    # two within 0.5% of each other: the earlier in the fixed order
    tie = fake_times({DEFAULT: 1.0, "w4u4g4b4": 0.900, "w4u4g4b3": 0.903, "w8u2g4b2": 0.95})
    assert select(tie, DEFAULT, ORDER) == "w4u4g4b3"
    assert select(tie, DEFAULT, ORDER[::-1]) == "w4u4g4b4"
    assert select(fake_times({DEFAULT: 1.0, "w4u4g4b3": 1.2}), DEFAULT, ORDER) == DEFAULT


def test_the_same_timings_write_the_same_table(tmp_path):
    times = fake_times({DEFAULT: 1.0, "w4u2g4b3s3": 0.97, "w4u4g4b3": 0.931, "w4u4g4b4": 0.93})
    entries = [table_entry("cuda_decode", H200, CLS, times, DEFAULT, ORDER),
               table_entry("cuda_decode", H200, "d128-float16-g1-plain",
                           fake_times({"w4u4g1b4": 1.0, "w4u8g1b3": 0.99}), "w4u4g1b4",
                           ["w4u4g1b4", "w4u8g1b3"])]
    assert entries[0]["schedule"] == "w4u4g4b3" and entries[0]["default_schedule"] == DEFAULT
    assert entries[0]["median_us"] < entries[0]["default_us"]
    assert entries[0]["workloads"]["b1 l32768"] == [round(60 * 0.931, 2), 60.0]
    a = tuned.write_table(tmp_path / "a.json", entries).read_bytes()
    b = tuned.write_table(tmp_path / "b.json", entries[::-1]).read_bytes()
    assert a == b
    tuned.use_table(tmp_path / "a.json")
    assert registry.scheduled(decode_key(), gpu=H200).schedule == "w4u4g4b3"
    assert registry.scheduled(decode_key(32, 32), gpu=H200).schedule == "w4u8g1b3"


# -- the candidates ---------------------------------------------------------------------------------

def test_candidates_are_deterministic_valid_and_within_budget():
    plan = plan_build()
    assert [c["class"] for c in plan] == [c.name() for c in DECODE_CLASSES]
    again = plan_build()
    assert [list(c["candidates"]) for c in plan] == [list(c["candidates"]) for c in again]
    kernels = sum(len(keys) for c in plan for keys in c["candidates"].values())
    assert kernels == 139 and kernels <= 150
    family = registry.family_named("cuda_decode")
    for c in plan:
        assert next(iter(c["candidates"])) == c["default_schedule"]  # the hand-written one first
        assert 19 <= len(c["candidates"]) <= 20 and len(c["workloads"]) == 5
        for schedule, keys in c["candidates"].items():
            for key in keys.values():
                assert key.schedule == schedule and family.supports(key) is None, key.uri
                assert D.workload_class(key) == c["class"]
                assert key_from_spec(key.to_json()) == key  # what a build process gets
                tiles = D.DecodeTiles.of(key)
                assert D.registers_needed(tiles, key.kv_dtype) <= D.register_bound(tiles)
                lo, hi = D.SEARCH_FLIGHT_BYTES
                assert lo <= D.flight_bytes(tiles, key.kv_dtype) <= hi
                assert D.fits_sm(tiles, key.head_dim, key.kv_dtype, key.variant, "sm_90a")
    small = plan_build(small=True)
    assert len(small) == 1 and len(small[0]["candidates"]) == 6 and len(small[0]["workloads"]) == 2
    assert set(small[0]["candidates"]) <= set(plan[0]["candidates"])
    assert [c["class"] for c in plan_build(classes=["d128-float16-g1-plain"])] == ["d128-float16-g1-plain"]
    with pytest.raises(ValueError, match="--classes"):
        plan_build(classes=["d128-float16-g2-plain"])
    with pytest.raises(ValueError, match="--family: 'cuda_prefill_fa2'"):
        plan_build("cuda_prefill_fa2")


def test_candidates_of_other_keys_parse():
    for head_dim, dtype, group, variant, arch in ((64, "float16", 4, None, "sm_90a"),
                                                  (256, "bfloat16", 8, ta.RoPE(), "sm_90a"),
                                                  (128, "float32", 2, ta.CustomMask(), "sm_80")):
        variant = variant or AttentionVariant()
        cands = D.candidate_schedules(head_dim, dtype, group, variant, arch)
        assert cands and cands == D.candidate_schedules(head_dim, dtype, group, variant, arch)
        for s in cands:
            D.check_class_schedule(s, f"d{head_dim}-{dtype}-g{group}-{D.variant_class(variant)}")


def test_a_heads_per_block_that_does_not_divide_the_group_is_refused():
    reason = registry.family_named("cuda_decode").supports(decode_key(32, 16, schedule="w4u4g4b4"))
    assert "heads_per_block 4 must divide the GQA group size 2" in reason


@pytest.mark.parametrize("schedule, variant", [("w4u4g4b4", None), ("w4u2g4b4s3", None),
                                               ("w8u4g2b2p", ta.RoPE()), ("w4u2g2b3s4", ta.RoPE())])
def test_shared_bytes_are_the_kernels(schedule, variant):
    """The candidates' shared-memory rule counts what the generated kernel declares."""
    from tvm_attn.build import compile_key, cuda_source

    key = decode_key(variant=variant, schedule=schedule)
    src = cuda_source(compile_key(key))
    sizes = {"half": 2, "float": 4, "int": 4}
    decls = re.findall(r"__shared__ alignas\(\d+\) (\w+) \w+\[(\d+)\]", src)
    declared = sum(sizes[t] * int(n) for t, n in decls)
    assert declared == D.shared_bytes(D.DecodeTiles.of(key), 128, "float16", key.variant)


# -- the command line -----------------------------------------------------------------------------

def test_tune_build_small(tmp_path, capsys):
    from tvm_attn.cuda_runtime import find_nvcc

    out = tmp_path / "tune"
    assert cli_main(["tune", "--build", str(out), "--small", "--jobs", "2", "--quiet"]) == 0
    manifest = json.loads((out / "candidates.json").read_text())
    assert manifest["kernels"] == 6 and manifest["family"] == "cuda_decode" and manifest["small"]
    (c,) = manifest["classes"]
    assert c["class"] == CLS and c["default_schedule"] == "w4u2g4b4p"
    assert [w["name"] for w in c["workloads"]] == ["b64 l2048", "b1 l32768"]
    assert [x["schedule"] for x in c["candidates"]] == list(plan_build(small=True)[0]["candidates"])
    for x in c["candidates"]:
        k = x["kernels"]["plain"]
        assert (out / f"{k['uri']}.so").exists() and key_from_spec(k["key"]).uri == k["uri"]
        assert x["runnable"] and k["status"] == "ok"
        assert (k["registers"] is not None) == (find_nvcc() is not None)
    assert "built 6 kernels" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["tune", "--build", "d", "--out", "t.json"], r"--out: goes with --run"),
    (["tune", "--run", "d"], r"--run: give --out"),
    (["tune", "--build", "d", "--classes", "d128-float16-g2-plain"], r"--classes"),
    (["tune", "--build", "d", "--jobs", "0"], r"--jobs: must be a positive integer, got 0"),
    (["tune", "--build", "d", "--family", "cuda_merge"], r"--family: 'cuda_merge'"),
    (["tune", "--run", "missing-dir", "--out", "t.json"], r"candidates.json: not a candidates file"),
])
def test_tune_usage_errors(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_tune_run_needs_a_gpu(tmp_path, capsys):
    from conftest import has_cuda_gpu

    if has_cuda_gpu():
        pytest.skip("a CUDA GPU is here")
    (tmp_path / "candidates.json").write_text(json.dumps({"version": 1, "family": "cuda_decode",
                                                          "classes": [{"class": CLS}]}))
    assert cli_main(["tune", "--run", str(tmp_path), "--out", str(tmp_path / "t.json")]) == 2
    assert "--run: needs a CUDA GPU here" in capsys.readouterr().err


def test_progress_counts_steps_in_any_order():
    import io

    from tvm_attn.progress import Progress

    stream = io.StringIO()
    with Progress(["a", "b", "c"], stream=stream) as bar:
        bar.finish("c", "ok")
        bar.finish("a")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("1/3 c ok") and lines[1].endswith("2/3 a") and "done in" in lines[-1]
    with pytest.raises(ValueError, match="unknown step 'd'"):
        Progress(["a"], stream=stream).finish("d")
    assert np.isfinite(bar.seconds["c"])


def test_build_one_lists_spills_and_failures(tmp_path, monkeypatch):
    """A candidate ptxas spills (8 K/V rows at the 128-register bound) is listed as such, where nvcc
    is; one that fails to build is listed with the error, and the build goes on."""
    from tvm_attn.cache import KernelCache
    from tvm_attn.cuda_runtime import find_nvcc
    from tvm_attn.tuning import _build_one

    row = _build_one(str(tmp_path), decode_key(schedule="w4u4g4b4p").to_json())
    if find_nvcc() is None:
        assert row["status"] == "ok" and row["reason"] == "ptxas not run (no nvcc here)"
    else:
        assert row["status"] == "spills" and row["spill_bytes"] > 0 and row["registers"] == 128
        assert re.fullmatch(r"ptxas spills \d+ bytes \(128 registers\)", row["reason"])

    def fail(self, key, force=False):
        raise RuntimeError("nvcc failed: out of resources")

    monkeypatch.setattr(KernelCache, "build", fail)
    row = _build_one(str(tmp_path), decode_key(schedule="w4u4g4b4").to_json())
    assert row == {"uri": decode_key(schedule="w4u4g4b4").uri, "status": "failed",
                   "reason": "RuntimeError: nvcc failed: out of resources"}


def test_manifest_keeps_a_spilling_default_as_the_baseline():
    from tvm_attn.tuning import _manifest

    (c,) = plan_build(small=True)
    default, other = list(c["candidates"])[:2]
    rows = {f"{c['class']} {s} plain": {"uri": keys["plain"].uri, "status": "ok"}
            for s, keys in c["candidates"].items()}
    for s in (default, other):
        rows[f"{c['class']} {s} plain"].update(status="spills", reason="ptxas spills 8 bytes")
    m = _manifest([c], rows, "cuda_decode", "sm_90a", True, 1.0)
    runnable = {x["schedule"]: x["runnable"] for x in m["classes"][0]["candidates"]}
    assert runnable[default] and not runnable[other] and sum(runnable.values()) == len(runnable) - 1
    assert [s["schedule"] for s in m["skipped"]] == [default, other]
    assert m["skipped"][1]["reasons"] == ["plain: ptxas spills 8 bytes"]
    json.dumps(m)  # what candidates.json holds

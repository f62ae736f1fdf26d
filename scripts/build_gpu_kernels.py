"""Build, on this (compiler) machine, every CUDA kernel the GPU host needs: the gpu test tier's and
the benchmarks', plus TVM's built-in decode and prefill kernels as baselines. Also records each
kernel's ptxas report (spills) and SASS (LDG.E.128 / LDGSTS, LDSM, HMMA, local memory) when
nvcc/cuobjdump are here.

Usage: python scripts/build_gpu_kernels.py [--out .kernels] [--arch sm_90a] [--gpu "NVIDIA H200"] [--small]
Writes: <out>/*.so + cubin/ (precompiled), <out>/tvm_builtin_{decode,prefill}.so, <out>/read_ceiling.so
(the decode benchmark's streaming read), <out>/models/ (the GPU tier's tiny models), <out>/kernel_report.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sass_counts(cubin: bytes) -> dict | None:
    exe = shutil.which("cuobjdump")
    if exe is None:
        return None
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([exe, "--dump-sass", f.name], capture_output=True, text=True).stdout
    ops = ["LDG.E.128", "LDGSTS", "LDSM", "SHFL.BFLY", "MUFU.EX2", "LDL", "STL", "HMMA"]
    return {op: len(re.findall(r"\b" + re.escape(op) + r"\b", text)) for op in ops}


def build_builtin(out: Path, arch: str) -> None:
    """TVM's own TIR decode kernel (the in-tree baseline), 32/8 heads, head_dim 128, fp16, page 16."""
    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode

    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    mods = {}
    for hq, hkv in [(32, 8), (32, 32)]:
        f = _attention_decode(hkv, hq, 128, "float16", False, {}, target, page_size=16)
        mods[f"builtin_decode_h{hq}x{hkv}"] = f.with_attr("global_symbol", f"builtin_decode_h{hq}x{hkv}")
    ex = tvm.compile(tvm.IRModule(mods), target=target)
    ex.export_library(str(out / "tvm_builtin_decode.so"))
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill, _attention_prefill_ragged

    from tvm_attn.build import cuda_source
    from tvm_attn.cuda_runtime import precompile

    precompile(cuda_source(ex), arch, out / "cubin")
    prefill = {
        "builtin_prefill_paged_h32x8": _attention_prefill(8, 32, 128, "float16", False, {}, target,
                                                          page_size=16),
        "builtin_prefill_ragged_h32x8": _attention_prefill_ragged(8, 32, 128, 128, "float16", {}, target),
    }
    ex = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in prefill.items()}),
                     target=target)
    ex.export_library(str(out / "tvm_builtin_prefill.so"))
    precompile(cuda_source(ex), arch, out / "cubin")


def build_read_ceiling(out: Path, arch: str) -> None:
    """The decode benchmark's streaming read (tvm_attn.tir.stream), one function per build."""
    import tvm

    from tvm_attn.build import cuda_source
    from tvm_attn.cuda_runtime import precompile
    from tvm_attn.benchmark import READ_CONFIGS, read_sum_name
    from tvm_attn.tir.stream import make_read_sum

    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    ex = tvm.compile(tvm.IRModule({read_sum_name(t, u): make_read_sum(t, u) for t, u in READ_CONFIGS}),
                     target=target)
    ex.export_library(str(out / "read_ceiling.so"))
    precompile(cuda_source(ex), arch, out / "cubin")


#: tests/gpu/test_kv_cache_cuda.py's and test_kv_cache_graphs.py's models: the cache sends decode to
#: the decode slot at GQA group 2 and to the paged-prefill slot at group 4
GPU_TEST_MODELS = {"tiny_g2": {},
                   "tiny_g4": {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2}}


def build_models(out: Path, arch: str) -> None:
    """The tiny Llama model in float16 with tvm_attn's KV cache, for the GPU tier."""
    from tvm_attn.models.build import build_model

    for name, overrides in GPU_TEST_MODELS.items():
        build_model("tiny", f"cuda:{arch}", out / "models" / f"{name}.so", seed=3, dtype="float16",
                    progress=False, **overrides)


def merge_keys(target: str) -> list:
    """The CUDA merge kernels (tests/gpu/test_merge_cuda.py, scripts/bench_merge.py): every op and dtype."""
    from tvm_attn.config import MergeKey
    from tvm_attn.tir.merge_cuda import DTYPES

    return [MergeKey(op, dtype, target) for op in ("merge_state", "merge_state_in_place", "merge_states")
            for dtype in DTYPES]


def snippet_keys(target: str) -> list:
    """Prefill kernels that tests other than the prefill cases run, as the wrappers schedule them: the
    README's "CUDA prefill" block (2 requests of 7 and 13 queries at group 4: the 64-row tile), and
    tests/gpu/test_prefill_cuda.py's run-time causal flag, planned window and batch-invariance tests
    on both prefill families."""
    import tvm_attn as ta
    from tvm_attn.api._common import flashinfer_variant
    from tvm_attn.config import AttentionKey
    from tvm_attn.registry import scheduled
    from tvm_attn.variants import RuntimeCausal

    def key(kv, variant, packed, family=None):
        return scheduled(AttentionKey("prefill", kv, 32, 8, 128, variant=variant, target=target), packed,
                         family=family)

    keys = [key(ta.PagedKV(16, "NHD"), ta.Causal(), 40)]
    window = flashinfer_variant(ta.SlidingWindow(100), causal=True)
    for variant, packed in ((RuntimeCausal(), 511), (window, 523), (ta.Causal(), 256), (ta.Causal(), 393)):
        for family in (None, "cuda_prefill_fa2"):
            keys.append(key(ta.RaggedKV("NHD"), variant, packed, family))
    return keys


def fuzz_keys(target: str) -> list:
    """The kernels of the fuzz test's CUDA subset (``python tests/test_fuzz.py --device cuda``: 4/2
    heads, head_dim 64, page 4), from the fuzz module's own list of them."""
    sys.path.insert(0, str(ROOT / "tests"))  # the fuzz module imports its helpers from there
    from tests.test_fuzz import cuda_kernel_keys

    return cuda_kernel_keys(target)


def gpu_keys(target: str, small: bool = False) -> tuple[list, list]:
    """The kernel keys the GPU tier and the benchmarks need, and the decode case of each (None for
    the others): every decode case, the benchmarks' decode keys, the ring schedules, every prefill
    key of the tier and the benchmarks, the merge kernels, and the fuzz test's CUDA kernels."""
    from tests.gpu import prefill_cases
    from tests.gpu.cases import CASES, RING_SCHEDULES, key_of

    cases = CASES[:2] if small else CASES
    keys = [key_of(c, target) for c in cases]
    # bench_decode's MHA row; bench_e2e's decode-attention split (TVM's KV cache pages are HND)
    bench = [key_of({**CASES[0], "heads": (32, 32)}, target), key_of({**CASES[0], "layout": "HND"}, target)]
    # the cp.async ring schedules the GPU tier checks (no default picks them)
    bench += [key_of({**CASES[0], "heads": h, "schedule": s}, target) for h, s in RING_SCHEDULES.items()]
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_prefill", ROOT / "scripts" / "bench_prefill.py")
    bench_prefill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_prefill)
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "scripts" / "bench_decode.py")
    bench_decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_decode)
    prefill = {k.uri: k for k in prefill_cases.build_keys(target) + bench_prefill.kernel_keys(target)
               + bench_decode.prefill_kernel_keys(target) + snippet_keys(target)}
    prefill = list(prefill.values())
    if small:
        prefill = prefill[:1]
    merge = merge_keys(target)[:1] if small else merge_keys(target)
    have = {k.uri for k in keys + bench + prefill}
    fuzz = [] if small else [k for k in fuzz_keys(target) if k.uri not in have]
    extra = bench + prefill + merge + fuzz
    return keys + extra, cases + [None] * len(extra)


def main(small: bool = False, out: str | None = None, arch: str = "sm_90a", gpu: str | None = None
         ) -> list[dict]:
    from tests.gpu.cases import case_id
    from tvm_attn.build import compile_key, cuda_source
    from tvm_attn.cache import KernelCache
    from tvm_attn.cuda_runtime import find_nvcc, nvcc_compile, ptxas_summary, spill_bytes
    from tvm_attn.schedule.tuned import GPU_ENV

    if gpu is not None:
        # every key list below (the GPU tier's, the benchmarks') asks the registry, which reads the
        # GPU from here: the kernels get the schedules a wrapper on that GPU picks
        os.environ[GPU_ENV] = gpu
    target = f"cuda:{arch}"
    out_dir = Path(out) if out else ROOT / ".kernels"
    keys, cases = gpu_keys(target, small)
    cache = KernelCache(out_dir) if not small else None
    rows = []
    for c, key in zip(cases, keys):
        t0 = time.perf_counter()
        if small:  # generate + compile only; no files
            ex = compile_key(key)
            src = cuda_source(ex)
        else:
            cache.build(key)
            src = None
        row = {"case": case_id(c) if c else getattr(key, "kind", key.uri), "uri": key.uri,
               "build_s": round(time.perf_counter() - t0, 2)}
        if find_nvcc() and (small or True):
            src = src or cuda_source(compile_key(key))
            cubin, log = nvcc_compile(src, arch)
            row["ptxas"] = ptxas_summary(log)
            row["sass"] = sass_counts(cubin)
        rows.append(row)
        spills = spill_bytes(row.get("ptxas", []))
        regs = [r["registers"] for r in row.get("ptxas", []) if "registers" in r]
        print(f"{row['case']:<40} build {row['build_s']:6.2f}s  regs {regs}  spills {spills}  "
              f"sass {row.get('sass')}")
    if not small:
        build_builtin(out_dir, arch)
        build_read_ceiling(out_dir, arch)
        build_models(out_dir, arch)
        (out_dir / "kernel_report.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--small", action="store_true")
    p.add_argument("--gpu", help="the GPU the kernels are for, e.g. 'NVIDIA H200': its tuned decode "
                                 "schedules (tvm_attn.schedule.tuned; the same as TVM_ATTN_GPU=...)")
    a = p.parse_args()
    main(a.small, a.out, a.arch, a.gpu)

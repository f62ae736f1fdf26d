"""CPU benchmark: tvm_attn's CPU kernels against a plain numpy implementation on the same inputs.

Workloads (32 query / 8 KV heads, head_dim 128, in float16, bfloat16 and float32): one causal
1024-token prefill (``single_prefill_with_kv_cache``), batch decode of 16 requests of 1024 keys over
a paged cache (page 16, shuffled pages), and the demo's shapes (``tvm-attn demo``: a causal paged
prefill of prompts 1, 37, 128 and 260, then a decode step of those four requests).

The baseline is numpy (BLAS matmuls, a float32 softmax, the paged cache gathered per request),
timed from the same inputs in their own dtype, so both sides pay for widening to float32. FLOP
rates count the visible (query, key) pairs for both (numpy computes the whole causal square). The
ceiling is numpy's float32 GEMM rate (compute-bound rows: prefill) or its streaming-read rate
(decode rows) measured in the same run. A row is written only for a result that matched numpy.

Usage:
    python scripts/bench_cpu.py --out bench/results/cpu-x86.json    # about a minute and a half
    python scripts/bench_cpu.py --quick                              # smaller shapes, one repetition
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tvm_attn.benchmark import result_header  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPES = ("float16", "bfloat16", "float32")
#: |o - o_numpy| <= TOL * (1 + |o_numpy|): the output's rounding to its dtype (tests/conftest.py)
TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
DEMO_PROMPTS = (1, 37, 128, 260)


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def numpy_attention(q, k, v, causal: bool):
    """One request: q ``[n, Hq, D]``, k/v ``[m, Hkv, D]`` -> float32 ``[n, Hq, D]``."""
    n, m = q.shape[0], k.shape[0]
    q4 = q.astype(np.float32).reshape(n, HKV, HQ // HKV, D)
    kf, vf = k.astype(np.float32), v.astype(np.float32)
    s = np.einsum("nhgd,mhd->hgnm", q4, kf, optimize=True)
    s *= np.float32(1 / np.sqrt(D))
    if causal:
        s[..., np.arange(m)[None, :] > np.arange(n)[:, None] + (m - n)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return np.einsum("hgnm,mhd->nhgd", s, vf, optimize=True).reshape(n, HQ, D)


def numpy_paged(q, qo_indptr, cache, indptr, indices, lens, causal: bool):
    out = []
    for b, n in enumerate(lens):
        pages = indices[indptr[b]:indptr[b + 1]]
        k = cache[pages, 0].reshape(-1, HKV, D)[:n]
        v = cache[pages, 1].reshape(-1, HKV, D)[:n]
        out.append(numpy_attention(q[qo_indptr[b]:qo_indptr[b + 1]], k, v, causal))
    return np.concatenate(out)


def median_s(fn, reps: int, min_total_s: float = 0.5) -> float:
    """Median seconds of ``fn`` over at least ``reps`` calls, and more (up to 50) until
    ``min_total_s`` has passed: short calls need many samples on a shared machine."""
    fn()  # warm-up: compiles or loads the kernel, touches the inputs
    times = []
    while len(times) < reps or (sum(times) < min_total_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def paged_cache(rng, lens, dtype):
    pages = [-(-n // PAGE) for n in lens]
    num_pages = sum(pages) + 3
    cache = rng.standard_normal((num_pages, 2, PAGE, HKV, D)).astype(np.float32).astype(dtype)
    indices = rng.permutation(num_pages)[:sum(pages)].astype(np.int32)
    indptr = np.cumsum([0] + pages).astype(np.int32)
    last = np.asarray([n - (p - 1) * PAGE for n, p in zip(lens, pages)], np.int32)
    return cache, indptr, indices, last


def workloads(quick: bool):
    """(name, kind, prompt lengths or kv lengths) of each workload."""
    if quick:
        return [("prefill l128 causal", "single", [128]), ("decode b4 l128 p16", "decode", [128] * 4),
                ("demo prefill p16", "prefill", list(DEMO_PROMPTS))]
    return [
        ("prefill l1024 causal", "single", [1024]),
        ("decode b16 l1024 p16", "decode", [1024] * 16),
        ("demo prefill p16", "prefill", list(DEMO_PROMPTS)),
        ("demo decode p16", "decode", [n + 1 for n in DEMO_PROMPTS]),
    ]


def measure(name, kind, lens, dtype, reps: int, rng, min_total_s: float = 0.5):
    """(tvm_attn output, numpy output, tvm_attn s, numpy s, flops, kv bytes) of one workload. The
    kernels get TVM tensors made once, so their time holds no copy of the inputs."""
    import tvm

    import tvm_attn as ta

    dt = np_dtype(dtype)
    randn = lambda *shape: rng.standard_normal(shape).astype(np.float32).astype(dt)  # noqa: E731
    if kind == "single":
        n = lens[0]
        q, k, v = randn(n, HQ, D), randn(n, HKV, D), randn(n, HKV, D)
        tq, tk, tv = (tvm.runtime.tensor(x) for x in (q, k, v))
        run = lambda: ta.single_prefill_with_kv_cache(tq, tk, tv, causal=True)  # noqa: E731
        ref = lambda: numpy_attention(q, k, v, causal=True)  # noqa: E731
        pairs, kv_bytes = n * (n + 1) // 2, 2 * k.nbytes
    else:
        cache, indptr, indices, last = paged_cache(rng, lens, dt)
        q_lens = [1] * len(lens) if kind == "decode" else lens
        qo_indptr = np.cumsum([0] + q_lens).astype(np.int32)
        q = randn(int(qo_indptr[-1]), HQ, D)
        plan = (indptr, indices, last, HQ, HKV, D, PAGE)
        if kind == "decode":
            w = ta.BatchDecodeWithPagedKVCacheWrapper("NHD")
            w.plan(*plan, q_data_type=dtype)
        else:
            w = ta.BatchPrefillWithPagedKVCacheWrapper("NHD")
            w.plan(qo_indptr, *plan, causal=True, q_data_type=dtype)
        tq, tcache = tvm.runtime.tensor(q), tvm.runtime.tensor(cache)
        run = lambda: w.run(tq, tcache)  # noqa: E731
        causal = kind != "decode"
        ref = lambda: numpy_paged(q, qo_indptr, cache, indptr, indices, lens, causal)  # noqa: E731
        pairs = sum(m if kind == "decode" else m * (m + 1) // 2 for m in lens)
        kv_bytes = sum(2 * m * HKV * D * np.dtype(dt).itemsize for m in lens)
    t_ours, t_np = median_s(run, reps, min_total_s), median_s(ref, reps, min_total_s)
    return run().numpy(), ref(), t_ours, t_np, 4 * D * HQ * pairs, kv_bytes


def ceilings(quick: bool) -> dict:
    n = 512 if quick else 1024
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    gemm = 2 * n**3 / median_s(lambda: a @ a, 3) / 1e9
    big = np.ones(2**24 if quick else 2**26, np.float32)
    read = big.nbytes / median_s(lambda: big.sum(), 3) / 1e9
    return {"gemm_f32_GFLOPs_numpy": round(gemm, 1), "read_GBps_numpy": round(read, 2)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"CPU {platform.machine()} {model or platform.processor() or ''}, {os.cpu_count()} threads".strip()


def main(small: bool = False, argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and one repetition (CI)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, quick 1)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated data types")
    parser.add_argument("--out", default=None, help="result JSON (bench/results/cpu-<arch>.json)")
    args = parser.parse_args([] if small and argv is None else argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps: must be at least 1, got {args.reps}")
    quick = args.quick or small
    reps = args.reps or (1 if quick else 5)
    min_total = 0.1 if quick else 0.5
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: {d!r} is not one of {DTYPES}")
    rng = np.random.default_rng(0)
    ceil = ceilings(quick)
    rows, table = [], []
    for name, kind, lens in workloads(quick):
        for dtype in dtypes:
            o, ref, t_ours, t_np, flops, kv_bytes = measure(name, kind, lens, dtype, reps, rng, min_total)
            err = np.abs(o.astype(np.float32) - ref)
            if not np.all(err <= TOL[dtype] * (1 + np.abs(ref))):
                raise AssertionError(f"{name} {dtype}: tvm_attn differs from numpy by {err.max():.3e}")
            workload = f"{name} h{HQ}/{HKV} d{D} {dtype}"
            bound = "read" if kind == "decode" else "gemm"
            for kernel, t in (("tvm_attn", t_ours), ("numpy", t_np)):
                gflops, gbps = flops / t / 1e9, kv_bytes / t / 1e9
                ceiling = ceil["read_GBps_numpy"] if bound == "read" else ceil["gemm_f32_GFLOPs_numpy"]
                rows.append({"workload": workload, "kernel": kernel, "median_us": round(t * 1e6, 1),
                             "TBps": round(gbps / 1e3, 5), "TFLOPs": round(gflops / 1e3, 5),
                             "pct_of_ceiling": round(100 * (gbps if bound == "read" else gflops) / ceiling,
                                                     1)})
            table.append((name, dtype, t_ours, t_np, float(err.max())))
    print(f"{'workload':24} {'dtype':9} {'tvm_attn ms':>12} {'numpy ms':>10} {'numpy/tvm_attn':>15} "
          f"{'max err':>9}")
    for name, dtype, t_ours, t_np, err in table:
        print(f"{name:24} {dtype:9} {t_ours * 1e3:12.1f} {t_np * 1e3:10.1f} {t_np / t_ours:15.2f} {err:9.1e}")
    print(f"ceilings: {ceil}")
    if args.out:
        import json

        command = " ".join(["python scripts/bench_cpu.py", *(sys.argv[1:] if argv is None else argv)])
        result = {**result_header(cpu_name(), command, ROOT), "ceilings": ceil, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main(argv=sys.argv[1:])

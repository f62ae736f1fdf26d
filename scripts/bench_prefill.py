"""Prefill / append benchmark on a GPU host: our tensor-core kernels against the compute ceiling and
the baselines, in one run.

Measures: the dense fp16 GEMM rate (torch.matmul, the ceiling); tvm_attn's prefill (kernel + merge,
with the plan it uses); torch SDPA with the flash and the cuDNN backends (K/V repeated to the query
heads; append uses the bottom-right causal mask); TVM's built-in ``_attention_prefill`` (paged) and
``_attention_prefill_ragged``, built by scripts/build_gpu_kernels.py. TFLOP/s count ``4 * head_dim *
query heads`` per visible (query, key) pair, so causal counts about half. A row is written only for a
kernel whose output matched the numpy reference (the last 64 query rows of the first request) in
this run.

Usage (GPU host, after `source .gpu/setup.sh`):
    TVM_ATTN_CACHE_DIR=.kernels python scripts/bench_prefill.py --out bench/results/prefill-h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REQUIRES = "gpu"

from tvm_attn.benchmark import bar_plot, result_header, time_torch, time_tvm, write_result  # noqa: E402


def zipf_lengths(n=16, mean=1024, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.zipf(1.5, n).astype(np.float64)
    return np.clip(np.round(z / z.mean() * mean), 16, 16384).astype(int).tolist()


def workloads(small: bool = False):
    """(name, requests [(qo, kv)], hq, hkv, d, causal, kv format, page size)."""
    out = []
    for L in (1024, 4096, 8192, 16384):
        for causal in (True, False):
            out.append((f"b{16384 // L} l{L}", [(L, L)] * (16384 // L), 32, 8, 128, causal, "ragged", 0))
    out += [
        ("b4 l4096 mha", [(4096, 4096)] * 4, 32, 32, 128, True, "ragged", 0),
        ("b4 l4096 d64", [(4096, 4096)] * 4, 32, 8, 64, True, "ragged", 0),
        ("b4 l4096 d256", [(4096, 4096)] * 4, 32, 8, 256, True, "ragged", 0),
        ("append 128 onto 4096 b16", [(128, 4096 + 128)] * 16, 32, 8, 128, True, "paged", 16),
        ("append 512 onto 4096 b16", [(512, 4096 + 512)] * 16, 32, 8, 128, True, "paged", 16),
        ("zipf b16 mean1024", [(n, n) for n in zipf_lengths()], 32, 8, 128, True, "ragged", 0),
        ("b4 l4096 paged p16", [(4096, 4096)] * 4, 32, 8, 128, True, "paged", 16),
        ("b4 l4096 paged p1", [(4096, 4096)] * 4, 32, 8, 128, True, "paged", 1),
    ]
    return out[:2] if small else out


def kernel_keys(target: str = "cuda:sm_90a", small: bool = False) -> list:
    """The prefill kernels this benchmark runs (built ahead by scripts/build_gpu_kernels.py)."""
    import tvm_attn as ta
    from tvm_attn.config import AttentionKey
    from tvm_attn.api.prefill import BACKENDS
    from tvm_attn.registry import scheduled
    from tvm_attn.variants import AttentionVariant

    keys = {}
    for _, reqs, hq, hkv, d, causal, fmt, page in workloads(small):
        kv = ta.PagedKV(page, "NHD") if fmt == "paged" else ta.RaggedKV("NHD")
        packed = int(np.mean([q for q, _ in reqs]) * (hq // hkv))
        v = ta.Causal() if causal else AttentionVariant()
        for backend in BENCH_BACKENDS:
            k = scheduled(AttentionKey("prefill", kv, hq, hkv, d, "float16", "float16", v, target), packed,
                          family=BACKENDS[backend])
            keys[k.uri] = k
            if backend == "auto":
                for schedule in _pinned_schedules(k.schedule, d, fmt):
                    pinned = dataclasses.replace(k, schedule=schedule)
                    keys[pinned.uri] = pinned
    return list(keys.values())


#: the Hopper consumer loops timed side by side on the dense head_dim-128 workloads, as
#: ``tvm_attn_sm90_<schedule>`` (serial or overlapped GEMMs, with or without the ping-pong; 128- or
#: 176-key stages; a ring of 3 stages, which fits shared memory at head_dim 128)
HOPPER_LOOPS = ("wsq128k128s2", "wsq128k128s2p", "wsq128k128s2o", "wsq128k128s2po", "wsq128k176s2o",
                "wsq128k176s2po", "wsq128k128s3o")


def _pinned_schedules(schedule: str, head_dim: int, fmt: str) -> tuple:
    """The Hopper schedules timed beside the registry's choice ``schedule``: where it chose the
    128-key kernel at head_dim 128 over ragged KV, its other loops; over pages, the other producer
    (gather or TMA boxes, where both address the pages) and a ring of 3 stages."""
    if schedule.startswith("wsq128k128") and head_dim == 128 and fmt == "ragged":
        return HOPPER_LOOPS
    if not (schedule.startswith("wsq") and fmt == "paged"):
        return ()
    three = schedule.replace("s2", "s3") if head_dim == 128 else None
    out = (three,) if schedule.endswith("g") else (three, schedule + "g", three and three + "g")
    return tuple(s for s in out if s and s != schedule)


#: the wrapper backends timed: the registry's choice ("tvm_attn") and the FA2-class kernel
#: ("tvm_attn_fa2", when the choice is another family)
BENCH_BACKENDS = ("auto", "fa2")


def run_ours(workload, kname, backend, reqs, hq, hkv, d, causal, fmt, page, q_t, k_t, v_t, q_d, rows0, ref_o,
             flops, add, matches, rows, dev, schedule=None):
    """Time tvm_attn's wrapper with ``backend`` (kernel + merge, with the plan it makes; its schedule
    pinned to ``schedule`` if given); a row only if its output matched, and for a non-auto backend only
    if it planned another kernel than auto."""
    import torch
    import tvm

    import tvm_attn as ta
    from tvm_attn.api.prefill import pin_schedule

    qo_lens, kv_lens = [q for q, _ in reqs], [k for _, k in reqs]
    qo_indptr = np.cumsum([0] + qo_lens).astype(np.int32)
    kv_indptr = np.cumsum([0] + kv_lens).astype(np.int32)
    if fmt == "paged":
        pages = [(n + page - 1) // page for n in kv_lens]
        p_indptr = np.cumsum([0] + pages).astype(np.int32)
        perm = torch.randperm(int(p_indptr[-1]), device="cuda")
        cache_t = torch.empty(int(p_indptr[-1]), 2, page, hkv, d, dtype=torch.float16, device="cuda")
        for bi, n in enumerate(kv_lens):  # scatter each request's rows into its (permuted) pages
            ids = perm[p_indptr[bi]: p_indptr[bi + 1]]
            padded = torch.zeros(pages[bi] * page, 2, hkv, d, dtype=torch.float16, device="cuda")
            kv_rows = slice(kv_indptr[bi], kv_indptr[bi + 1])
            padded[:n, 0], padded[:n, 1] = k_t[kv_rows], v_t[kv_rows]
            cache_t[ids] = padded.view(pages[bi], page, 2, hkv, d).transpose(1, 2)
        indices = perm.int().cpu().numpy()
        last = np.array([n - (p - 1) * page for n, p in zip(kv_lens, pages)], np.int32)
        w = ta.BatchPrefillWithPagedKVCacheWrapper("NHD", device="cuda", backend=backend)
        if schedule is not None:
            pin_schedule(w, schedule)
        w.plan(qo_indptr, p_indptr, indices, last, hq, hkv, d, page, causal=causal)
        data = [("paged_kv_cache", tvm.runtime.from_dlpack(cache_t))]
    else:
        w = ta.BatchPrefillWithRaggedKVCacheWrapper("NHD", device="cuda", backend=backend)
        if schedule is not None:
            pin_schedule(w, schedule)
        w.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=causal)
        data = [("k", tvm.runtime.from_dlpack(k_t)), ("v", tvm.runtime.from_dlpack(v_t))]
    inputs = {"data": data, **({"cache_t": cache_t, "p_indptr": p_indptr, "indices": indices, "last": last}
                               if fmt == "paged" else {})}
    if backend != "auto" and any(r["workload"] == workload and r.get("schedule") == w.kernel_key.schedule
                                 for r in rows):
        return inputs
    o = w.run(q_d, *[x for _, x in data])
    if matches(f"{workload} {kname}", o.numpy()[rows0], ref_o):
        main_args, merge_args, _, _ = w._call.launch_args(q_d, data, {})
        mod = w._cache.module(w.kernel_key)
        ms = time_tvm(mod, w.kernel_key.uri, dev, main_args, number=5, repeat=7)
        if merge_args is not None and w._call.merge_fn is not None:
            ms += time_tvm(mod, w.kernel_key.uri + "_merge", dev, merge_args, number=5, repeat=7)
        add(workload, kname, ms, flops)
        rows[-1]["schedule"] = w.kernel_key.schedule
    return inputs


def visible_pairs(reqs, causal: bool) -> int:
    total = 0
    for qo, kv in reqs:
        if not causal:
            total += qo * kv
        else:
            i = np.arange(qo)
            total += int(np.clip(i + kv - qo + 1, 0, kv).sum())
    return total


def main(small: bool = False, out: str | None = None) -> list[dict]:
    import torch
    import tvm

    import tvm_attn as ta
    from tvm_attn import reference as R
    from tvm_attn.cache import KernelNotBuiltError
    from tvm_attn.cuda_runtime import ensure_cuda

    cache_dir = Path(os.environ.get("TVM_ATTN_CACHE_DIR", ROOT / ".kernels"))
    ensure_cuda(cache_dir / "cubin")
    dev = tvm.cuda(0)
    device_name = torch.cuda.get_device_name(0)
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    ceilings = {"gemm_fp16_TFLOPs": 2 * 8192**3 / (time_torch(torch, lambda: a @ b, 20) * 1e-3) / 1e12}
    a = b = None  # free the two GEMM operands
    ceiling = ceilings["gemm_fp16_TFLOPs"]
    builtin_path = cache_dir / "tvm_builtin_prefill.so"
    builtin = tvm.runtime.load_module(str(builtin_path)) if builtin_path.exists() else None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    rows, notes = [], []

    def add(workload, kernel, ms, flops):
        tf = flops / (ms * 1e-3) / 1e12
        rows.append({"workload": workload, "kernel": kernel, "median_us": round(ms * 1e3, 1), "TBps": None,
                     "TFLOPs": round(tf, 1), "pct_of_ceiling": round(100 * tf / ceiling, 1)})
        print(f"  {kernel:<22} {ms * 1e3:10.1f} us {tf:7.1f} TFLOP/s", flush=True)

    def matches(what, got, ref, tol=2e-2):
        err = float(np.abs(np.asarray(got, np.float32) - ref).max())
        if not err <= tol:
            notes.append(f"{what}: max |err| {err:.3e} vs reference, row dropped")
            print("  MISMATCH", what, err, flush=True)
        return err <= tol

    torch.manual_seed(0)
    for name, reqs, hq, hkv, d, causal, fmt, page in workloads(small):
        workload = f"prefill {name} h{hq}/{hkv} d{d} {'causal' if causal else 'full'} fp16"
        print(workload, flush=True)
        flops = 4 * d * hq * visible_pairs(reqs, causal)
        qo_lens, kv_lens = [q for q, _ in reqs], [k for _, k in reqs]
        qo_indptr = np.cumsum([0] + qo_lens).astype(np.int32)
        kv_indptr = np.cumsum([0] + kv_lens).astype(np.int32)
        q_t = torch.randn(int(qo_indptr[-1]), hq, d, dtype=torch.float16, device="cuda")
        k_t = torch.randn(int(kv_indptr[-1]), hkv, d, dtype=torch.float16, device="cuda")
        v_t = torch.randn_like(k_t)
        # the reference: the last 64 query rows of request 0 (bottom-right causal keeps them aligned)
        n0, m0 = qo_lens[0], kv_lens[0]
        rows0 = slice(max(n0 - 64, 0), n0)
        q0 = q_t[rows0].cpu().numpy()
        k0, v0 = k_t[:m0].cpu().numpy(), v_t[:m0].cpu().numpy()
        ref_o, _ = R.dense_attention(q0, k0, v0, variant=ta.Causal() if causal else None)
        q_d = tvm.runtime.from_dlpack(q_t)
        inputs = None

        case = (reqs, hq, hkv, d, causal, fmt, page, q_t, k_t, v_t, q_d, rows0, ref_o, flops, add, matches,
                rows, dev)

        def ours(kname, backend, schedule=None, case=case, workload=workload):
            """run_ours, or a note when the kernel was not built (a partial kernel directory)."""
            try:
                return run_ours(workload, kname, backend, *case, schedule=schedule)
            except KernelNotBuiltError as e:
                notes.append(f"{workload} {kname}: not built ({str(e).split(' is not')[0]})")
                print("  NOT BUILT", kname, flush=True)
                return None

        for backend in BENCH_BACKENDS:
            kname = "tvm_attn" if backend == "auto" else f"tvm_attn_{backend}"
            inputs = ours(kname, backend) or inputs
            chosen = rows[-1].get("schedule", "") if rows and rows[-1]["workload"] == workload else ""
            if backend == "auto":
                for schedule in _pinned_schedules(chosen, d, fmt):
                    ours(f"tvm_attn_sm90_{schedule}", "fa3", schedule)
        if inputs is None:
            continue
        data = inputs["data"]
        if fmt == "paged":
            cache_t, p_indptr, indices, last = (inputs[n] for n in ("cache_t", "p_indptr", "indices", "last"))

        # torch SDPA: per-request calls when lengths differ (summed), one batched call otherwise
        rep = hq // hkv
        uniform = len(set(reqs)) == 1
        groups = [list(range(len(reqs)))] if uniform else [[i] for i in range(len(reqs))]
        calls = []
        for g in groups:
            qo, kv = reqs[g[0]]
            qb = torch.stack([q_t[qo_indptr[i]: qo_indptr[i + 1]] for i in g]).transpose(1, 2)
            kb = torch.stack([k_t[kv_indptr[i]: kv_indptr[i + 1]] for i in g])
            kb = kb.repeat_interleave(rep, 2).transpose(1, 2)
            vb = torch.stack([v_t[kv_indptr[i]: kv_indptr[i + 1]] for i in g])
            vb = vb.repeat_interleave(rep, 2).transpose(1, 2)
            mask = causal_lower_right(qo, kv) if causal and qo != kv else None
            calls.append((qb, kb, vb, mask, causal and qo == kv))
        for backend, kname in ((SDPBackend.FLASH_ATTENTION, "torch_sdpa_flash"),
                               (SDPBackend.CUDNN_ATTENTION, "torch_sdpa_cudnn")):
            def run_all(backend=backend):
                outs = []
                with sdpa_kernel([backend]):
                    for qb, kb, vb, mask, is_causal in calls:
                        outs.append(torch.nn.functional.scaled_dot_product_attention(
                            qb, kb, vb, attn_mask=mask, is_causal=is_causal))
                return outs
            try:
                outs = run_all()
            except RuntimeError as e:
                notes.append(f"{workload} {kname}: {str(e).splitlines()[0][:160]}")
                continue
            got = outs[0][0].transpose(0, 1)[rows0].float().cpu().numpy()
            if matches(f"{workload} {kname}", got, ref_o):
                add(workload, kname, time_torch(torch, run_all), flops)
            del outs

        # TVM's built-in TIR prefill (32/8 heads, head_dim 128 only): paged (HND pages) or ragged
        if builtin is not None and (hq, hkv, d) == (32, 8, 128) and (fmt == "ragged" or page == 16):
            o_b = tvm.runtime.empty((int(qo_indptr[-1]), hq, d), "float16", dev)
            lse_b = tvm.runtime.empty((int(qo_indptr[-1]), hq), "float32", dev)
            zq = tvm.runtime.tensor(np.zeros(int(qo_indptr[-1]), np.int32), dev)
            zb = tvm.runtime.tensor(np.zeros(len(reqs), np.int32), dev)
            qi = tvm.runtime.tensor(qo_indptr, dev)
            sm = 1.0 / np.sqrt(d)
            if fmt == "ragged":
                fname = "builtin_prefill_ragged_h32x8"
                args = [q_d, qi, data[0][1], data[1][1], tvm.runtime.tensor(kv_indptr, dev), zq, zb, o_b,
                        lse_b, int(causal), 0, 1.0, 1e4, sm]
            else:
                fname = "builtin_prefill_paged_h32x8"
                pages_hnd = tvm.runtime.from_dlpack(cache_t.transpose(2, 3).contiguous())
                args = [q_d, qi, pages_hnd, tvm.runtime.tensor(p_indptr, dev),
                        tvm.runtime.tensor(indices, dev),
                        tvm.runtime.tensor(last, dev), zb, zq, o_b, lse_b, int(causal), 0, 1.0, 1e4, sm]
            builtin[fname](*args)
            if matches(f"{workload} tvm_builtin_tir", o_b.numpy()[rows0], ref_o):
                add(workload, "tvm_builtin_tir", time_tvm(builtin, fname, dev, args, number=1, repeat=3),
                    flops)
        del q_t, k_t, v_t, data, inputs
        torch.cuda.empty_cache()

    result = {**result_header(device_name,
                              "TVM_ATTN_CACHE_DIR=.kernels python scripts/bench_prefill.py --out "
                              + (out or "-"), ROOT),
              "ceilings": ceilings, "rows": rows, "notes": notes}
    print(f"device {device_name}; dense fp16 GEMM {ceiling:.0f} TFLOP/s")
    for n in notes:
        print("note:", n)
    if out:
        write_result(out, result, plot)
    return rows


def plot(result, path):
    bar_plot(result, path, value=lambda r: r["TFLOPs"],
             label=lambda w: w.replace("prefill ", "").replace(" fp16", ""),
             ylabel="TFLOP/s (causal counts visible pairs)", figsize=(15, 5.5), rotation=30, ha="right",
             fontsize=7, title=f"Prefill, {result['device']} "
                               f"(dense fp16 GEMM {result['ceilings']['gemm_fp16_TFLOPs']:.0f} TFLOP/s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    main(a.small, a.out)

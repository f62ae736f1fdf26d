"""Paged-decode benchmark on a GPU host: our CUDA kernel against the read ceiling and the baselines.

Measures in one run: the streaming-read ceiling (the fastest of a large read-only torch reduction
and the TIR streaming reads of tvm_attn.tir.stream, over 4 GB) and the device copy rate; tvm_attn's
decode (one kernel, which also merges the requests it cuts, with the plan it uses); TVM's built-in
``_attention_decode`` (built by scripts/build_gpu_kernels.py with the same workflow); torch SDPA
over contiguous KV where torch is present; and, at 32/8 heads, the tensor-core prefill kernel run
on the decode step (a query token per request, the group folded into 4 query rows of a 16-row
tile), to check whether large GQA groups should decode through it. The variants run at 64 x 2048;
the sliding window (4096 keys, given to ``plan``) also at 1 x 32768, where its row counts the bytes
of the keys the window shows. Plan time is measured at batch 1, 64 and 256.
Rows are written only for kernels whose output matched the reference in this run.

Usage (GPU host, after `source .gpu/setup.sh`):
    TVM_ATTN_CACHE_DIR=.kernels python scripts/bench_decode.py --out bench/results/decode-h100.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REQUIRES = "gpu"

from tvm_attn.benchmark import (  # noqa: E402
    READ_CONFIGS, bar_plot, page_table, read_sum_name, result_header, time_torch, time_tvm, write_result,
    zipf_lengths,
)

HQ, HKV, D, PAGE = 32, 8, 128, 16
#: the sliding window of the window rows (planned for: the kernel reads only the keys it shows)
WINDOW = 4096


def workloads(small: bool):
    zipf = zipf_lengths(64, 2048)
    out = [
        ("b64 l2048", [2048] * 64, HQ, HKV),
        ("b16 l8192", [8192] * 16, HQ, HKV),
        ("b128 l1024", [1024] * 128, HQ, HKV),
        ("b1 l32768", [32768], HQ, HKV),
        (f"b64 zipf mean{int(np.mean(zipf))}", zipf, HQ, HKV),
        ("b64 l2048 mha", [2048] * 64, 32, 32),
        # FlashInfer-shaped steps at 2 GiB of KV, where launch and tail costs weigh least
        ("b256 l2048", [2048] * 256, HQ, HKV),
        ("b32 l16384", [16384] * 32, HQ, HKV),
    ]
    return out[:1] if small else out


def prefill_kernel_keys(target: str = "cuda:sm_90a") -> list:
    """The tensor-core prefill kernel run on decode steps (one query token per request, the GQA group
    folded into query rows), which this benchmark compares with the decode kernel at 32/8 heads
    (built ahead by scripts/build_gpu_kernels.py)."""
    import tvm_attn as ta
    from tvm_attn.config import AttentionKey
    from tvm_attn.schedule.prefill import prefill_schedule
    from tvm_attn.variants import AttentionVariant

    return [AttentionKey("prefill", ta.PagedKV(PAGE, "NHD"), HQ, HKV, D, "float16", "float16",
                         AttentionVariant(), target, prefill_schedule(D, HQ // HKV))]


def kv_bytes(lens, hkv):
    return int(sum(lens)) * hkv * D * 2 * 2


def read_ceilings(tvm, dev, torch, cache_dir: Path, small: bool) -> dict:
    """The streaming-read ceiling: the fastest of torch's sum and the TIR reads of
    ``read_ceiling.so`` (tvm_attn.tir.stream) over the same 4 GB, each checked against torch's sum;
    ``read_TBps`` is the fastest, and each one's rate is kept beside it. Also the device copy rate."""
    ceilings, reads = {}, {}
    n = 2 * 1024**3 if not small else 2**26
    if torch is not None:
        x = torch.empty(n, dtype=torch.float16, device="cuda").uniform_()
        y = torch.empty_like(x)
        reads["torch_sum"] = n * 2 / (time_torch(torch, lambda: x.sum(), 10) * 1e-3) / 1e12
        ceilings["copy_TBps_rw"] = n * 4 / (time_torch(torch, lambda: y.copy_(x), 10) * 1e-3) / 1e12
        del y
        x_d = tvm.runtime.from_dlpack(x.view(-1, 8))
        want = float(x.sum(dtype=torch.float64))
    else:
        x_np = np.random.default_rng(0).random((n // 8, 8), dtype=np.float32).astype(np.float16)
        x_d = tvm.runtime.tensor(x_np, dev)
        want = float(x_d.numpy().astype(np.float64).sum())
    path = cache_dir / "read_ceiling.so"
    if path.exists():
        mod = tvm.runtime.load_module(str(path))
        for threads, unroll in READ_CONFIGS:
            name = read_sum_name(threads, unroll)
            out = tvm.runtime.empty((dev.multi_processor_count * (2048 // threads), threads), "float32", dev)
            mod[name](x_d, out)
            got = float(out.numpy().astype(np.float64).sum())
            if abs(got - want) > 1e-3 * abs(want):
                print(f"note: {name} summed {got}, expected {want}; not a ceiling")
                continue
            reads[name] = n * 2 / (time_tvm(mod, name, dev, [x_d, out], number=5, repeat=10) * 1e-3) / 1e12
    if reads:
        ceilings["read_TBps"] = max(reads.values())
        ceilings.update({f"read_TBps_{k}": v for k, v in reads.items()})
    return ceilings


def main(small: bool = False, out: str | None = None) -> list[dict]:
    import tvm

    from tvm_attn.planner import PLAN_DECODE, DecodePlanParams

    import tvm_attn as ta
    from tvm_attn import reference as R
    from tvm_attn.cuda_runtime import ensure_cuda

    cache_dir = Path(os.environ.get("TVM_ATTN_CACHE_DIR", ROOT / ".kernels"))
    ensure_cuda(cache_dir / "cubin")
    dev = tvm.cuda(0)
    rng = np.random.default_rng(1)
    try:
        import torch
    except ImportError:
        torch = None
    device_name = torch.cuda.get_device_name(0) if torch else dev.device_name
    ceilings = read_ceilings(tvm, dev, torch, cache_dir, small)
    read_ceiling = ceilings.get("read_TBps")
    builtin_so = cache_dir / "tvm_builtin_decode.so"
    builtin = tvm.runtime.load_module(str(builtin_so)) if builtin_so.exists() else None

    rows, notes = [], []

    def add(workload, kernel, ms, nbytes):
        tbps = nbytes / (ms * 1e-3) / 1e12
        rows.append({"workload": workload, "kernel": kernel, "median_us": round(ms * 1e3, 2),
                     "TBps": round(tbps, 3), "TFLOPs": None,
                     "pct_of_ceiling": round(100 * tbps / read_ceiling, 1) if read_ceiling else None})

    # the window is given at plan time, so the plan splits only the keys inside it
    window = ("/window", ta.SlidingWindow(WINDOW), {})
    variants = [("", None, {}), ("/rope", ta.RoPE(), {}), window, ("/softcap", ta.LogitsSoftCap(), {}),
                ("/alibi", ta.ALiBi(), {})]
    variants_of = {"b64 l2048": variants, "b1 l32768": [variants[0], window]}
    for wname, lens, hq, hkv in workloads(small):
        workload = f"decode {wname} h{hq}/{hkv} d{D} p{PAGE} fp16"
        indptr, indices, last = page_table(lens, PAGE, rng)
        num_pages = int(indptr[-1])
        shape = (num_pages, 2, PAGE, hkv, D)
        if torch is not None:  # random data made on the GPU: GBs of it
            cache_t = torch.randn(shape, dtype=torch.float16, device="cuda")
            cache_d = tvm.runtime.from_dlpack(cache_t)
        else:
            cache_t = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
            cache_d = tvm.runtime.tensor(cache_t, dev)
        q = rng.standard_normal((len(lens), hq, D)).astype(np.float16)
        q_d = tvm.runtime.tensor(q, dev)
        nbytes = kv_bytes(lens, hkv)
        check_rows = min(len(lens), 4)  # reference on the first requests' pages only
        sub = indices[: indptr[check_rows]]
        sub_cache = (cache_t[torch.from_numpy(sub).long().cuda()].cpu().numpy() if torch is not None
                     else cache_t[sub])
        ref_o, _ = R.paged_attention(q[:check_rows], None, sub_cache, indptr[: check_rows + 1],
                                     np.arange(sub.size, dtype=np.int32), last[:check_rows])
        for suffix, variant, vargs in variants_of.get(wname, variants[:1]):
            w = ta.BatchDecodeWithPagedKVCacheWrapper("NHD", device="cuda")
            w.plan(indptr, indices, last, hq, hkv, D, PAGE, variant=variant)
            o = w.run(q_d, cache_d, **vargs).numpy()
            if variant is None or suffix == "/window":
                want = ref_o if variant is None else R.paged_attention(
                    q[:check_rows], None, sub_cache, indptr[: check_rows + 1],
                    np.arange(sub.size, dtype=np.int32), last[:check_rows], variant=variant)[0]
                err = float(np.abs(o[:check_rows].astype(np.float32) - want).max())
                if err > 2e-3:
                    notes.append(f"{workload}: tvm_attn{suffix} mismatch {err:.3e}, row dropped")
                    continue
            main_args, _, _, _ = w._call.launch_args(q_d, [("paged_kv_cache", cache_d)], vargs)
            mod = w._cache.module(w.kernel_key)
            ms = time_tvm(mod, w.kernel_key.uri, dev, main_args, number=20, repeat=15)
            # the window's rows count the bytes of the keys it shows (the ones the kernel has to read)
            add(workload, "tvm_attn" + suffix, ms,
                kv_bytes([min(n, WINDOW + 1) for n in lens], hkv) if suffix == "/window" else nbytes)
        if hkv == HKV and hq == HQ:  # decode through the prefill kernel (issue: large GQA groups)
            w = ta.BatchPrefillWithPagedKVCacheWrapper("NHD", device="cuda")
            w.plan(np.arange(len(lens) + 1, dtype=np.int32), indptr, indices, last, hq, hkv, D, PAGE)
            o = w.run(q_d, cache_d).numpy()
            err = float(np.abs(o[:check_rows].astype(np.float32) - ref_o).max())
            if err <= 2e-3:
                main_args, merge_args, _, _ = w._call.launch_args(q_d, [("paged_kv_cache", cache_d)], {})
                mod = w._cache.module(w.kernel_key)
                ms = time_tvm(mod, w.kernel_key.uri, dev, main_args, number=20, repeat=15)
                if merge_args is not None:
                    ms += time_tvm(mod, w.kernel_key.uri + "_merge", dev, merge_args, number=20, repeat=15)
                add(workload, "tvm_attn_prefill_kernel", ms, nbytes)
            else:
                notes.append(f"{workload}: prefill kernel on decode mismatch {err:.3e}, row dropped")
        if builtin is not None and hkv in (8, 32):
            name = f"builtin_decode_h{hq}x{hkv}"
            if torch is not None:
                hnd_t = cache_t.transpose(2, 3).contiguous()
                pages_hnd = tvm.runtime.from_dlpack(hnd_t)
            else:
                pages_hnd = tvm.runtime.tensor(np.ascontiguousarray(cache_t.transpose(0, 1, 3, 2, 4)), dev)
            zeros = tvm.runtime.tensor(np.zeros(len(lens), np.int32), dev)
            o_b = tvm.runtime.empty((len(lens), hq, D), "float16", dev)
            lse_b = tvm.runtime.empty((len(lens), hq), "float32", dev)
            args = [q_d, pages_hnd, tvm.runtime.tensor(indptr, dev), tvm.runtime.tensor(indices, dev),
                    tvm.runtime.tensor(last, dev), zeros, zeros, o_b, lse_b, 0, 1.0, 1e4, 1.0 / np.sqrt(D)]
            builtin[name](*args)
            err = float(np.abs(o_b.numpy()[:check_rows].astype(np.float32) - ref_o).max())
            if err <= 2e-3:
                add(workload, "tvm_builtin_tir", time_tvm(builtin, name, dev, args, number=5, repeat=7),
                    nbytes)
            else:
                notes.append(f"{workload}: tvm builtin mismatch {err:.3e}")
            del pages_hnd
            hnd_t = None
        if torch is not None and len(set(lens)) == 1:
            L = lens[0]
            qt = torch.from_numpy(q).cuda().unsqueeze(2)
            k = torch.randn(len(lens), hkv, L, D, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            f = lambda: torch.nn.functional.scaled_dot_product_attention(qt, k, v, enable_gqa=hkv != hq)  # noqa: E731
            add(workload, "torch_sdpa_contiguous", time_torch(torch, f, 20), nbytes)
            del k, v
        del cache_d, cache_t

    plan_times = {}
    for b in (1, 64, 256):
        lens = [2048] * b
        indptr, indices, last = page_table(lens, PAGE, rng)
        w = ta.BatchDecodeWithPagedKVCacheWrapper("NHD", device="cuda", max_batch_size=256)
        w.plan(indptr, indices, last, HQ, HKV, D, PAGE)
        # the compiled decode plan alone (page-table check, staging and planner in one host call)
        plan_fn = w._cache.module(w.kernel_key)[PLAN_DECODE]
        bufs = w._dev_plan.buffers
        scalars = DecodePlanParams(num_ctas=bufs.ws.num_ctas, page_size=PAGE, allow_split=1, pad_batch=b,
                                   pad_pages=-1).args()
        ts, tp = [], []
        for _ in range(200):
            t0 = time.perf_counter()
            w.plan(indptr, indices, last, HQ, HKV, D, PAGE)
            ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plan_fn(indptr, indices, last, *bufs._decode_args, *scalars)
            tp.append(time.perf_counter() - t0)
        plan_times[f"batch{b}"] = {"wrapper_plan_us": round(float(np.median(ts)) * 1e6, 1),
                                   "compiled_plan_us": round(float(np.median(tp)) * 1e6, 1)}

    result = {**result_header(device_name, "TVM_ATTN_CACHE_DIR=.kernels python scripts/bench_decode.py --out "
                              + (out or "-"), ROOT),
              "ceilings": ceilings, "rows": rows, "plan_time": plan_times, "notes": notes}
    print(f"device {device_name}; ceilings " + ", ".join(f"{k} {v:.2f}" for k, v in ceilings.items()))
    print(f"{'workload':<44}{'kernel':<24}{'us':>9}{'TB/s':>7}{'%ceil':>7}")
    for r in rows:
        print(f"{r['workload']:<44}{r['kernel']:<24}{r['median_us']:>9.1f}{r['TBps']:>7.2f}"
              f"{(r['pct_of_ceiling'] or 0):>7.1f}")
    print("plan time:", plan_times)
    for n in notes:
        print("note:", n)
    if out:
        write_result(out, result, plot)
    return rows


def plot(result, path):
    bar_plot(result, path, value=lambda r: r["TBps"], kernels=lambda k: "/" not in k,
             label=lambda w: w.replace("decode ", "").replace(" d128 p16 fp16", ""),
             ylabel="TB/s of K+V read",
             title=f"Paged decode, {result['device']}",
             hline=(result["ceilings"].get("read_TBps"), "read ceiling"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    main(a.small, a.out)

"""State-merge benchmark on a GPU host: the CUDA merge kernels against the memory ceiling and torch.

The merges are pure streaming (each state's v read once, the merged v written once), so the
ceiling is the device copy rate, measured in the same run on the same number of bytes scale
(bench_decode's ``read_ceilings``: torch's ``copy_`` over 4 GB, read + write, and the streaming read
alone). Each workload is checked against the numpy reference on its first rows before it is timed
(rows whose output does not match are dropped and noted); then tvm_attn's kernel (TVM's time
evaluator on the prebuilt kernel) and, where torch is present, the same merge written in torch
(max, exp2, weighted sum in float32: several kernels and float32 temporaries) are timed. Bytes moved:
every input read once and every output written once (v and the LSEs).

Only kernels built ahead of time are used (scripts/build_gpu_kernels.py puts them in
``$TVM_ATTN_CACHE_DIR``, default ``.kernels``), so it runs with TVM's runtime alone.

Usage (GPU host): python scripts/bench_merge.py --out bench/results/merge-h200.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REQUIRES = "gpu"

from tvm_attn.benchmark import bar_plot, result_header, time_torch, time_tvm, write_result  # noqa: E402

#: the tests' tolerance rule (tests/conftest.py): |v - ref| <= TOL * (1 + |ref|), LSE to 1e-3
TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
CHECK_ROWS = 64
HEADS, HEAD_DIM = 32, 128


def workloads(small: bool) -> list[tuple]:
    """(op, dtype, rows, states): 8 states of 16k rows (a cascade's depths or split-KV pieces), the
    two-state merges over 64k rows (1.5 GB moved in fp16), and other state counts and dtypes."""
    if small:
        return [("merge_states", "float16", 256, 4), ("merge_state", "float16", 256, 2),
                ("merge_state_in_place", "float16", 256, 2)]
    return [
        ("merge_states", "float16", 16384, 8), ("merge_states", "bfloat16", 16384, 8),
        ("merge_states", "float32", 16384, 8), ("merge_states", "float16", 16384, 2),
        ("merge_states", "float16", 4096, 32),
        ("merge_state", "float16", 65536, 2), ("merge_state", "bfloat16", 65536, 2),
        ("merge_state", "float32", 32768, 2), ("merge_state_in_place", "float16", 65536, 2),
        ("merge_state_in_place", "float32", 32768, 2),
    ]


def moved_bytes(op: str, dtype: str, n: int, k: int) -> int:
    es = 4 if dtype == "float32" else 2
    per_state = n * HEADS * (HEAD_DIM * es + 4)  # v and the LSE of one state
    return (k + 1) * per_state  # read every state, write the merged one (in place too)


def _bench_decode():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "scripts" / "bench_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _states(op, torch, tvm, dev, dtype, n, k, rng):
    """Random states ``v (n, k, H, D)``, ``s (n, k, H)`` on the device (a tenth of the LSEs -inf:
    empty states): (the kernel's input tensors, host copies of the first CHECK_ROWS rows, the torch
    tensors or None). The two-state ops get each state in tensors of its own, as a caller has them."""
    shape = (n, k, HEADS, HEAD_DIM)
    if torch is not None:
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        v = torch.randn(shape, device="cuda", dtype=torch.float32).to(tdt)
        s = torch.randn(shape[:3], device="cuda") * 4
        s[torch.rand(shape[:3], device="cuda") < 0.1] = float("-inf")
        host = (v[:CHECK_ROWS].float().cpu().numpy(), s[:CHECK_ROWS].cpu().numpy())
        tensors = (v, s) if op == "merge_states" else (v[:, 0].contiguous(), s[:, 0].contiguous(),
                                                      v[:, 1].contiguous(), s[:, 1].contiguous())
        return [tvm.runtime.from_dlpack(t) for t in tensors], host, tensors
    from tvm_attn.dtypes import to_numpy_dtype

    v = rng.standard_normal(shape, dtype=np.float32).astype(to_numpy_dtype(dtype))
    s = (rng.standard_normal(shape[:3]) * 4).astype(np.float32)
    s[rng.random(shape[:3]) < 0.1] = -np.inf
    host = (v[:CHECK_ROWS].astype(np.float32), s[:CHECK_ROWS])
    arrays = (v, s) if op == "merge_states" else (v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays], host, None


def _torch_merge(torch, *states):
    """The reference's math in torch: ``(v, s)`` with ``v (n, k, H, D)``, ``s (n, k, H)`` (log2 LSE),
    or two states ``(v_a, s_a, v_b, s_b)``."""
    if len(states) == 2:
        v, s = states
        m = s.amax(dim=1)
        safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        w = torch.exp2(s - safe[:, None])
        denom = w.sum(dim=1)
        acc = (w[..., None] * v.float()).sum(dim=1)
    else:
        va, sa, vb, sb = states
        m = torch.maximum(sa, sb)
        safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        wa, wb = torch.exp2(sa - safe), torch.exp2(sb - safe)
        denom = wa + wb
        acc = wa[..., None] * va.float() + wb[..., None] * vb.float()
    seen = denom > 0
    out = acc / torch.where(seen, denom, torch.ones_like(denom))[..., None]
    lse = torch.where(seen, safe + torch.log2(denom), torch.full_like(denom, float("-inf")))
    return out.to(states[0].dtype), lse


def _kernel_args(op, tvm, dev, inputs):
    """The kernel's arguments: the inputs, then the outputs (none in place)."""
    if op == "merge_state_in_place":
        return list(inputs)
    v = inputs[0]
    n, H, D = int(v.shape[0]), int(v.shape[-2]), int(v.shape[-1])
    return [*inputs, tvm.runtime.empty((n, H, D), v.dtype, dev), tvm.runtime.empty((n, H), "float32", dev)]


def _check(op, got_v, got_s, host, dtype) -> float | None:
    """The worst excess over the tolerance rule on the first rows (None: within it)."""
    from tvm_attn import reference as R

    v, s = host
    if op == "merge_states":
        ref_v, ref_s = R.merge_states(v, s)
    else:
        ref_v, ref_s = R.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1])
    got_v = np.asarray(got_v, np.float32)[:CHECK_ROWS]
    got_s = np.asarray(got_s, np.float32)[:CHECK_ROWS]
    excess = float((np.abs(got_v - ref_v) - TOL[dtype] * (1 + np.abs(ref_v))).max())
    if not np.array_equal(np.isneginf(got_s), np.isneginf(ref_s)):
        return float("inf")
    fin = np.isfinite(ref_s)
    lse_err = float(np.abs(got_s[fin] - ref_s[fin]).max()) if fin.any() else 0.0
    return None if excess <= 0 and lse_err <= 1e-3 else max(excess, lse_err)


def main(small: bool = False, out: str | None = None) -> list[dict]:
    import tvm

    from tvm_attn.cache import KernelCache
    from tvm_attn.config import MergeKey
    from tvm_attn.cuda_runtime import device_arch, ensure_cuda

    cache_dir = Path(os.environ.get("TVM_ATTN_CACHE_DIR", ROOT / ".kernels"))
    ensure_cuda(cache_dir / "cubin")
    dev = tvm.cuda(0)
    if not dev.exist:
        raise RuntimeError("bench_merge: no CUDA device here")
    cache = KernelCache(cache_dir)
    target = f"cuda:{device_arch(0)}"
    try:
        import torch
    except ImportError:
        torch = None
    device_name = torch.cuda.get_device_name(0) if torch else dev.device_name
    rng = np.random.default_rng(0)
    ceilings = _bench_decode().read_ceilings(tvm, dev, torch, cache_dir, small)
    copy_ceiling = ceilings.get("copy_TBps_rw")
    rows, notes = [], []

    def add(workload, kernel, ms, nbytes):
        tbps = nbytes / (ms * 1e-3) / 1e12
        rows.append({"workload": workload, "kernel": kernel, "median_us": round(ms * 1e3, 2),
                     "TBps": round(tbps, 3),
                     "pct_of_copy": round(100 * tbps / copy_ceiling, 1) if copy_ceiling else None})

    for op, dtype, n, k in workloads(small):
        workload = f"{op} {k}x{n}x{HEADS}x{HEAD_DIM} {dtype}"
        inputs, host, torch_states = _states(op, torch, tvm, dev, dtype, n, k, rng)
        key = MergeKey(op, dtype, target)
        mod = cache.module(key)
        args = _kernel_args(op, tvm, dev, inputs)
        mod[key.uri](*args)
        got = (args[-2], args[-1]) if op != "merge_state_in_place" else (args[0], args[1])
        bad = _check(op, got[0].numpy(), got[1].numpy(), host, dtype)
        nbytes = moved_bytes(op, dtype, n, k)
        if bad is not None:
            notes.append(f"{workload}: tvm_attn exceeds the tolerance by {bad:.3e}, row dropped")
        else:
            add(workload, "tvm_attn", time_tvm(mod, key.uri, dev, args, number=20, repeat=10), nbytes)
        if torch is not None and op != "merge_state_in_place":
            t_v, t_s = _torch_merge(torch, *torch_states)
            bad = _check(op, t_v.float().cpu().numpy(), t_s.cpu().numpy(), host, dtype)
            if bad is None:
                ms = time_torch(torch, lambda ts=torch_states: _torch_merge(torch, *ts), 10)
                add(workload, "torch", ms, nbytes)
            else:
                notes.append(f"{workload}: torch exceeds the tolerance by {bad:.3e}, row dropped")
        del inputs, torch_states, args

    result = {**result_header(device_name, "python scripts/bench_merge.py --out " + (out or "-"), ROOT),
              "ceilings": ceilings, "rows": rows, "notes": notes}
    print(f"device {device_name}; ceilings " + ", ".join(f"{k} {v:.2f}" for k, v in ceilings.items()))
    print(f"{'workload':<48}{'kernel':<12}{'us':>10}{'TB/s':>8}{'%copy':>7}")
    for r in rows:
        pct = r["pct_of_copy"] or 0
        print(f"{r['workload']:<48}{r['kernel']:<12}{r['median_us']:>10.1f}{r['TBps']:>8.2f}{pct:>7.1f}")
    for note in notes:
        print("note:", note)
    if out:
        write_result(out, result, plot)
    return rows


def plot(result, path):
    bar_plot(result, path, value=lambda r: r["TBps"], label=lambda w: w.replace(f"x{HEADS}x{HEAD_DIM}", ""),
             ylabel="TB/s moved (inputs read + outputs written)", title=f"State merge, {result['device']}",
             hline=(result["ceilings"].get("copy_TBps_rw"), "device copy (read + write)"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    try:
        main(a.small, a.out)
    except RuntimeError as e:  # no GPU, no CUDA runtime, or a kernel not built ahead of time
        sys.exit(f"bench_merge: {e}")

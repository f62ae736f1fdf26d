"""End-to-end benchmark: the Llama-3.1-8B-shaped model (random fp16 weights) with tvm_attn's KV cache
(AttnPagedKVCache) against the same model with TVM's built-in TIRPagedKVCache, in one run.

Measures decode inter-token latency (one decode step of every sequence) at batch 1, 16 and 64 with
context 1k and 4k, and time-to-first-token of a 2k-token prompt (batch_prefill, last-token logits).
Two steps, because the GPU host has TVM's runtime only:

    python scripts/bench_e2e.py --build e2e/ --target cuda:sm_90a          # here: compile both models + cubins
    python scripts/bench_e2e.py --run e2e/ --out bench/results/e2e-h100.json   # GPU host (writes a PNG too)

Each model runs in its own process (its KV cache for 64 x 4k tokens takes 34 GB), with the same
weights. Correctness first: before timing, both models prefill the same prompt and decode a step;
rows are written only when their logits agree (fp16 tolerance). The JSON's ``kv_cache_slots`` says
which KV-cache slots hold tvm_attn kernels: on CUDA this version fills none (every attention slot is
TVM's kernel, see tvm_attn/relax/kv_cache.py), so the two rows measure the same kernels until the
CUDA slots land.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REQUIRES = "gpu"

from tvm_attn.benchmark import bar_plot, result_header, write_result  # noqa: E402

MODELS = {"tvm_attn": "tvm_attn", "tvm_builtin": "tvm_builtin_tir"}  # kv_cache -> the row's kernel name
BATCHES, CONTEXTS, TTFT_PROMPT = (1, 16, 64), (1024, 4096), 2048


def build(directory: Path, target: str, config: str = "llama3-8b", **overrides) -> None:
    """Compile both models (and their cubins) into ``directory``; needs TVM's compiler."""
    from tvm_attn.models.build import build_model

    directory.mkdir(parents=True, exist_ok=True)
    for kv_cache in MODELS:
        print(f"building {config} with the {kv_cache} KV cache for {target}")
        build_model(config, target, directory / f"{kv_cache}.so", kv_cache=kv_cache, seed=0, **overrides)


def fast_random_weights(meta: dict, device) -> list:
    """Random fp16 weights at the scale of a trained model, made quickly: windows of one random pool.
    Deterministic, so both model processes get the same weights."""
    import tvm

    from tvm_attn.models.runtime import config_from_json

    cfg = config_from_json(meta["config"])
    shapes = cfg.param_shapes()
    pool = np.random.default_rng(0).standard_normal(1 << 24).astype(cfg.dtype)
    rng = np.random.default_rng(1)
    out = []
    for name in meta["param_names"]:
        shape = shapes[name]
        n = int(np.prod(shape))
        reps = -(-n // pool.size)
        flat = np.concatenate([np.roll(pool, int(rng.integers(pool.size))) for _ in range(reps)])[:n]
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * flat
        elif "embed_tokens" in name:
            w = flat
        else:
            w = flat / np.sqrt(shape[1])
        out.append(tvm.runtime.tensor(w.astype(cfg.dtype).reshape(shape), device))
    return out


def run_one(library: Path, small: bool) -> dict:
    """Measure one model (called in its own process); returns its timings and check logits."""
    import tvm

    from tvm_attn.models.runtime import ModelSession

    meta = json.loads(library.with_suffix(".json").read_text())
    device = "cuda" if meta["target"].startswith("cuda") else "cpu"
    if device == "cuda":
        from tvm_attn.cuda_runtime import ensure_cuda

        ensure_cuda(library.parent / "cubin")
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu()
    batches, contexts, prompt = ((1, 2), (64,), 48) if small else (BATCHES, CONTEXTS, TTFT_PROMPT)
    weights = fast_random_weights(meta, dev)
    capacity = max(batches) * max(contexts) + 1024
    s = ModelSession(library, device, weights=weights, max_batch_size=max(batches),
                     max_total_seq_len=capacity, prefill_chunk_size=max(8192, prompt))
    vocab = meta["config"]["vocab_size"]
    rng = np.random.default_rng(0)
    next_id = iter(range(1 << 30))

    # correctness probe: one prompt, one decode step
    probe = int(next(next_id))
    s.add_sequence(probe)
    check_prompt = rng.integers(0, vocab, 64 if not small else 16).tolist()
    check = [s.forward([probe], [check_prompt], last_only=True)[0][0]]
    check.append(s.forward([probe], [[int(check_prompt[0])]])[0][0])
    s.remove_sequence(probe)

    def timed(fn, repeat: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        dev.sync()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            dev.sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    result = {"ttft_us": None, "itl_us": {}}
    tokens = rng.integers(0, vocab, prompt).tolist()

    def ttft_once():
        sid = int(next(next_id))
        s.add_sequence(sid)
        s.forward([sid], [tokens], last_only=True, fetch=False)
        s.remove_sequence(sid)

    result["ttft_us"] = timed(ttft_once, 3 if small else 10) * 1e6
    for ctx in contexts:
        for b in batches:
            ids = [int(next(next_id)) for _ in range(b)]
            for sid in ids:
                s.add_sequence(sid)
            per_forward = max(1, 8192 // ctx)          # fill the context, a few sequences per forward
            for i in range(0, b, per_forward):
                group = ids[i : i + per_forward]
                s.forward(group, [rng.integers(0, vocab, ctx - 1).tolist() for _ in group], last_only=True,
                          fetch=False)
            step_tokens = [[int(t)] for t in rng.integers(0, vocab, b)]
            result["itl_us"][f"{b}x{ctx}"] = timed(lambda: s.forward(ids, step_tokens, fetch=False),
                                                   3 if small else 20) * 1e6
            for sid in ids:
                s.remove_sequence(sid)
    result["check"] = [c.astype(np.float32).tolist() for c in check]
    result["kv_cache_slots"] = meta["kv_cache_slots"]
    del s, weights
    gc.collect()
    return result


def run(directory: Path, out: str | None, small: bool) -> list[dict]:
    results = {}
    for kv_cache in MODELS:
        library = directory / f"{kv_cache}.so"
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", str(library), "--to", f.name]
            subprocess.run(cmd + (["--small"] if small else []), check=True)
            results[kv_cache] = json.loads(Path(f.name).read_text())
    ref = results["tvm_builtin"]["check"]
    mine = results["tvm_attn"]["check"]
    errs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(mine, ref)]
    scale = max(float(np.abs(np.asarray(r)).max()) for r in ref)
    matched = max(errs) <= 2e-2 * (1 + scale)
    meta = json.loads((directory / "tvm_attn.json").read_text())
    name = f"{meta['config_name']} {meta['config']['dtype']}"
    rows = []
    for kv_cache, kernel in MODELS.items():
        if kv_cache == "tvm_attn" and not matched:
            continue
        r = results[kv_cache]
        rows.append({"workload": f"ttft prompt{TTFT_PROMPT if not small else 48} b1 {name}", "kernel": kernel,
                     "median_us": round(r["ttft_us"], 1), "TBps": None, "TFLOPs": None, "pct_of_ceiling": None})
        for key, us in r["itl_us"].items():
            b, ctx = key.split("x")
            rows.append({"workload": f"decode itl b{b} ctx{ctx} {name}", "kernel": kernel, "median_us": round(us, 1),
                         "TBps": None, "TFLOPs": None, "pct_of_ceiling": None})
    device_name = _device_name(meta["target"])
    result = {
        **result_header(device_name, f"python scripts/bench_e2e.py --run {directory} --out {out or '-'}", ROOT),
        "ceilings": {},
        "rows": rows, "kv_cache_slots": {k: results[k]["kv_cache_slots"] for k in MODELS},
        "check": {"reference": "tvm_builtin_tir model, same weights", "max_abs_logit_diff": errs, "matched": matched},
        "notes": ["median_us is per decode step of the whole batch (inter-token latency) or per 2k prefill (TTFT), "
                  "host launch overhead included; weights random fp16"],
    }
    for row in rows:
        print(f"{row['workload']:<44}{row['kernel']:<20}{row['median_us']:>12.1f} us")
    print("logit check vs the built-in model:", "matched" if matched else "MISMATCH", errs)
    if out:
        write_result(out, result, plot)
    if not matched:
        raise SystemExit("tvm_attn's model disagrees with the built-in one; its rows were not written")
    return rows


def _device_name(target: str) -> str:
    import tvm

    return tvm.cuda(0).device_name if target.startswith("cuda") else "cpu"


def plot(result, path):
    bar_plot(result, path, value=lambda r: r["median_us"] / 1e3, label=lambda w: w.rsplit(" ", 2)[0],
             ylabel="ms (lower is better)", title=f"Llama-3.1-8B shape, end to end, {result['device']}",
             figsize=(11, 4.5))


def main(small: bool = False, argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", help="compile both models into this directory (compiler side)")
    p.add_argument("--target", default="cuda:sm_90a")
    p.add_argument("--run", help="measure the models in this directory (GPU host)")
    p.add_argument("--out", help="JSON result path, e.g. bench/results/e2e-h100.json")
    p.add_argument("--small", action="store_true", help="tiny model, tiny workloads (a smoke run)")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    p.add_argument("--to", help=argparse.SUPPRESS)
    a = p.parse_args([] if argv is None and small else argv)
    small = small or a.small
    if a.run_one:
        Path(a.to).write_text(json.dumps(run_one(Path(a.run_one), small)))
        return []
    if a.build:
        build(Path(a.build), a.target, *(("tiny",) if small else ()))
    if a.run:
        return run(Path(a.run), a.out, small)
    if not a.build:  # main(small=True) from the script tests: build and run the tiny models on this GPU
        with tempfile.TemporaryDirectory(prefix="tvm_attn_e2e_") as d:
            build(Path(d), a.target, "tiny")
            return run(Path(d), a.out, True)
    return []


if __name__ == "__main__":
    main()

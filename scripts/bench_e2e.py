"""End-to-end benchmark: the Llama-3.1-8B-shaped model (random fp16 weights) with tvm_attn's KV cache
(AttnPagedKVCache) against the same model with TVM's built-in TIRPagedKVCache, in one run.

Measures decode inter-token latency (one decode step of every sequence) at batch 1, 16 and 64 with
context 1k and 4k, and time-to-first-token of a 2k-token prompt (batch_prefill, last-token logits).
Two steps, because the GPU host has TVM's runtime only:

    python scripts/bench_e2e.py --build e2e/ --target cuda:sm_90a         # here: compile both models + cubins
    python scripts/bench_e2e.py --run e2e/ --out bench/results/e2e-h100.json  # GPU host (writes a PNG too)

For an sm_90a target a third model, ``tvm_attn_fa2``, is the same tvm_attn model built for sm_90:
the registry's Hopper prefill family needs sm_90a, so that cache's prefill slots hold the FA2-class
kernels. It times the time to first token only (its decode slot is the same kernel), the baseline
the Hopper prefill kernel's TTFT is measured against.

Each model runs in its own process (its KV cache for 64 x 4k tokens takes 34 GB), with the same
weights. Correctness first: before timing, both models prefill the same prompt and decode a step;
rows are written only when their logits agree (fp16 tolerance). The JSON's ``kv_cache_slots`` says
which KV-cache slots hold tvm_attn kernels: on CUDA the ragged prefill, paged prefill and decode
slots (tvm_attn/relax/kv_backend.py); the baseline's are TVM's TIR kernels.

Where the time goes at batch 64 / context 4k: the decode attention kernels alone (ours and TVM's,
from the kernel cache of scripts/build_gpu_kernels.py when it is there) at that shape, times the
layer count; the rest of the step is the model's GEMMs, norms, RoPE, page appends and host work.

The random weights of one layer are shared by every layer (each layer still streams its weights
from HBM: a layer's 436 MB does not fit in L2), which makes the two processes' setup fast.
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

#: library stem -> (its KV cache, the row's kernel name)
MODELS = {"tvm_attn": ("tvm_attn", "tvm_attn"), "tvm_builtin": ("tvm_builtin", "tvm_builtin_tir")}
#: the FA2-class baseline of an sm_90a build (see the module docstring): TTFT only
FA2_MODEL = "tvm_attn_fa2"
BATCHES, CONTEXTS, TTFT_PROMPT = (1, 16, 64), (1024, 4096), 2048


def build(directory: Path, target: str, config: str = "llama3-8b", **overrides) -> None:
    """Compile both models (and their cubins) into ``directory``; needs TVM's compiler. On CUDA the
    tiny model is built in float16 (tvm_attn's CUDA kernels run on tensor cores)."""
    from tvm_attn.models.build import build_model

    if target.startswith("cuda") and config == "tiny":
        overrides.setdefault("dtype", "float16")

    directory.mkdir(parents=True, exist_ok=True)
    models = {stem: (kv_cache, target) for stem, (kv_cache, _) in MODELS.items()}
    if target == "cuda:sm_90a":
        models[FA2_MODEL] = ("tvm_attn", "cuda:sm_90")
    for stem, (kv_cache, model_target) in models.items():
        print(f"building {config} with the {kv_cache} KV cache for {model_target} ({stem})")
        build_model(config, model_target, directory / f"{stem}.so", kv_cache=kv_cache, seed=0, **overrides)


def fast_random_weights(meta: dict, device) -> list:
    """Random fp16 weights at the scale of a trained model, made quickly: windows of one random pool,
    and one set of layer weights shared by all layers. Deterministic, so both model processes get
    the same weights."""
    import re

    import tvm

    from tvm_attn.models.runtime import config_from_json

    cfg = config_from_json(meta["config"])
    shapes = cfg.param_shapes()
    pool = np.random.default_rng(0).standard_normal(1 << 24).astype(np.float32)
    rng = np.random.default_rng(1)
    made: dict[str, object] = {}
    out = []
    for name in meta["param_names"]:
        shared = re.sub(r"layers\.\d+\.", "layers.*.", name)
        if shared not in made:
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
            made[shared] = tvm.runtime.tensor(w.astype(cfg.dtype).reshape(shape), device)
        out.append(made[shared])
    return out


def cache_plan_time(library: Path, meta: dict, dev) -> dict:
    """Microseconds of one decode-step plan through the cache's paged-prefill slot (the C++
    ``tvm_attn_kv_plan_paged`` in the model's library: the planner plus the copy of the work lists
    to the device), called from Python, at batch 1, 64 and 256 with 2048 keys per request."""
    import tvm

    c = meta["config"]
    hq, hkv, d, page = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["page_size"]
    plan = tvm.runtime.load_module(str(library)).get_function("tvm_attn_kv_plan_paged", query_imports=True)
    try:
        host = tvm.runtime.device("cuda_host", 0)
        pinned = tvm.runtime.empty((8 << 20,), "uint8", host)
    except Exception:  # noqa: BLE001 - no page-locked allocator: plain host memory
        host = tvm.cpu()
        pinned = tvm.runtime.empty((8 << 20,), "uint8", host)
    int_ws = tvm.runtime.empty((8 << 20,), "uint8", dev)
    float_ws = tvm.runtime.empty((64 << 20,), "uint8", dev)
    out = {}
    for b in (1, 64, 256):
        pages = 2048 // page
        qo = tvm.runtime.tensor(np.arange(b + 1, dtype=np.int32), tvm.cpu())
        ip = tvm.runtime.tensor(np.arange(b + 1, dtype=np.int32) * pages, tvm.cpu())
        kv_len = tvm.runtime.tensor(np.full(b, 2048, np.int32), tvm.cpu())
        args = (float_ws, int_ws, pinned, qo, ip, kv_len, b, b, hq, hkv, page, False, d, d, False, -1, -1,
                False, 0)
        plan(*args)
        ts = []
        for _ in range(200):
            t0 = time.perf_counter()
            plan(*args)
            ts.append(time.perf_counter() - t0)
        out[f"batch{b}"] = round(float(np.median(ts)) * 1e6, 1)
    dev.sync()
    return out


def attention_split(library: Path, batch: int, ctx: int) -> dict:
    """Per-step decode attention (all layers) at ``batch`` x ``ctx``: tvm_attn's decode kernel (the one
    the cache runs for a decode step) and TVM's built-in TIR decode, timed alone on random pages."""
    import os

    import tvm

    import tvm_attn as ta
    from tvm_attn.benchmark import time_tvm
    from tvm_attn.cuda_runtime import ensure_cuda

    meta = json.loads(library.with_suffix(".json").read_text())
    c = meta["config"]
    hq, hkv, d, page, layers = (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
                                c["page_size"], c["num_hidden_layers"])
    cache_dir = Path(os.environ.get("TVM_ATTN_CACHE_DIR", ROOT / ".kernels"))
    ensure_cuda(cache_dir / "cubin")
    dev = tvm.cuda(0)
    rng = np.random.default_rng(0)
    pages = -(-ctx // page)
    indptr = np.arange(batch + 1, dtype=np.int32) * pages
    indices = rng.permutation(batch * pages).astype(np.int32)
    last = np.full(batch, ctx - (pages - 1) * page, np.int32)
    q = tvm.runtime.tensor(rng.standard_normal((batch, hq, d)).astype("float16"), dev)
    cache = tvm.runtime.empty((batch * pages, 2, hkv, page, d), "float16", dev)  # HND, as the KV cache
    out = {}
    w = ta.BatchDecodeWithPagedKVCacheWrapper("HND", device="cuda")
    w.plan(indptr, indices, last, hq, hkv, d, page)
    main_args, merge_args, _, _ = w._call.launch_args(q, [("paged_kv_cache", cache)], {})
    mod = w._cache.module(w.kernel_key)
    ms = time_tvm(mod, w.kernel_key.uri, dev, main_args, number=10, repeat=10)
    if merge_args is not None and w._call.merge_fn is not None:
        ms += time_tvm(mod, w.kernel_key.uri + "_merge", dev, merge_args, number=10, repeat=10)
    out["tvm_attn"] = ms * 1e3 * layers
    builtin_path = cache_dir / "tvm_builtin_decode.so"
    name = f"builtin_decode_h{hq}x{hkv}"
    if builtin_path.exists():
        builtin = tvm.runtime.load_module(str(builtin_path))
        zeros = tvm.runtime.tensor(np.zeros(batch, np.int32), dev)
        args = [q, cache, tvm.runtime.tensor(indptr, dev), tvm.runtime.tensor(indices, dev),
                tvm.runtime.tensor(last, dev), zeros, zeros,
                tvm.runtime.empty((batch, hq, d), "float16", dev),
                tvm.runtime.empty((batch, hq), "float32", dev), 0, 1.0, 1e4, 1.0 / np.sqrt(d)]
        out["tvm_builtin"] = time_tvm(builtin, name, dev, args, number=3, repeat=5) * 1e3 * layers
    return out


def run_one(library: Path, small: bool, ttft_only: bool = False) -> dict:
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
    # every sequence's context plus the timed decode steps, each rounded up to whole pages, plus a prompt
    capacity = max(batches) * (max(contexts) + 64) + max(prompt, 1024)
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

    t_phase = time.perf_counter()
    result["ttft_us"] = timed(ttft_once, 3 if small else 10) * 1e6
    print(f"{library.name}: ttft {result['ttft_us'] / 1e3:.1f} ms ({time.perf_counter() - t_phase:.0f} s)",
          flush=True)
    repeat, warmup = (3, 2) if small else (20, 2)
    for ctx in () if ttft_only else contexts:
        # fill max(batches) sequences to ctx once; each batch size decodes the first b of them, and
        # popn takes the timed steps' tokens back off so every cell starts at the same context
        t_phase = time.perf_counter()
        ids = [int(next(next_id)) for _ in range(max(batches))]
        for sid in ids:
            s.add_sequence(sid)
        per_forward = max(1, 8192 // ctx)          # fill the context, a few sequences per forward
        for i in range(0, len(ids), per_forward):
            group = ids[i : i + per_forward]
            s.forward(group, [rng.integers(0, vocab, ctx - 1).tolist() for _ in group], last_only=True,
                      fetch=False)
        dev.sync()
        print(f"{library.name}: filled {len(ids)} x {ctx} ({time.perf_counter() - t_phase:.0f} s)",
              flush=True)
        for b in batches:
            step_tokens = [[int(t)] for t in rng.integers(0, vocab, b)]
            result["itl_us"][f"{b}x{ctx}"] = timed(lambda: s.forward(ids[:b], step_tokens, fetch=False),
                                                   repeat, warmup) * 1e6
            for sid in ids[:b]:
                s.popn(sid, repeat + warmup)
            print(f"{library.name}: itl b{b} ctx{ctx} {result['itl_us'][f'{b}x{ctx}'] / 1e3:.2f} ms",
                  flush=True)
        for sid in ids:
            s.remove_sequence(sid)
    if meta["kv_cache"] == "tvm_attn" and device == "cuda" and not ttft_only:
        result["cache_plan_us"] = cache_plan_time(library, meta, dev)
    result["check"] = [c.astype(np.float32).tolist() for c in check]
    result["kv_cache_slots"] = meta["kv_cache_slots"]
    # free the session's and the weights' device memory before returning
    s = weights = None
    gc.collect()
    return result


def run(directory: Path, out: str | None, small: bool) -> list[dict]:
    models = dict(MODELS)
    if (directory / f"{FA2_MODEL}.so").exists():
        models[FA2_MODEL] = ("tvm_attn", FA2_MODEL)
    results = {}
    for stem in models:
        library = directory / f"{stem}.so"
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", str(library), "--to", f.name]
            cmd += (["--small"] if small else []) + (["--ttft-only"] if stem == FA2_MODEL else [])
            subprocess.run(cmd, check=True)
            results[stem] = json.loads(Path(f.name).read_text())
    ref = results["tvm_builtin"]["check"]
    scale = max(float(np.abs(np.asarray(r)).max()) for r in ref)
    errs, matched = {}, {}
    for stem in models:
        if stem != "tvm_builtin":
            errs[stem] = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
                          for a, b in zip(results[stem]["check"], ref)]
            matched[stem] = max(errs[stem]) <= 2e-2 * (1 + scale)
    meta = json.loads((directory / "tvm_attn.json").read_text())
    name = f"{meta['config_name']} {meta['config']['dtype']}"
    rows = []
    for stem, (_, kernel) in models.items():
        if not matched.get(stem, True):
            continue
        r = results[stem]
        rows.append({"workload": f"ttft prompt{TTFT_PROMPT if not small else 48} b1 {name}", "kernel": kernel,
                     "median_us": round(r["ttft_us"], 1), "TBps": None, "TFLOPs": None,
                     "pct_of_ceiling": None})
        for key, us in r["itl_us"].items():
            b, ctx = key.split("x")
            rows.append({"workload": f"decode itl b{b} ctx{ctx} {name}", "kernel": kernel,
                         "median_us": round(us, 1), "TBps": None, "TFLOPs": None, "pct_of_ceiling": None})
    split_at = (max(BATCHES), max(CONTEXTS)) if not small else None
    split = {}
    if split_at and meta["target"].startswith("cuda"):
        attn = attention_split(directory / "tvm_attn.so", *split_at)
        for stem, (_, kernel) in MODELS.items():
            itl = results[stem]["itl_us"].get(f"{split_at[0]}x{split_at[1]}")
            if stem in attn and itl is not None:
                split[kernel] = {"itl_us": round(itl, 1), "attention_us": round(attn[stem], 1),
                                 "rest_us": round(itl - attn[stem], 1)}
                rows.append({"workload": f"decode attention only b{split_at[0]} ctx{split_at[1]} {name}",
                             "kernel": kernel, "median_us": round(attn[stem], 1), "TBps": None,
                             "TFLOPs": None, "pct_of_ceiling": None})
    device_name = _device_name(meta["target"])
    result = {
        **result_header(device_name, f"python scripts/bench_e2e.py --run {directory} --out {out or '-'}",
                        ROOT),
        "ceilings": {},
        "rows": rows, "kv_cache_slots": {k: results[k]["kv_cache_slots"] for k in models},
        "targets": {k: json.loads((directory / f"{k}.json").read_text())["target"] for k in models},
        "check": {"reference": "tvm_builtin_tir model, same weights", "max_abs_logit_diff": errs,
                  "matched": matched},
        "cache_plan_us": results["tvm_attn"].get("cache_plan_us"),
        "time_split": {"at": f"b{split_at[0]} ctx{split_at[1]}" if split_at else None, **split},
        "notes": ["median_us is per decode step of the whole batch (inter-token latency) or per 2k prefill "
                  "(TTFT), host launch overhead included; weights random fp16, one layer's weights shared by "
                  "all layers",
                  "decode attention only: the decode kernels alone at that shape on random pages, times the "
                  "layer count; time_split.rest_us = itl - attention (GEMMs, norms, RoPE, page appends, "
                  "host)"],
    }
    for row in rows:
        print(f"{row['workload']:<44}{row['kernel']:<20}{row['median_us']:>12.1f} us")
    for stem in errs:
        print(f"logit check of {stem} vs the built-in model:", "matched" if matched[stem] else "MISMATCH",
              errs[stem])
    if out:
        write_result(out, result, plot)
    wrong = [stem for stem, ok in matched.items() if not ok]
    if wrong:
        raise SystemExit(f"{', '.join(wrong)} disagree(s) with the built-in model; "
                         "those rows were not written")
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
    p.add_argument("--ttft-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args([] if argv is None and small else argv)
    small = small or a.small
    if a.run_one:
        Path(a.to).write_text(json.dumps(run_one(Path(a.run_one), small, a.ttft_only)))
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

"""Run a model built by `tvm-attn build-model`: add sequences, prefill, decode, fork (shared prefix).

Works with TVM's runtime alone (no compiler): it loads the library and drives TVM's runtime KV cache
through tvm_attn.models.runtime.ModelSession. With --check it compares every step's logits with the
numpy forward pass of what the model's metadata (model.json) says it is: config, attention variant and
weights (CPU-sized models only), and exits 1 if any step is off by more than the limit (--tol).

Usage:
    tvm-attn build-model --config tiny -o model.so                        # compiler side
    TVM_USE_RUNTIME_LIB=1 python scripts/run_model.py --model model.so --check
    python scripts/run_model.py --model llama8b.so --device cuda --prompt-lens 512,100,2000 --steps 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


#: --check's default limit: max |logits - numpy| <= TOL[dtype] * (1 + max |numpy|) (the numpy pass is float64)
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def run(model: Path, device: str, prompt_lens, steps: int, check: bool, seed: int = 0, params=None,
        tol: float | None = None) -> list[dict]:
    """Drive ``model``; each row of the result is one step. With ``check``, a row also holds
    ``max_abs_err`` against the numpy forward pass and ``bound``, its limit (``tol``, default by dtype,
    times ``1 + max |numpy|``). ``params``: a ``.params`` file to run instead of the recorded weights."""
    from tvm_attn.models.llama import numpy_forward
    from tvm_attn.models.runtime import (
        ModelSession,
        config_from_json,
        load_params,
        read_metadata,
        reference_config,
    )

    meta = read_metadata(model)
    # The reference comes from the metadata alone (config, variant, weight source), never from the
    # library: a library that computes something other than what its metadata says fails the check.
    cfg = reference_config(meta) if check else config_from_json(meta["config"])
    tol = TOL.get(cfg.dtype, 1e-2) if tol is None else tol
    session = ModelSession(model, device=device,
                           max_total_seq_len=max(4096, 2 * sum(prompt_lens) + 4 * steps),
                           weights=load_params(params, meta["param_names"]) if params else None)
    reference_weights = session.default_weights() if check else None
    rng = np.random.default_rng(seed)
    seqs = {i: rng.integers(0, cfg.vocab_size, n).tolist() for i, n in enumerate(prompt_lens)}
    rows = []

    def step(name, ids, new):
        start = time.perf_counter()
        out = session.forward(ids, new)
        seconds = time.perf_counter() - start
        row = {"step": name, "sequences": len(ids), "new_tokens": sum(map(len, new)),
               "ms": round(seconds * 1e3, 3)}
        err = scale = 0.0
        for i, n, logits in zip(ids, new, out):
            seqs[i] += n
            if check:
                ref = numpy_forward(cfg, reference_weights, seqs[i])[-len(n):]
                err = max(err, float(np.abs(logits - ref).max()))
                scale = max(scale, float(np.abs(ref).max()))
        if check:
            row.update(max_abs_err=err, bound=tol * (1 + scale))
        rows.append(row)
        print(f"{name:<12} {len(ids)} seqs {sum(map(len, new)):>6} tokens {seconds * 1e3:9.2f} ms"
              + (f"   max|logits - numpy| {err:.2e} (limit {row['bound']:.1e})" if check else ""))

    for i in seqs:
        session.add_sequence(i)
    prompts = {i: list(t) for i, t in seqs.items()}
    seqs = {i: [] for i in seqs}
    step("prefill", list(prompts), list(prompts.values()))
    fork = len(prompt_lens)
    session.fork_sequence(0, fork)            # a second continuation of sequence 0's prompt
    seqs[fork] = list(seqs[0])
    for k in range(steps):
        ids = list(seqs)
        step(f"decode {k + 1}", ids, [[int(t)] for t in rng.integers(0, cfg.vocab_size, len(ids))])
    return rows


def main(small: bool = False, argv=None) -> list[dict]:
    """Exits 1 (``SystemExit``) when ``--check`` finds logits beyond the limit, 2 on bad arguments."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model",
                        help="library from tvm-attn build-model (default: build the tiny model here)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompt-lens", default="7,30,45", help="comma-separated prompt lengths")
    parser.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    parser.add_argument("--check", action="store_true", help="compare every step with the numpy forward pass "
                        "of the model's metadata (config, variant, weights); exit 1 beyond the limit")
    parser.add_argument("--tol", type=float, help="--check's relative limit (default: "
                        + ", ".join(f"{k} {v:g}" for k, v in TOL.items()) + ")")
    parser.add_argument("--params", help="run these weights (a .params file, as --save-params writes) "
                        "instead of the recorded ones; --check still compares with the recorded ones")
    args = parser.parse_args([] if small and argv is None else argv)
    try:
        lens = [int(x) for x in args.prompt_lens.split(",")]
    except ValueError:
        parser.error(f"--prompt-lens: comma-separated integers, got {args.prompt_lens!r}")
    if min(lens) < 1 or args.steps < 0:
        parser.error(f"--prompt-lens must be >= 1 and --steps >= 0, "
                     f"got {args.prompt_lens!r} and {args.steps}")
    if small:
        args.steps, args.check = min(args.steps, 3), True
    if args.model:
        try:
            rows = run(Path(args.model), args.device, lens, args.steps, args.check, params=args.params,
                       tol=args.tol)
        except (ValueError, FileNotFoundError) as e:
            parser.exit(2, f"run_model.py: {e}\n")
    else:
        from tvm_attn.models.build import build_model

        with tempfile.TemporaryDirectory(prefix="tvm_attn_model_") as d:
            path = Path(d) / "tiny.so"
            build_model("tiny", "llvm", path, progress=not small)
            rows = run(path, args.device, lens, args.steps, args.check, params=args.params, tol=args.tol)
    bad = [r for r in rows if args.check and r["max_abs_err"] > r["bound"]]
    if bad:
        worst = max(bad, key=lambda r: r["max_abs_err"] / r["bound"])
        raise SystemExit(f"run_model.py --check: logits differ from numpy in {len(bad)} of {len(rows)} "
                         f"steps; worst {worst['step']}: {worst['max_abs_err']:.2e} > {worst['bound']:.1e}")
    return rows


if __name__ == "__main__":
    main()

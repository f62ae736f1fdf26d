"""Run a model built by `tvm-attn build-model`: add sequences, prefill, decode, fork (shared prefix).

Works with TVM's runtime alone (no compiler): it loads the library and drives TVM's runtime KV cache
through tvm_attn.models.runtime.ModelSession. With --check it compares every step's logits with the
numpy forward pass of the same weights (CPU-sized models only).

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


def run(model: Path, device: str, prompt_lens, steps: int, check: bool, seed: int = 0) -> list[dict]:
    from tvm_attn.models.runtime import ModelSession, config_from_json

    session = ModelSession(model, device=device, max_total_seq_len=max(4096, 2 * sum(prompt_lens) + 4 * steps))
    cfg = config_from_json(session.meta["config"])
    weights = session.default_weights() if check else None
    rng = np.random.default_rng(seed)
    seqs = {i: rng.integers(0, cfg.vocab_size, n).tolist() for i, n in enumerate(prompt_lens)}
    rows = []

    def step(name, ids, new):
        start = time.perf_counter()
        out = session.forward(ids, new)
        seconds = time.perf_counter() - start
        err = 0.0
        for i, n, logits in zip(ids, new, out):
            seqs[i] += n
            if check:
                from tvm_attn.models.llama import numpy_forward

                ref = numpy_forward(cfg, weights, seqs[i])[-len(n):]
                err = max(err, float(np.abs(logits - ref).max()))
        rows.append({"step": name, "sequences": len(ids), "new_tokens": sum(map(len, new)),
                     "ms": round(seconds * 1e3, 3), "max_abs_err": err if check else None})
        print(f"{name:<12} {len(ids)} seqs {sum(map(len, new)):>6} tokens {seconds * 1e3:9.2f} ms"
              + (f"   max|logits - numpy| {err:.2e}" if check else ""))

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="library from tvm-attn build-model (default: build the tiny model here)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompt-lens", default="7,30,45", help="comma-separated prompt lengths")
    parser.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    parser.add_argument("--check", action="store_true", help="compare every step with the numpy forward pass")
    args = parser.parse_args([] if small and argv is None else argv)
    lens = [int(x) for x in args.prompt_lens.split(",")]
    if small:
        args.steps, args.check = min(args.steps, 3), True
    if args.model:
        return run(Path(args.model), args.device, lens, args.steps, args.check)
    from tvm_attn.models.build import build_model

    with tempfile.TemporaryDirectory(prefix="tvm_attn_model_") as d:
        path = Path(d) / "tiny.so"
        build_model("tiny", "llvm", path, progress=not small)
        rows = run(path, args.device, lens, args.steps, args.check)
    if args.check and max(r["max_abs_err"] for r in rows) > 1e-3:
        raise SystemExit(f"logits differ from numpy: {max(r['max_abs_err'] for r in rows):.2e}")
    return rows


if __name__ == "__main__":
    main()

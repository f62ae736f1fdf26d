"""Tune the CUDA decode kernel's schedule for one GPU: the same code as ``tvm-attn tune``
(tvm_attn/tuning.py, whose docstring says what each step does and writes).

Usage:
    # here (TVM's compiler and nvcc): every candidate kernel of every class, ptxas-checked
    python scripts/tune.py --build /tmp/tune-build --family cuda_decode [--arch sm_90a] [--jobs 2]
    # on the GPU host, after `source .gpu/setup.sh` (--run loads the kernels from its directory)
    python scripts/tune.py --run /tmp/tune-build --out tuned.json [--gpu "NVIDIA H200"] [--plot tuned.png]
Both take --classes (comma-separated class names) and --small (one class, 2 workloads, 6 candidates).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(small: bool = False, argv=None) -> list[dict]:
    """The step ``argv`` asks for; without it (``small`` only), a check of both: ``--build --small``
    into a temporary directory, then ``--run --small`` there where a CUDA GPU is."""
    from tvm_attn.tuning import add_arguments, main_from_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    if argv is not None:
        args = p.parse_args(argv)
        return _rows(main_from_args(args, " ".join(["python scripts/tune.py", *argv])))
    if not small:
        raise ValueError("argv: give the step to run (--build DIR or --run DIR ...)")
    import tvm

    from tvm_attn.cuda_runtime import ensure_cuda

    with tempfile.TemporaryDirectory(prefix="tvm_attn_tune_") as d:
        args = p.parse_args(["--build", d, "--small", "--quiet"])
        rows = _rows(main_from_args(args, "python scripts/tune.py --build"))
        try:
            ensure_cuda()
            has_gpu = tvm.cuda(0).exist
        except (RuntimeError, OSError):
            has_gpu = False
        if has_gpu:
            args = p.parse_args(["--run", d, "--out", str(Path(d) / "tuned.json"), "--small", "--quiet"])
            rows += main_from_args(args, "python scripts/tune.py --run")["rows"]
    return rows


def _rows(result: dict) -> list[dict]:
    """The candidates' build rows of a --build manifest, or the timing rows of a --run result."""
    if "rows" in result:
        return result["rows"]
    return [{"class": c["class"], "schedule": x["schedule"], "runnable": x["runnable"]}
            for c in result["classes"] for x in c["candidates"]]


if __name__ == "__main__":
    main(argv=sys.argv[1:])

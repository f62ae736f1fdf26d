"""The sha256 of the generated CUDA source of every kernel the GPU tier and the benchmarks build
(scripts/build_gpu_kernels.py's list), to prove that a refactor leaves the kernels byte-identical.

Usage: python scripts/cuda_source_hashes.py [--arch sm_90a] [--out hashes.json] [--compare old.json]
Needs TVM's compiler, no GPU and no nvcc. ``--compare`` exits 1 when any kernel's source differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def source_hashes(arch: str = "sm_90a", small: bool = False) -> dict[str, str]:
    from scripts.build_gpu_kernels import gpu_keys
    from tvm_attn.build import compile_key, cuda_source

    keys, _ = gpu_keys(f"cuda:{arch}", small)
    return {key.uri: hashlib.sha256(cuda_source(compile_key(key)).encode()).hexdigest() for key in keys}


def main(small: bool = False, out: str | None = None, compare: str | None = None, arch: str = "sm_90a"):
    """{uri: sha256}; with ``compare``, also the uris whose source differs (``small``: three kernels)."""
    hashes = source_hashes(arch, small)
    if out:
        Path(out).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if not compare:
        print(f"{len(hashes)} kernels")
        return hashes
    old = json.loads(Path(compare).read_text())
    changed = sorted(u for u in hashes if old.get(u) != hashes[u])
    missing = sorted(set(old) - set(hashes))
    for u in changed:
        print(f"changed: {u}" if u in old else f"new: {u}")
    for u in missing:
        print(f"gone: {u}")
    print(f"{len(hashes)} kernels, {len(changed)} changed or new, {len(missing)} gone")
    return None if changed or missing else hashes


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--out", help="write {uri: sha256} here")
    p.add_argument("--compare", help="a file written by --out: report kernels whose source differs (exit 1)")
    a = p.parse_args()
    sys.exit(0 if main(out=a.out, compare=a.compare, arch=a.arch) is not None else 1)

"""Loading CUDA kernels anywhere: with TVM's runtime alone, and without a CUDA compiler.

TVM ships CUDA kernels as source inside the exported library and compiles it when the library is
loaded, through the global ``tvm_callback_cuda_compile``. This module registers that callback so it
first looks for a cubin compiled ahead of time (``tvm-attn build`` writes ``<cache>/cubin/<sha256 of
arch and source>.cubin`` with the build machine's nvcc), then falls back to nvcc, then to NVRTC.
With ``TVM_USE_RUNTIME_LIB=1`` (or no compiler library) TVM does not load its CUDA runtime library
on import; :func:`ensure_cuda` does.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm

from .registry import launch_bounds

#: the flags TVM's own nvcc path uses (tvm/support/nvcc.py), so cubins match what TVM would build
NVCC_FLAGS = (
    "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
)

_STATE: dict = {"cubin_dirs": [], "arch": None, "registered": False}


_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\((\d+)\) (\w+)_kernel\(")


def prepare_source(code: str) -> str:
    """TVM emits ``__launch_bounds__(threads)`` only; the persistent grids assume the resident blocks
    per SM of the kernel's schedule (``b<N>`` in its name, :func:`tvm_attn.registry.launch_bounds`),
    so each such kernel gets that as its minimum (capping its registers at 65536 / (threads x N)).
    The cubin key stays that of TVM's own source."""

    def bound(m: re.Match) -> str:
        bounds = launch_bounds(m.group(2))
        if bounds is None:
            return m.group(0)
        threads, blocks = bounds
        if threads != int(m.group(1)):
            raise ValueError(f"kernel {m.group(2)}: TVM launches {m.group(1)} threads, "
                             f"its schedule names {threads}")
        return f"__launch_bounds__({threads}, {blocks}) {m.group(2)}_kernel("

    return _LAUNCH_BOUNDS.sub(bound, code)


def cubin_name(code: str, arch: str) -> str:
    return hashlib.sha256((arch + "\0" + code).encode()).hexdigest() + ".cubin"


def find_nvcc() -> str | None:
    for cand in [shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 *sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def nvcc_compile(code: str, arch: str, fmt: str = "cubin", extra=()) -> tuple[bytes, str]:
    """Compile CUDA source for exactly ``arch`` (e.g. ``sm_90a``); returns (binary, ptxas report)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory(prefix="tvm_attn_nvcc_") as d:
        src, out = os.path.join(d, "k.cu"), os.path.join(d, f"k.{fmt}")
        Path(src).write_text(prepare_source(code))
        cmd = [nvcc, f"--{fmt}", f"-arch={arch}", "-Xptxas", "-v", *NVCC_FLAGS, *extra, "-o", out, src]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"nvcc failed: {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        return Path(out).read_bytes(), p.stdout + p.stderr


def precompile(code: str, arch: str, directory: Path) -> Path | None:
    """Write the cubin of ``code`` into ``directory`` (None if this machine has no nvcc), and ptxas's
    report of it beside it (:func:`ptxas_report` reads it)."""
    if find_nvcc() is None:
        return None
    path = Path(directory) / cubin_name(code, arch)
    if not path.exists():
        data, log = nvcc_compile(code, arch)
        path.parent.mkdir(parents=True, exist_ok=True)
        for dest, write in ((path.with_suffix(".ptxas"), lambda p: p.write_text(log)),
                            (path, lambda p: p.write_bytes(data))):
            tmp = dest.with_name(dest.name + ".tmp")  # atomic: readers never see half a file
            write(tmp)
            os.replace(tmp, dest)
    return path


def ptxas_summary(log: str) -> list[dict]:
    """Per kernel of a ptxas report (``-Xptxas -v``): ``{"function", "registers", "smem_bytes"}`` and
    ``{"function", "spill_stores", "spill_loads"}``."""
    out, name = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            smem = re.search(r"(\d+) bytes smem", line)
            out.append({"function": name, "registers": int(m.group(1)),
                        "smem_bytes": int(smem.group(1)) if smem else 0})
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out.append({"function": name, "spill_stores": int(m.group(1)), "spill_loads": int(m.group(2))})
    return out


def ptxas_report(cubin: Path | None) -> list[dict] | None:
    """:func:`ptxas_summary` of the report :func:`precompile` kept beside ``cubin``; None where there
    is none (no nvcc, or a cubin precompiled before reports were kept)."""
    if cubin is None:
        return None
    log = Path(cubin).with_suffix(".ptxas")
    return ptxas_summary(log.read_text()) if log.exists() else None


def spill_bytes(summary: list[dict]) -> int:
    """Spill stores plus loads over the kernels of a :func:`ptxas_summary`."""
    return sum(r.get("spill_stores", 0) + r.get("spill_loads", 0) for r in summary)


def _load_cuda_library() -> None:
    if tvm.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    lib = os.environ.get("TVM_RUNTIME_CUDA_LIB") or os.path.join(os.path.dirname(tvm.__file__), "lib",
                                                                 "libtvm_runtime_cuda.so")
    for dep in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise RuntimeError(f"cannot load TVM's CUDA runtime {lib}: {e}") from None


def device_arch(device_id: int = 0) -> str:
    """``sm_90a`` for an H100 (the ``a`` features need exactly that arch), ``sm_80`` for an A100."""
    major, minor = tvm.cuda(device_id).compute_version.split(".")
    return f"sm_{major}{minor}" + ("a" if int(major) >= 9 else "")


def ensure_cuda(cubin_dir: str | os.PathLike | None = None) -> None:
    """Load TVM's CUDA runtime if needed and register the compile callback (idempotent)."""
    _load_cuda_library()
    if cubin_dir is not None and str(cubin_dir) not in _STATE["cubin_dirs"]:
        _STATE["cubin_dirs"].append(str(cubin_dir))
    if _STATE["registered"]:
        return
    import tvm_ffi

    def compile_callback(code, *_):
        code = str(code)
        arch = _STATE["arch"] or device_arch()
        _STATE["arch"] = arch
        for d in _STATE["cubin_dirs"]:
            path = Path(d) / cubin_name(code, arch)
            if path.exists():
                return bytearray(path.read_bytes())
        if find_nvcc() is not None:
            return bytearray(nvcc_compile(code, arch)[0])
        from tvm.support import nvcc as tvm_nvcc

        return bytearray(tvm_nvcc.compile_cuda(prepare_source(code), target_format="cubin", arch=arch,
                                               compiler="nvrtc"))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_callback, override=True)
    _STATE["registered"] = True

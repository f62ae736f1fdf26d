"""The CPU that the CPU kernels (keys of target ``"llvm"``) are compiled for, and its tag in the cache.

By default (``TVM_ATTN_CPU_TARGET`` unset or ``host``) they are compiled for this host's CPU, as
LLVM's ``-mcpu=native`` does: LLVM's name of the CPU and every feature it reports (``mcpu`` and
``mattr``), so that F16C widens float16 with ``vcvtph2ps`` and AVX2/AVX-512 give wider vectors.
Such kernels may use instructions other CPUs lack, so the kernel cache files them under
:func:`host_tag`, a digest of the CPU's identity and features as the OS reports them, which a
process computes the same way with or without TVM's compiler; a cache directory that hosts with
other CPUs share never hands them out there.

``TVM_ATTN_CPU_TARGET=generic`` compiles and looks up the portable kernels instead (LLVM's default
target of the platform; on x86-64: SSE2, float16 widened by integer operations): build with it the
CPU kernels you ship to other machines. Where the OS does not describe the CPU (no
``/proc/cpuinfo``), the portable kernels are used.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

ENV = "TVM_ATTN_CPU_TARGET"
MODES = ("host", "generic")
#: the /proc/cpuinfo fields that identify a CPU model and its features (x86, then AArch64)
_IDENTITY = ("vendor_id", "cpu family", "model", "flags",
             "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")


def mode() -> str:
    """``"host"`` or ``"generic"``, from ``$TVM_ATTN_CPU_TARGET`` (default ``host``)."""
    value = os.environ.get(ENV, "host").strip().lower() or "host"
    if value not in MODES:
        raise ValueError(f"{ENV}: must be one of {MODES}, got {os.environ[ENV]!r}")
    return value


def cache_tag() -> str | None:
    """The tag the cache files CPU kernels under: this host's :func:`host_tag` when they are built for
    it, None for the portable kernels."""
    return host_tag() if mode() == "host" else None


@functools.lru_cache(maxsize=None)
def host_tag() -> str | None:
    """``"cpu"`` and 12 hex digits of sha256 over the first processor's identity and feature fields
    of ``/proc/cpuinfo`` (None where there is none: then the portable kernels are used)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    first = text.split("\n\n", 1)[0]
    fields = {}
    for line in first.splitlines():
        name, sep, value = line.partition(":")
        name = name.strip()
        if sep and name in _IDENTITY:
            fields[name] = " ".join(sorted(value.split())) if name in ("flags", "Features") else value.strip()
    if not fields:
        return None
    text = "\n".join(f"{k}={fields[k]}" for k in sorted(fields))
    return "cpu" + hashlib.sha256(text.encode()).hexdigest()[:12]


def llvm_target_config() -> dict:
    """The TVM target (as a dict) that CPU kernels are compiled for: this host's CPU name and all of
    LLVM's host features (``+`` present, ``-`` absent) under :func:`cache_tag`, else ``{"kind": "llvm"}``.
    Needs TVM's compiler."""
    if cache_tag() is None:
        return {"kind": "llvm"}
    import tvm_ffi

    cpu = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    features = dict(tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")())
    return {"kind": "llvm", "mcpu": str(cpu),
            "mattr": sorted(("+" if on else "-") + str(name) for name, on in features.items())}

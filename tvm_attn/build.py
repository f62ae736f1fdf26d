"""Kernel generation and compilation: the only module that needs TVM's compiler.

Imported lazily by :mod:`tvm_attn.cache` on a cache miss, so a process with TVM's runtime alone
serves prebuilt kernels without touching it.
"""

from __future__ import annotations

import tvm

from .config import AttentionKey, MergeKey, PlannerKey
from .registry import family_of


def target_of(name: str) -> tvm.target.Target:
    """``"llvm"`` or ``"cuda:sm_90a"`` -> a TVM target (always with an explicit arch for CUDA)."""
    kind, _, arch = name.partition(":")
    if kind == "llvm":
        return tvm.target.Target({"kind": "llvm"})
    if kind == "cuda":
        if not arch:
            raise ValueError("target 'cuda' needs an arch, e.g. 'cuda:sm_90a'")
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    raise ValueError(f"unknown target {name!r}; use 'llvm' or 'cuda:<arch>'")


def generate(key: AttentionKey | MergeKey | PlannerKey) -> tvm.IRModule:
    """The key's module, as its kernel family (:mod:`tvm_attn.registry`) generates it: ``key.uri``
    and, for CUDA, the planner, the decode plan and (prefill) the merge kernel."""
    return tvm.IRModule(family_of(key).generate(key))


def kernel_target(key: AttentionKey | MergeKey | PlannerKey) -> tvm.target.Target:
    """The target ``key``'s module is compiled for: a CPU key's is this host's CPU or the portable one
    (:mod:`tvm_attn.cpu_target`); a CUDA key's host code stays portable (it runs on the GPU host)."""
    if key.target == "llvm":
        from .cpu_target import llvm_target_config

        return tvm.target.Target(llvm_target_config())
    return target_of(key.target)


def compile_key(key: AttentionKey | MergeKey | PlannerKey) -> tvm.runtime.Executable:
    target = kernel_target(key)
    with target:  # the CPU generators widen float16 in hardware where the target can (F16C)
        mod = generate(key)
    return tvm.compile(mod, target=target)


def cuda_source(executable) -> str | None:
    """The CUDA source inside a compiled module, or None for a CPU module."""
    mod = executable.mod if hasattr(executable, "mod") else executable
    for m in mod.imports:
        if m.kind == "cuda":
            return m.inspect_source()
    return None

"""Kernel generation and compilation: the only module that needs TVM's compiler.

Imported lazily by :mod:`tvm_attn.cache` on a cache miss, so a process with TVM's runtime alone
serves prebuilt kernels without touching it.
"""

from __future__ import annotations

import tvm

from .config import AttentionKey, MergeKey, PlannerKey
from .kv.formats import PagedKV


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


def generate(key: AttentionKey | MergeKey) -> tvm.IRModule:
    """The kernel's module: ``key.uri`` and, for CUDA, the planner, the decode plan and (prefill)
    the merge kernel."""
    if isinstance(key, MergeKey):
        if key.target.startswith("cuda"):
            from .tir.merge_cuda import make_merge_cuda

            return tvm.IRModule({key.uri: make_merge_cuda(key)})
        from .tir.merge import make_merge

        return tvm.IRModule({key.uri: make_merge(key)})
    if isinstance(key, PlannerKey):
        from .planner import PLAN_DECODE
        from .tir.plan import make_decode_plan, make_planner

        return tvm.IRModule({key.uri: make_planner(key.uri), PLAN_DECODE: make_decode_plan()})
    if not isinstance(key, AttentionKey):
        raise TypeError(f"no generator for {type(key).__name__}")
    if key.target.startswith("llvm"):
        from .tir.attention import make_attention

        return tvm.IRModule({key.uri: make_attention(key)})
    from .planner import PLAN, PLAN_DECODE
    from .tir.plan import make_decode_plan, make_planner

    # the planner and the decode plan (page-table check, staging, planner) run on the host, on host
    # tensors, inside the same module as the kernels
    host = target_of("llvm")
    host_fns = {PLAN: make_planner().with_attr("target", host),
                PLAN_DECODE: make_decode_plan().with_attr("target", host)}
    if key.kind == "decode" and isinstance(key.kv, PagedKV):
        from .tir.decode_cuda import make_batch_decode_cuda

        return tvm.IRModule({key.uri: make_batch_decode_cuda(key), **host_fns})
    if key.kind in ("prefill", "bsr"):
        from .tir.prefill_cuda import make_prefill_cuda, make_prefill_merge_cuda

        return tvm.IRModule({
            key.uri: make_prefill_cuda(key), key.uri + "_merge": make_prefill_merge_cuda(key), **host_fns,
        })
    raise ValueError(
        f"no CUDA kernel for {key.kind} over {type(key.kv).__name__}: CUDA has paged decode, and prefill "
        "(paged, ragged) and block-sparse attention; decode over ragged KV runs through prefill"
    )


def compile_key(key: AttentionKey | MergeKey) -> tvm.runtime.Executable:
    return tvm.compile(generate(key), target=target_of(key.target))


def cuda_source(executable) -> str | None:
    """The CUDA source inside a compiled module, or None for a CPU module."""
    mod = executable.mod if hasattr(executable, "mod") else executable
    for m in mod.imports:
        if m.kind == "cuda":
            return m.inspect_source()
    return None

"""Kernel generation and compilation: the only module that needs TVM's compiler.

Imported lazily by :mod:`tvm_attn.cache` on a cache miss, so a process with TVM's runtime alone
serves prebuilt kernels without touching it.
"""

from __future__ import annotations

import tvm

from .config import AttentionKey, MergeKey


def target_of(name: str) -> tvm.target.Target:
    """``"llvm"`` or ``"cuda:sm_90a"`` -> a TVM target (always with an explicit arch for CUDA)."""
    kind, _, arch = name.partition(":")
    if kind == "llvm":
        return tvm.target.Target({"kind": "llvm"})
    if kind == "cuda":
        if not arch:
            raise ValueError("target 'cuda' needs an arch, e.g. 'cuda:sm_90a'")
        return tvm.target.Target({"kind": "cuda", "arch": arch})
    raise ValueError(f"unknown target {name!r}; use 'llvm' or 'cuda:<arch>'")


def generate(key: AttentionKey | MergeKey) -> tvm.tirx.PrimFunc:
    """The kernel's PrimFunc, named ``key.uri``."""
    if isinstance(key, AttentionKey):
        from .tir.attention import make_attention

        return make_attention(key)
    if isinstance(key, MergeKey):
        from .tir.merge import make_merge

        return make_merge(key)
    raise TypeError(f"no generator for {type(key).__name__}")


def compile_key(key: AttentionKey | MergeKey) -> tvm.runtime.Executable:
    func = generate(key)
    return tvm.compile(tvm.IRModule({key.uri: func}), target=target_of(key.target))

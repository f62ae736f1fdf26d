"""KV formats (host-side descriptions and checks); their TIR index math is :mod:`tvm_attn.kv.index`."""

from .formats import BlockSparseKV, PagedKV, RaggedKV

__all__ = ["BlockSparseKV", "PagedKV", "RaggedKV"]

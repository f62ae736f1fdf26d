"""Relax integration: attention as Relax calls, TVM's runtime KV cache driving our kernels, and an
``nn.Module`` attention layer for ``tvm.relax.frontend.nn`` models.

* :mod:`.ops`: one function per attention kind (decode, paged/ragged prefill, block-sparse) and the
  state merges, each emitting ``call_tir`` on the kernel generated for its arguments' types.
* :mod:`.kv_cache`: :class:`~.kv_cache.AttnPagedKVCache`, TVM's runtime paged KV cache
  (``vm.builtin.paged_attention_kv_cache_create``) with our kernels in its attention slots.
* :mod:`.layer`: :class:`~.layer.Attention`, a GQA attention layer over that cache, the variant a
  constructor parameter.
"""

from .ops import (
    batch_decode_with_paged_kv_cache,
    batch_prefill_with_paged_kv_cache,
    batch_prefill_with_ragged_kv_cache,
    block_sparse_attention,
    merge_state,
    merge_states,
)

__all__ = [
    "batch_decode_with_paged_kv_cache", "batch_prefill_with_paged_kv_cache",
    "batch_prefill_with_ragged_kv_cache", "block_sparse_attention", "merge_state", "merge_states",
]

"""The public API, in FlashInfer's names: plan/run wrappers, single-request calls and state merging."""

from .cascade import merge_state, merge_state_in_place, merge_states
from .decode import BatchDecodeWithPagedKVCacheWrapper, single_decode_with_kv_cache
from .prefill import (
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    single_prefill_with_kv_cache,
)
from .sparse import BlockSparseAttentionWrapper

__all__ = [
    "merge_state", "merge_state_in_place", "merge_states", "BatchDecodeWithPagedKVCacheWrapper",
    "single_decode_with_kv_cache", "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper", "single_prefill_with_kv_cache", "BlockSparseAttentionWrapper",
]

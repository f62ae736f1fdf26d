"""tvm_attn: an attention engine for LLM serving whose kernels are TVM TIR generators.

Public names follow FlashInfer: plan/run wrappers for paged, ragged and block-sparse KV, single-request
calls, state merging; plus the variant functors and KV formats they are generated from.
"""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    BatchDecodeWithPagedKVCacheWrapper,
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
    BlockSparseAttentionWrapper,
    merge_state,
    merge_state_in_place,
    merge_states,
    single_decode_with_kv_cache,
    single_prefill_with_kv_cache,
)
from .cache import KernelCache, KernelNotBuiltError, get_cache  # noqa: E402
from .config import AttentionKey, MergeKey  # noqa: E402
from .cuda_runtime import ensure_cuda  # noqa: E402
from .kv import BlockSparseKV, PagedKV, RaggedKV  # noqa: E402
from .variants import (  # noqa: E402
    ALiBi,
    AttentionVariant,
    Causal,
    CustomMask,
    DimTable,
    LogitsSoftCap,
    RoPE,
    ScalarParam,
    SigmoidAttention,
    SlidingWindow,
    TensorParam,
    alibi_slopes,
    compose,
    pack_custom_mask,
)

__all__ = [
    "BatchDecodeWithPagedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper", "BlockSparseAttentionWrapper", "merge_state",
    "merge_state_in_place", "merge_states", "single_decode_with_kv_cache", "single_prefill_with_kv_cache",
    "KernelCache", "ensure_cuda",
    "KernelNotBuiltError", "get_cache", "AttentionKey", "MergeKey", "BlockSparseKV", "PagedKV", "RaggedKV",
    "ALiBi", "AttentionVariant", "Causal", "CustomMask", "DimTable", "LogitsSoftCap", "RoPE", "ScalarParam",
    "SigmoidAttention", "SlidingWindow", "TensorParam", "alibi_slopes", "compose", "pack_custom_mask",
]

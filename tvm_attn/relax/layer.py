"""``nn.Module`` attention for ``tvm.relax.frontend.nn`` models.

:class:`Attention` is a GQA self-attention layer over the runtime KV cache: a fused q/k/v projection,
one ``attention_with_fused_qkv`` call on the cache (which applies RoPE, appends the new K/V to its
pages and runs our kernels), and the output projection. One cache serves every layer, so the cache
is built with the variant of the layers (:func:`cache_variant`); a model passes it to
:class:`~tvm_attn.relax.kv_cache.AttnPagedKVCache` in its ``create_paged_kv_cache`` method.
"""

from __future__ import annotations

from tvm.relax.frontend import nn

from ..variants.base import compose


class Attention(nn.Module):
    """Self-attention of layer ``layer_id`` through the paged KV cache.

    --- Shapes ---
    x: ``[batch, seq_len, hidden_size]`` (prefill: ``batch = 1`` and the sequences laid end to end;
    decode: ``seq_len = 1``); returns the same shape.

    ``variant``: the attention variant of this layer (default: plain softmax attention; the cache
    adds the causal mask). It must be position-free and have scalar arguments only (see
    :func:`tvm_attn.tir.abi.kv_cache_kernel`).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_id: int,
                 variant=None, dtype: str = "float16"):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_id = layer_id
        self.variant = compose(variant)
        self.qkv_proj = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=False,
                                  dtype=dtype)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: nn.Tensor, paged_kv_cache) -> nn.Tensor:
        b, s, _ = x.shape
        qkv = nn.op.reshape(self.qkv_proj(x), (b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim))
        o = paged_kv_cache.attention_with_fused_qkv(self.layer_id, qkv, self.num_heads,
                                                    sm_scale=self.head_dim**-0.5)
        return self.o_proj(nn.op.reshape(o, (b, s, self.num_heads * self.head_dim)))


def cache_variant(layers: list[Attention]):
    """The one variant of ``layers``, for the cache they share; raises if they differ."""
    variants = {layer.variant.uri(): layer.variant for layer in layers}
    if len(variants) > 1:
        raise ValueError(f"the layers sharing one KV cache have different variants: {sorted(variants)}")
    return next(iter(variants.values())) if variants else compose(None)

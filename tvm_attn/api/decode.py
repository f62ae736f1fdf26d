"""Decode attention (one new query token per request): batch over a paged KV cache, and single.

Lineage: FlashInfer ``decode.py`` (``BatchDecodeWithPagedKVCacheWrapper``, ``single_decode_with_kv_cache``).
"""

from __future__ import annotations

from ..config import AttentionKey
from ..kv.formats import PagedKV
from ..tensor import shape_of
from ._common import Wrapper, check_tensor, data_dtypes, flashinfer_variant, reshape, run_single


class BatchDecodeWithPagedKVCacheWrapper(Wrapper):
    """Batch decode over a paged KV cache.

    Example::

        >>> w = BatchDecodeWithPagedKVCacheWrapper("NHD")
        >>> w.plan(kv_indptr, kv_indices, kv_last_page_len, num_qo_heads=32, num_kv_heads=8,
        ...        head_dim=128, page_size=16)
        >>> o = w.run(q, paged_kv_cache)          # q: [batch_size, 32, 128]

    Note: the plan depends only on the page table, so one plan serves every layer of a step.
    """

    def plan(
        self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
        page_size: int, *, variant=None, pos_encoding_mode: str = "NONE", window_left: int = -1,
        logits_soft_cap: float | None = None, q_data_type="float16", kv_data_type=None, sm_scale=None,
        rope_scale: float | None = None, rope_theta: float | None = None,
    ) -> None:
        """Check the page table and pick the kernel.

        Parameters
        ----------
        indptr : int32 ``[batch_size + 1]``; indices : int32 ``[indptr[-1]]`` page ids;
        last_page_len : int32 ``[batch_size]``, in ``[1, page_size]`` (0 for a request with no pages).
        variant : an :class:`~tvm_attn.variants.AttentionVariant`, composed with the FlashInfer-style
            options ``pos_encoding_mode`` ("NONE", "ROPE_LLAMA", "ALIBI"), ``window_left``,
            ``logits_soft_cap``, ``rope_scale`` and ``rope_theta``.
        """
        fmt = PagedKV(page_size, self._kv_layout)
        indptr, indices, last_page_len, _ = fmt.validate(indptr, indices, last_page_len)
        q_dtype, kv_dtype = data_dtypes(q_data_type, kv_data_type)
        v = flashinfer_variant(
            variant, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        key = AttentionKey("decode", fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, v, self._target)
        self._batch_size = indptr.size - 1
        self._max_page = int(indices[: indptr[-1]].max(initial=-1))
        self._plan_call(key, sm_scale, (), (indptr, indices, last_page_len), self._batch_size)

    def run(self, q, paged_kv_cache, *, out=None, lse=None, return_lse: bool = False, **variant_args):
        """``q`` ``[batch_size, num_qo_heads, head_dim]`` -> ``o`` of the same shape (and ``lse`` float32
        ``[batch_size, num_qo_heads]`` with ``return_lse``). ``variant_args``: the variant's extras."""
        call = self._planned()
        key = call.key
        check_tensor("q", q, (self._batch_size, key.num_qo_heads, key.head_dim), key.q_dtype)
        check_paged_cache(paged_kv_cache, key, self._max_page)
        return call(q, [("paged_kv_cache", paged_kv_cache)], variant_args, out, lse, return_lse)


def check_paged_cache(cache, key: AttentionKey, max_page: int) -> None:
    """``cache`` matches the planned format and holds every page the plan refers to."""
    shape = key.kv.cache_shape(None, key.num_kv_heads, key.head_dim)
    check_tensor("paged_kv_cache", cache, shape, key.kv_dtype)
    num_pages = shape_of(cache)[0]
    if max_page >= num_pages:
        raise ValueError(
            f"paged_kv_cache: has {num_pages} pages, but the plan's kv_indices refer to page {max_page}"
        )


def single_decode_with_kv_cache(
    q, k, v, *, kv_layout: str = "NHD", variant=None, pos_encoding_mode: str = "NONE", window_left: int | None = None,
    logits_soft_cap: float | None = None, sm_scale=None, rope_scale=None, rope_theta=None, return_lse: bool = False,
    device=None, cache=None, **variant_args,
):
    """Decode one request: ``q`` ``[num_qo_heads, head_dim]``, ``k``/``v`` ``[kv_len, num_kv_heads, head_dim]``
    (``"NHD"``) or ``[num_kv_heads, kv_len, head_dim]`` (``"HND"``) -> ``o`` ``[num_qo_heads, head_dim]``."""
    q_shape = shape_of(q)
    if len(q_shape) != 2:
        raise ValueError(f"q: expected shape (num_qo_heads, head_dim), got {q_shape}")
    num_qo_heads, head_dim = q_shape
    fi = dict(window_left=window_left, logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta)
    res = run_single(
        "decode", reshape(q, (1, num_qo_heads, head_dim)), k, v, kv_layout=kv_layout, variant=variant, causal=False,
        pos_encoding_mode=pos_encoding_mode, fi_options=fi, sm_scale=sm_scale, return_lse=return_lse,
        device=device, cache=cache, variant_args=variant_args,
    )
    if return_lse:
        return reshape(res[0], (num_qo_heads, head_dim)), reshape(res[1], (num_qo_heads,))
    return reshape(res, (num_qo_heads, head_dim))

"""Prefill and append attention (ragged query rows per request) over paged or ragged KV, and single.

Lineage: FlashInfer ``prefill.py``. Append is prefill with ``kv_len > qo_len``: with ``causal=True`` the
query rows are aligned to the end of the KV (``kv_idx <= qo_idx + kv_len - qo_len``).
"""

from __future__ import annotations

import numpy as np

from ..config import AttentionKey
from ..kv.formats import PagedKV, RaggedKV
from ..kv.validate import as_index_array, check_indptr
from ..tensor import shape_of
from ._common import Wrapper, check_tensor, data_dtypes, flashinfer_variant, run_single
from .decode import check_paged_cache


def _qo_indptr(qo_indptr, batch_size: int) -> np.ndarray:
    qo_indptr = as_index_array("qo_indptr", qo_indptr)
    check_indptr("qo_indptr", qo_indptr)
    if qo_indptr.size != batch_size + 1:
        raise ValueError(
            f"qo_indptr: has {qo_indptr.size} entries, but the KV index describes {batch_size} requests "
            f"(expected {batch_size + 1})"
        )
    return qo_indptr


class BatchPrefillWithPagedKVCacheWrapper(Wrapper):
    """Batch prefill / append over a paged KV cache.

    Example::

        >>> w = BatchPrefillWithPagedKVCacheWrapper("NHD")
        >>> w.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, 32, 8, 128, 16, causal=True)
        >>> o = w.run(q, paged_kv_cache)          # q: [qo_indptr[-1], 32, 128]
    """

    def plan(
        self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
        num_kv_heads: int, head_dim: int, page_size: int, *, causal: bool = False, variant=None,
        pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: float | None = None,
        q_data_type="float16", kv_data_type=None, sm_scale=None, rope_scale=None, rope_theta=None,
    ) -> None:
        """Check the query and page tables and pick the kernel (arguments as FlashInfer's; ``variant``
        composes with ``causal`` and the FlashInfer-style options)."""
        fmt = PagedKV(page_size, self._kv_layout)
        kv_indptr, kv_indices, last, _ = fmt.validate(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len)
        qo_indptr = _qo_indptr(qo_indptr, kv_indptr.size - 1)
        q_dtype, kv_dtype = data_dtypes(q_data_type, kv_data_type)
        v = flashinfer_variant(
            variant, causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        key = AttentionKey("prefill", fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, v, self._target)
        self._total_qo = int(qo_indptr[-1])
        self._max_page = int(kv_indices[: kv_indptr[-1]].max(initial=-1))
        self._plan_call(key, sm_scale, (qo_indptr,), (kv_indptr, kv_indices, last), self._total_qo)

    def run(self, q, paged_kv_cache, *, out=None, lse=None, return_lse: bool = False, **variant_args):
        """``q`` ``[qo_indptr[-1], num_qo_heads, head_dim]`` -> ``o`` of the same shape (and ``lse``)."""
        call = self._planned()
        key = call.key
        check_tensor("q", q, (self._total_qo, key.num_qo_heads, key.head_dim), key.q_dtype)
        check_paged_cache(paged_kv_cache, key, self._max_page)
        return call(q, [("paged_kv_cache", paged_kv_cache)], variant_args, out, lse, return_lse)


class BatchPrefillWithRaggedKVCacheWrapper(Wrapper):
    """Batch prefill over ragged K/V: request ``b`` owns rows ``kv_indptr[b]:kv_indptr[b+1]`` of ``k``/``v``."""

    def plan(
        self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim: int, *, causal: bool = False,
        variant=None, pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap=None,
        q_data_type="float16", kv_data_type=None, sm_scale=None, rope_scale=None, rope_theta=None,
    ) -> None:
        fmt = RaggedKV(self._kv_layout)
        kv_indptr, _ = fmt.validate(kv_indptr)
        qo_indptr = _qo_indptr(qo_indptr, kv_indptr.size - 1)
        q_dtype, kv_dtype = data_dtypes(q_data_type, kv_data_type)
        v = flashinfer_variant(
            variant, causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        key = AttentionKey("prefill", fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, v, self._target)
        self._total_qo, self._total_kv = int(qo_indptr[-1]), int(kv_indptr[-1])
        self._plan_call(key, sm_scale, (qo_indptr,), (kv_indptr,), self._total_qo)

    def run(self, q, k, v, *, out=None, lse=None, return_lse: bool = False, **variant_args):
        """``q`` ``[qo_indptr[-1], Hq, D]``; ``k``/``v`` ``[kv_indptr[-1], Hkv, D]`` (``"HND"``: ``[Hkv, kv_indptr[-1], D]``)."""
        call = self._planned()
        key = call.key
        check_tensor("q", q, (self._total_qo, key.num_qo_heads, key.head_dim), key.q_dtype)
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, key.kv.kv_shape(self._total_kv, key.num_kv_heads, key.head_dim), key.kv_dtype)
        return call(q, [("k", k), ("v", v)], variant_args, out, lse, return_lse)


def single_prefill_with_kv_cache(
    q, k, v, *, causal: bool = False, kv_layout: str = "NHD", variant=None, pos_encoding_mode: str = "NONE",
    window_left: int | None = None, logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None,
    return_lse: bool = False, device=None, cache=None, **variant_args,
):
    """Prefill / append for one request: ``q`` ``[qo_len, Hq, D]``, ``k``/``v`` ``[kv_len, Hkv, D]`` (``"NHD"``)
    or ``[Hkv, kv_len, D]`` (``"HND"``) -> ``o`` ``[qo_len, Hq, D]``."""
    if len(shape_of(q)) != 3:
        raise ValueError(f"q: expected shape (qo_len, num_qo_heads, head_dim), got {shape_of(q)}")
    fi = dict(window_left=window_left, logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta)
    return run_single(
        "prefill", q, k, v, kv_layout=kv_layout, variant=variant, causal=causal, pos_encoding_mode=pos_encoding_mode,
        fi_options=fi, sm_scale=sm_scale, return_lse=return_lse, device=device, cache=cache, variant_args=variant_args,
    )

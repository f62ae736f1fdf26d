"""numpy reference for every attention form, KV format and variant, returning (output, LSE).

Written independently of the kernels: it gathers each request's K/V into dense arrays, builds the
full logits matrix with einsum, and applies the variants' numpy twins (``ref_*``). The LSE is in log2
units (FlashInfer and TVM); a row that sees no key has output 0 and LSE ``-inf``. Accumulation is in
float64 by default (``accum="float32"`` for a low-precision path).

Non-finite data, as the kernels do (and torch's softmax): a visible logit that is NaN or ``+inf``
makes its row's output and LSE NaN; a ``-inf`` logit weighs 0 (a row whose visible logits are all
``-inf`` is a row that sees nothing); NaN or inf in a value row reaches the output through its
weight (``0 * inf`` is NaN); keys that are masked out are never read.
"""

from __future__ import annotations

import math

import numpy as np

from .variants.base import AttentionVariant, RefContext, ScalarParam, TensorParam, compose
from .variants.masks import Causal


def _f(x, accum):
    return np.asarray(x).astype(accum)


def variant_params(variant: AttentionVariant, given: dict | None, **dims) -> dict:
    """The variant's extra parameters: the given ones, else their defaults (``dims``: num_qo_heads, ...)."""
    given = dict(given or {})
    out = {}
    for p in variant.extra_params():
        if p.name in given:
            out[p.name] = given[p.name]
        elif isinstance(p, ScalarParam) and p.default is not None:
            out[p.name] = p.default
        elif isinstance(p, TensorParam) and p.default is not None:
            out[p.name] = p.default(**dims)
        else:
            raise ValueError(f"missing variant argument {p.name!r}")
    return out


def dense_attention(
    q, k, v, *, variant: AttentionVariant | None = None, sm_scale: float | None = None,
    params: dict | None = None, batch_idx: int = 0, qo_idx=None, kv_idx=None, qo_len: int | None = None,
    kv_len: int | None = None, visible=None, accum: str = "float64",
):
    """One request: ``q (Lq, Hq, D)``, ``k``/``v (Lk, Hkv, D)`` -> ``o (Lq, Hq, D)`` float32,
    ``lse (Lq, Hq)``.

    ``qo_idx``/``kv_idx`` are the logical positions of the rows (default ``arange``), ``qo_len``/
    ``kv_len`` the lengths the hooks see (default: the array lengths), and ``visible`` an extra boolean
    ``(Lq, Lk)`` mask (block sparsity).
    """
    variant = variant or AttentionVariant()
    Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    params = variant_params(variant, params, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D)
    qo_idx = np.arange(Lq) if qo_idx is None else np.asarray(qo_idx)
    kv_idx = np.arange(Lk) if kv_idx is None else np.asarray(kv_idx)
    qo_len = Lq if qo_len is None else qo_len
    kv_len = Lk if kv_len is None else kv_len
    group = Hq // Hkv
    o = np.zeros((Lq, Hq, D), np.float32)
    lse = np.full((Lq, Hq), -np.inf, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite data: see the module docstring
        for h in range(Hq):
            _head(variant, q, k, v, h, group, sm_scale, params, batch_idx, qo_idx, kv_idx, qo_len, kv_len,
                  visible, accum, o, lse)
    return o, lse


def _head(variant, q, k, v, h, group, sm_scale, params, batch_idx, qo_idx, kv_idx, qo_len, kv_len, visible,
          accum, o, lse):
    """Query head ``h`` of :func:`dense_attention`, into ``o[:, h]`` and ``lse[:, h]``."""
    Lq, Lk, D = q.shape[0], k.shape[0], q.shape[2]
    hk = h // group
    ctx = RefContext(batch_idx, qo_idx[:, None], kv_idx[None, :], h, hk, qo_len, kv_len, D, params)
    kctx = RefContext(batch_idx, None, kv_idx[None, :], None, hk, qo_len, kv_len, D, params)
    qh = variant.ref_query_transform(ctx, _f(q[:, h], accum))
    kh = variant.ref_key_transform(kctx, _f(k[:, hk], accum))
    logits = variant.ref_logits_transform(ctx, (qh @ kh.T) * sm_scale).astype(accum)
    mask = np.ones((Lq, Lk), bool)
    m = variant.ref_logits_mask(ctx)
    if m is not None:
        mask &= np.broadcast_to(m, (Lq, Lk))
    if visible is not None:
        mask &= visible
    vh = _f(v[:, hk], accum)
    if not variant.use_softmax:
        out = _weighted_sum(np.where(mask, logits, 0).astype(accum), mask, vh)
        o[:, h] = variant.ref_output_transform(ctx, out)
        return
    bad = (mask & (np.isnan(logits) | (logits == np.inf))).any(axis=1)  # NaN rows
    masked = np.where(mask & ~bad[:, None], logits, -np.inf)
    row_max = masked.max(axis=1, initial=-np.inf)
    seen = row_max > -np.inf
    safe_max = np.where(seen, row_max, 0)
    p = np.where(seen[:, None], np.exp(masked - safe_max[:, None]), 0).astype(accum)
    denom = p.sum(axis=1)
    out = _weighted_sum(p, mask, vh) / np.where(seen, denom, 1)[:, None]
    out = variant.ref_output_transform(ctx, out)
    o[:, h] = np.where(bad[:, None], np.nan, np.where(seen[:, None], out, 0))
    lse_h = np.where(seen, (safe_max + np.log(np.where(seen, denom, 1))) / math.log(2), -np.inf)
    lse[:, h] = np.where(bad, np.nan, lse_h)


def _weighted_sum(w, mask, vh):
    """``w @ vh`` over the visible keys only: a NaN or inf in a masked-out value row stays out (as
    in the kernels, which never read it), while a visible one reaches the output even with weight 0."""
    if np.isfinite(vh).all():
        return w @ vh
    return np.einsum("qk,qkd->qd", w, np.where(mask[:, :, None], vh[None], 0))


def gather_paged(paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout: str = "NHD"):
    """Each request's ``(k, v)`` as dense ``(kv_len, Hkv, D)`` arrays (the reconstruct-to-dense loop)."""
    cache = np.asarray(paged_kv_cache)
    if kv_layout == "HND":
        cache = cache.transpose(0, 1, 3, 2, 4)
    page_size = cache.shape[2]
    out = []
    for b in range(len(kv_indptr) - 1):
        pages = np.asarray(kv_indices[kv_indptr[b] : kv_indptr[b + 1]])
        n = len(pages)
        kv_len = (n - 1) * page_size + int(kv_last_page_len[b]) if n else 0
        k = cache[pages, 0].reshape(-1, *cache.shape[3:])[:kv_len]
        v = cache[pages, 1].reshape(-1, *cache.shape[3:])[:kv_len]
        out.append((k, v))
    return out


def _with_causal(variant, causal):
    variant = variant or AttentionVariant()
    return compose(Causal(), variant) if causal else variant


def batch_attention(q, qo_indptr, kvs, *, variant=None, causal=False, sm_scale=None, params=None,
                    accum="float64"):
    """Requests with dense per-request ``kvs = [(k_b, v_b), ...]``.

    ``q`` is ``(total_qo, Hq, D)`` with ``qo_indptr``, or, for decode (``qo_indptr=None``), ``(B, Hq, D)``.
    """
    variant = _with_causal(variant, causal)
    q = np.asarray(q)
    if qo_indptr is None:
        qo_indptr = np.arange(q.shape[0] + 1)
    o = np.zeros(q.shape, np.float32)
    lse = np.full(q.shape[:2], -np.inf, np.float32)
    for b, (k, v) in enumerate(kvs):
        s, e = int(qo_indptr[b]), int(qo_indptr[b + 1])
        o[s:e], lse[s:e] = dense_attention(
            q[s:e], k, v, variant=variant, sm_scale=sm_scale, params=params, batch_idx=b, accum=accum
        )
    return o, lse


def paged_attention(q, qo_indptr, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout="NHD",
                    **kw):
    """Batch decode (``qo_indptr=None``) or prefill over a paged KV cache."""
    kvs = gather_paged(paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)
    return batch_attention(q, qo_indptr, kvs, **kw)


def ragged_attention(q, qo_indptr, k, v, kv_indptr, kv_layout="NHD", **kw):
    """Batch decode (``qo_indptr=None``) or prefill over ragged K/V."""
    k, v = np.asarray(k), np.asarray(v)
    if kv_layout == "HND":
        k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    kvs = [(k[kv_indptr[b] : kv_indptr[b + 1]], v[kv_indptr[b] : kv_indptr[b + 1]])
           for b in range(len(kv_indptr) - 1)]
    return batch_attention(q, qo_indptr, kvs, **kw)


def block_sparse_attention(q, k, v, indptr, indices, R, C, *, variant=None, causal=False, **kw):
    """BSR attention: block row ``r`` of ``R`` query rows sees the ``C``-row key blocks
    ``indices[indptr[r]:indptr[r+1]]``."""
    M, N = q.shape[0], k.shape[0]
    visible = np.zeros((M, N), bool)
    for r in range(M // R):
        for c in indices[indptr[r] : indptr[r + 1]]:
            visible[r * R : (r + 1) * R, c * C : (c + 1) * C] = True
    return dense_attention(q, k, v, variant=_with_causal(variant, causal), visible=visible, **kw)


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two attention states (``v (n, H, D)``, ``s (n, H)`` log2 LSE) -> ``(v, s)`` in float32."""
    return merge_states(np.stack([v_a, v_b], axis=1), np.stack([s_a, s_b], axis=1))


def merge_states(v, s):
    """Merge ``v (n, k, H, D)`` and ``s (n, k, H)`` over the ``k`` states (none: every row empty).

    A state of weight 0 (``s = -inf``: no keys) adds nothing, whatever its ``v`` holds; a NaN
    ``s`` (or a ``+inf`` one), or a NaN in the ``v`` of a state of weight > 0, makes the row NaN, as
    in the kernels."""
    v = np.asarray(v).astype(np.float64)
    s = np.asarray(s).astype(np.float64)
    n, k, H, D = v.shape
    if k == 0:
        return np.zeros((n, H, D), np.float32), np.full((n, H), -np.inf, np.float32)
    with np.errstate(invalid="ignore"):
        m = s.max(axis=1)  # NaN if some s is
        safe = np.where(m == -np.inf, 0, m)
        w = np.exp2(s - safe[:, None])  # -inf: 0; NaN, or +inf - inf: NaN
        denom = w.sum(axis=1)
        seen = (denom > 0) | np.isnan(denom)
        out = (np.where(w[..., None] != 0, w[..., None] * v, 0).sum(axis=1)
               / np.where(seen, denom, 1)[..., None])
        lse = np.where(seen, safe + np.log2(np.where(seen, denom, 1)), -np.inf)
    return np.where(seen[..., None], out, 0).astype(np.float32), lse.astype(np.float32)

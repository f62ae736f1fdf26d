"""Mask variants: causal, sliding window, and FlashInfer's bit-packed custom mask.

Each mask is written twice: as a TIR boolean (``logits_mask``) in FlashInfer's own form, and as a
numpy twin in terms of absolute positions, so that the two implementations check each other.
"""

from __future__ import annotations

import numpy as np

from .base import AttentionVariant, KeyRange, ScalarParam, TensorParam, check_scalar

#: The widest window the masks' int32 arithmetic supports: ``kv_idx + qo_len + window_left`` must
#: not overflow, which holds for every request with ``qo_len + kv_len <= 2**30`` (2**31 - 1 wraps
#: to a negative sum and hides every key). A window as wide as the request is the same as none.
MAX_WINDOW_LEFT = 2**30 - 1


def check_window_left(value, name: str = "window_left") -> int:
    """``value`` as a window: -1 (no window, FlashInfer's convention) or ``0..MAX_WINDOW_LEFT``."""
    import operator

    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int (-1 for no window), got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int (-1 for no window), got {value!r}") from None
    if value < -1 or value > MAX_WINDOW_LEFT:
        raise ValueError(
            f"{name}: must be -1 (no window) or in [0, {MAX_WINDOW_LEFT}] (the int32 mask arithmetic), "
            f"got {value}"
        )
    return int(value)


class Causal(AttentionVariant):
    """A query sees the keys at or before its own position (bottom-right aligned, as FlashInfer)."""

    def logits_mask(self, ctx):
        return ctx.kv_idx <= ctx.qo_idx + ctx.kv_len - ctx.qo_len

    def kv_range(self, ctx):
        return 0, ctx.qo_idx + ctx.kv_len - ctx.qo_len + 1

    def mask_is_range(self) -> bool:
        return True

    def key_range(self, args=None):
        return KeyRange(causal=True)

    def ref_logits_mask(self, ctx):
        q_pos = ctx.qo_idx + (ctx.kv_len - ctx.qo_len)
        return ctx.kv_idx <= q_pos


class RuntimeCausal(Causal):
    """:class:`Causal` with a run-time switch: the int32 scalar ``is_causal`` (non-zero: causal, 0: no mask).

    TVM's runtime KV cache passes the flag per call (its paged prefill runs causal over the new keys
    and non-causal over the cached ones), and FlashInfer's ``mask_mode`` is a run-time choice too.
    """

    uri_name = "runtime_causal"

    def extra_params(self):
        return (ScalarParam("is_causal", "int32", 1, "non-zero: causal mask; 0: every key visible"),)

    def logits_mask(self, ctx):
        from tvm import tirx

        return tirx.any(ctx["is_causal"] == 0, super().logits_mask(ctx))

    def kv_range(self, ctx):
        from tvm import tirx

        lo, hi = super().kv_range(ctx)
        return lo, tirx.if_then_else(ctx["is_causal"] != 0, hi, ctx.kv_len)

    def key_range(self, args=None):
        # the flag is a run's choice: a plan reads every key
        if args is None or not _int_arg(args, "is_causal", 1):
            return None
        return KeyRange(causal=True)

    def ref_logits_mask(self, ctx):
        return super().ref_logits_mask(ctx) if int(ctx["is_causal"]) else None


class SlidingWindow(AttentionVariant):
    """A query sees at most ``window_left`` keys before its own position (FlashInfer's ``window_left``).

    ``window_left`` is a run-time int32 scalar (default from the constructor); -1 disables the
    window, other negatives are an error, and so is one wider than :data:`MAX_WINDOW_LEFT`. The CUDA
    plans (decode and prefill) read only the keys inside the constructor's window
    (:meth:`key_range`), so a run with that plan may pass a smaller ``window_left`` but not a larger
    one (nor -1). The window bounds the left side only: compose with :class:`Causal` (or plan with
    ``causal=True``) to also hide future keys.
    """

    def __init__(self, window_left: int = -1):
        self._window_left = check_window_left(window_left)

    def validate_args(self, args):
        check_window_left(args["window_left"])

    def spec(self):
        return self.named_spec(window_left=self._window_left)

    def extra_params(self):
        return (ScalarParam("window_left", "int32", self._window_left, "keys visible left of the query"),)

    def logits_mask(self, ctx):
        from tvm import tirx

        w = ctx["window_left"]
        return tirx.any(w < 0, ctx.kv_idx + ctx.qo_len + w >= ctx.kv_len + ctx.qo_idx)

    def kv_range(self, ctx):
        from tvm import tirx

        w = ctx["window_left"]
        return tirx.if_then_else(w < 0, 0, ctx.kv_len + ctx.qo_idx - ctx.qo_len - w), ctx.kv_len

    def mask_is_range(self) -> bool:
        return True

    def key_range(self, args=None):
        if args is None:
            w = self._window_left
        else:
            w = check_window_left(_int_arg(args, "window_left", self._window_left))
        return KeyRange(window_left=w) if w >= 0 else None

    def ref_logits_mask(self, ctx):
        w = int(ctx["window_left"])
        if w < 0:
            return None
        q_pos = ctx.qo_idx + (ctx.kv_len - ctx.qo_len)
        return (q_pos - ctx.kv_idx) <= w


def _int_arg(args: dict, name: str, default: int) -> int:
    return check_scalar(name, "int32", args.get(name, default))


class CustomMask(AttentionVariant):
    """An arbitrary boolean mask per request, bit-packed as FlashInfer's ``packed_custom_mask``.

    Run-time tensors:

    * ``custom_mask``: uint8 ``[num_bytes]``, each request's row-major ``qo_len x kv_len`` boolean mask
      packed little-endian (bit ``i % 8`` of byte ``i // 8``), segments padded to whole bytes;
    * ``mask_indptr``: int32 ``[batch_size + 1]``, the byte offset of each request's segment.

    Build both with :func:`pack_custom_mask`. A bit outside ``custom_mask`` reads as masked, so a
    wrong ``mask_indptr`` cannot make the kernel read out of bounds. For block-sparse attention the
    whole ``M x N`` matrix is one request.
    """

    tensors = (
        TensorParam("custom_mask", "uint8", ("mask_bytes",), "bit-packed boolean mask"),
        TensorParam("mask_indptr", "int32", ("mask_segments",), "byte offset of each request's mask"),
    )

    def logits_mask(self, ctx):
        from tvm import tirx

        bits = ctx["custom_mask"]
        bit = tirx.Cast("int64", ctx.qo_idx) * tirx.Cast("int64", ctx.kv_len) + tirx.Cast("int64", ctx.kv_idx)
        byte = tirx.Cast("int64", ctx["mask_indptr"][ctx.batch_idx]) + bit // 8
        in_range = tirx.all(byte >= 0, byte < tirx.Cast("int64", bits.shape[0]))
        safe = tirx.if_then_else(in_range, byte, tirx.const(0, "int64"))
        value = tirx.Cast("int32", bits[safe])
        bit_set = tirx.bitwise_and(tirx.shift_right(value, tirx.Cast("int32", bit % 8)), 1) == 1
        return tirx.all(in_range, bit_set)

    def validate_lengths(self, args, qo_lens, kv_lens):
        """``mask_indptr`` has one segment per request, of exactly ``ceil(qo_len * kv_len / 8)``
        bytes (as :func:`pack_custom_mask` makes it), all inside ``custom_mask``."""
        from ..kv.validate import as_index_array, check_indptr
        from ..tensor import shape_of

        num_bytes = shape_of(args["custom_mask"], "custom_mask")[0]
        indptr = as_index_array("mask_indptr", args["mask_indptr"])
        need = (np.asarray(qo_lens, np.int64) * np.asarray(kv_lens, np.int64) + 7) // 8
        if indptr.size != need.size + 1:
            raise ValueError(
                f"mask_indptr: has {indptr.size} entries, but the plan has {need.size} requests "
                f"(expected {need.size + 1}; see pack_custom_mask)"
            )
        check_indptr("mask_indptr", indptr, num_bytes, "len(custom_mask)")
        sizes = np.diff(indptr)
        bad = np.nonzero(sizes != need)[0]
        if bad.size:
            b = int(bad[0])
            raise ValueError(
                f"mask_indptr: request {b}'s segment has {int(sizes[b])} bytes, but its qo_len x kv_len = "
                f"{int(qo_lens[b])} x {int(kv_lens[b])} mask packs into {int(need[b])} (see pack_custom_mask)"
            )

    def ref_logits_mask(self, ctx):
        packed = np.asarray(ctx["custom_mask"], dtype=np.uint8)
        start = int(np.asarray(ctx["mask_indptr"])[ctx.batch_idx])
        n = ctx.qo_len * ctx.kv_len
        flat = np.unpackbits(packed[start:], bitorder="little")[:n]
        flat = np.pad(flat, (0, n - flat.size))  # bits past the end read as masked
        dense = flat.reshape(ctx.qo_len, ctx.kv_len).astype(bool)
        return dense[np.asarray(ctx.qo_idx).reshape(-1)][:, np.asarray(ctx.kv_idx).reshape(-1)]


def pack_custom_mask(masks) -> tuple[np.ndarray, np.ndarray]:
    """Pack per-request boolean masks ``[(qo_len_i, kv_len_i), ...]`` into ``(custom_mask, mask_indptr)``.

    Same layout as FlashInfer's ``segment_packbits(..., bitorder="little")``.

    Example::

        >>> packed, indptr = pack_custom_mask([np.tril(np.ones((3, 3), bool))])
        >>> packed.tolist(), indptr.tolist()
        ([217, 1], [0, 2])
    """
    chunks, indptr = [], [0]
    for i, m in enumerate(masks):
        m = np.asarray(m)
        if m.ndim != 2:
            raise ValueError(f"pack_custom_mask: mask {i} must be 2-D (qo_len, kv_len), got shape {m.shape}")
        packed = np.packbits(m.astype(bool).reshape(-1), bitorder="little")
        chunks.append(packed)
        indptr.append(indptr[-1] + packed.size)
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return data.astype(np.uint8), np.asarray(indptr, dtype=np.int32)

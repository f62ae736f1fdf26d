"""Rotary position embedding applied on the fly to q and k (FlashInfer's ``ROPE_LLAMA``).

Lineage: FlashInfer ``pos_enc.cuh`` and TVM's ``_rope`` in ``_kernel_common.py``. Non-interleaved
("rotate half") layout. Positions: a key at ``kv_idx`` is at ``kv_idx``; a query row is at
``qo_idx + kv_len - qo_len``. Frequencies for pair ``i`` (``0 <= i < head_dim/2``):

* ``style="llama"``: ``1 / (rope_scale * rope_theta ** (2i / head_dim))``;
* ``style="llama3.1"``: Llama-3.1 scaling of ``rope_theta ** (-2i / head_dim)`` with factor
  ``rope_scale``, bands set by ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position``.

``rope_scale`` and ``rope_theta`` are float32 run-time scalars; the style and the band constants are
compile-time. The angle is computed in float32, as the kernels do.
"""

from __future__ import annotations

import math

import numpy as np

from .base import AttentionVariant, DimTable, ScalarParam
from .logits import check_positive_float

_STYLES = ("llama", "llama3.1")


class RoPE(AttentionVariant):
    uri_name = "rope"
    def __init__(
        self,
        style: str = "llama",
        rope_scale: float | None = None,
        rope_theta: float | None = None,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_max_position: int = 8192,
    ):
        if style not in _STYLES:
            raise ValueError(f"RoPE: style must be one of {_STYLES}, got {style!r}")
        low_freq_factor = check_positive_float("low_freq_factor", low_freq_factor)
        high_freq_factor = check_positive_float("high_freq_factor", high_freq_factor)
        if not high_freq_factor > low_freq_factor > 0:
            raise ValueError(
                "RoPE: need high_freq_factor > low_freq_factor > 0, "
                f"got {high_freq_factor}, {low_freq_factor}"
            )
        self.style = style
        if style == "llama3.1":
            self.low_freq_factor = float(low_freq_factor)
            self.high_freq_factor = float(high_freq_factor)
            from ..kv.validate import check_positive

            self.original_max_position = check_positive("original_max_position", original_max_position)
        default_scale, default_theta = (8.0, 500000.0) if style == "llama3.1" else (1.0, 10000.0)
        self._scale = check_positive_float("rope_scale", default_scale if rope_scale is None else rope_scale)
        self._theta = check_positive_float("rope_theta", default_theta if rope_theta is None else rope_theta)

    def validate_args(self, args):
        # theta <= 0 or scale 0 make the frequencies NaN or inf (o = 0, LSE = -inf)
        check_positive_float("rope_scale", args["rope_scale"])
        check_positive_float("rope_theta", args["rope_theta"])


    def spec(self):
        # the band constants are compile-time (public, in config()); scale and theta are the run-time defaults
        return self.named_spec(**self.config(), rope_scale=self._scale, rope_theta=self._theta)

    def extra_params(self):
        return (
            ScalarParam("rope_scale", "float32", self._scale, "position scale (llama) or factor (llama3.1)"),
            ScalarParam("rope_theta", "float32", self._theta, "base of the frequencies"),
        )

    # -- TIR ----------------------------------------------------------------------------------------
    def _freq(self, ctx, i):
        from tvm import tirx

        from ..tir.softmax import f32
        scale, theta = ctx["rope_scale"], ctx["rope_theta"]
        base = tirx.pow(theta, f32(-2 * i) / f32(ctx.head_dim))
        if self.style == "llama":
            return base / scale
        lo, hi, omax = self.low_freq_factor, self.high_freq_factor, float(self.original_max_position)
        wavelen = tirx.const(2 * math.pi, "float32") / base
        smooth = (tirx.const(omax, "float32") / wavelen - lo) / (hi - lo)
        mixed = (1.0 - smooth) * base / scale + smooth * base
        return tirx.if_then_else(
            wavelen < omax / hi, base, tirx.if_then_else(wavelen > omax / lo, base / scale, mixed)
        )

    def tables(self, head_dim: int):
        # the frequencies depend on the pair index and the scalars only: a CUDA kernel computes them
        # once per block (powf and a division per element per key made decode compute-bound)
        return (DimTable("rope_freq", head_dim // 2, self._freq),)

    def _rotate(self, ctx, load, d, pos):
        from tvm import tirx

        half = ctx.head_dim // 2
        i = tirx.floormod(d, half)
        angle = tirx.Cast("float32", pos) * ctx.table(self.tables(ctx.head_dim)[0], i)
        first = d < half
        partner = tirx.if_then_else(first, d + half, d - half)
        rotated = tirx.if_then_else(first, -load(partner), load(partner))
        return load(d) * tirx.cos(angle) + rotated * tirx.sin(angle)

    def query_transform(self, ctx, load, d):
        return self._rotate(ctx, load, d, ctx.qo_idx + ctx.kv_len - ctx.qo_len)

    def key_transform(self, ctx, load, d):
        return self._rotate(ctx, load, d, ctx.kv_idx)

    # -- numpy ---------------------------------------------------------------------------------------
    def ref_freqs(self, head_dim: int, rope_scale: float, rope_theta: float) -> np.ndarray:
        """float32 frequencies ``[head_dim / 2]``."""
        i = np.arange(head_dim // 2, dtype=np.float64)
        base = np.float32(rope_theta) ** (-2.0 * i / head_dim)
        if self.style == "llama":
            return (base / rope_scale).astype(np.float32)
        lo, hi, omax = self.low_freq_factor, self.high_freq_factor, self.original_max_position
        wavelen = 2 * np.pi / base
        smooth = (omax / wavelen - lo) / (hi - lo)
        out = np.where(
            wavelen < omax / hi,
            base,
            np.where(wavelen > omax / lo, base / rope_scale,
                     (1 - smooth) * base / rope_scale + smooth * base),
        )
        return out.astype(np.float32)

    def _ref_rotate(self, x, positions, ctx):
        d = x.shape[-1]
        freqs = self.ref_freqs(d, float(ctx["rope_scale"]), float(ctx["rope_theta"]))
        angle = (positions.astype(np.float32)[:, None] * freqs[None, :]).astype(np.float64)
        cos, sin = np.cos(angle), np.sin(angle)
        x1, x2 = x[:, : d // 2], x[:, d // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def ref_query_transform(self, ctx, q):
        positions = np.asarray(ctx.qo_idx).reshape(-1) + (ctx.kv_len - ctx.qo_len)
        return self._ref_rotate(q, positions, ctx)

    def ref_key_transform(self, ctx, k):
        return self._ref_rotate(k, np.asarray(ctx.kv_idx).reshape(-1), ctx)

"""Logits variants: soft-cap, ALiBi, and sigmoid attention (which turns the softmax off)."""

from __future__ import annotations

import math

import numpy as np

from .base import AttentionVariant, ScalarParam, TensorParam, check_scalar


def check_positive_float(name: str, value) -> float:
    """``value`` as a positive finite float32 (TypeError/ValueError naming ``name``)."""
    value = check_scalar(name, "float32", value)
    if not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}")
    return value


class LogitsSoftCap(AttentionVariant):
    """``cap * tanh(logits / cap)`` (Gemma-2, Grok), with ``logits_soft_cap`` a float32 run-time scalar."""

    uri_name = "soft_cap"

    def __init__(self, cap: float = 30.0):
        self._cap = check_positive_float("logits_soft_cap", cap)

    def spec(self):
        return self.named_spec(cap=self._cap)

    def extra_params(self):
        return (ScalarParam("logits_soft_cap", "float32", self._cap, "cap > 0"),)

    def validate_args(self, args):
        check_positive_float("logits_soft_cap", args["logits_soft_cap"])

    def logits_transform(self, ctx, logits):
        from tvm import tirx

        cap = ctx["logits_soft_cap"]
        return cap * tirx.tanh(logits / cap)

    def ref_logits_transform(self, ctx, logits):
        cap = float(ctx["logits_soft_cap"])
        return cap * np.tanh(logits / cap)


class ALiBi(AttentionVariant):
    """Adds ``-slope[h] * (query_position - key_position)`` to the logits (after ``sm_scale``).

    ``alibi_slopes`` is a float32 run-time tensor ``[num_qo_heads]``; when ``run`` is not given one it
    uses the standard slopes of :func:`alibi_slopes`.
    """

    uri_name = "alibi"

    tensors = (
        TensorParam(
            "alibi_slopes", "float32", ("num_qo_heads",), "per-head ALiBi slope (default: alibi_slopes())",
            default=lambda num_qo_heads, **_: alibi_slopes(num_qo_heads),
        ),
    )

    def logits_transform(self, ctx, logits):
        from tvm import tirx

        slope = ctx["alibi_slopes"][ctx.qo_head_idx]
        distance = ctx.kv_idx - (ctx.qo_idx + ctx.kv_len - ctx.qo_len)
        return logits + slope * tirx.Cast("float32", distance)

    def ref_logits_transform(self, ctx, logits):
        slope = float(np.asarray(ctx["alibi_slopes"])[ctx.qo_head_idx])
        q_pos = ctx.qo_idx + (ctx.kv_len - ctx.qo_len)
        return logits - slope * (q_pos - ctx.kv_idx)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The ALiBi paper's slopes for ``num_heads`` heads (geometric, interleaved past a power of two)."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    if n < num_heads:
        extra = [2.0 ** (-4.0 * (2 * i + 1) / n) for i in range(num_heads - n)]
        slopes += extra
    return np.asarray(slopes, dtype=np.float32)


class SigmoidAttention(AttentionVariant):
    """FlashSigmoid: weights ``sigmoid(logits + sigmoid_bias)``, no softmax and so no LSE.

    The example of a variant that changes the algorithm: ``use_softmax = False`` makes the kernel sum
    ``weight * v`` directly. Split-KV partial results add up, and ``return_lse`` is refused.
    """

    uri_name = "sigmoid"

    use_softmax = False

    def __init__(self, bias: float = 0.0):
        self._bias = check_scalar("sigmoid_bias", "float32", bias)

    def spec(self):
        return self.named_spec(bias=self._bias)

    def extra_params(self):
        return (ScalarParam("sigmoid_bias", "float32", self._bias, "added before the sigmoid"),)

    def logits_transform(self, ctx, logits):
        from tvm import tirx

        return tirx.sigmoid(logits + ctx["sigmoid_bias"])

    def ref_logits_transform(self, ctx, logits):
        return 1.0 / (1.0 + np.exp(-(logits + float(ctx["sigmoid_bias"]))))

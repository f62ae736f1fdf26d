"""Variants: user-defined ones end to end, composition, the README example, and the probe of each
built-in hook against its numpy twin over a (qo, kv) grid."""

import numpy as np
import pytest

import tvm_attn as ta
from tvm_attn import reference as R

from conftest import assert_attention_close, randn


class ScaledOutput(ta.AttentionVariant):
    """A user variant touching every hook: a query scale, a key offset, a temperature and an output gain."""

    scalars = (ta.ScalarParam("temperature", "float32", 1.0), ta.ScalarParam("gain", "float32", 2.0))
    tensors = (ta.TensorParam("key_bias", "float32", ("head_dim",)),)

    def query_transform(self, ctx, load, d):
        return load(d) * 0.5

    def key_transform(self, ctx, load, d):
        return load(d) + ctx["key_bias"][d]

    def logits_transform(self, ctx, logits):
        return logits / ctx["temperature"]

    def logits_mask(self, ctx):
        return (ctx.kv_idx + ctx.qo_head_idx) % 3 != 0

    def output_transform(self, ctx, out, d):
        return out * ctx["gain"]

    def ref_query_transform(self, ctx, q):
        return q * 0.5

    def ref_key_transform(self, ctx, k):
        return k + np.asarray(ctx["key_bias"])[None, :]

    def ref_logits_transform(self, ctx, logits):
        return logits / ctx["temperature"]

    def ref_logits_mask(self, ctx):
        return (ctx.kv_idx + ctx.qo_head_idx) % 3 != 0

    def ref_output_transform(self, ctx, out):
        return out * ctx["gain"]


@pytest.mark.parametrize("compose_with", [None, "causal", "softcap"])
def test_user_variant_end_to_end(compose_with, rng):
    variant = ScaledOutput()
    if compose_with == "causal":
        variant = ta.Causal() + variant
    elif compose_with == "softcap":
        variant = variant + ta.LogitsSoftCap(4.0)
    q, k, v = (randn(rng, (9, 4, 64), "float32"), randn(rng, (20, 2, 64), "float32"),
               randn(rng, (20, 2, 64), "float32"))
    args = {"temperature": 0.7, "key_bias": rng.standard_normal(64).astype(np.float32)}
    o, lse = ta.single_prefill_with_kv_cache(q, k, v, variant=variant, return_lse=True, **args)
    ref_o, ref_lse = R.dense_attention(q, k, v, variant=variant, params=args)
    assert_attention_close(o, lse, ref_o, ref_lse, "float32")


def test_readme_variant_example(rng):
    """The README's under-25-line custom variant, verbatim in spirit."""

    class Temperature(ta.AttentionVariant):
        scalars = (ta.ScalarParam("temperature", "float32", default=1.0),)

        def logits_transform(self, ctx, logits):
            return logits / ctx["temperature"]

        def ref_logits_transform(self, ctx, logits):
            return logits / ctx["temperature"]

    q, k, v = (randn(rng, (4, 8, 128), "float16"), randn(rng, (33, 2, 128), "float16"),
               randn(rng, (33, 2, 128), "float16"))
    o = ta.single_prefill_with_kv_cache(q, k, v, causal=True, variant=Temperature(), temperature=0.5)
    ref, _ = R.dense_attention(q, k, v, variant=ta.Causal() + Temperature(), params={"temperature": 0.5})
    assert_attention_close(o, None, ref, None, "float16")


@pytest.mark.parametrize(
    "variant, args",
    [
        (ta.Causal(), {}),
        (ta.variants.RuntimeCausal(), {}),
        (ta.variants.RuntimeCausal(), {"is_causal": 0}),
        (ta.SlidingWindow(3), {}),
        (ta.SlidingWindow(), {"window_left": 0}),
        (ta.LogitsSoftCap(0.5), {}),
        (ta.ALiBi(), {}),
        (ta.RoPE(), {"rope_scale": 2.0}),
        (ta.RoPE("llama3.1", original_max_position=32), {"rope_theta": 1000.0}),
        (ta.SigmoidAttention(0.25), {}),
        (ta.Causal() + ta.SlidingWindow(2) + ta.LogitsSoftCap(1.0), {}),
    ],
    ids=lambda x: x if isinstance(x, dict) else repr(x),
)
@pytest.mark.parametrize("qo_len, kv_len", [(1, 1), (7, 7), (5, 40), (12, 3)])
def test_builtin_hook_probe(variant, args, qo_len, kv_len, rng):
    """Every (qo, kv) pair of a grid, for each built-in: kernel hook vs numpy twin."""
    q = randn(rng, (qo_len, 4, 64), "float32")
    k, v = randn(rng, (kv_len, 4, 64), "float32"), randn(rng, (kv_len, 4, 64), "float32")
    res = ta.single_prefill_with_kv_cache(q, k, v, variant=variant, return_lse=variant.use_softmax, **args)
    o, lse = res if variant.use_softmax else (res, None)
    ref_o, ref_lse = R.dense_attention(q, k, v, variant=variant, params=args)
    assert_attention_close(o, lse, ref_o, ref_lse, "float32", repr(variant))


def test_compose_flattens_and_names():
    v = ta.compose(ta.Causal(), ta.compose(ta.SlidingWindow(4), ta.LogitsSoftCap()))
    assert [type(p).__name__ for p in v.parts] == ["Causal", "SlidingWindow", "LogitsSoftCap"]
    assert v.uri() == "causal__sliding_window__soft_cap"
    assert ta.compose(ta.AttentionVariant(), ta.Causal()) == ta.Causal()
    assert {p.name for p in v.extra_params()} == {"window_left", "logits_soft_cap"}


def test_pack_custom_mask_layout():
    m = np.tril(np.ones((3, 3), bool))
    packed, indptr = ta.pack_custom_mask([m, np.ones((1, 9), bool)])
    assert packed.tolist() == [217, 1, 255, 1] and indptr.tolist() == [0, 2, 4]
    bits = np.unpackbits(packed[:2], bitorder="little")[:9].reshape(3, 3)
    np.testing.assert_array_equal(bits.astype(bool), m)


class KeyGain(ta.AttentionVariant):
    """A user variant whose key transform reads a DimTable: a gain per head-dimension pair."""

    scalars = (ta.ScalarParam("gain_base", "float32", 1.5),)

    def tables(self, head_dim):
        return (ta.DimTable("key_gain", head_dim // 2, lambda ctx, i: ctx["gain_base"] + 0.125 * i),)

    def key_transform(self, ctx, load, d):
        from tvm import tirx

        return load(d) * ctx.table(self.tables(ctx.head_dim)[0], tirx.floormod(d, ctx.head_dim // 2))

    def ref_key_transform(self, ctx, k):
        half = k.shape[-1] // 2
        gain = ctx["gain_base"] + 0.125 * np.arange(half)
        return k * np.concatenate([gain, gain])[None, :]


def test_dim_table_variant_end_to_end(rng):
    """A kernel that keeps no tables computes the entry in place; same result as the numpy twin."""
    q, k, v = (randn(rng, (6, 4, 64), "float32"), randn(rng, (17, 2, 64), "float32"),
               randn(rng, (17, 2, 64), "float32"))
    variant = KeyGain() + ta.RoPE()
    args = {"gain_base": 0.75}
    o, lse = ta.single_prefill_with_kv_cache(q, k, v, variant=variant, return_lse=True, **args)
    ref_o, ref_lse = R.dense_attention(q, k, v, variant=variant, params=args)
    assert_attention_close(o, lse, ref_o, ref_lse, "float32")
    assert [t.name for t in variant.tables(64)] == ["key_gain", "rope_freq"]


def test_compose_refuses_duplicate_table_names():
    with pytest.raises(ValueError, match="rope_freq"):
        ta.compose(ta.RoPE(), ta.RoPE("llama3.1")).tables(128)

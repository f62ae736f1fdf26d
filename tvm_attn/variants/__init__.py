"""Attention variants: the functor base class, the built-ins, and composition.

How to add a variant (at most four steps): write a class in one file here (TIR hooks + numpy twins);
export it below; add its case to ``tests/test_variants.py``; add it to the GPU tier when CUDA kernels
use it.
"""

from .base import (
    AttentionVariant,
    ComposedVariant,
    DimTable,
    HookContext,
    RefContext,
    ScalarParam,
    TensorParam,
    compose,
)
from .logits import ALiBi, LogitsSoftCap, SigmoidAttention, alibi_slopes
from .masks import Causal, CustomMask, RuntimeCausal, SlidingWindow, pack_custom_mask
from .rope import RoPE

#: Built-in variants by the name the CLI and JSON kernel lists use.
BUILTIN = {
    "default": AttentionVariant,
    "causal": Causal,
    "runtime_causal": RuntimeCausal,
    "sliding_window": SlidingWindow,
    "custom_mask": CustomMask,
    "logits_soft_cap": LogitsSoftCap,
    "alibi": ALiBi,
    "rope": RoPE,
    "sigmoid": SigmoidAttention,
}


def variant_from_spec(spec) -> AttentionVariant:
    """A variant from a JSON-able spec, as :meth:`AttentionVariant.spec` writes it: a name,
    ``{"name": ..., **kwargs}``, a list of those (composed), or ``"package.module:ClassName"`` for a
    user variant."""
    if spec is None:
        return AttentionVariant()
    if isinstance(spec, AttentionVariant):
        return spec
    if isinstance(spec, list):
        return compose(*(variant_from_spec(s) for s in spec))
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"variant spec must be a name, a dict with 'name', or a list; got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        cls = importlib.import_module(module)
        for part in attr.split("."):
            cls = getattr(cls, part)
    elif name in BUILTIN:
        cls = BUILTIN[name]
    else:
        raise ValueError(f"unknown variant {name!r}; built-ins: {', '.join(BUILTIN)}")
    if not (isinstance(cls, type) and issubclass(cls, AttentionVariant)):
        raise TypeError(f"variant {name!r} is not an AttentionVariant class")
    return cls(**kwargs)


__all__ = [
    "AttentionVariant", "ComposedVariant", "DimTable", "HookContext", "RefContext", "ScalarParam",
    "TensorParam", "compose", "ALiBi", "LogitsSoftCap", "SigmoidAttention", "alibi_slopes", "Causal",
    "CustomMask",
    "RuntimeCausal", "SlidingWindow", "pack_custom_mask", "RoPE", "BUILTIN", "variant_from_spec",
]

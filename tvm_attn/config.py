"""Kernel keys: everything that selects a generated kernel, and the deterministic name built from it.

The name (``uri``) is the kernel's global symbol and the key of the kernel cache, as FlashInfer's
``get_batch_decode_uri``. Two keys with the same uri generate the same kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import dtypes
from .kv.formats import BlockSparseKV, PagedKV, RaggedKV
from .kv.validate import check_head_dim, check_heads
from .variants.base import AttentionVariant, ScalarParam, TensorParam

#: Attention kinds: decode has one query row per request and no ``qo_indptr``; prefill has ragged
#: query rows described by ``qo_indptr`` (append and single prefill are prefill); bsr is block-sparse.
KINDS = ("decode", "prefill", "bsr")


def target_uri(target: str) -> str:
    """``"llvm"`` or ``"cuda:sm_90a"`` -> a name fragment."""
    return target.replace(":", "").replace("_", "")


@dataclass(frozen=True)
class AttentionKey:
    kind: str
    kv: PagedKV | RaggedKV | BlockSparseKV
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    q_dtype: str = "float16"
    kv_dtype: str = "float16"
    variant: AttentionVariant = field(default_factory=AttentionVariant)
    target: str = "llvm"
    schedule: str = "default"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "bsr") != isinstance(self.kv, BlockSparseKV):
            raise ValueError(f"kind {self.kind!r} does not go with KV format {self.kv!r}")
        check_heads(self.num_qo_heads, self.num_kv_heads)
        check_head_dim(self.head_dim)
        object.__setattr__(self, "q_dtype", dtypes.check_data_dtype("q_dtype", self.q_dtype))
        object.__setattr__(self, "kv_dtype", dtypes.check_data_dtype("kv_dtype", self.kv_dtype))
        if not isinstance(self.variant, AttentionVariant):
            raise TypeError(f"variant: expected an AttentionVariant, got {self.variant!r}")

    @property
    def o_dtype(self) -> str:
        return self.q_dtype

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def uri(self) -> str:
        parts = [
            f"attn_{self.kind}", self.kv.uri(),
            f"q{dtypes.short(self.q_dtype)}", f"kv{dtypes.short(self.kv_dtype)}",
            f"h{self.num_qo_heads}x{self.num_kv_heads}", f"d{self.head_dim}",
            self.variant.uri().replace("+", "_"), target_uri(self.target), self.schedule,
        ]
        return "_".join(parts)

    def param_names(self) -> list[str]:
        """The kernel's arguments in call order (the C++ / packed-function contract)."""
        if self.kind == "bsr":
            head = ["q", "k", "v", "indptr", "indices"]
        else:
            head = ["q"] + (["qo_indptr"] if self.kind == "prefill" else [])
            if isinstance(self.kv, PagedKV):
                head += ["paged_kv_cache", "kv_indptr", "kv_indices", "kv_last_page_len"]
            else:
                head += ["k", "v", "kv_indptr"]
        return head + ["o", "lse", "sm_scale"] + [p.name for p in self.extra_params()]

    def extra_params(self) -> tuple[TensorParam | ScalarParam, ...]:
        """Tensors first, then scalars, each in declaration order."""
        params = self.variant.extra_params()
        return tuple(p for p in params if isinstance(p, TensorParam)) + tuple(
            p for p in params if isinstance(p, ScalarParam)
        )

    def to_json(self) -> dict:
        kv = {"format": type(self.kv).__name__, **vars(self.kv)}
        return {
            "kind": self.kind, "kv": kv, "num_qo_heads": self.num_qo_heads, "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "q_dtype": self.q_dtype, "kv_dtype": self.kv_dtype,
            "variant": self.variant.uri(), "target": self.target, "schedule": self.schedule,
        }


@dataclass(frozen=True)
class MergeKey:
    """``merge_state`` (two states), ``merge_state_in_place`` or ``merge_states`` (n states)."""

    op: str
    dtype: str = "float16"
    target: str = "llvm"

    def __post_init__(self):
        if self.op not in ("merge_state", "merge_state_in_place", "merge_states"):
            raise ValueError(f"op: unknown merge op {self.op!r}")
        object.__setattr__(self, "dtype", dtypes.check_data_dtype("v.dtype", self.dtype))

    @property
    def uri(self) -> str:
        return f"{self.op}_{dtypes.short(self.dtype)}_{target_uri(self.target)}"

    def to_json(self) -> dict:
        return {"op": self.op, "dtype": self.dtype, "target": self.target}


@dataclass(frozen=True)
class PlannerKey:
    """The planner alone, as a host module (CUDA kernel modules also carry their own copy)."""

    target: str = "llvm"

    @property
    def uri(self) -> str:
        return "tvm_attn_plan_" + target_uri(self.target)

    def to_json(self) -> dict:
        return {"planner": "split_kv", "target": self.target}


def key_from_spec(spec: dict) -> AttentionKey | MergeKey:
    """A kernel key from a JSON-able spec (the format of ``tvm-attn build --kernels``)::

        {"kind": "decode", "kv": {"format": "paged", "page_size": 16, "layout": "NHD"},
         "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "q_dtype": "float16",
         "variant": ["causal", {"name": "sliding_window", "window_left": 128}]}
        {"merge": "merge_states", "dtype": "float16"}
    """
    from .variants import variant_from_spec

    spec = dict(spec)
    target = spec.pop("target", "llvm")
    if "merge" in spec:
        return MergeKey(spec.pop("merge"), spec.pop("dtype", "float16"), target)
    kv = dict(spec.pop("kv"))
    fmt = kv.pop("format")
    formats = {"paged": PagedKV, "ragged": RaggedKV, "bsr": BlockSparseKV}
    if fmt not in formats:
        raise ValueError(f"kv.format: must be one of {list(formats)}, got {fmt!r}")
    variant = variant_from_spec(spec.pop("variant", None))
    kind, hq, hkv, d = spec.pop("kind"), spec.pop("num_qo_heads"), spec.pop("num_kv_heads"), spec.pop("head_dim")
    q_dtype = spec.pop("q_dtype", "float16")
    kv_dtype = spec.pop("kv_dtype", q_dtype)
    schedule = spec.pop("schedule", None)
    if schedule is None and target.startswith("cuda") and kind == "decode":
        from .schedule.decode import decode_schedule

        schedule = decode_schedule(d, kv_dtype, hq // max(hkv, 1), variant)
    return AttentionKey(kind, formats[fmt](**kv), hq, hkv, d, q_dtype, kv_dtype, variant, target, schedule or "default")

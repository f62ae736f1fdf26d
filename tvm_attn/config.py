"""Kernel keys: everything that selects a generated kernel, and the deterministic name built from it.

The name (``uri``) is the kernel's global symbol and the key of the kernel cache, as FlashInfer's
``get_batch_decode_uri``. Two keys with the same uri generate the same kernel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from . import dtypes
from .kv.formats import BlockSparseKV, PagedKV, RaggedKV
from .kv.validate import check_head_dim, check_heads
from .variants.base import AttentionVariant, ScalarParam, TensorParam

#: Attention kinds: decode has one query row per request and no ``qo_indptr``; prefill has ragged
#: query rows described by ``qo_indptr`` (append and single prefill are prefill); bsr is block-sparse.
KINDS = ("decode", "prefill", "bsr")
#: KV formats by the name specs use (``to_json`` writes these; the class names are read too)
KV_FORMATS = {"paged": PagedKV, "ragged": RaggedKV, "bsr": BlockSparseKV}
MERGE_OPS = ("merge_state", "merge_state_in_place", "merge_states")


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
        """The spec :func:`key_from_spec` reads back into this key."""
        fmt = next(name for name, cls in KV_FORMATS.items() if isinstance(self.kv, cls))
        return {
            "kind": self.kind, "kv": {"format": fmt, **asdict(self.kv)}, "num_qo_heads": self.num_qo_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "q_dtype": self.q_dtype,
            "kv_dtype": self.kv_dtype, "variant": self.variant.spec(), "target": self.target,
            "schedule": self.schedule,
        }


@dataclass(frozen=True)
class MergeKey:
    """``merge_state`` (two states), ``merge_state_in_place`` or ``merge_states`` (n states)."""

    op: str
    dtype: str = "float16"
    target: str = "llvm"

    def __post_init__(self):
        if self.op not in MERGE_OPS:
            raise ValueError(f"op: unknown merge op {self.op!r}")
        object.__setattr__(self, "dtype", dtypes.check_data_dtype("v.dtype", self.dtype))

    @property
    def uri(self) -> str:
        return f"{self.op}_{dtypes.short(self.dtype)}_{target_uri(self.target)}"

    def to_json(self) -> dict:
        return {"merge": self.op, "dtype": self.dtype, "target": self.target}


@dataclass(frozen=True)
class PlannerKey:
    """The planner alone, as a host module (CUDA kernel modules also carry their own copy)."""

    target: str = "llvm"

    @property
    def uri(self) -> str:
        return "tvm_attn_plan_" + target_uri(self.target)

    def to_json(self) -> dict:
        return {"planner": "split_kv", "target": self.target}


def key_from_spec(spec: dict, gpu: str | None = None) -> AttentionKey | MergeKey | PlannerKey:
    """A kernel key from a JSON-able spec (the format of ``tvm-attn build --kernels``, and what
    ``to_json`` writes)::

        {"kind": "decode", "kv": {"format": "paged", "page_size": 16, "layout": "NHD"},
         "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "q_dtype": "float16",
         "variant": ["causal", {"name": "sliding_window", "window_left": 128}]}
        {"merge": "merge_states", "dtype": "float16"}
        {"planner": "split_kv"}

    ``target`` defaults to ``"llvm"``, ``kv_dtype`` to ``q_dtype``, and ``schedule`` to the one the
    kernel's family chooses (:mod:`tvm_attn.registry`) for ``gpu`` (a tuned table's, see
    :mod:`tvm_attn.schedule.tuned`).
    """
    if not isinstance(spec, dict):
        raise TypeError(f"kernel spec: expected a JSON object, got {spec!r}")
    spec = dict(spec)
    target = spec.pop("target", "llvm")
    if "merge" in spec:
        key = MergeKey(spec.pop("merge"), spec.pop("dtype", "float16"), target)
    elif "planner" in spec:
        if spec.pop("planner") != "split_kv":
            raise ValueError("kernel spec: planner: the one planner is 'split_kv'")
        key = PlannerKey(target)
    else:
        key, schedule = _attention_key(spec, target)
    if spec:
        raise ValueError(f"kernel spec: unknown keys {sorted(spec)} for a {type(key).__name__}")
    if isinstance(key, AttentionKey) and schedule is None:
        from .registry import scheduled

        key = scheduled(key, gpu=gpu)
    return key


def _attention_key(spec: dict, target: str) -> tuple[AttentionKey, str | None]:
    """Pops an attention spec's entries off ``spec``: the key (schedule "default" when not given)
    and the schedule given."""
    from .variants import variant_from_spec

    for name in ("kind", "kv", "num_qo_heads", "num_kv_heads", "head_dim"):
        if name not in spec:
            raise ValueError(f"kernel spec: missing {name!r} (an attention kernel spec needs kind, kv, "
                             "num_qo_heads, num_kv_heads and head_dim; a merge spec has 'merge')")
    kv = spec.pop("kv")
    if not isinstance(kv, dict) or "format" not in kv:
        raise ValueError(f"kernel spec: kv: expected an object with a 'format', got {kv!r}")
    kv = dict(kv)
    fmt = kv.pop("format")
    formats = {**KV_FORMATS, **{cls.__name__: cls for cls in KV_FORMATS.values()}}
    if fmt not in formats:
        raise ValueError(f"kernel spec: kv.format: must be one of {list(KV_FORMATS)}, got {fmt!r}")
    names = {f.name for f in fields(formats[fmt])}
    if set(kv) - names:
        raise ValueError(f"kernel spec: kv: unknown keys {sorted(set(kv) - names)} for format {fmt!r} "
                         f"(it takes {sorted(names)})")
    q_dtype = spec.pop("q_dtype", "float16")
    schedule = spec.pop("schedule", None)
    key = AttentionKey(spec.pop("kind"), formats[fmt](**kv), spec.pop("num_qo_heads"),
                       spec.pop("num_kv_heads"), spec.pop("head_dim"), q_dtype, spec.pop("kv_dtype", q_dtype),
                       variant_from_spec(spec.pop("variant", None)), target, schedule or "default")
    return key, schedule

"""The variant functor: what a custom attention changes, as hooks that return TIR expressions.

Lineage: FlashInfer's ``AttentionVariantBase`` (``variant_helper.cuh``) and the paper's design space
``o = output_transform(softmax(logits_mask ? logits_transform(sm_scale * q' . k') : -inf) . v)`` with
``q' = query_transform(q)`` and ``k' = key_transform(k)``.

A variant is a small Python class. Its hooks are called while a kernel is *generated*; each returns a
TIR ``PrimExpr`` that is inlined into the kernel, so a variant costs nothing at run time beyond the
arithmetic it adds. Every hook has a numpy twin (``ref_*``) used by :mod:`tvm_attn.reference`; the
twin is written independently so that tests compare two implementations, not one with itself.

Semantics, shared by every kernel and the reference:

* ``qo_idx`` and ``kv_idx`` are logical positions within the request (for block-sparse attention:
  the absolute row of q and column of k). ``qo_len`` and ``kv_len`` are the request's lengths. A query
  row is aligned to the end of the KV: its absolute position is ``qo_idx + kv_len - qo_len``.
* logits are ``sm_scale * dot(q', k')`` in float32, then ``logits_transform``; masked entries take no
  part. With ``use_softmax`` the weights are the softmax of the logits; otherwise the weights *are*
  the transformed logits (sigmoid attention).
* The LSE is ``log2(sum(exp(logits)))`` over visible entries (log2 units, as FlashInfer and TVM),
  ``-inf`` for a row that sees nothing; such a row's output is 0.
* Non-finite data propagates as in torch's softmax: a visible logit that is NaN or ``+inf`` makes
  its row's output and LSE NaN (never the 0 / ``-inf`` of an empty row); a ``-inf`` logit weighs 0.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Names the kernels already use; an extra parameter may not take them.
RESERVED_NAMES = frozenset(
    {"q", "k", "v", "o", "lse", "sm_scale", "qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len",
     "paged_kv_cache", "indptr", "indices"}
)
#: Symbolic dimension names an extra tensor's shape may use; they are replaced by the kernel's constants.
CONFIG_DIMS = ("num_qo_heads", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class TensorParam:
    """An extra tensor a variant reads, passed to ``run`` by keyword.

    ``shape`` holds ints, names from :data:`CONFIG_DIMS` (replaced by the kernel's constants), or other
    names, which become free symbolic dims checked by TVM when the kernel is called.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    doc: str = ""
    #: optional ``default(num_qo_heads=..., num_kv_heads=..., head_dim=...) -> array`` used when ``run``
    #: is not given the tensor
    default: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        _check_name(self.name)
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclass(frozen=True)
class ScalarParam:
    """An extra scalar (``int32`` or ``float32``) passed to ``run`` by keyword, or its default."""

    name: str
    dtype: str
    default: float | int | None = None
    doc: str = ""

    def __post_init__(self):
        _check_name(self.name)
        if self.dtype not in ("int32", "float32"):
            raise ValueError(f"ScalarParam {self.name!r}: dtype must be int32 or float32, got {self.dtype!r}")


#: the range of an int32 run-time scalar, and the largest finite float32
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38


def check_scalar(name: str, dtype: str, value) -> int | float:
    """``value`` as a run-time scalar of ``dtype`` (``"int32"`` or ``"float32"``), never coerced:
    an int32 takes an integer (not 2.5, not "3", not True), a float32 a real number (not a string);
    NaN, inf and values outside the dtype's range are refused. TypeError or ValueError naming ``name``."""
    if dtype == "int32":
        try:
            if isinstance(value, (bool, np.bool_)):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name}: expected an int32 scalar (an integer), got {value!r}") from None
        if not INT32_MIN <= value <= INT32_MAX:
            raise ValueError(f"{name}: {value} does not fit in int32")
        return int(value)
    if isinstance(value, (str, bytes, bool)) or not (isinstance(value, numbers.Real)
                                                     or hasattr(value, "__float__")):
        raise TypeError(f"{name}: expected a float32 scalar (a real number), got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float32 scalar (a real number), got {value!r}") from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name}: must be a finite float32 number, got {value!r}")
    return value


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"extra parameter name {name!r} is not an identifier")
    if name in RESERVED_NAMES:
        raise ValueError(f"extra parameter name {name!r} is reserved by the kernels")


@dataclass
class HookContext:
    """What a hook sees: positions as TIR int32 expressions, and the variant's extra parameters.

    ``kv_idx`` is None in ``query_transform``; ``qo_idx`` and ``qo_head_idx`` are None in
    ``key_transform`` (a key is transformed once for every query that reads it).
    ``ctx["name"]`` returns an extra parameter: a TIR ``Buffer`` for a tensor, a ``Var`` for a scalar.
    """

    batch_idx: Any
    qo_idx: Any
    kv_idx: Any
    qo_head_idx: Any
    kv_head_idx: Any
    qo_len: Any
    kv_len: Any
    head_dim: int
    params: dict[str, Any]

    #: tables a kernel keeps (name -> Buffer over ``i``): see :class:`DimTable`
    tables: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str):
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"no extra parameter {name!r}; declared: {sorted(self.params)}") from None

    def table(self, table: "DimTable", i):
        """Entry ``i`` of ``table``: read from the kernel's copy where it keeps one, else computed here."""
        buf = self.tables.get(table.name)
        return table.value(self, i) if buf is None else buf[i]


@dataclass(frozen=True)
class DimTable:
    """Float32 values over an index ``i in [0, size)`` that depend only on ``i`` and the variant's
    scalars, never on positions (RoPE's frequencies, ``theta ** (-2 i / head_dim) / scale``).

    A hook reads entry ``i`` with ``ctx.table(table, i)``. Kernels that run the hook per key (the
    CUDA kernels) compute each table once per block into shared memory, with ``value(ctx, i)`` for
    a context that has only ``head_dim`` and the extra parameters; elsewhere ``ctx.table`` inlines
    ``value``. Either way the hook's result is the same expression of the same inputs.
    """

    name: str
    size: int
    value: Callable[["HookContext", Any], Any] = dataclasses.field(compare=False)


@dataclass
class RefContext:
    """The numpy twin of :class:`HookContext` for one (request, query head).

    ``qo_idx`` has shape ``(qo_len, 1)`` and ``kv_idx`` shape ``(1, kv_len)``, so expressions of both
    broadcast to the ``(qo_len, kv_len)`` logits grid. Heads and lengths are Python ints; extra
    parameters are numpy arrays or Python scalars.
    """

    batch_idx: int
    qo_idx: Any
    kv_idx: Any
    qo_head_idx: int | None
    kv_head_idx: int
    qo_len: int
    kv_len: int
    head_dim: int
    params: dict[str, Any]

    def __getitem__(self, name: str):
        try:
            return self.params[name]
        except KeyError:
            raise KeyError(f"no extra parameter {name!r}; declared: {sorted(self.params)}") from None


@dataclass(frozen=True)
class KeyRange:
    """Which keys a query row sees, as far as a plan can know: with ``causal``, none after its own
    position (bottom-right aligned, as :class:`~tvm_attn.variants.Causal`); with ``window_left = w``,
    none more than ``w`` before it. :meth:`AttentionVariant.key_range` returns one (None: every key);
    the CUDA planners read only these keys."""

    causal: bool = False
    window_left: int | None = None

    def __post_init__(self):
        if self.window_left is not None and self.window_left < 0:
            raise ValueError(f"KeyRange: window_left must be None or >= 0, got {self.window_left}")

    def __and__(self, other: "KeyRange") -> "KeyRange":
        """The keys both ranges show."""
        windows = [w for w in (self.window_left, other.window_left) if w is not None]
        return KeyRange(self.causal or other.causal, min(windows) if windows else None)

    def __str__(self):
        parts = (["causal"] if self.causal else []) + ([f"window_left={self.window_left}"]
                                                       if self.window_left is not None else [])
        return ", ".join(parts) or "every key"


def intersect_key_ranges(ranges) -> KeyRange | None:
    """The keys every one of ``ranges`` shows (a None in ``ranges``: every key)."""
    out = None
    for r in ranges:
        if r is not None:
            out = r if out is None else out & r
    return out


def check_key_range(planned: KeyRange | None, needed: KeyRange | None) -> None:
    """Refuse a run that needs keys its plan does not read: a ValueError naming the widened field."""
    if planned is None:
        return
    needed = needed or KeyRange()
    field = None
    if planned.causal and not needed.causal:
        field = "causal"
    elif planned.window_left is not None and (needed.window_left is None
                                              or needed.window_left > planned.window_left):
        field = "window_left"
    if field is not None:
        raise ValueError(f"{field}: this run's keys ({needed}) include keys that the plan, cut for "
                         f"({planned}), does not read; plan with the widest range you run with")


class AttentionVariant:
    """Base class: plain softmax attention. Subclasses override only the hooks they need.

    Class attributes ``tensors`` and ``scalars`` declare extra parameters; override
    :meth:`extra_params` when they depend on constructor arguments. Compile-time options are
    instance attributes of simple types (int, float, str, bool); they enter the kernel name through
    :meth:`uri`, so two variants with the same uri must generate the same kernel.
    """

    use_softmax: bool = True
    tensors: tuple[TensorParam, ...] = ()
    scalars: tuple[ScalarParam, ...] = ()

    # -- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if type(self) is AttentionVariant:
            return "default"
        if "uri_name" in type(self).__dict__:
            return type(self).uri_name
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def config(self) -> dict[str, Any]:
        """Compile-time options: public instance attributes of simple types."""
        return {
            k: v for k, v in sorted(vars(self).items())
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))
        }

    def uri(self) -> str:
        parts = [self.name] + [f"{k}{_fmt(v)}" for k, v in self.config().items()]
        return "_".join(parts)

    def spec(self) -> str | dict | list:
        """The JSON-able spec :func:`~tvm_attn.variants.variant_from_spec` reads back into this variant:
        the built-in name or ``"module:Class"``, with the constructor arguments the variant keeps as
        public attributes (its :meth:`config`). A variant that keeps other constructor state overrides
        this, returning ``self.named_spec(**arguments)``."""
        other = sorted(set(vars(self)) - set(self.config()))
        if other:
            raise TypeError(f"{type(self).__name__}.spec: the variant keeps {other} beyond its config(); "
                            "define spec() returning self.named_spec(**constructor_arguments)")
        return self.named_spec(**self.config())

    def named_spec(self, **arguments) -> str | dict:
        """``{"name": <built-in name or "module:Class">, **arguments}``, or the name alone."""
        from . import BUILTIN

        cls = type(self)
        name = next((n for n, c in BUILTIN.items() if c is cls), f"{cls.__module__}:{cls.__qualname__}")
        return {"name": name, **arguments} if arguments else name

    def extra_params(self) -> tuple[TensorParam | ScalarParam, ...]:
        return tuple(self.tensors) + tuple(self.scalars)

    def validate_args(self, args: dict[str, Any]) -> None:
        """Check the values of the run-time scalars (host-side, O(1)); raise ValueError naming the bad one."""

    def checks_lengths(self) -> bool:
        """Whether :meth:`validate_lengths` checks anything (the wrappers then keep each planned
        request's lengths)."""
        return type(self).validate_lengths is not AttentionVariant.validate_lengths

    def validate_lengths(self, args: dict[str, Any], qo_lens, kv_lens) -> None:
        """Check the run-time tensors ``args`` against the planned requests' lengths (int64 arrays
        ``qo_lens``, ``kv_lens``, one entry per request or block-sparse matrix); raise ValueError
        naming the bad one."""

    def overrides(self, hook: str) -> bool:
        """Whether this variant changes ``hook`` (kernels skip the work of hooks left at default)."""
        return getattr(type(self), hook) is not getattr(AttentionVariant, hook)

    def reads_tensors(self) -> bool:
        """Whether the variant takes run-time tensors (its hooks load from them, which the CUDA
        schedules count as registers)."""
        return any(isinstance(p, TensorParam) for p in self.extra_params())

    def __add__(self, other: "AttentionVariant") -> "AttentionVariant":
        return compose(self, other)

    def __eq__(self, other):
        return isinstance(other, AttentionVariant) and self.uri() == other.uri()

    def __hash__(self):
        return hash(self.uri())

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({cfg})"

    # -- TIR hooks (called at generation time; return PrimExprs) -----------------------------------
    def query_transform(self, ctx: HookContext, load: Callable[[Any], Any], d) -> Any:
        """Element ``d`` of the transformed query, in float32. ``load(i)`` reads raw element ``i``."""
        return load(d)

    def key_transform(self, ctx: HookContext, load: Callable[[Any], Any], d) -> Any:
        """Element ``d`` of the transformed key, in float32."""
        return load(d)

    def logits_transform(self, ctx: HookContext, logits) -> Any:
        """Transform one float32 logit (already multiplied by ``sm_scale``)."""
        return logits

    def logits_mask(self, ctx: HookContext) -> Any:
        """A boolean expression: whether (qo_idx, kv_idx) is visible. None means always visible."""
        return None

    def output_transform(self, ctx: HookContext, out, d) -> Any:
        """Element ``d`` of the normalized float32 output, before the cast to the output dtype."""
        return out

    def kv_range(self, ctx: HookContext) -> tuple[Any, Any] | None:
        """Optional bounds ``(lo, hi)`` on ``kv_idx`` outside which ``logits_mask`` is always false.

        Kernels skip the keys outside (FA's ``get_n_block_min_max``); the mask still decides inside.
        ``ctx.kv_idx`` is None here. None (the default) means no bound. Both bounds must be
        non-decreasing in ``qo_idx`` (true of causal and sliding windows): tiled kernels take a tile's
        bounds from its first and last query rows.
        """
        return None

    def key_range(self, args: dict[str, Any] | None = None) -> KeyRange | None:
        """Which keys a query row sees (None: every key). ``args=None``: at plan time, the keys any
        run of the plan may need; the CUDA planners (decode and prefill) read only those. Else
        ``args`` are a run's scalars (name -> value; a name not given takes its default) and the
        result the keys that run needs: a wrapper refuses a run that needs more than its plan read.
        It must agree with :meth:`logits_mask` (the keys outside are hidden). A run-time switch that
        can show more keys (:class:`~tvm_attn.variants.RuntimeCausal`) is unknown at plan time."""
        return None

    def tables(self, head_dim: int) -> tuple[DimTable, ...]:
        """The :class:`DimTable` s the hooks read through ``ctx.table`` (names unique in a variant)."""
        return ()

    def mask_is_range(self) -> bool:
        """Whether ``logits_mask`` is exactly ``lo <= kv_idx < hi`` of :meth:`kv_range` (or absent).

        Then a tiled kernel evaluates no mask on tiles that lie wholly inside every row's range
        (FlashAttention's causal tile skipping); otherwise it evaluates the mask on every tile."""
        return not self.overrides("logits_mask")

    # -- numpy twins (used by the reference) -------------------------------------------------------
    def ref_query_transform(self, ctx: RefContext, q):
        """``q``: float64 array ``(qo_len, head_dim)``."""
        return q

    def ref_key_transform(self, ctx: RefContext, k):
        """``k``: float64 array ``(kv_len, head_dim)``."""
        return k

    def ref_logits_transform(self, ctx: RefContext, logits):
        """``logits``: float64 array ``(qo_len, kv_len)``."""
        return logits

    def ref_logits_mask(self, ctx: RefContext):
        """Boolean array broadcastable to ``(qo_len, kv_len)``, or None."""
        return None

    def ref_output_transform(self, ctx: RefContext, out):
        """``out``: float64 array ``(qo_len, head_dim)``."""
        return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return repr(v).replace(".", "p").replace("-", "m").replace("+", "")
    return re.sub(r"[^A-Za-z0-9]", "", str(v))


class ComposedVariant(AttentionVariant):
    """Variants applied in order: transforms chain, masks are AND-ed, extra parameters are united."""

    def __init__(self, parts: Sequence[AttentionVariant]):
        flat: list[AttentionVariant] = []
        for p in parts:
            if not isinstance(p, AttentionVariant):
                raise TypeError(f"compose: {p!r} is not an AttentionVariant")
            flat.extend(p.parts if isinstance(p, ComposedVariant) else [p])
        if sum(not p.use_softmax for p in flat) > 1:
            raise ValueError("compose: at most one variant may turn softmax off")
        seen: dict[str, Any] = {}
        for p in flat:
            for param in p.extra_params():
                if param.name in seen and _signature(seen[param.name]) != _signature(param):
                    raise ValueError(
                        f"compose: {type(p).__name__} and an earlier variant both declare {param.name!r} "
                        "with different specs"
                    )
                seen[param.name] = param
        self.parts = tuple(flat)
        self._params = tuple(seen.values())

    use_softmax = property(lambda self: all(p.use_softmax for p in self.parts))  # type: ignore[assignment]

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    def uri(self) -> str:
        return "__".join(p.uri() for p in self.parts)

    def config(self):
        return {}

    def spec(self) -> list:
        return [p.spec() for p in self.parts]

    def extra_params(self):
        return self._params

    def validate_args(self, args):
        for p in self.parts:
            p.validate_args(args)

    def checks_lengths(self) -> bool:
        return any(p.checks_lengths() for p in self.parts)

    def validate_lengths(self, args, qo_lens, kv_lens):
        for p in self.parts:
            p.validate_lengths(args, qo_lens, kv_lens)

    def overrides(self, hook: str) -> bool:
        return any(p.overrides(hook) for p in self.parts)

    def mask_is_range(self) -> bool:
        return all(p.mask_is_range() for p in self.parts)

    def key_range(self, args=None):
        return intersect_key_ranges(p.key_range(args) for p in self.parts)

    def tables(self, head_dim: int):
        tables: dict[str, DimTable] = {}
        for p in self.parts:
            for t in p.tables(head_dim):
                if t.name in tables:
                    raise ValueError(f"compose: two parts read a table named {t.name!r}; "
                                     "table names must be unique")
                tables[t.name] = t
        return tuple(tables.values())

    def __repr__(self):
        return " + ".join(repr(p) for p in self.parts)

    def query_transform(self, ctx, load, d):
        for p in self.parts:
            if p.overrides("query_transform"):
                load = _bind_load(p.query_transform, ctx, load)
        return load(d)

    def key_transform(self, ctx, load, d):
        for p in self.parts:
            if p.overrides("key_transform"):
                load = _bind_load(p.key_transform, ctx, load)
        return load(d)

    def logits_transform(self, ctx, logits):
        for p in self.parts:
            logits = p.logits_transform(ctx, logits)
        return logits

    def logits_mask(self, ctx):
        from tvm import tirx

        mask = None
        for p in self.parts:
            m = p.logits_mask(ctx)
            if m is not None:
                mask = m if mask is None else tirx.all(mask, m)
        return mask

    def output_transform(self, ctx, out, d):
        for p in self.parts:
            out = p.output_transform(ctx, out, d)
        return out

    def kv_range(self, ctx):
        from tvm import tirx

        bounds = [b for b in (p.kv_range(ctx) for p in self.parts) if b is not None]
        if not bounds:
            return None
        lo, hi = bounds[0]
        for b_lo, b_hi in bounds[1:]:
            lo, hi = tirx.max(lo, b_lo), tirx.min(hi, b_hi)
        return lo, hi

    def ref_query_transform(self, ctx, q):
        for p in self.parts:
            q = p.ref_query_transform(ctx, q)
        return q

    def ref_key_transform(self, ctx, k):
        for p in self.parts:
            k = p.ref_key_transform(ctx, k)
        return k

    def ref_logits_transform(self, ctx, logits):
        for p in self.parts:
            logits = p.ref_logits_transform(ctx, logits)
        return logits

    def ref_logits_mask(self, ctx):
        mask = None
        for p in self.parts:
            m = p.ref_logits_mask(ctx)
            if m is not None:
                mask = m if mask is None else (mask & m)
        return mask

    def ref_output_transform(self, ctx, out):
        for p in self.parts:
            out = p.ref_output_transform(ctx, out)
        return out


def _signature(param) -> tuple:
    """What must agree when two variants share a parameter (defaults and docs may differ)."""
    return (type(param), param.name, param.dtype, getattr(param, "shape", None))


def _bind_load(hook, ctx, inner):
    return lambda i: hook(ctx, inner, i)


def compose(*variants: AttentionVariant) -> AttentionVariant:
    """Compose variants left to right (``a + b`` is the same). Default variants drop out."""
    parts = [v for v in variants if v is not None and v.uri() != "default"]
    if not parts:
        return AttentionVariant()
    if len(parts) == 1:
        return parts[0]
    return ComposedVariant(parts)

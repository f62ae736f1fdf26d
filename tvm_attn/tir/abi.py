"""Kernel ABIs: the argument orders that callers other than tvm_attn's wrappers fix.

:func:`tvm_attn.tir.attention.make_attention` declares its arguments in tvm_attn's own order
(:meth:`tvm_attn.config.AttentionKey.param_names`: the format's arguments, ``o``, ``lse``,
``sm_scale``, the variant's extras). Two callers expect another one; an ABI relabels the same kernel:

* :class:`RelaxDPS`: Relax ``call_tir`` passes inputs first and the outputs last, so the order is the
  format's arguments, ``sm_scale``, the extras, then ``o``, ``lse``.
* :class:`TVMKVCacheSlot`: TVM's runtime paged KV cache (``vm.builtin.paged_attention_kv_cache_create``)
  calls a ``("tirx", f)`` attention slot with the builtin TIR signature (``attn_backend.h``)::

    decode         (q, pages, page_indptr, page_values, last_page_len, k_rope_pos_offset, q_rope_position,
                    o, lse, rotary_mode, rope_scale, rope_theta, sm_scale)
    prefill_paged  (q, q_indptr, pages, page_indptr, page_values, last_page_len, k_rope_pos_offset,
                    q_rope_position, o, lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale)
    prefill_ragged (q, q_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset, o, lse, causal,
                    rotary_mode, rope_scale, rope_theta, sm_scale)

  ``pages`` is our HND paged layout, ``causal`` is the :class:`~tvm_attn.variants.RuntimeCausal`
  scalar, and the index arrays arrive as views with an element offset. The kernels leave RoPE to
  the cache (``RopeMode.NORMAL``: the cache's split-rotary kernel rotates q and k before attention),
  so they declare the RoPE arguments and check at run time that ``rotary_mode`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx

from ..config import AttentionKey
from ..kv.formats import PagedKV, RaggedKV
from ..variants.base import HookContext, _fmt
from ..variants.masks import RuntimeCausal
from ._builder import T, buffer_param, scalar_param


class KernelABI:
    """Base: tvm_attn's own argument order."""

    #: whether the index arrays (indptr, indices, last_page_len) may be views with an element offset
    index_offsets = False
    #: appended to the kernel name, so two ABIs of one key never share a symbol
    suffix = ""

    def symbol(self, key: AttentionKey) -> str:
        return key.uri + self.suffix

    def declare(self, key: AttentionKey, idx, params: dict) -> None:
        """Declare the ABI's own arguments (added to ``params``, where hooks can read them)."""

    def order(self, key: AttentionKey) -> list[str]:
        return key.param_names()

    def reorder(self, key: AttentionKey, func: tirx.PrimFunc) -> tirx.PrimFunc:
        """``func`` with its parameters in :meth:`order` (every parameter named exactly once)."""
        by_name = {p.name: p for p in func.params}
        names = self.order(key)
        if sorted(names) != sorted(by_name):
            raise ValueError(f"{type(self).__name__}: order {names} does not match "
                             f"the kernel's {sorted(by_name)}")
        return tirx.PrimFunc([by_name[n] for n in names], func.body, func.ret_type, func.attrs)


class RelaxDPS(KernelABI):
    """Inputs, then scalars, then the outputs ``o`` and ``lse`` (Relax ``call_tir``)."""

    suffix = "_dps"

    def order(self, key):
        names = key.param_names()
        return [n for n in names if n not in ("o", "lse")] + ["o", "lse"]


#: The attention slots of TVM's runtime KV cache that take our kernels, and their key (kind, format).
TVM_SLOTS = ("decode", "prefill_paged", "prefill_ragged")


@dataclass(frozen=True)
class TVMKVCacheSlot(KernelABI):
    """One ``("tirx", f)`` attention slot of TVM's runtime KV cache (see the module docstring).

    ``fixed``: ``(name, value)`` pairs of variant scalars the cache cannot pass, bound into the kernel.
    """

    slot: str
    fixed: tuple = ()
    index_offsets = True

    def __post_init__(self):
        if self.slot not in TVM_SLOTS:
            raise ValueError(f"slot: must be one of {TVM_SLOTS}, got {self.slot!r}")

    @property
    def suffix(self) -> str:
        return f"_tvm_{self.slot}" + "".join(f"_{n}{_fmt(v)}" for n, v in self.fixed)

    def check_key(self, key: AttentionKey) -> None:
        want = {"decode": ("decode", PagedKV), "prefill_paged": ("prefill", PagedKV),
                "prefill_ragged": ("prefill", RaggedKV)}[self.slot]
        if (key.kind, type(key.kv)) != want:
            raise ValueError(f"slot {self.slot!r} needs a {want[0]} kernel over {want[1].__name__}, "
                             f"got {key.uri}")
        paged = isinstance(key.kv, PagedKV)
        if key.kv.layout != ("HND" if paged else "NHD"):
            raise ValueError(f"slot {self.slot!r}: TVM's cache passes {'HND pages' if paged else 'NHD k/v'}, "
                             f"got layout {key.kv.layout!r}")
        fixed = {n for n, _ in self.fixed}
        names = [p.name for p in key.extra_params() if p.name not in fixed]
        want_extras = [] if self.slot == "decode" else ["is_causal"]
        if names != want_extras:
            raise ValueError(
                f"slot {self.slot!r}: the cache passes no variant arguments besides {want_extras}; "
                f"the kernel also declares {[n for n in names if n not in want_extras]}"
            )

    def declare(self, key, idx, params):
        self.check_key(key)
        params["k_rope_pos_offset"] = buffer_param("k_rope_pos_offset", (idx.batch,), "int32", offset=True)
        params["q_rope_position"] = buffer_param("q_rope_position", (idx.num_q_rows,), "int32", offset=True)
        rotary_mode = scalar_param("rotary_mode", "int32")
        params["rope_scale"] = scalar_param("rope_scale", "float32")
        params["rope_theta"] = scalar_param("rope_theta", "float32")
        with T.Assert(rotary_mode == 0, "tvm_attn kernels in TVM's KV cache need rope_mode NORMAL or NONE "
                      "(RoPE applied before attention), got inline RoPE (rotary_mode=1)"):
            pass

    def order(self, key):
        tail = ["rotary_mode", "rope_scale", "rope_theta", "sm_scale"]
        causal = [] if self.slot == "decode" else ["is_causal"]
        if self.slot == "prefill_ragged":
            return ["q", "qo_indptr", "k", "v", "kv_indptr", "q_rope_position", "k_rope_pos_offset", "o",
                    "lse", *causal, *tail]
        head = ["q"] + ([] if self.slot == "decode" else ["qo_indptr"])
        return [*head, "paged_kv_cache", "kv_indptr", "kv_indices", "kv_last_page_len", "k_rope_pos_offset",
                "q_rope_position", "o", "lse", *causal, *tail]

    def reorder(self, key, func):
        return super().reorder(key, bind_scalars(func, self.fixed))


def fixed_scalars(variant) -> tuple:
    """``(name, default)`` of each run-time argument of ``variant``, which a KV-cache slot binds into
    the kernel (the cache passes no variant arguments; :func:`bind_scalars`); raises ``ValueError``
    for a variant without softmax (the cache merges states by their LSE) and for an argument that
    is a tensor or has no default."""
    from ..variants.base import ScalarParam

    if not variant.use_softmax:
        raise ValueError(f"variant {variant!r}: TVM's cache merges attention states by their LSE, "
                         "which needs softmax")
    fixed = []
    for p in variant.extra_params():
        if not isinstance(p, ScalarParam) or p.default is None:
            raise ValueError(
                f"variant {variant!r}: TVM's KV cache cannot pass the argument {p.name!r}; "
                "a cache slot takes variants whose run-time arguments are scalars with defaults "
                "(bound into the kernel)"
            )
        fixed.append((p.name, p.default))
    check_position_free(variant)
    return tuple(fixed)


#: The positions a hook sees (:class:`~tvm_attn.variants.base.HookContext`). In a slot of TVM's KV cache
#: they are the slot's own, not the sequence's: the paged prefill runs once per shared-prefix depth
#: (``kv_len`` is the depth's length and the queries are not aligned to its end), the ragged prefill
#: sees the new tokens only, and ``batch_idx`` counts the slot's requests, not sequence ids.
_POSITIONS = ("batch_idx", "qo_idx", "kv_idx", "qo_len", "kv_len")


def check_position_free(variant) -> None:
    """Raise ``ValueError`` naming ``variant`` if a hook of it depends on positions (masks, RoPE,
    ALiBi, ...), which TVM's KV cache cannot give its slots (see :data:`_POSITIONS`); RoPE is applied
    by the cache itself, before attention. Each TIR hook is probed with fresh variables for the
    positions and the result searched for them."""
    from ..variants.base import TensorParam

    pos = {n: tirx.Var(n, "int32") for n in _POSITIONS}
    params = {p.name: (tirx.decl_buffer([tirx.Var(f"{p.name}_n{i}", "int32") for i, _ in enumerate(p.shape)],
                                        p.dtype, p.name)
                             if isinstance(p, TensorParam) else tirx.Var(p.name, p.dtype))
              for p in variant.extra_params()}
    ctx = HookContext(pos["batch_idx"], pos["qo_idx"], pos["kv_idx"], tirx.Var("qo_head_idx", "int32"),
                      tirx.Var("kv_head_idx", "int32"), pos["qo_len"], pos["kv_len"], 64, params)
    data = tirx.decl_buffer((64,), "float32", "x")
    d = tirx.Var("d", "int32")
    probes = {
        "query_transform": lambda: variant.query_transform(ctx, lambda i: data[i], d),
        "key_transform": lambda: variant.key_transform(ctx, lambda i: data[i], d),
        "logits_transform": lambda: variant.logits_transform(ctx, tirx.Var("logits", "float32")),
        "logits_mask": lambda: variant.logits_mask(ctx),
        "kv_range": lambda: variant.kv_range(ctx),
        "output_transform": lambda: variant.output_transform(ctx, tirx.Var("out", "float32"), d),
    }
    for hook, probe in probes.items():
        exprs = probe()
        exprs = [] if exprs is None else list(exprs) if isinstance(exprs, (tuple, list)) else [exprs]
        used = sorted({v.name for e in exprs if isinstance(e, tvm.ir.expr.Expr)
                       for v in tirx.analysis.undefined_vars(e)}
                      & set(_POSITIONS))
        if used:
            scalars = ", ".join(f"{p.name}={p.default!r}" for p in variant.extra_params())
            raise ValueError(
                f"variant {variant.uri()!r}{f' ({scalars})' if scalars else ''}: its {hook} reads "
                f"{', '.join(used)}, but TVM's KV cache runs each attention slot over a shared-prefix "
                "depth or the new tokens alone, so positions there are not the sequence's; the cache takes "
                "position-free variants only (it applies the causal mask and RoPE itself)")


def bind_scalars(func: tirx.PrimFunc, fixed) -> tirx.PrimFunc:
    """``func`` with the scalar parameters named in ``fixed`` (``(name, value)`` pairs, from
    :func:`fixed_scalars`) bound to their values; names ``func`` does not declare are skipped."""
    by_name = {p.name: p for p in func.params}
    binds = {by_name[n]: tirx.const(v, str(by_name[n].ty.dtype)) for n, v in fixed if n in by_name}
    return func.specialize(binds) if binds else func


def kv_cache_kernel(slot: str, num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: str,
                    page_size: int, variant=None) -> tirx.PrimFunc:
    """The kernel for one attention slot of TVM's runtime KV cache, in the builtin TIR signature.

    ``variant``: optional, composed after the (run-time) causal mask of the prefill slots. The cache
    passes no variant arguments, so the variant's run-time scalars are bound to their defaults in the
    kernel; a variant tensor cannot be passed and raises ``ValueError``, as does a variant without
    softmax (the cache merges attention states by their LSE).
    """
    from ..variants import compose
    from .attention import make_attention

    user = compose(variant)
    fixed = fixed_scalars(user)
    full = user if slot == "decode" else compose(RuntimeCausal(), user)
    kv = RaggedKV("NHD") if slot == "prefill_ragged" else PagedKV(page_size, "HND")
    kind = "decode" if slot == "decode" else "prefill"
    key = AttentionKey(kind, kv, num_qo_heads, num_kv_heads, head_dim, dtype, dtype, full, "llvm")
    return make_attention(key, TVMKVCacheSlot(slot, fixed))

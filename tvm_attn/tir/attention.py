"""The portable attention kernel: every kind (decode, prefill, block-sparse), every KV format, every
variant, from one generator. It targets the CPU (``llvm``) and is the semantic ground truth that the
CUDA kernels share hooks and index math with.

Lineage: TVM's ``_attention_decode_cpu`` / ``_attention_prefill_cpu`` (``relax/frontend/nn/llm``),
rebuilt around the variant hooks and :mod:`tvm_attn.kv.index` instead of one copy per format.

One query row at a time, online softmax in float32 registers::

    for qo_head in parallel(num_qo_heads):           # schedule.cpu: the parallel axis
      for segment b:                                 # a request, or a block row
        for query row i of b:
          q' = query_transform(q[row, qo_head, :])
          m, d, o = -inf, 0, 0
          for key step j of b in variant.kv_range:    # kv_idx = index.kv_idx(b, j)
            if logits_mask(...):
              s = logits_transform(sm_scale * dot(q', key_transform(k_j)))
              m, d, o = online-softmax update with (s, v_j)
          o[row, qo_head] = output_transform(o / d);  lse = m * log2(e) + log2(d)

Arguments, in order: the format's query/KV arguments, ``o``, ``lse`` (float32, log2 units),
``sm_scale`` (float32), then the variant's extra tensors and scalars
(:meth:`tvm_attn.config.AttentionKey.param_names`).
"""

from __future__ import annotations

import dataclasses

from tvm import tirx

from ..config import AttentionKey
from ..kv.index import declare_layout
from ..schedule.cpu import CPU_LOOP_ORDER
from ..variants.base import CONFIG_DIMS, HookContext, ScalarParam
from ._builder import IRBuilder, T, buffer_param, let, local, loop, scalar_param, store, sym, when
from .softmax import LOG2E, NEG_INF, Ref, f32, online_update


def declare_extra_params(key: AttentionKey) -> dict:
    """Declare the variant's extra tensors and scalars; return them by name."""
    consts = {"num_qo_heads": key.num_qo_heads, "num_kv_heads": key.num_kv_heads, "head_dim": key.head_dim}
    dims: dict[str, tirx.Var] = {}
    out = {}
    for p in key.extra_params():
        if isinstance(p, ScalarParam):
            out[p.name] = scalar_param(p.name, p.dtype)
            continue
        shape = []
        for dim in p.shape:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in CONFIG_DIMS:
                shape.append(consts[dim])
            else:
                shape.append(dims.setdefault(dim, sym(dim)))
        out[p.name] = buffer_param(p.name, shape, p.dtype)
    return out


def make_attention(key: AttentionKey, abi=None) -> tirx.PrimFunc:
    """Generate the CPU kernel for ``key`` (see the module docstring).

    ``abi`` (a :class:`tvm_attn.tir.abi.KernelABI`) gives the kernel the argument order another
    caller expects (Relax ``call_tir``, TVM's runtime KV cache); the body is the same.
    """
    if not key.target.startswith("llvm"):
        raise ValueError(f"make_attention builds the portable CPU kernel; target {key.target!r} is not llvm")
    variant, D = key.variant, key.head_dim
    with IRBuilder() as ib:
        with T.prim_func():
            symbol = key.uri if abi is None else abi.symbol(key)
            T.func_name(symbol)
            T.func_attr({"global_symbol": symbol, "tir.noalias": True})
            idx = declare_layout(key, offsets=abi is not None and abi.index_offsets)
            o = buffer_param("o", (idx.num_q_rows, key.num_qo_heads, D), key.o_dtype)
            lse = buffer_param("lse", (idx.num_q_rows, key.num_qo_heads), "float32")
            sm_scale = scalar_param("sm_scale", "float32")
            params = declare_extra_params(key)
            if abi is not None:
                abi.declare(key, idx, params)
            stage_keys = variant.overrides("key_transform")

            with loop("qo_head", key.num_qo_heads, CPU_LOOP_ORDER.head_loop) as h:
                kv_head = let("kv_head", h // key.group_size)
                with loop("b", idx.num_segments) as b:
                    qo_len, kv_len = let("qo_len", idx.qo_len(b)), let("kv_len", idx.kv_len(b))
                    with loop("i", idx.num_rows(b)) as i:
                        row = let("row", idx.row_begin(b) + i)
                        qo_idx = let("qo_idx", idx.qo_idx(b, i))
                        ctx = HookContext(idx.batch_idx(b), qo_idx, None, h, kv_head, qo_len, kv_len, D, params)
                        q_local, o_local = local("q_local", D), local("o_local", D)
                        k_local = local("k_local", D) if stage_keys else None
                        state = local("state", 3)  # m (running max, natural units), d (sum), s (logit)
                        with loop("d", D) as d:
                            load_q = lambda dd: f32(idx.q[row, h, dd])  # noqa: E731
                            store(q_local, variant.query_transform(ctx, load_q, d), d)
                            store(o_local, tirx.const(0.0, "float32"), d)
                        store(state, tirx.const(NEG_INF, "float32"), 0)
                        store(state, tirx.const(0.0, "float32"), 1)

                        steps = idx.kv_steps(b)
                        bounds = variant.kv_range(ctx) if idx.steps_are_positions else None
                        lo = let("kv_lo", tirx.max(bounds[0], 0)) if bounds else 0
                        hi = let("kv_hi", tirx.max(tirx.min(bounds[1], steps), lo)) if bounds else steps
                        with loop("jj", hi - lo) as jj:
                            j = let("j", lo + jj) if bounds else jj
                            addr = idx.kv_addr(b, j)
                            kv_idx = let("kv_idx", idx.kv_idx(b, j, addr))
                            sctx = dataclasses.replace(ctx, kv_idx=kv_idx)
                            with when(variant.logits_mask(sctx)):
                                kctx = HookContext(ctx.batch_idx, None, kv_idx, None, kv_head, qo_len, kv_len, D, params)
                                load_k = lambda dd: f32(idx.load_k(addr, kv_head, dd))  # noqa: E731
                                if stage_keys:
                                    with loop("d", D) as d:
                                        store(k_local, variant.key_transform(kctx, load_k, d), d)
                                store(state, tirx.const(0.0, "float32"), 2)
                                with loop("d", D) as d:
                                    k_d = k_local[d] if stage_keys else load_k(d)
                                    store(state, state[2] + q_local[d] * k_d, 2)
                                s = let("s", variant.logits_transform(sctx, state[2] * sm_scale))
                                _accumulate(variant.use_softmax, state, o_local, s, lambda d: f32(idx.load_v(addr, kv_head, d)), D)

                        _write_output(key, ctx, state, o_local, o, lse, row, h)
    func = ib.get()
    return func if abi is None else abi.reorder(key, func)


def _accumulate(use_softmax: bool, state, o_local, s, load_v, D: int) -> None:
    """Fold one (logit, value row) into the running state: online softmax (natural units; the kernel
    skips hidden keys, so the max needs no guard), or a plain weighted sum."""
    if not use_softmax:
        with loop("d", D) as d:
            store(o_local, o_local[d] + s * load_v(d), d)
        return
    # a -inf logit weighs 0: the safe max keeps exp2(-inf + inf) = NaN out of the weights
    step = online_update(Ref(state, (0,)), Ref(state, (1,)), 1, lambda _: s, names=("m_new", None, "rescale"),
                         natural=True)
    with loop("d", D) as d:
        store(o_local, step.output(o_local[d], [load_v(d)]), d)


def _write_output(key: AttentionKey, ctx: HookContext, state, o_local, o, lse, row, h) -> None:
    variant, D = key.variant, key.head_dim
    if not variant.use_softmax:
        with loop("d", D) as d:
            store(o, tirx.Cast(key.o_dtype, variant.output_transform(ctx, o_local[d], d)), row, h, d)
        store(lse, tirx.const(NEG_INF, "float32"), row, h)  # no softmax, no LSE: wrappers refuse return_lse
        return
    # d is 0 for a row that saw no key (o = 0, LSE = -inf) and NaN once a NaN or +inf logit came in,
    # which must come out as NaN, not as an empty row
    seen = tirx.any(state[1] > 0, tirx.isnan(state[1]))
    with loop("d", D) as d:
        out = variant.output_transform(ctx, o_local[d] / state[1], d)
        store(o, tirx.Cast(key.o_dtype, tirx.if_then_else(seen, out, tirx.const(0.0, "float32"))), row, h, d)
    store(lse, tirx.if_then_else(seen, state[0] * LOG2E + tirx.log2(state[1]), tirx.const(NEG_INF, "float32")), row, h)

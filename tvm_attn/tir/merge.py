"""Merging attention states (FlashInfer ``cascade.py``): ``(v, s)`` pairs, ``s`` the LSE in log2 units.

The state of attention over a union of disjoint key sets is the ``⊕`` of the states over each set:
``s = log2(sum 2**s_i)`` and ``v = sum 2**(s_i - s) v_i`` (paper §2.2; associative, commutative).
A state with ``s = -inf`` (no keys) is the identity, whatever its ``v`` holds; a NaN ``s``, or a NaN
in the ``v`` of a state that is not empty, makes the result NaN (NaN inputs must show).

Kernels (CPU, any number of rows ``n``, heads ``H`` and ``head_dim``):

* ``merge_state(v_a, s_a, v_b, s_b, v_out, s_out)``; ``v_*`` ``(n, H, D)``, ``s_*`` ``(n, H)`` float32;
* ``merge_state_in_place(v, s, v_other, s_other)``: the result replaces ``(v, s)``;
* ``merge_states(v, s, v_out, s_out)``: ``v`` ``(n, k, H, D)``, ``s`` ``(n, k, H)``, merged over ``k``.
"""

from __future__ import annotations

from tvm import tirx

from ..config import MergeKey
from ._builder import IRBuilder, T, buffer_param, let, local, loop, store, sym, when
from .softmax import Ref, f32, loop_max, lse_of, nonempty, safe_max, weight, zero


def merge_params(key: MergeKey, n, H, D):
    """The merge kernels' arguments, declared in their call order (the CPU and CUDA kernels share
    it): ``(num_states, vs, ss, v_out, s_out)``. ``merge_states`` has one ``v`` ``[n, k, H, D]`` and
    ``s`` ``[n, k, H]`` holding every state; the two-state ops a buffer per state; in place, the
    outputs are the first state's buffers."""
    dt = key.dtype
    if key.op == "merge_states":
        k = sym("num_states")
        v = buffer_param("v", (n, k, H, D), dt)
        s = buffer_param("s", (n, k, H), "float32")
        v_out = buffer_param("v_out", (n, H, D), dt)
        s_out = buffer_param("s_out", (n, H), "float32")
        return k, [v], [s], v_out, s_out
    names = ("v_a", "s_a", "v_b", "s_b") if key.op == "merge_state" else ("v", "s", "v_other", "s_other")
    va, sa = buffer_param(names[0], (n, H, D), dt), buffer_param(names[1], (n, H), "float32")
    vb, sb = buffer_param(names[2], (n, H, D), dt), buffer_param(names[3], (n, H), "float32")
    if key.op == "merge_state":
        v_out = buffer_param("v_out", (n, H, D), dt)
        s_out = buffer_param("s_out", (n, H), "float32")
    else:
        v_out, s_out = va, sa
    return 2, [va, vb], [sa, sb], v_out, s_out


def make_merge(key: MergeKey) -> tirx.PrimFunc:
    n, H, D = sym("n"), sym("num_heads"), sym("head_dim")
    dt = key.dtype
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(key.uri)
            T.func_attr({"global_symbol": key.uri, "tir.noalias": key.op != "merge_state_in_place"})
            num_states, vs, ss, v_out, s_out = merge_params(key, n, H, D)
            if key.op == "merge_states":
                (v,), (s,) = vs, ss
                load_v = lambda i, st, h, d: f32(v[i, st, h, d])  # noqa: E731
                load_s = lambda i, st, h: s[i, st, h]  # noqa: E731
            else:
                (va, vb), (sa, sb) = vs, ss
                load_v = lambda i, st, h, d: f32(tirx.if_then_else(st == 0, va[i, h, d], vb[i, h, d]))  # noqa: E731
                load_s = lambda i, st, h: tirx.if_then_else(st == 0, sa[i, h], sb[i, h])  # noqa: E731

            with loop("i", n, "parallel") as i:
                with loop("h", H) as h:
                    acc = local("acc", 2)  # running max, then sum of weights
                    loop_max(Ref(acc, (0,)), num_states, lambda st: load_s(i, st, h), "st")
                    m = let("m", acc[0])
                    safe_m = let("safe_m", safe_max(m))
                    store(acc, zero(), 1)
                    with loop("st", num_states) as st:
                        store(acc, acc[1] + weight(load_s(i, st, h), safe_m), 1)
                    denom = let("denom", acc[1])
                    with loop("d", D) as d:
                        out = local("out", 1)
                        store(out, zero(), 0)
                        with loop("st", num_states) as st:
                            w = weight(load_s(i, st, h), safe_m)
                            # skips 0 * NaN from an empty state's garbage value; a NaN weight adds NaN
                            with when(nonempty(w)):
                                store(out, out[0] + w * load_v(i, st, h, d), 0)
                        result = tirx.if_then_else(nonempty(denom), out[0] / denom, zero())
                        store(v_out, tirx.Cast(dt, result), i, h, d)
                    store(s_out, lse_of(safe_m, denom), i, h)
    return ib.get()

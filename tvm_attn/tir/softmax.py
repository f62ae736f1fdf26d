"""The online softmax, in one place: its constants, the step that brings a running state up to new
logits, and the folds of states. Every kernel and merge builds its softmax math from these.

A state is ``(m, l, o)``: the running max of the logits, the sum ``l`` of the weights ``2^(s - m)``,
and the output ``o`` weighted the same way (not yet divided by ``l``); ``o / l`` is the attention
output and ``m + log2(l)`` its LSE. Partial states that split-KV kernels write are ``(lse, o / l)``.
The CUDA kernels keep logits in log2 units (``s * log2(e)``) so that ``exp2`` is one instruction;
the CPU kernel keeps natural units and scales inside ``exp2`` (``natural``). A state whose max is
``-inf`` has seen no visible key.

A step over new logits ``s_j``, whatever holds the state (registers, fragments, shared memory)::

    m' = max(m, s_j...);  scale = 2^(m - safe(m'));  p_j = 2^(s_j - safe(m'))
    l' = l * scale + sum p_j;  o' = o * scale + sum p_j v_j

:func:`max_step` is its first line over given expressions (a kernel that rescales lazily, or keeps
its state in a fragment layout, stores the results itself); :func:`online_update` is the whole step
on a state held in buffer elements (:class:`Ref`), and :meth:`Step.output` the output's line.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from tvm import tirx

from ._builder import let, local, loop, store

LOG2E = math.log2(math.e)
NEG_INF = -math.inf


def f32(x):
    return tirx.Cast("float32", x)


def neg_inf():
    return tirx.const(NEG_INF, "float32")


def zero():
    return tirx.const(0.0, "float32")


def safe_max(m):
    """The running max to subtract inside ``exp2``: 0 for a state that has seen no visible key
    (max ``-inf``), so that ``exp2(-inf - 0) = 0`` rather than ``exp2(-inf + inf) = NaN``."""
    return tirx.if_then_else(m == neg_inf(), zero(), m)


def seen(m):
    """The state of max ``m`` has seen a visible key."""
    return m > neg_inf()


def nonempty(l):
    """A weight, or a state's sum of weights, ``l`` counts: ``l > 0``, or NaN (a NaN or +inf logit
    came in, or a NaN partial state), which must come out as NaN, not as an empty row. (Not
    ``l != 0``: TVM's LLVM code compares ordered, so NaN != 0 is false there.) Tested once per row
    in the epilogues, never in the key loop."""
    return tirx.any(l > 0, tirx.isnan(l))


def weight(s, m_safe, natural: bool = False):
    """``2^(s - m_safe)``: the weight of logit ``s`` against the (safe) running max."""
    return tirx.exp2((s - m_safe) * LOG2E if natural else s - m_safe)


def rescaled(old, scale, terms):
    """``old * scale + terms[0] + terms[1] + ...`` (``scale`` None: no rescale, the terms just add)."""
    total = old if scale is None else old * scale
    for term in terms:
        total = total + term
    return total


def inv_sum(l):
    """``1 / l``, 0 for a state that has seen no key (NaN for a NaN sum): one division, then a
    multiply per element."""
    return tirx.if_then_else(nonempty(l), tirx.const(1.0, "float32") / l, zero())


def lse_of(m, l, valid=None):
    """The LSE (log2 units) of a state of safe max ``m`` and sum ``l``: ``-inf`` unless ``valid``
    (by default :func:`nonempty`: NaN for a NaN sum)."""
    return tirx.if_then_else(nonempty(l) if valid is None else valid, m + tirx.log2(l), neg_inf())


def _bind(name, value):
    return value if name is None else let(name, value)


@dataclasses.dataclass(frozen=True)
class Ref:
    """One element of a buffer that holds part of a state: ``buf[at]``."""

    buf: tirx.Buffer
    at: tuple

    def load(self):
        return self.buf[self.at]

    def store(self, value) -> None:
        store(self.buf, value, *self.at)


@dataclasses.dataclass(frozen=True)
class Step:
    """A step of the online softmax: the new running max, the max to subtract inside ``exp2``, the
    factor of the old sum and output, and (after :func:`online_update`) the new logits' weights."""

    m_new: tirx.PrimExpr
    m_safe: tirx.PrimExpr
    scale: tirx.PrimExpr
    natural: bool = False
    weights: tuple = ()

    def weight(self, s):
        return weight(s, self.m_safe, self.natural)

    def output(self, old, values, skip_empty: bool = False):
        """An output element after the step: ``old * scale + sum weight_j * values[j]``. With
        ``skip_empty`` a term of weight 0 adds 0 whatever its value (a partial row of an empty
        piece may hold anything, NaN included); a NaN weight (a NaN partial LSE) adds NaN."""
        terms = [w * x for w, x in zip(self.weights, values)]
        if skip_empty:
            terms = [tirx.if_then_else(nonempty(w), t, zero()) for w, t in zip(self.weights, terms)]
        return rescaled(old, self.scale, terms)


def max_step(m_old, logits, names=("m_new", "m_safe", "scale"), safe: bool = True,
             natural: bool = False) -> Step:
    """The new max of a running max ``m_old`` and the ``logits``, and the rescale of the old state.
    ``names`` name the lets of the max, the safe max and the scale (None: not bound); without
    ``safe`` the max is subtracted as is (a kernel that never sees a state with no visible key)."""
    m_new = _bind(names[0], functools.reduce(tirx.max, logits, m_old))
    m_safe = _bind(names[1], safe_max(m_new)) if safe else m_new
    scale = _bind(names[2], weight(m_old, m_safe, natural))
    return Step(m_new, m_safe, scale, natural)


def online_update(m: Ref, l: Ref, n: int, logit, p_name: str = "p", p_local: bool = False,
                  names=("m_new", "m_safe", "scale"), safe: bool = True, natural: bool = False) -> Step:
    """Take the state's max ``m`` and sum ``l`` to ``n`` new logits ``logit(j)``; returns the step,
    whose :meth:`Step.output` updates the output. The weights are lets named ``p_name``, or, with
    ``p_local``, a local buffer of that name filled in an unrolled loop (``logit`` then takes the
    loop variable)."""
    step = max_step(m.load(), [logit(j) for j in range(n)], names, safe, natural)
    if p_local:
        p = local(p_name, n)
        with loop("u", n, "unroll") as u:
            store(p, step.weight(logit(u)), u)
        weights = tuple(p[j] for j in range(n))
    else:
        weights = tuple(let(p_name, step.weight(logit(j))) for j in range(n))
    l.store(rescaled(l.load(), step.scale, weights))
    m.store(step.m_new)
    return dataclasses.replace(step, weights=weights)


def loop_max(cell: Ref, n, load, name: str = "k") -> None:
    """``cell = max(-inf, load(0), .., load(n - 1))`` over a serial loop ``name``."""
    cell.store(neg_inf())
    with loop(name, n) as k:
        cell.store(tirx.max(cell.load(), load(k)))


def fold_partial(softmax: bool, md, acc, lead: tuple, vec: int, s_rows, parts) -> None:
    """Fold partial states into the running one: ``md[(*lead, 0)]``/``md[(*lead, 1)]`` hold the
    running max (log2 units) and weight sum, ``acc[(*lead, v)]`` the weighted output; partial ``j``
    has log2 LSE ``s_rows[j]`` (-inf: weighs nothing) and normalized output ``parts[j](v)``. The
    rows are folded together: one max over them and one rescale of the running state, so the
    exponentials of the rows do not wait on each other. Without softmax the outputs just add."""
    step = None
    if softmax:
        m, l = Ref(md, (*lead, 0)), Ref(md, (*lead, 1))
        step = online_update(m, l, len(s_rows), lambda j: s_rows[j], "w_r")
    with loop("v", vec, "unroll") as v:
        old = acc[(*lead, v)]
        values = [part(v) for part in parts]
        store(acc, rescaled(old, None, values) if step is None else step.output(old, values, True), *lead, v)


def fold_states(softmax: bool, n: int, m_of, l_of, o_of, vec: int, res, tot) -> None:
    """Fold ``n`` states ``(m_of(k), l_of(k), o_of(k, v))`` in two passes (their max, then the
    weighted sums): ``res[v]`` gets the normalized output, ``tot`` = (LSE in log2 units, sum of
    weights). Without softmax the outputs add (``tot`` = (-inf, 1))."""
    if not softmax:
        with loop("v", vec, "unroll") as v:
            store(res, zero(), v)
            with loop("k", n) as k:
                store(res, res[v] + o_of(k, v), v)
        store(tot, neg_inf(), 0)
        store(tot, tirx.const(1.0, "float32"), 1)
        return
    loop_max(Ref(tot, (0,)), n, m_of)
    m = let("m_all", tot[0])
    m_safe = let("m_all_safe", safe_max(m))
    store(tot, zero(), 1)
    with loop("v", vec, "unroll") as v:
        store(res, zero(), v)
    with loop("k", n) as k:
        wk = let("wk", weight(m_of(k), m_safe))
        store(tot, tot[1] + l_of(k) * wk, 1)
        with loop("v", vec, "unroll") as v:
            store(res, res[v] + o_of(k, v) * wk, v)
    denom = tot[1]
    inv = let("inv_denom", inv_sum(denom))
    with loop("v", vec, "unroll") as v:
        store(res, res[v] * inv, v)
    store(tot, lse_of(m_safe, denom), 0)

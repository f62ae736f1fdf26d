"""tvm_attn.tir.softmax on the CPU: the online step over several logits at a time, the two-pass fold
of unnormalized states, and the fold of partial rows, against the softmax in numpy (the CUDA
kernels that use them otherwise run only in the GPU tier)."""

import numpy as np
import tvm

from tvm_attn.build import target_of
from tvm_attn.tir._builder import IRBuilder, T, buffer_param, local, loop, store
from tvm_attn.tir.softmax import Ref, fold_partial, fold_states, inv_sum, lse_of, neg_inf, online_update, zero

R, K, STEPS, U, V = 4, 3, 2, 4, 4  # rows, key groups, steps per group, logits per step, value width
N = K * STEPS * U


def _build(body, name):
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            body()
    return tvm.compile(ib.get(), target=target_of("llvm"))[name]


def _reference(s, v):
    """o = sum 2^s v / sum 2^s and lse = log2(sum 2^s) per row; 0 and -inf for a row with no key."""
    w = np.exp2(s - np.where(np.isfinite(s.max(1)), s.max(1), 0)[:, None])
    denom = w.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(denom[:, None] > 0, (w[:, :, None] * v).sum(1) / denom[:, None], 0)
        lse = np.where(denom > 0, np.log2(denom) + s.max(1), -np.inf)
    return o, lse


def _steps_then_fold():
    s = buffer_param("s", (R, N), "float32")
    v = buffer_param("v", (R, N, V), "float32")
    o_out = buffer_param("o_out", (R, V), "float32")
    lse_out = buffer_param("lse_out", (R,), "float32")
    with loop("r", R) as r:
        md, o = local("md", (K, 2)), local("o", (K, V))
        for k in range(K):  # key group k: STEPS online steps of U logits each
            store(md, neg_inf(), k, 0)
            store(md, zero(), k, 1)
            with loop("x", V) as x:
                store(o, zero(), k, x)
            with loop("it", STEPS) as it:
                first = (k * STEPS + it) * U
                logit = lambda u, first=first: s[r, first + u]  # noqa: E731
                step = online_update(Ref(md, (k, 0)), Ref(md, (k, 1)), U, logit, p_local=True)
                with loop("x", V) as x:
                    store(o, step.output(o[k, x], [v[r, first + u, x] for u in range(U)]), k, x)
        res, tot = local("res", V), local("tot", 2)
        fold_states(True, K, lambda k: md[k, 0], lambda k: md[k, 1], lambda k, x: o[k, x], V, res, tot)
        with loop("x", V) as x:
            store(o_out, res[x], r, x)
        store(lse_out, tot[0], r)


def test_online_steps_and_fold_states(rng):
    s = (rng.standard_normal((R, N)) * 3).astype(np.float32)
    s[1] = -np.inf  # a row that sees no key
    s[2, : STEPS * U] = -np.inf  # a key group that sees none
    s[3, 1::2] = -np.inf  # hidden keys inside the steps
    v = rng.standard_normal((R, N, V)).astype(np.float32)
    f = _build(_steps_then_fold, "softmax_steps")
    o, lse = tvm.runtime.tensor(np.zeros((R, V), np.float32)), tvm.runtime.tensor(np.zeros(R, np.float32))
    f(tvm.runtime.tensor(s), tvm.runtime.tensor(v), o, lse)
    ro, rlse = _reference(s, v)
    np.testing.assert_allclose(o.numpy(), ro, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse.numpy()), np.isneginf(rlse))
    seen = np.isfinite(rlse)
    np.testing.assert_allclose(lse.numpy()[seen], rlse[seen], atol=1e-5)


J, UM = 6, 3  # partial rows, rows folded together


def _fold_rows():
    lse_in = buffer_param("lse_in", (R, J), "float32")
    part = buffer_param("part", (R, J, V), "float32")
    o_out = buffer_param("o_out", (R, V), "float32")
    lse_out = buffer_param("lse_out", (R,), "float32")
    with loop("r", R) as r:
        md, acc = local("md", 2), local("acc", V)
        store(md, neg_inf(), 0)
        store(md, zero(), 1)
        with loop("x", V) as x:
            store(acc, zero(), x)
        with loop("k", J // UM) as k:
            rows = [k * UM + j for j in range(UM)]
            fold_partial(True, md, acc, (), V, [lse_in[r, row] for row in rows],
                         [lambda x, row=row: part[r, row, x] for row in rows])
        with loop("x", V) as x:  # the kernels' epilogue
            store(o_out, acc[x] * inv_sum(md[1]), r, x)
        store(lse_out, lse_of(md[0], md[1]), r)


def test_fold_partial_rows(rng):
    """Partial rows ``(lse, o / l)`` fold UM at a time; an empty row (lse -inf) may hold NaN."""
    s = (rng.standard_normal((R, J, U)) * 3).astype(np.float32)
    v = rng.standard_normal((R, J, U, V)).astype(np.float32)
    parts, lses = zip(*(_reference(s[:, j], v[:, j]) for j in range(J)))
    part, lse_in = np.stack(parts, 1).astype(np.float32), np.stack(lses, 1).astype(np.float32)
    lse_in[0, 1], part[0, 1] = -np.inf, np.nan  # an empty piece, garbage in its row
    lse_in[2, :UM] = -np.inf  # a whole round of empty pieces
    keep = np.isfinite(lse_in)
    f = _build(_fold_rows, "softmax_fold_rows")
    o, lse = tvm.runtime.tensor(np.zeros((R, V), np.float32)), tvm.runtime.tensor(np.zeros(R, np.float32))
    f(tvm.runtime.tensor(lse_in), tvm.runtime.tensor(part), o, lse)
    w = np.where(keep, np.exp2(lse_in - lse_in.max(1, keepdims=True)), 0)
    ro = (w[:, :, None] * np.where(keep[:, :, None], part, 0)).sum(1) / w.sum(1, keepdims=True)
    rlse = np.log2(w.sum(1)) + lse_in.max(1)
    np.testing.assert_allclose(o.numpy(), ro, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), rlse, atol=1e-5)


def test_nan_logits_come_out_nan(rng):
    """A NaN logit (a NaN in q or in a visible key) or a +inf one makes the row's o and LSE NaN, not
    the o = 0, LSE = -inf of a row that saw no key; the other rows are untouched."""
    s = (rng.standard_normal((R, N)) * 3).astype(np.float32)
    s[1, 5] = np.nan  # one visible key
    s[2] = np.nan  # a NaN query row: every logit
    s[3, N - 1] = np.inf
    v = rng.standard_normal((R, N, V)).astype(np.float32)
    f = _build(_steps_then_fold, "softmax_steps_nan")
    o, lse = tvm.runtime.tensor(np.zeros((R, V), np.float32)), tvm.runtime.tensor(np.zeros(R, np.float32))
    f(tvm.runtime.tensor(s), tvm.runtime.tensor(v), o, lse)
    assert np.isnan(o.numpy()[1:]).all() and np.isnan(lse.numpy()[1:]).all()
    ro, rlse = _reference(s[:1], v[:1])
    np.testing.assert_allclose(o.numpy()[:1], ro, atol=1e-5)
    np.testing.assert_allclose(lse.numpy()[:1], rlse, atol=1e-5)


def test_fold_partial_rows_nan(rng):
    """A NaN partial LSE makes the folded row NaN, a NaN in a non-empty partial row that element; an
    empty row's NaN (lse -inf) still adds nothing."""
    lse_in = (rng.standard_normal((R, J)) * 3).astype(np.float32)
    part = rng.standard_normal((R, J, V)).astype(np.float32)
    lse_in[0, 1], part[0, 1] = -np.inf, np.nan  # empty, garbage in its row
    lse_in[1, 4] = np.nan
    lse_in[2, :] = -np.inf
    lse_in[2, 3] = np.nan  # a NaN beside empty pieces only
    part[3, 2, 1] = np.nan
    f = _build(_fold_rows, "softmax_fold_rows_nan")
    o, lse = tvm.runtime.tensor(np.zeros((R, V), np.float32)), tvm.runtime.tensor(np.zeros(R, np.float32))
    f(tvm.runtime.tensor(lse_in), tvm.runtime.tensor(part), o, lse)
    o, lse = o.numpy(), lse.numpy()
    assert np.isfinite(o[0]).all() and np.isfinite(lse[0])
    assert np.isnan(o[1:3]).all() and np.isnan(lse[1:3]).all()
    assert np.isnan(o[3, 1]) and np.isfinite(np.delete(o[3], 1)).all() and np.isfinite(lse[3])

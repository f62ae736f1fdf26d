"""Fuzzing the public API and the CLI with generated malformed (and some valid) inputs.

Every case must end in a ValueError/TypeError (or a documented project error: ``KernelNotBuiltError``,
``RuntimeError`` "call plan(...) first") whose message names the argument, or in a result that
matches :mod:`tvm_attn.reference`. The cases run in a child process, one after another; the parent
watches it, so a crash (the child dies) or a hang (no answer within the timeout) is recorded against
the case that caused it and a fresh child goes on with the next one.

Case ``i`` is made from ``(seed, i)`` alone (:func:`make_case`), so the child regenerates it and a
failing case replays with ``--start i --count 1``. Shapes are tiny and the kernels few (each compiles
once per process and comes from the test session's cache directory), so the run is bounded by
compile time. Run by hand for the table of outcomes::

    python tests/test_fuzz.py --report [--count 1000] [--seed 0] [--device cuda]

``--device cuda`` sends the wrapper and single-call cases to the CUDA kernels (for the GPU host, under
``compute-sanitizer --tool memcheck``: out-of-range pages and masks are memory errors there).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _tensors import DLPackView, unaligned

#: outcomes that pass, and the ones the test requires to be absent
GOOD = ("correct", "error_named")
BAD = ("crash", "hang", "silent_accept", "error_unnamed", "obscure_error", "wrong_result", "valid_refused")
CASE_TIMEOUT_S = 240  # the first case of a key compiles its kernel (a few seconds alone; 2 shared cores)

Hq, Hkv, D, PAGE = 4, 2, 64, 4
DTYPE = "float16"
TOL = {"float16": 2e-3, "float32": 1e-4}


@dataclass
class Case:
    name: str
    call: object  # () -> result
    names: tuple | None = None  # an error must name one of these; None: a valid input
    check: object = None  # result -> None (raises AssertionError when wrong), for valid inputs


# -- data ---------------------------------------------------------------------------------------------

def _randn(rng, shape, dtype=DTYPE):
    import ml_dtypes  # noqa: F401 - bfloat16 numpy dtype

    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _table(rng, min_batch=1):
    """A valid paged table: (indptr, indices, last_page_len, num_pages)."""
    batch = int(rng.integers(min_batch, 4))
    pages = rng.integers(0, 3, batch)
    pages[rng.integers(batch)] = max(1, pages.max())  # at least one key somewhere
    num_pages = int(pages.sum()) + int(rng.integers(0, 3))
    indices = rng.permutation(num_pages)[: pages.sum()].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    last = np.where(pages > 0, rng.integers(1, PAGE + 1, batch), 0).astype(np.int32)
    return indptr, indices, last, num_pages


def _to_host(x):
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "numpy"):
        return x.numpy()
    return np.from_dlpack(x)


def _close(got, want, dtype=DTYPE):
    got, want = np.asarray(_to_host(got), np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN pattern differs from the reference"
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), fin), "inf pattern differs from the reference"
    err = np.abs(got[fin] - want[fin])
    assert np.all(err <= TOL[dtype] * (1 + np.abs(want[fin]))), f"max |err| {err.max(initial=0):.3e}"


def _readonly(x):
    x = np.array(x)
    x.flags.writeable = False
    return x


def _unaligned(x):
    return DLPackView(unaligned(x))


def _poison(rng, x):
    """``x`` with a NaN or inf somewhere."""
    x = np.array(x)
    flat = x.reshape(-1)
    flat[rng.integers(flat.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return x


#: values that are not tensors
NOT_TENSORS = (None, "q", [[1.0, 2.0]], 3.0, {"a": 1})


# -- case templates -------------------------------------------------------------------------------------
# Each takes (rng, device) and returns a Case.

def _decode_setup(rng, device):
    import tvm_attn as ta

    indptr, indices, last, num_pages = _table(rng)
    cache = _randn(rng, (num_pages, 2, PAGE, Hkv, D))
    q = _randn(rng, (indptr.size - 1, Hq, D))
    return ta, (indptr, indices, last, num_pages), q, cache


def _decode_ref(q, cache, table, variant=None, params=None):
    from tvm_attn import reference

    indptr, indices, last, _ = table
    return reference.paged_attention(q, None, cache, indptr, indices, last, variant=variant, params=params)[0]


INDEX_MUTATIONS = [
    # (what, argument index 0/1/2 = indptr/indices/last, mutate(arr) -> arr or None for invalid, valid?)
    ("decreasing", 0, lambda a: a[[0, 2, 1, *range(3, a.size)]] if a.size > 2 and a[1] != a[2] else None),
    ("not from 0", 0, lambda a: a + 1),
    ("short", 0, lambda a: a[:-1]),
    ("long", 0, lambda a: np.append(a, a[-1] + 1)),
    ("past the end", 0, lambda a: np.append(a[:-1], a[-1] + 5)),
    ("empty", 0, lambda a: a[:0]),
    ("negative page", 1, lambda a: np.where(np.arange(a.size) == 0, -1, a) if a.size else None),
    ("huge page", 1, lambda a: np.where(np.arange(a.size) == 0, 2**31 - 1, a) if a.size else None),
    ("int64 overflow", 1, lambda a: np.where(np.arange(a.size) == 0, np.int64(2**40), a.astype(np.int64))
     if a.size else None),
    ("last 0", 2, lambda a: np.where(a > 0, 0, a) if (a > 0).any() else None),
    ("last > page", 2, lambda a: np.where(a > 0, PAGE + 1, a) if (a > 0).any() else None),
    ("last on empty", 2, lambda a: np.where(a == 0, 1, a) if (a == 0).any() else None),
    ("last short", 2, lambda a: a[:-1]),
    ("last long", 2, lambda a: np.append(a, 1)),
    ("float", None, lambda a: a.astype(np.float32) + 0.5),
    ("2-D", None, lambda a: a.reshape(1, -1)),
    ("bool", None, lambda a: a.astype(bool)),
    ("None", None, lambda a: None),
    ("string", None, lambda a: "0,1,2"),
    ("ragged list", None, lambda a: [[0], [1, 2]]),
]
VALID_INDEX_FORMS = [
    ("int64", lambda a: a.astype(np.int64)),
    ("list", lambda a: a.tolist()),
    ("read-only", _readonly),
    ("strided", lambda a: np.repeat(a, 2)[::2]),
    ("uint8", lambda a: a.astype(np.uint8)),
    ("unaligned dlpack", _unaligned),
]
INDEX_NAMES = ("kv_indptr", "kv_indices", "kv_last_page_len")


def t_decode_index(rng, device):
    ta, table, q, cache = _decode_setup(rng, device)
    arrays = list(table[:3])
    which = int(rng.integers(3))
    if rng.random() < 0.25:  # a valid form of a valid table
        what, form = VALID_INDEX_FORMS[rng.integers(len(VALID_INDEX_FORMS))]
        arrays[which] = form(arrays[which])
        names, check = None, (lambda o: _close(o, _decode_ref(q, cache, table)))
    else:
        what, target, mutate = INDEX_MUTATIONS[rng.integers(len(INDEX_MUTATIONS))]
        which = which if target is None else target
        bad = mutate(arrays[which])
        if bad is None and what != "None":
            return t_decode_index(rng, device)  # this table cannot take that mutation: draw again
        arrays[which] = bad
        # a wrong length of one array shows as a mismatch with another; a page past the cache at run
        names, check = INDEX_NAMES + ("paged_kv_cache",), None

    def call():
        w = ta.BatchDecodeWithPagedKVCacheWrapper(device=device)
        w.plan(*arrays, Hq, Hkv, D, PAGE, q_data_type=DTYPE)
        return w.run(q, cache)

    return Case(f"decode index {INDEX_NAMES[which]} {what}", call, names, check)


BAD_PLAN_OPTIONS = {
    "num_qo_heads": [0, -4, True, 4.0, "4", None, 3, 2**40],
    "num_kv_heads": [0, -2, True, 2.0, "2", None, 3, 8],
    "head_dim": [0, -64, 96, 65, 64.0, "64", True, None, 512],
    "page_size": [0, -4, 4.0, "4", True, None],
    "window_left": [-2, -7, 2.5, "3", 2**31 - 1, 2**31 + 5, 2**30, True, [1]],
    "logits_soft_cap": [float("nan"), float("inf"), -1.0, -1e-9, "30", [30.0], 1e39],
    "sm_scale": ["abc", float("nan"), float("inf"), 0.0, -0.125, True, [0.1], 1e-50j],
    "pos_encoding_mode": ["ROPE", "rope_llama", None, 1, ["ALIBI"]],
    "q_data_type": ["int8", "float64", None, np.int32, "f16", 16],
    "kv_data_type": ["int8", "float64", "fp8", 16],
    "variant": ["causal", "Causal", 1, object(), "ta.Causal", "class", "sliding_window"],
}


def t_decode_plan_option(rng, device):
    import tvm_attn as ta

    _, table, q, cache = _decode_setup(rng, device)
    name = list(BAD_PLAN_OPTIONS)[rng.integers(len(BAD_PLAN_OPTIONS))]
    values = BAD_PLAN_OPTIONS[name]
    value = values[rng.integers(len(values))]
    if value == "class":
        value = [ta.Causal, ta.SlidingWindow, ta.RoPE][rng.integers(3)]
    args = dict(num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D, page_size=PAGE)
    kw = dict(q_data_type=DTYPE)
    (args if name in args else kw)[name] = value
    if name in ("rope_scale", "rope_theta"):
        kw["pos_encoding_mode"] = "ROPE_LLAMA"

    def call():
        w = ta.BatchDecodeWithPagedKVCacheWrapper(device=device)
        w.plan(*table[:3], **args, **kw)
        return w.run(q, cache)

    names = (name,) + (("num_qo_heads", "num_kv_heads") if name.startswith("num_") else ())
    return Case(f"decode plan {name}={value!r:.30}", call, names)


def t_rope_option(rng, device):
    import tvm_attn as ta

    _, table, q, cache = _decode_setup(rng, device)
    name = ["rope_scale", "rope_theta"][rng.integers(2)]
    value = [0.0, -1.0, float("nan"), float("inf"), "1", [1.0]][rng.integers(6)]
    mode = "ROPE_LLAMA" if rng.random() < 0.8 else "NONE"  # with NONE any rope option is refused

    def call():
        w = ta.BatchDecodeWithPagedKVCacheWrapper(device=device)
        w.plan(*table[:3], Hq, Hkv, D, PAGE, q_data_type=DTYPE, pos_encoding_mode=mode, **{name: value})
        return w.run(q, cache)

    return Case(f"decode plan {mode} {name}={value!r}", call, (name,))


def t_decode_run(rng, device):
    import tvm_attn as ta

    _, table, q, cache = _decode_setup(rng, device)
    batch, num_pages = q.shape[0], table[3]
    kw, run_q, run_cache, names = {}, q, cache, None
    kind = rng.integers(14)
    if kind == 0:
        run_q, names = _randn(rng, (batch + int(rng.integers(1, 3)), Hq, D)), ("q",)  # not the planned batch
    elif kind == 1:
        run_q, names = _randn(rng, [(batch, Hq * 2, D), (batch, Hq, D * 2), (batch, Hq), (1, batch, Hq, D)][
            rng.integers(4)]), ("q",)
    elif kind == 2:
        run_q, names = q.astype([np.float32, np.int16, np.float64][rng.integers(3)]), ("q",)
    elif kind == 3:
        run_q, names = NOT_TENSORS[rng.integers(len(NOT_TENSORS))], ("q",)
    elif kind == 4:  # fewer pages than the table refers to
        run_cache, names = cache[: int(table[1].max())], ("paged_kv_cache",)
    elif kind == 5:
        shapes = [(num_pages, 2, Hkv, PAGE, D), (num_pages, 2, PAGE * 2, Hkv, D),
                  (num_pages, 1, PAGE, Hkv, D), (num_pages, 2, PAGE, Hkv, D // 2),
                  (num_pages * 2 * PAGE, Hkv, D)]
        run_cache, names = _randn(rng, shapes[rng.integers(len(shapes))]), ("paged_kv_cache",)
    elif kind == 6:
        run_cache, names = cache.astype(np.float32), ("paged_kv_cache",)
    elif kind == 7:
        run_cache, names = NOT_TENSORS[rng.integers(1, len(NOT_TENSORS))], ("paged_kv_cache",)
    elif kind == 8:
        bad = [np.zeros((batch, Hq, D // 2), DTYPE), np.zeros((batch, Hq, D), np.float32), _readonly(
            np.zeros((batch, Hq, D), DTYPE)), [[0.0]], "out", _unaligned(np.zeros((batch, Hq, D), DTYPE))]
        kw["out"], names = bad[rng.integers(len(bad))], ("out",)
    elif kind == 9:
        bad = [np.zeros((batch, Hq + 1), np.float32), np.zeros((batch, Hq), DTYPE), _readonly(
            np.zeros((batch, Hq), np.float32)), "lse"]
        kw["lse"], kw["return_lse"], names = bad[rng.integers(len(bad))], True, ("lse",)
    elif kind == 10:
        extra = ["window_left", "windw_left", "custom_mask", "alibi_slopes"][rng.integers(4)]
        kw[extra], names = 1, (extra,)
    elif kind == 11:  # valid: out / lse buffers of every kind
        out = [np.zeros((batch, Hq, D), DTYPE), ta_tensor(np.zeros((batch, Hq, D), DTYPE), device)][
            rng.integers(2)]
        kw.update(out=out, lse=np.zeros((batch, Hq), np.float32), return_lse=True)
    elif kind == 12:  # valid: inputs of other kinds
        # a host DLPack tensor of another library is the CPU wrapper's input; a CUDA wrapper copies in
        # numpy arrays but names a host tensor it would have to copy behind the caller's back
        forms = [_readonly, functools.partial(ta_tensor, device=device)]
        forms += [_unaligned] if device == "cpu" else []
        form = forms[rng.integers(len(forms))]
        run_q, run_cache = form(q), form(cache)
    else:  # valid: NaN / inf data
        if rng.random() < 0.5:
            run_q = _poison(rng, q)
        else:
            run_cache = _poison(rng, cache)

    def call():
        w = ta.BatchDecodeWithPagedKVCacheWrapper(device=device)
        w.plan(*table[:3], Hq, Hkv, D, PAGE, q_data_type=DTYPE)
        res = w.run(run_q, run_cache, **kw)
        return res[0] if kw.get("return_lse") else res

    check = None
    if names is None:
        check = lambda o: _close(o, _decode_ref(_to_host(run_q), _to_host(run_cache), table))  # noqa: E731
    return Case(f"decode run case {kind}", call, names, check)


def ta_tensor(x, device: str = "cpu"):
    """``x`` as a TVM tensor on the case's device (a CUDA wrapper refuses host TVM tensors; where no
    GPU is, as when :func:`cuda_case_keys` lists the kernels, the host)."""
    import tvm

    on_gpu = False
    if device.startswith("cuda"):
        from tvm_attn.cuda_runtime import ensure_cuda

        try:
            ensure_cuda()  # a runtime-only TVM loads its CUDA runtime on demand
            on_gpu = tvm.cuda(0).exist
        except Exception:  # noqa: BLE001 -- no CUDA runtime here
            on_gpu = False
    return tvm.runtime.tensor(np.asarray(x), tvm.cuda(0) if on_gpu else tvm.cpu())


def t_run_before_plan(rng, device):
    import tvm_attn as ta

    cls = [ta.BatchDecodeWithPagedKVCacheWrapper, ta.BatchPrefillWithPagedKVCacheWrapper,
           ta.BatchPrefillWithRaggedKVCacheWrapper][rng.integers(3)]

    def call():
        w = cls(device=device)
        q = np.zeros((1, Hq, D), DTYPE)
        return w.run(q, np.zeros((1, 2, PAGE, Hkv, D), DTYPE)) if "Paged" in cls.__name__ else w.run(q, q, q)

    return Case(f"{cls.__name__} run before plan", call, ("plan",))


@functools.lru_cache(maxsize=None)
def _cuda_here() -> bool:
    from tvm_attn.api._common import resolve_device

    try:
        resolve_device("cuda")
        return True
    except ValueError:  # no driver or no device: "cuda" must then be a ValueError naming device
        return False


def t_wrapper_args(rng, device):
    import tvm_attn as ta

    cls = [ta.BatchDecodeWithPagedKVCacheWrapper, ta.BatchPrefillWithPagedKVCacheWrapper,
           ta.BatchPrefillWithRaggedKVCacheWrapper][rng.integers(3)]
    name = ["device", "kv_layout"][rng.integers(2)]
    devices = ["tpu", "cuda:one", "gpu", 0, "cpu:0"] + ([] if _cuda_here() else ["cuda", "cuda:0"])
    value = {"device": devices, "kv_layout": ["NDH", "nhd", None, 0, "HDN"]}[name]
    value = value[rng.integers(len(value))]

    def call():
        return cls(**{name: value}) if name == "device" else cls(value)

    return Case(f"{cls.__name__}({name}={value!r})", call, (name,))


def t_decode_variant_scalars(rng, device):
    import tvm_attn as ta

    _, table, q, cache = _decode_setup(rng, device)
    variant = ta.SlidingWindow(6) + ta.LogitsSoftCap(30.0)
    name = ["window_left", "logits_soft_cap"][rng.integers(2)]
    bad = {"window_left": [2.5, "3", -7, -2, 2**31 - 1, 2**31 + 5, None, True, [1], np.float32(2)],
           "logits_soft_cap": [float("nan"), float("inf"), 0.0, -1.0, "1", None, [2.0], 1e39]}[name]
    if rng.random() < 0.3:
        value = int(rng.integers(-1, 7)) if name == "window_left" else float(rng.uniform(0.5, 50))
        params = {"window_left": 6, "logits_soft_cap": 30.0, name: value}
        names = None
        check = lambda o: _close(o, _decode_ref(q, cache, table, variant, params))  # noqa: E731
    else:
        value, names, check = bad[rng.integers(len(bad))], (name,), None

    def call():
        w = ta.BatchDecodeWithPagedKVCacheWrapper(device=device)
        w.plan(*table[:3], Hq, Hkv, D, PAGE, q_data_type=DTYPE, variant=variant)
        return w.run(q, cache, **{name: value})

    return Case(f"decode run {name}={value!r:.30}", call, names, check)


def t_custom_mask(rng, device):
    import tvm_attn as ta

    _, table, q, cache = _decode_setup(rng, device)
    indptr, _, last, _ = table
    pages = np.diff(indptr)
    kv_lens = np.where(pages > 0, (pages - 1) * PAGE + last, 0)
    masks = [rng.random((1, int(n))) < 0.6 for n in kv_lens]
    packed, mask_indptr = ta.pack_custom_mask(masks)
    kind = rng.integers(11)
    names = ("custom_mask", "mask_indptr")
    if kind == 0:  # short or empty (every table has a key, so a mask needs a byte)
        packed = packed[: int(rng.integers(0, packed.size))]
    elif kind == 1:
        mask_indptr = mask_indptr[:-1]
    elif kind == 2:
        mask_indptr = np.append(mask_indptr, mask_indptr[-1])
    elif kind == 3:
        mask_indptr = mask_indptr[::-1].copy() if mask_indptr[-1] > 0 else mask_indptr + 1
    elif kind == 4:
        mask_indptr = mask_indptr + 1
    elif kind == 5:
        mask_indptr = np.append(mask_indptr[:-1], mask_indptr[-1] + 3)
    elif kind == 6:
        mask_indptr = [mask_indptr.astype(np.float32), mask_indptr.reshape(1, -1), None, "0"][rng.integers(4)]
    elif kind == 7:
        packed = [packed.astype(np.int32), packed.reshape(1, -1), None, packed.astype(bool)][rng.integers(4)]
    elif kind == 8:  # valid: a longer buffer than needed is fine
        packed = np.append(packed, np.zeros(3, np.uint8))
        names = None
    else:  # valid
        names = None
    mask_args = dict(custom_mask=packed, mask_indptr=mask_indptr)

    def call():
        w = ta.BatchDecodeWithPagedKVCacheWrapper(device=device)
        w.plan(*table[:3], Hq, Hkv, D, PAGE, q_data_type=DTYPE, variant=ta.CustomMask())
        return w.run(q, cache, **mask_args)

    check = None
    if names is None:
        check = lambda o: _close(o, _decode_ref(q, cache, table, ta.CustomMask(), mask_args))  # noqa: E731
    return Case(f"decode custom mask case {kind}", call, names, check)


def t_prefill_paged(rng, device):
    import tvm_attn as ta
    from tvm_attn import reference

    indptr, indices, last, num_pages = _table(rng)
    batch = indptr.size - 1
    qo_lens = rng.integers(0, 4, batch)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    cache = _randn(rng, (num_pages, 2, PAGE, Hkv, D))
    q = _randn(rng, (int(qo_indptr[-1]), Hq, D))
    causal = bool(rng.integers(2))
    kind = rng.integers(8)
    names = ("qo_indptr",)
    if kind == 0:
        qo_indptr = qo_indptr[:-1]
    elif kind == 1:
        qo_indptr = np.append(qo_indptr, qo_indptr[-1])
    elif kind == 2:
        qo_indptr = qo_indptr[::-1].copy() if qo_indptr[-1] else qo_indptr + 1
    elif kind == 3:
        qo_indptr = [None, "0,1", qo_indptr.astype(np.float32) + 0.5, [[0, 1], [2]]][rng.integers(4)]
    elif kind == 4:
        q, names = _randn(rng, (q.shape[0] + 1, Hq, D)), ("q",)  # other rows than planned
    elif kind == 5:
        q = _poison(rng, q) if q.size else q
        names = None
    else:
        qo_indptr = [qo_indptr, qo_indptr.tolist(), qo_indptr.astype(np.int64)][rng.integers(3)]
        names = None

    def call():
        w = ta.BatchPrefillWithPagedKVCacheWrapper(device=device)
        w.plan(qo_indptr, indptr, indices, last, Hq, Hkv, D, PAGE, causal=causal, q_data_type=DTYPE)
        return w.run(q, cache)

    def check(o):
        qi = np.asarray(qo_indptr, np.int64)
        want = reference.paged_attention(q, qi, cache, indptr, indices, last, causal=causal)[0]
        _close(o, want)

    return Case(f"prefill paged case {kind}", call, names, check if names is None else None)


def t_ragged(rng, device):
    import tvm_attn as ta
    from tvm_attn import reference

    layout = ["NHD", "HND"][rng.integers(2)]
    batch = int(rng.integers(1, 4))
    qo_lens, kv_lens = rng.integers(1, 4, batch), rng.integers(0, 6, batch)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    total = int(kv_indptr[-1])
    kv_shape = (total, Hkv, D) if layout == "NHD" else (Hkv, total, D)
    q, k, v = _randn(rng, (int(qo_indptr[-1]), Hq, D)), _randn(rng, kv_shape), _randn(rng, kv_shape)
    kind = rng.integers(9)
    names = ("kv_indptr", "qo_indptr")
    if kind == 0:
        kv_indptr = kv_indptr[::-1].copy() if total else kv_indptr + 1
    elif kind == 1:
        kv_indptr = kv_indptr[:-1]
    elif kind == 2:
        kv_indptr = np.append(kv_indptr, total + 1)
    elif kind == 3:
        k, names = _randn(rng, (total + 1, Hkv, D) if layout == "NHD" else (Hkv, total + 1, D)), ("k",)
    elif kind == 4:
        other = (Hkv, total, D) if layout == "NHD" else (total, Hkv, D)
        v, names = _randn(rng, other), ("v",)
        if other == kv_shape:
            v = v.astype(np.float32)
    elif kind == 5:
        k, names = k.astype(np.float32), ("k",)
    elif kind == 6:
        v, names = NOT_TENSORS[rng.integers(len(NOT_TENSORS))], ("v",)
    elif kind == 7:
        v = _poison(rng, v) if v.size else v
        names = None
    else:
        names = None

    def call():
        w = ta.BatchPrefillWithRaggedKVCacheWrapper(layout, device=device)
        w.plan(qo_indptr, kv_indptr, Hq, Hkv, D, q_data_type=DTYPE)
        return w.run(q, k, v)

    def check(o):
        _close(o, reference.ragged_attention(q, qo_indptr, k, v, kv_indptr, layout)[0])

    return Case(f"ragged {layout} case {kind}", call, names, check if names is None else None)


def t_block_sparse(rng, device):
    import tvm_attn as ta
    from tvm_attn import reference

    R, C = 2, 2
    M, N = R * int(rng.integers(1, 4)), C * int(rng.integers(1, 4))
    rows = [np.sort(rng.choice(N // C, int(rng.integers(0, N // C + 1)), replace=False))
            for _ in range(M // R)]
    indptr = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int32)
    indices = np.concatenate(rows).astype(np.int32)
    q, k, v = _randn(rng, (M, Hq, D)), _randn(rng, (N, Hkv, D)), _randn(rng, (N, Hkv, D))
    plan = dict(M=M, N=N, R=R, C=C)
    kind = rng.integers(8)
    names = None
    if kind == 0:
        key = ["M", "N", "R", "C"][rng.integers(4)]
        plan[key], names = [plan[key] + 1, 0, -2, 2.0, None, True][rng.integers(6)], (key, "R", "C", "indptr")
    elif kind == 1:
        indptr, names = indptr[:-1], ("indptr",)
    elif kind == 2:  # a block column past N / C
        if indices.size == 0:
            indices, indptr = np.zeros(1, np.int32), np.minimum(np.arange(indptr.size), 1).astype(np.int32)
        indices, names = np.append(indices[:-1], N // C).astype(np.int32), ("indices",)
    elif kind == 3:
        q, names = _randn(rng, (M + R, Hq, D)), ("q",)
    elif kind == 4:
        k, names = _randn(rng, (N + C, Hkv, D)), ("k",)

    def call():
        w = ta.BlockSparseAttentionWrapper(device=device)
        w.plan(indptr, indices, plan["M"], plan["N"], plan["R"], plan["C"], Hq, Hkv, D, q_data_type=DTYPE)
        return w.run(q, k, v)

    def check(o):
        _close(o, reference.block_sparse_attention(q, k, v, indptr, indices, R, C)[0])

    return Case(f"bsr case {kind}", call, names, check if names is None else None)


def t_single(rng, device):
    import tvm_attn as ta
    from tvm_attn import reference

    decode = bool(rng.integers(2))
    kv_len = int(rng.integers(1, 7))
    dt = "float32" if device == "cpu" else DTYPE  # the CUDA kernels are float16 / bfloat16
    q = _randn(rng, (Hq, D) if decode else (int(rng.integers(1, 4)), Hq, D), dt)
    k, v = _randn(rng, (kv_len, Hkv, D), dt), _randn(rng, (kv_len, Hkv, D), dt)
    kw = {}
    kind = rng.integers(12)
    names = None
    if kind == 0:
        q, names = _randn(rng, (1,) + q.shape if rng.random() < 0.5 else q.shape[1:], dt), ("q",)
    elif kind == 1:
        k, names = _randn(rng, (kv_len, 3, D), dt), ("k", "num_qo_heads", "num_kv_heads")
    elif kind == 2:
        v, names = _randn(rng, (kv_len + 1, Hkv, D), dt), ("v",)
    elif kind == 3:
        v, names = v.astype(np.float16 if dt == "float32" else np.float32), ("v",)
    elif kind == 4:
        which = rng.integers(3)
        bad = NOT_TENSORS[rng.integers(len(NOT_TENSORS))]
        q, k, v = [bad if i == which else x for i, x in enumerate((q, k, v))]
        names = ("qkv"[which],)
    elif kind == 5:
        kw["device"], names = ["tpu", "cuda:x", 5, "gpu"][rng.integers(4)], ("device",)
    elif kind == 6:
        kw["variant"], names = ["causal", ta.Causal, 3][rng.integers(3)], ("variant",)
    elif kind == 7:
        kw["kv_layout"], names = ["NDH", "hnd", None][rng.integers(3)], ("kv_layout", "k")
    elif kind == 8:
        kw["sm_scale"], names = ["abc", -1.0, float("nan"), True][rng.integers(4)], ("sm_scale",)
    elif kind == 9:
        q = _poison(rng, q)
    elif kind == 10:
        k = _poison(rng, k)
    if not decode and kind in (9, 10, 11):
        kw["causal"] = bool(rng.integers(2))
    fn = ta.single_decode_with_kv_cache if decode else ta.single_prefill_with_kv_cache
    dev = kw.pop("device", device)

    def call():
        return fn(q, k, v, device=dev, **kw)

    def check(o):
        qq = q[None] if decode else q
        want = reference.dense_attention(qq, k, v, variant=ta.Causal() if kw.get("causal") else None)[0]
        _close(o, want[0] if decode else want, dt)

    return Case(f"{fn.__name__} case {kind}", call, names, check if names is None else None)


def t_merge(rng, device):
    import tvm_attn as ta
    from tvm_attn import reference

    n, H = int(rng.integers(1, 4)), 2
    op = ["merge_state", "merge_states", "merge_state_in_place"][rng.integers(3)]
    kind = rng.integers(6)
    names = None
    va, vb = _randn(rng, (n, H, D), "float32"), _randn(rng, (n, H, D), "float32")
    sa, sb = _randn(rng, (n, H), "float32"), _randn(rng, (n, H), "float32")
    if op == "merge_states":
        v, s = np.stack([va, vb], 1), np.stack([sa, sb], 1)
        if kind == 0:
            s, names = s[:, :1], ("s",)
        elif kind == 1:
            v, names = v[0], ("v",)
        elif kind == 2:
            s, names = s.astype(np.float16), ("s",)
        elif kind == 3:
            v, names = NOT_TENSORS[rng.integers(len(NOT_TENSORS))], ("v",)

        def call():
            return ta.merge_states(v, s, device=device)[0]

        def check(o):
            _close(o, reference.merge_states(v, s)[0], "float32")
    else:
        in_place = op == "merge_state_in_place"
        args = [va, sa, vb, sb]
        arg_names = ("v", "s", "v_other", "s_other") if in_place else ("v_a", "s_a", "v_b", "s_b")
        which = int(rng.integers(4))
        bad = [lambda x: x[:, :1], lambda x: x.astype(np.float16), lambda x: "x", lambda x: None,
               _readonly if in_place and which < 2 else (lambda x: x[:, :1])]
        if kind < 5:  # a mismatch may be reported on the other tensor of the pair (v_a sets the shapes)
            args[which], names = bad[kind](args[which]), arg_names
        want = reference.merge_state(va, sa, vb, sb)[0]

        def call():
            if in_place:
                ta.merge_state_in_place(*args, device=device)
                return args[0]
            return ta.merge_state(*args, device=device)[0]

        def check(o):
            _close(o, want, "float32")

    return Case(f"{op} case {kind}", call, names, check if names is None else None)


def _spec(**over):
    spec = {"kind": "decode", "kv": {"format": "paged", "page_size": PAGE}, "num_qo_heads": Hq,
            "num_kv_heads": Hkv, "head_dim": D, "q_dtype": DTYPE}
    spec.update(over)
    return json.dumps({k: v for k, v in spec.items() if v is not None})


CLI_CASES = [
    (["demo", "--prompt-lens", "0"], "--prompt-lens"),
    (["demo", "--prompt-lens", "-3,4"], "--prompt-lens"),
    (["demo", "--prompt-lens", "a,b"], "--prompt-lens"),
    (["demo", "--prompt-lens", ","], "--prompt-lens"),
    (["demo", "--layers", "0"], "--layers"),
    (["demo", "--layers", "-1"], "--layers"),
    (["demo", "--layers", "x"], "--layers"),
    (["demo", "--decode-steps", "-2"], "--decode-steps"),
    (["demo", "--dtype", "int8"], "--dtype"),
    (["demo", "--kv-layout", "NDH"], "--kv-layout"),
    (["build", "--kernels", "[{"], "--kernels"),
    (["build", "--kernels", "{not json"], "--kernels"),
    (["build", "--kernels", "/nonexistent/k.json"], "--kernels"),
    (["build", "--kernels", _spec(kv=None)], "kv"),
    (["build", "--kernels", _spec(kind=None)], "kind"),
    (["build", "--kernels", _spec(heads=4)], "heads"),
    (["build", "--kernels", _spec(kv={"format": "paged", "pagesize": 4})], "pagesize"),
    (["build", "--kernels", _spec(kv={"format": "pages", "page_size": 4})], "format"),
    (["build", "--kernels", _spec(kv="paged")], "kv"),
    (["build", "--kernels", _spec(head_dim=96)], "head_dim"),
    (["build", "--kernels", _spec(num_qo_heads=0)], "num_qo_heads"),
    (["build", "--kernels", _spec(kind="encode")], "kind"),
    (["build", "--kernels", _spec(q_dtype="int8")], "q_dtype"),
    (["build", "--kernels", _spec(variant="causl")], "causl"),
    (["build", "--kernels", _spec(variant={"name": "sliding_window", "window_left": -5})], "window_left"),
    (["build", "--kernels", _spec(variant={"name": "logits_soft_cap", "cap": 0})], "logits_soft_cap"),
    (["build", "--kernels", '["causal"]'], "spec 0"),
    (["build", "--kernels", "42"], "--kernels"),
    (["build", "--kernels", json.dumps({"merge": "merge_all"})], "merge"),
    (["build", "--kernels", json.dumps({"merge": "merge_states", "dtype": "float16", "x": 1})], "x"),
    (["build-model", "-o", "/nonexistent/m.so", "--variant", "{bad"], "--variant"),
    (["build-model", "-o", "/nonexistent/m.so", "--layers", "0"], "--layers"),
    (["frobnicate"], "frobnicate"),
]


def t_cli(rng, device):
    from tvm_attn.cli import main

    if rng.random() < 0.06:  # valid: build one kernel (into the session's cache: usually already there)
        argv, option = ["build", "--kernels", _spec(), "-o", os.environ["TVM_ATTN_CACHE_DIR"]], None
    else:
        argv, option = CLI_CASES[rng.integers(len(CLI_CASES))]

    def call():
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse's own errors (usage + one error line)
                code = e.code
        if code != 0:
            text = err.getvalue()
            lines = [ln for ln in text.splitlines() if not ln.startswith(("usage:", " "))]
            if code != 2 or len(lines) != 1 or "Traceback" in text:
                raise AssertionError(f"exit {code}, stderr not one error line: {text!r}")
            raise CliError(lines[0])
        return out.getvalue()

    return Case(f"cli {' '.join(argv)[:60]}", call, None if option is None else (option,),
                (lambda out: None) if option is None else None)


class CliError(ValueError):
    """A CLI run that exited 2 with one error line (the line is the message)."""


TEMPLATES = [
    (t_decode_index, 6), (t_decode_plan_option, 5), (t_rope_option, 1), (t_decode_run, 6),
    (t_run_before_plan, 1), (t_wrapper_args, 1), (t_decode_variant_scalars, 3), (t_custom_mask, 3),
    (t_prefill_paged, 3), (t_ragged, 3), (t_block_sparse, 2), (t_single, 4), (t_merge, 3), (t_cli, 3),
]
_WHEEL = [t for t, weight in TEMPLATES for _ in range(weight)]
#: templates that run on the CUDA host (the others are host-only or do not take a device)
CUDA_TEMPLATES = {t_decode_index, t_decode_run, t_decode_variant_scalars, t_custom_mask, t_prefill_paged,
                  t_ragged, t_block_sparse, t_single}


def cuda_kernel_keys(target: str = "cuda:sm_90a") -> list:
    """The kernels the ``--device cuda`` cases run, for scripts/build_gpu_kernels.py to build ahead
    (the GPU host has TVM's runtime alone). :func:`test_cuda_kernel_keys` checks the list against the
    keys the cases look up."""
    import tvm_attn as ta
    from tvm_attn.config import AttentionKey
    from tvm_attn.registry import scheduled

    def keys(kind, fmt, variants, qo_lens=(1, 1)):
        # the prefill wrappers pick the query tile from the requests' mean GQA-packed rows, for
        # requests of qo_lens[0]..qo_lens[1] query rows (None: no request has a query row)
        lo, hi = qo_lens
        group = Hq // Hkv
        shapes = [None] if kind == "decode" else (
            ([None] if lo == 0 else []) + list(range(max(lo, 1) * group, hi * group + 1)))
        return [scheduled(AttentionKey(kind, fmt, Hq, Hkv, D, DTYPE, DTYPE, v, target), shape)
                for v in variants for shape in shapes]

    default, causal = ta.AttentionVariant(), ta.Causal()
    out = keys("decode", ta.PagedKV(PAGE, "NHD"),  # t_decode_*, t_custom_mask
               [default, ta.SlidingWindow(6) + ta.LogitsSoftCap(30.0), ta.CustomMask()])
    out += keys("prefill", ta.PagedKV(PAGE, "NHD"), [default, causal], (0, 3))  # t_prefill_paged
    out += keys("prefill", ta.RaggedKV("NHD"), [default, causal], (1, 3))  # t_ragged, t_single
    out += keys("prefill", ta.RaggedKV("HND"), [default], (1, 3))  # t_ragged
    out += keys("bsr", ta.BlockSparseKV(2, 2), [default], (2, 2))  # t_block_sparse: block rows of R = 2
    return list({k.uri: k for k in out}.values())


def cuda_case_keys(count: int, seed: int = 0, target: str = "cuda:sm_90a") -> set[str]:
    """The uris of the kernels the first ``count`` ``--device cuda`` cases look up, found on this host:
    "cuda" resolves to the CPU with a CUDA target and every lookup records its key and raises
    ``KernelNotBuiltError`` (so a case ends at its lookup; inputs the wrappers refuse look up nothing)."""
    from unittest import mock

    import tvm
    from tvm_attn.api import _common, cascade
    from tvm_attn.cache import KernelCache, KernelNotBuiltError

    seen = set()

    class Recording(KernelCache):
        def module(self, key):
            seen.add(key.uri)
            raise KernelNotBuiltError(key.uri)

    cache = Recording()
    resolve = lambda device: (tvm.cpu(0), target)  # noqa: E731
    with contextlib.ExitStack() as stack:
        for patch in (mock.patch.object(_common, "resolve_device", resolve),
                      mock.patch.object(cascade, "resolve_device", resolve),
                      mock.patch.object(_common, "get_cache", lambda directory=None: cache),
                      mock.patch.object(type(tvm.cpu(0)), "multi_processor_count", 132)):
            stack.enter_context(patch)
        for i in range(count):
            run_case(make_case(seed, i, "cuda"))
    return seen


def _selftest_case(i: int) -> Case:
    """With ``TVM_ATTN_FUZZ_SELFTEST=1``: a crash, a hang, then a pass (to test the harness)."""
    import time

    calls = [lambda: os.abort(), lambda: time.sleep(3600), lambda: 1]
    return Case(f"selftest {i}", calls[i % 3], None, lambda r: None)


def make_case(seed: int, i: int, device: str = "cpu") -> Case:
    if os.environ.get("TVM_ATTN_FUZZ_SELFTEST") == "1":
        return _selftest_case(i)
    rng = np.random.default_rng([seed, i])
    wheel = _WHEEL if device == "cpu" else [t for t in _WHEEL if t in CUDA_TEMPLATES]
    return wheel[i % len(wheel)](rng, device)


# -- running one case ---------------------------------------------------------------------------------------

def run_case(case: Case) -> tuple[str, str]:
    """(outcome, detail) of one case, in this process."""
    from tvm_attn.cache import KernelNotBuiltError

    try:
        result = case.call()
    except (ValueError, TypeError, RuntimeError) as err:
        text = f"{type(err).__name__}: {err}"
        if isinstance(err, RuntimeError) and not (
                isinstance(err, KernelNotBuiltError) or "call plan(...) first" in str(err)):
            return "obscure_error", text
        if case.names is None:
            return "valid_refused", text
        if any(name in str(err) for name in case.names):
            return "error_named", text
        return "error_unnamed", text
    except AssertionError as err:
        return "obscure_error", f"AssertionError: {err}"
    except Exception as err:  # noqa: BLE001 - any other exception is an obscure failure
        return "obscure_error", f"{type(err).__name__}: {err}"
    if case.names is not None:
        return "silent_accept", "returned a result"
    try:
        case.check(result)
    except AssertionError as err:
        return "wrong_result", str(err)
    return "correct", ""


def worker(seed: int, start: int, stop: int, device: str) -> None:
    """Child process: run cases ``start..stop-1``, one JSON line before and after each."""
    import warnings

    warnings.simplefilter("ignore")
    for i in range(start, stop):
        print(json.dumps({"start": i}), flush=True)
        try:
            case = make_case(seed, i, device)
            outcome, detail = run_case(case)
            name = case.name
        except Exception as err:  # noqa: BLE001 - a broken generator is reported, not hidden
            name, outcome, detail = "make_case", "obscure_error", f"generator: {type(err).__name__}: {err}"
        print(json.dumps({"done": i, "name": name, "outcome": outcome, "detail": detail[:400]}), flush=True)


# -- the parent: child processes, crashes and hangs ----------------------------------------------------------

def fuzz(count: int = 600, seed: int = 0, device: str = "cpu", timeout_s: float = CASE_TIMEOUT_S,
         start: int = 0) -> list[dict]:
    """Run cases ``start..count-1`` in child processes; one record per case."""
    records, i = [], start
    while i < count:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(seed), "--start",
               str(i), "--stop", str(count), "--device", device]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain: never block the child
        current = None
        while True:
            try:
                line = lines.get(timeout=timeout_s)
            except queue.Empty:
                proc.kill()
                proc.wait()
                records.append({"i": current, "name": "?", "outcome": "hang",
                                "detail": f"no answer in {timeout_s} s"})
                i = current + 1
                break
            if line is None:  # the child is gone
                code = proc.wait()
                if current is not None:
                    records.append({"i": current, "name": "?", "outcome": "crash",
                                    "detail": f"exit code {code}"})
                    i = current + 1
                else:
                    i = count
                break
            msg = json.loads(line)
            if "start" in msg:
                current = msg["start"]
            else:
                records.append({"i": msg["done"], **{k: msg[k] for k in ("name", "outcome", "detail")}})
                current = None
                i = msg["done"] + 1
    return records


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def table(records: list[dict]) -> str:
    counts = collections.Counter(r["outcome"] for r in records)
    rows = [f"{'outcome':<16}{'cases':>7}"] + [f"{k:<16}{counts.get(k, 0):>7}" for k in GOOD + BAD]
    rows.append(f"{'total':<16}{len(records):>7}")
    return "\n".join(rows)


def test_fuzz_api_and_cli(cache_dir):
    records = fuzz(count=int(os.environ.get("TVM_ATTN_FUZZ_CASES", "600")))
    print("\n" + table(records))
    bad = [r for r in records if r["outcome"] in BAD]
    assert len(records) >= 500
    assert not bad, "\n".join(f"case {r['i']} {r['name']}: {r['outcome']}: {r['detail']}" for r in bad[:20])
    # the cases reach every outcome the test claims to check: errors, and results compared with the reference
    counts = collections.Counter(r["outcome"] for r in records)
    assert counts["error_named"] >= 350 and counts["correct"] >= 80, counts


def test_cuda_kernel_keys():
    """Every kernel the GPU host's fuzz run looks up is in scripts/build_gpu_kernels.py's list."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_gpu_kernels", Path(__file__).resolve().parent.parent / "scripts" / "build_gpu_kernels.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    built = {k.uri for k in build.gpu_keys("cuda:sm_90a")[0]}
    listed = {k.uri for k in cuda_kernel_keys()}
    seen = cuda_case_keys(1000)
    assert seen == listed, f"looked up, not listed: {sorted(seen - listed)}; listed, not looked up: " \
                           f"{sorted(listed - seen)}"
    assert listed <= built, sorted(listed - built)


def test_harness_catches_crashes_and_hangs(monkeypatch):
    monkeypatch.setenv("TVM_ATTN_FUZZ_SELFTEST", "1")
    records = fuzz(count=3, timeout_s=10)
    assert [(r["i"], r["outcome"]) for r in records] == [(0, "crash"), (1, "hang"), (2, "correct")], records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fuzz tvm_attn's public API and CLI; print the outcomes")
    p.add_argument("--report", action="store_true", help="run the cases and print the table (the default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--count", type=int, default=600)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU host subset")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case that is not a pass")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.seed, args.start, args.stop, args.device)
        return 0
    os.environ.setdefault("TVM_ATTN_CACHE_DIR", tempfile.mkdtemp(prefix="tvm_attn_fuzz_cache_"))
    records = fuzz(args.start + args.count, args.seed, args.device, start=args.start)
    for r in records:
        if args.verbose or r["outcome"] in BAD:
            print(f"case {r['i']:>4} {r['outcome']:<14} {r['name']}: {r['detail'][:200]}")
    print(table(records))
    return 1 if any(r["outcome"] in BAD for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared fixtures and the tolerance rule.

Tolerance rule (every kernel-vs-reference comparison): the reference accumulates in float64 from the
same (rounded) inputs, so the kernel may differ by its float32 accumulation plus the rounding of the
output to its dtype:  ``|o - o_ref| <= TOL[dtype] * (1 + |o_ref|)``  with TOL = 1e-4 (float32),
2e-3 (float16, 2^-9 covers one rounding of |o| <= 4 by 2^-11 plus accumulation), 1.6e-2 (bfloat16,
2^-6 for its 8-bit mantissa). The LSE is float32 in every case and must match to 1e-3 absolute,
with ``-inf`` exactly where the reference has it; NaN (in o and the LSE) must be exactly where the
reference has it too.
"""

from __future__ import annotations

import os
import tempfile

import ml_dtypes
import numpy as np
import pytest

# One fresh kernel cache for the whole session: nothing stale from an older checkout, and each kernel
# compiles once however many tests use it.
# (On the GPU host the caller points TVM_ATTN_CACHE_DIR at the kernels built ahead of time.)
_CACHE = os.environ.setdefault("TVM_ATTN_CACHE_DIR", tempfile.mkdtemp(prefix="tvm_attn_test_cache_"))

TOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def assert_attention_close(o, lse, ref_o, ref_lse, dtype, what=""):
    o = np.asarray(o).astype(np.float32)
    ref_o = np.asarray(ref_o, np.float32)
    assert o.shape == ref_o.shape, (o.shape, ref_o.shape)
    nan = np.isnan(ref_o)  # NaN inputs: NaN exactly where the reference has it
    assert np.array_equal(np.isnan(o), nan), f"{what}: NaN pattern of o differs"
    err = np.abs(np.where(nan, 0, o - ref_o))
    bound = TOL[dtype] * (1 + np.abs(np.where(nan, 0, ref_o)))
    assert np.all(err <= bound), f"{what}: max |err| {err.max():.3e} (worst excess {(err - bound).max():.3e})"
    if lse is not None:
        lse = np.asarray(lse, np.float32)
        assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), f"{what}: -inf LSE pattern differs"
        assert np.array_equal(np.isnan(lse), np.isnan(ref_lse)), f"{what}: NaN LSE pattern differs"
        fin = np.isfinite(ref_lse)
        if fin.any():
            assert np.abs(lse[fin] - ref_lse[fin]).max() <= 1e-3, f"{what}: LSE error"


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(np.float32).astype(NP[dtype])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def cache_dir():
    return _CACHE


def has_cuda_gpu() -> bool:
    try:
        import tvm

        from tvm_attn.cuda_runtime import ensure_cuda

        ensure_cuda()
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - no CUDA runtime or driver here
        return False


def pytest_collection_modifyitems(config, items):
    if not has_cuda_gpu():
        skip = pytest.mark.skip(reason="no CUDA GPU here")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny Llama model built once for the CPU tests that run it (``tvm-attn build-model --config
    tiny --seed 3``, our kernels in TVM's KV cache): the path of its library, model.json beside it.
    Tests only read it (each opens its own ModelSession)."""
    from tvm_attn.cli import main

    path = tmp_path_factory.mktemp("tiny_model") / "tiny.so"
    assert main(["build-model", "--config", "tiny", "-o", str(path), "--seed", "3", "--quiet"]) == 0
    return path

"""Attention states to merge, shared by the CPU and GPU merge tests (no compiler needed)."""

import numpy as np

from conftest import randn


def merge_inputs(rng, dtype, n, k, H, D):
    """``k`` states with empty ones: row 0 head 0 has none at all, state 0 is empty in row 1, and an
    empty state's v holds NaN (a kernel must not read it: weight 0)."""
    v = randn(rng, (n, k, H, D), dtype)
    s = (rng.standard_normal((n, k, H)) * 4).astype(np.float32)
    s[0, :, 0] = -np.inf
    if n > 1 and k:
        s[1, 0] = -np.inf
    v[np.isneginf(s)] = np.nan
    return v, s


def nan_merge_inputs(rng, dtype, n, k, H, D):
    """:func:`merge_inputs` (``n >= 6``) with NaN inputs in head 0: row 2 has a NaN LSE, row 3 a NaN
    in element 5 of a non-empty state's v, row 4 a NaN LSE beside empty states, row 5 a +inf LSE."""
    v, s = merge_inputs(rng, dtype, n, k, H, D)
    s[2, 0, 0] = np.nan
    v[3, k - 1, 0, min(5, D - 1)] = np.nan
    s[4, :, 0] = -np.inf
    s[4, k // 2, 0] = np.nan
    s[5, k - 1, 0] = np.inf
    return v, s

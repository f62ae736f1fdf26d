"""Host-side checks that run in ``plan`` before any kernel sees the data.

Every failure is a ``ValueError`` that names the argument and the bad value, so a wrong page table
never reaches a kernel (where it would read out of bounds or silently give garbage).
"""

from __future__ import annotations

import numpy as np

from ..dtypes import INDEX_DTYPE
from ..tensor import to_numpy

SUPPORTED_HEAD_DIMS = (64, 128, 256)
#: at most this many heads: the kernels' int32 offsets (row * heads * head_dim) must not overflow
MAX_HEADS = 2**15


def as_index_array(name: str, value) -> np.ndarray:
    """``value`` (any array-like or DLPack tensor) as a 1-D contiguous int32 numpy array: the same
    memory when it already is one, else a checked copy."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected a 1-D int32 array (or list of ints), got {value!r}")
    try:
        arr = to_numpy(value)
    except (TypeError, ValueError) as err:  # e.g. a ragged nested list
        raise ValueError(f"{name}: is not an array of integers ({err})") from None
    if arr.dtype == INDEX_DTYPE and arr.ndim == 1 and arr.flags.c_contiguous:
        return arr  # the common case, checked in O(1)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: must hold integers (int32), got dtype {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name}: values do not fit in int32")
    return np.ascontiguousarray(arr, dtype=INDEX_DTYPE)


def check_indptr(name: str, indptr: np.ndarray, total: int | None = None, total_name: str = "") -> None:
    """``indptr`` is non-empty, starts at 0, never decreases, and ends within ``total``."""
    if indptr.size == 0:
        raise ValueError(f"{name}: needs at least one entry (batch_size + 1), got an empty array")
    if indptr[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {name}[0] = {int(indptr[0])}")
    if indptr.size == 1:
        return
    steps = np.diff(indptr)
    if steps.min() < 0:
        i = int(np.argmin(steps))
        raise ValueError(
            f"{name}: must be non-decreasing, but {name}[{i}] = {int(indptr[i])} > "
            f"{name}[{i + 1}] = {int(indptr[i + 1])}"
        )
    if total is not None and indptr[-1] > total:
        raise ValueError(f"{name}: last entry {int(indptr[-1])} exceeds {total_name} = {total}")


def check_range(name: str, arr: np.ndarray, low: int, high: int, what: str) -> None:
    """Every entry lies in ``[low, high)``."""
    if arr.size == 0 or (arr.min() >= low and arr.max() < high):
        return
    bad = np.nonzero((arr < low) | (arr >= high))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}: {name}[{i}] = {int(arr[i])} is out of range [{low}, {high}) ({what})")


def check_heads(num_qo_heads: int, num_kv_heads: int) -> None:
    for name, value in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads)):
        if check_positive(name, value) > MAX_HEADS:
            raise ValueError(f"{name}: {value} heads is more than the kernels support ({MAX_HEADS})")
    if num_qo_heads % num_kv_heads:
        raise ValueError(
            f"num_qo_heads: {num_qo_heads} is not a multiple of num_kv_heads = {num_kv_heads} "
            "(GQA needs whole groups)"
        )


def check_head_dim(head_dim: int) -> None:
    integer = isinstance(head_dim, (int, np.integer)) and not isinstance(head_dim, bool)
    if not integer or head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim: {head_dim!r} is not supported; use one of {SUPPORTED_HEAD_DIMS}")


def check_positive(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive int, got {value!r}")
    return int(value)


def check_layout(layout: str) -> str:
    if layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout: must be 'NHD' or 'HND', got {layout!r}")
    return layout

"""Tensor interop: numpy arrays, ``tvm.runtime.Tensor`` and any DLPack tensor (torch, ...) in and out.

Inputs become TVM tensors on the kernel's device, zero-copy through DLPack where the producer
allows it (numpy arrays that are not 64-byte aligned, and bfloat16 numpy arrays, are copied).
Outputs come back in the kind of the reference input (usually ``q``): a numpy array, a TVM tensor,
or, for other DLPack producers such as torch, a tensor of that library, zero-copy.
"""

from __future__ import annotations

import numpy as np
import tvm

from .dtypes import dtype_name, to_numpy_dtype


def device_of(x) -> tvm.runtime.Device | None:
    """The TVM device holding ``x``, or None for host numpy data."""
    if isinstance(x, tvm.runtime.Tensor):
        return x.device
    if hasattr(x, "__dlpack_device__") and not isinstance(x, np.ndarray):
        dev_type, dev_id = x.__dlpack_device__()
        return tvm.runtime.Device(int(dev_type), int(dev_id))
    return None


def dtype_of(x) -> str:
    return dtype_name(x.dtype)


def shape_of(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def to_tvm(x, device: tvm.runtime.Device, name: str = "tensor") -> tvm.runtime.Tensor:
    """``x`` as a TVM tensor on ``device`` (zero-copy when it is already there and DLPack allows)."""
    if isinstance(x, tvm.runtime.Tensor):
        if x.device.dlpack_device_type() != device.dlpack_device_type() or x.device.index != device.index:
            raise ValueError(f"{name}: is on {x.device}, but the kernel runs on {device}")
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        arr = np.ascontiguousarray(x)
        if arr.dtype.kind in "fiub" or arr.dtype.name == "bfloat16":
            if arr.dtype.name != "bfloat16" and device.dlpack_device_type() == 1 and _compact(arr):
                try:
                    return tvm.runtime.from_dlpack(arr)
                except RuntimeError:
                    pass  # not 64-byte aligned: copy below
            return tvm.runtime.tensor(arr, device)
        raise ValueError(f"{name}: unsupported numpy dtype {arr.dtype}")
    if hasattr(x, "__dlpack__"):
        t = tvm.runtime.from_dlpack(x)
        if t.device.dlpack_device_type() != device.dlpack_device_type():
            raise ValueError(f"{name}: is on {t.device}, but the kernel runs on {device}")
        return t
    raise TypeError(f"{name}: expected a numpy array, a tvm.runtime.Tensor or a DLPack tensor, got {type(x).__name__}")


def _compact(arr: np.ndarray) -> bool:
    """Non-empty with exactly the row-major strides TVM expects (numpy may keep odd strides on size-1
    or empty dims)."""
    if arr.size == 0:
        return False
    expected, step = [], arr.itemsize
    for n in reversed(arr.shape):
        expected.append(step)
        step *= n
    return tuple(reversed(expected)) == arr.strides


def to_numpy(x) -> np.ndarray:
    """A host numpy view or copy of ``x``."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, tvm.runtime.Tensor):
        return x.numpy()
    if hasattr(x, "__dlpack__"):
        if hasattr(x, "cpu") and hasattr(x, "numpy"):  # torch and friends
            return x.detach().cpu().numpy() if hasattr(x, "detach") else x.cpu().numpy()
        return np.asarray(tvm.runtime.from_dlpack(x).numpy())
    return np.asarray(x)


def empty(shape, dtype: str, device: tvm.runtime.Device) -> tvm.runtime.Tensor:
    return tvm.runtime.empty(tuple(int(s) for s in shape), dtype, device)


def like_input(t: tvm.runtime.Tensor, like):
    """Return ``t`` in the kind of ``like``: numpy, TVM tensor, or the DLPack library of ``like``."""
    if isinstance(like, tvm.runtime.Tensor):
        return t
    if isinstance(like, np.ndarray):
        return t.numpy()
    module = type(like).__module__.split(".")[0]
    if module == "torch":
        import torch

        return torch.from_dlpack(t)
    if hasattr(like, "__dlpack__"):
        lib = __import__(module)
        if hasattr(lib, "from_dlpack"):
            return lib.from_dlpack(t)
    return t


def host_array(x, dtype: str) -> np.ndarray:
    """numpy array of ``x`` in ``dtype`` (for reference checks in scripts and tests)."""
    return np.asarray(to_numpy(x)).astype(to_numpy_dtype(dtype))

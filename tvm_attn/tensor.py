"""Tensor interop: numpy arrays, ``tvm.runtime.Tensor`` and any DLPack tensor (torch, ...) in and out.

Inputs become TVM tensors on the kernel's device, zero-copy through DLPack where the producer
allows it; the others are copied: numpy arrays that are read-only, not 64-byte aligned or bfloat16,
and DLPack tensors whose data is not 64-byte aligned (TVM's kernels assume that alignment; a torch
slice often breaks it). Outputs (``out=``) must be writable and, for DLPack tensors, aligned.
Outputs come back in the kind of the reference input (usually ``q``): a numpy array, a TVM tensor,
or, for other DLPack producers such as torch, a tensor of that library, zero-copy.
"""

from __future__ import annotations

import numpy as np
import tvm

from .dtypes import dtype_name, to_numpy_dtype


def is_tensor(x) -> bool:
    """Whether ``x`` is a tensor this package takes: a numpy array, a TVM tensor, or a DLPack tensor."""
    return isinstance(x, (np.ndarray, tvm.runtime.Tensor)) or (
        hasattr(x, "__dlpack__") and hasattr(x, "shape") and hasattr(x, "dtype")
    )


def require_tensor(x, name: str) -> None:
    """TypeError naming ``name`` unless ``x`` is a tensor (lists, strings and None are not)."""
    if not is_tensor(x):
        raise TypeError(
            f"{name}: expected a numpy array, a tvm.runtime.Tensor or a DLPack tensor, got {_describe(x)}"
        )


def _describe(x) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def device_of(x) -> tvm.runtime.Device | None:
    """The TVM device holding ``x``, or None for host numpy data."""
    if isinstance(x, tvm.runtime.Tensor):
        return x.device
    if hasattr(x, "__dlpack_device__") and not isinstance(x, np.ndarray):
        dev_type, dev_id = x.__dlpack_device__()
        return tvm.runtime.Device(int(dev_type), int(dev_id))
    return None


def dtype_of(x, name: str = "tensor") -> str:
    require_tensor(x, name)
    return dtype_name(x.dtype)


def shape_of(x, name: str = "tensor") -> tuple[int, ...]:
    require_tensor(x, name)
    return tuple(int(s) for s in x.shape)


def to_tvm(x, device: tvm.runtime.Device, name: str = "tensor", copy: bool = True) -> tvm.runtime.Tensor:
    """``x`` as a TVM tensor on ``device`` (zero-copy when it is already there and DLPack allows).

    ``copy=False``, for tensors the kernel writes into: a DLPack tensor that TVM cannot take
    zero-copy is refused instead of copied (the result would land in the copy)."""
    if isinstance(x, tvm.runtime.Tensor):
        if x.device.dlpack_device_type() != device.dlpack_device_type() or x.device.index != device.index:
            raise ValueError(f"{name}: is on {x.device}, but the kernel runs on {device}")
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        arr = np.ascontiguousarray(x)
        if arr.dtype.kind in "fiub" or arr.dtype.name == "bfloat16":
            if (arr.dtype.name != "bfloat16" and device.dlpack_device_type() == 1 and _compact(arr)
                    and arr.flags.writeable and arr.ctypes.data % ALIGNMENT == 0):
                return tvm.runtime.from_dlpack(arr)
            return tvm.runtime.tensor(arr, device)
        raise ValueError(f"{name}: unsupported numpy dtype {arr.dtype}")
    if hasattr(x, "__dlpack__"):
        dev = device_of(x)
        if dev.dlpack_device_type() != device.dlpack_device_type():
            raise ValueError(f"{name}: is on {dev}, but the kernel runs on {device}")
        try:
            return tvm.runtime.from_dlpack(x)
        except (RuntimeError, BufferError) as err:
            if not copy:
                raise ValueError(
                    f"{name}: cannot be written in place ({err}); pass a contiguous, 64-byte aligned tensor"
                ) from None
            return _copied(x, device, name, err)
    raise TypeError(f"{name}: expected a numpy array, a tvm.runtime.Tensor or a DLPack tensor, "
                    f"got {_describe(x)}")


#: the data alignment TVM's ``from_dlpack`` requires (its kernels assume it)
ALIGNMENT = 64


def aligned_zeros(shape, dtype=np.int32) -> np.ndarray:
    """numpy zeros whose data starts on an :data:`ALIGNMENT`-byte boundary. TVM's compiled functions
    assume it of every array argument: LLVM emits aligned vector accesses, and the AVX-512 ones of
    the host-CPU kernels fault on numpy's 16-byte-aligned memory."""
    n = int(np.prod(shape))
    nbytes = n * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    at = -raw.ctypes.data % ALIGNMENT
    return raw[at: at + nbytes].view(dtype).reshape(shape)


def is_aligned(a: np.ndarray) -> bool:
    return a.ctypes.data % ALIGNMENT == 0


def _copied(x, device, name: str, err: Exception) -> tvm.runtime.Tensor:
    """An aligned copy of a DLPack tensor that TVM cannot take zero-copy (unaligned data)."""
    if hasattr(x, "clone"):  # torch and friends: a fresh allocation on the same device is aligned
        try:
            return tvm.runtime.from_dlpack(x.clone())
        except (RuntimeError, BufferError):
            pass
    if device.dlpack_device_type() == 1:
        return tvm.runtime.tensor(np.ascontiguousarray(np.from_dlpack(x)), device)
    raise ValueError(f"{name}: TVM cannot take this tensor ({err}); pass a contiguous, 64-byte aligned one")


def check_writable(x, name: str) -> None:
    """A numpy array that is to take a result in place is writable (checked before any kernel runs)."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        raise ValueError(f"{name}: the numpy array is read-only, so it cannot take the result")


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
        dev = device_of(x)
        if dev is not None and dev.dlpack_device_type() == 1:
            try:
                return np.from_dlpack(x)
            except (TypeError, RuntimeError, BufferError):
                pass
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

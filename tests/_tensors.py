"""Tensors of other libraries, as the tests need them (no pytest state: the fuzz workers import it too)."""

import numpy as np


class DLPackView:
    """Another library's DLPack tensor (its data need not be 64-byte aligned, as a torch slice)."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype

    def __dlpack__(self, **kw):
        return self.arr.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()


def unaligned(x) -> np.ndarray:
    """A copy of ``x`` whose data is not 64-byte aligned."""
    x = np.asarray(x)
    buf = np.zeros(x.size + 64, x.dtype)
    off = next(i for i in range(1, 64) if (buf.ctypes.data + i * x.itemsize) % 64)
    view = buf[off: off + x.size].reshape(x.shape)
    view[...] = x
    assert view.ctypes.data % 64
    return view

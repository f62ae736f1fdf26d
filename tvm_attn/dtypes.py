"""Data types the engine accepts, and their numpy spellings.

q, k and v may be float16, bfloat16 or float32; the output has the query's dtype; the LSE is float32.
Index arrays (indptr, indices, last_page_len) are int32, as in FlashInfer.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

#: Element types of q / k / v / o.
DATA_DTYPES = ("float16", "bfloat16", "float32")
#: Element type of every index array.
INDEX_DTYPE = "int32"
#: Element type of the log-sum-exp output.
LSE_DTYPE = "float32"

_NUMPY = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}


def to_numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a TVM dtype name (bfloat16 comes from ml_dtypes)."""
    try:
        return _NUMPY[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


def dtype_name(dtype) -> str:
    """Canonical TVM name of a numpy / ml_dtypes / TVM / torch dtype, or of a name string."""
    if isinstance(dtype, str):
        s = dtype
    else:
        s = str(dtype)
    s = s.replace("torch.", "")
    aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
               "fp32": "float32"}
    return aliases.get(s, s)


def short(name: str) -> str:
    """Short form used in kernel names: f16, bf16, f32."""
    return _SHORT[name]


def check_data_dtype(arg: str, name: str) -> str:
    """Raise ValueError naming ``arg`` unless ``name`` is a supported data dtype."""
    name = dtype_name(name)
    if name not in DATA_DTYPES:
        raise ValueError(f"{arg}: dtype {name!r} is not supported; use one of {', '.join(DATA_DTYPES)}")
    return name

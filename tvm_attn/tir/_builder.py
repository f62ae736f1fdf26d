"""Small helpers over TVM's script IR builder, so kernel generators read like TVMScript.

The generators use the builder (the API that ``@T.prim_func`` parsing drives) rather than a parsed
function, because their parameter lists come from the KV format and the variant: one generator makes
every format's kernel instead of one hand-written copy per format.
"""

from __future__ import annotations

import contextlib

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

__all__ = ["T", "IRBuilder", "buffer_param", "scalar_param", "let", "local", "loop", "store", "when", "sym"]


def sym(name: str, dtype: str = "int32") -> tirx.Var:
    """A symbolic dimension, bound by TVM from the shapes of the arguments at call time."""
    return tirx.Var(name, dtype)


def buffer_param(name: str, shape, dtype: str, offset: bool = False) -> tirx.Buffer:
    """Declare a tensor argument ``name`` matched to ``shape`` (ints or symbolic vars).

    ``offset=True`` gives the buffer a symbolic element offset, so that the caller may pass a view
    into a larger tensor (TVM's runtime KV cache passes its index arrays that way).
    """
    handle = T.arg(name, T.handle())
    elem_offset = sym(f"{name}_elem_offset") if offset else None
    buf = T.match_buffer(handle, tuple(shape), dtype, elem_offset=elem_offset)
    IRBuilder.name(name, buf)
    return buf


def scalar_param(name: str, dtype: str) -> tirx.Var:
    return T.arg(name, tirx.Var(name, dtype))


def let(name: str, value) -> tirx.Var:
    """Bind ``value`` once to a named variable (TVMScript ``name: T.let[...] = value``)."""
    var = T.Bind(value)
    IRBuilder.name(name, var)
    return var


def local(name: str, shape, dtype: str = "float32") -> tirx.Buffer:
    """A thread-local array of exactly ``shape``, accessed through a declared view of its storage.

    TVM 0.27's ``s_tir.CompactBufferAllocation`` evaluates the accessed region of every load and store
    of an allocated buffer against every variable bound above it; views it leaves alone. The Hopper
    paged kernel's ~3,300 fragment accesses under its page lookups made that pass 114 s of a 116 s
    compile. Our arrays are allocated at the size they use, so the pass has nothing to shrink: with the
    view the compile takes 3 s and every generated kernel's source is byte-identical."""
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    storage = T.alloc_buffer(shape, dtype, scope="local")
    IRBuilder.name(name, storage)
    return T.decl_buffer(shape, dtype, data=storage.data, scope="local")


@contextlib.contextmanager
def loop(name: str, extent, kind: str = "serial"):
    """``for name in T.<kind>(extent)`` as a context manager that yields the loop variable."""
    frame = {"serial": T.serial, "parallel": T.parallel, "vectorized": T.vectorized, "unroll": T.unroll}[kind]
    with frame(0, extent) as var:
        IRBuilder.name(name, var)
        yield var


def store(buf: tirx.Buffer, value, *indices) -> None:
    T.buffer_store(buf, value, list(indices))


@contextlib.contextmanager
def when(cond):
    """``if cond:``; a ``None`` condition means always (no branch emitted)."""
    if cond is None:
        yield
        return
    with T.If(cond):
        with T.Then():
            yield

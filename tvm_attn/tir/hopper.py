"""Hopper (sm_90a) building blocks: mbarriers, TMA tensor maps and loads, wgmma descriptors and
instructions, register reallocation. TVM 0.27 reaches these only as raw PTX (``T.ptx`` / ``T.cuda``);
this module is the one place that spells them, for every Hopper kernel.

Shared-memory operands are 128-byte-swizzled tiles of 64-element columns (:data:`CHUNK`): a
``rows x 64`` block of 128-byte rows, as TMA writes it with ``CU_TENSOR_MAP_SWIZZLE_128B`` and as
wgmma reads it. K-major operands (Q and K of ``Q K^T``) step 32 bytes per 16-deep k-step inside a
chunk and to the next chunk every four steps; the MN-major operand (V of ``P V``) steps 16 rows
(2 KiB) per k-step, and its 64-column chunks are ``leading`` bytes apart.

TVM workaround (one place): the codegen of ``T.cuda.wgmma.noop_barrier`` reads ``reg.dtype``,
which TIRx's loads do not have; :func:`_patch_noop_barrier` registers one that reads
``reg.ty.dtype``.
"""

from __future__ import annotations

from tvm import tirx

from ..schedule.hopper import CHUNK
from ._builder import T, let, local, loop
from .mma import MMA_TYPES

SWIZZLE_128B = 3  # CUtensorMapSwizzle: CU_TENSOR_MAP_SWIZZLE_128B, the same code for wgmma descriptors
SWIZZLE_ROWS = 8  # a swizzle atom: 8 rows of 128 bytes
ATOM_BYTES = 1024


def _patch_noop_barrier():
    from tvm.backend.cuda.codegen.registry import CODEGEN_REGISTRY, register_codegen

    @register_codegen("cuda_wgmma_noop_barrier")
    def _noop_barrier(reg):  # noqa: F811
        name = {"uint32": "tirx.cuda_wgmma_noop_barrier_uint32",
                "float32": "tirx.cuda_wgmma_noop_barrier_float32"}[str(reg.ty.dtype)]
        res = CODEGEN_REGISTRY[name]([reg])
        return res[0] if isinstance(res, tuple) else res


_patch_noop_barrier()


def smem(buf, elem: int | tirx.PrimExpr, extent: int):
    """Pointer to element ``elem`` of the flat shared buffer ``buf`` for an asynchronous access of
    ``extent`` elements. The access mask is empty: these kernels order shared memory with
    mbarriers and wgmma waits, which TVM's ThreadSync pass cannot see."""
    return buf.access_ptr(0, offset=elem, extent=extent)


# -- mbarriers ---------------------------------------------------------------------------------------

class Barriers:
    """``n`` mbarriers in shared memory, by index."""

    def __init__(self, name: str, n: int):
        self.n = n
        self.buf = T.alloc_buffer((n,), "uint64", scope="shared", align=8)
        from ._builder import IRBuilder

        IRBuilder.name(name, self.buf)

    def ptr(self, i):
        return self.buf.access_ptr(0, offset=i, extent=1)

    def init(self, i: int, count: int):
        T.evaluate(T.ptx.mbarrier.init.shared.b64(self.ptr(i), T.uint32(count)))

    def arrive(self, i):
        T.evaluate(T.ptx.mbarrier.arrive.shared.b64(self.ptr(i), T.uint32(1)))

    def expect_tx(self, i, nbytes: int):
        """Arrive, and expect ``nbytes`` of TMA traffic before the phase completes."""
        T.evaluate(T.ptx.mbarrier.arrive.expect_tx.shared.b64(self.ptr(i), T.uint32(nbytes)))

    def arrive_on_copies(self, i):
        """Arrive at barrier ``i`` once this thread's cp.async copies issued so far have landed; the
        arrival is one of the count the barrier was initialized with (``.noinc``)."""
        T.evaluate(T.ptx["cp.async.mbarrier.arrive.noinc.shared.b64"](self.ptr(i)))

    def wait(self, i, parity):
        """Until the phase of parity ``parity`` (0/1) of barrier ``i`` has completed."""
        T.evaluate(T.cuda.mbarrier_wait(self.ptr(i), parity))


def fence_barrier_init():
    """Make mbarrier.init visible to the async proxy (TMA) before any copy signals it."""
    fence_proxy_async()


def fence_proxy_async():
    """Order this thread's shared-memory stores before later reads by the async proxy (wgmma, TMA)."""
    T.evaluate(T.ptx.fence.proxy.async_.shared__cta())


# -- TMA ---------------------------------------------------------------------------------------------

def tensor_map(name: str, data, dims, box, dtype: str):
    """A host-encoded ``CUtensorMap`` over ``data`` (row-major, ``dims`` innermost first, packed), with
    ``box`` (innermost first) and the 128-byte swizzle; a kernel parameter of the launch."""
    esize = 2 if dtype in ("float16", "bfloat16") else 4
    strides, s = [], esize
    for d in dims[:-1]:
        s = s * d
        strides.append(s)
    m = T.Bind(T.tvm_stack_alloca("tensormap", 1), T.handle("tensormap"))
    from ._builder import IRBuilder

    IRBuilder.name(name, m)
    rank = len(dims)
    T.evaluate(T.tensormap_encode_tiled(m, data, *dims, *strides, *box, *([1] * rank),
                                        descriptor_dtype=dtype, rank=rank, swizzle=SWIZZLE_128B))
    return m


def tma_load(dst, tmap, coords, bar_ptr):
    """One box of ``tmap`` at ``coords`` (innermost first) -> shared memory ``dst``, completing
    ``nbytes`` of transaction on the barrier at ``bar_ptr``."""
    op = T.ptx[f"cp.async.bulk.tensor.{len(coords)}d.shared::cluster.global.mbarrier::complete_tx::bytes"]
    T.evaluate(op(dst, T.address_of(tmap), *coords, bar_ptr))


# -- wgmma -------------------------------------------------------------------------------------------

def descriptor(name: str, base_ptr, leading_bytes: int, stride_bytes: int = ATOM_BYTES):
    """A wgmma shared-memory descriptor of the 128-byte-swizzled tile at ``base_ptr``: ``leading``
    (LBO: between 64-column chunks of an MN-major operand; unused for K-major) and ``stride`` (SBO:
    between groups of 8 rows) in bytes. Step it with :func:`advance`."""
    d = local(name, (1,), "uint64")
    T.evaluate(T.cuda.wgmma.encode_matrix_descriptor(
        T.address_of(d[0]), base_ptr, leading_bytes // 16, stride_bytes // 16, SWIZZLE_128B))
    return let(name + "_v", d[0])


def advance(desc, nbytes):
    """``desc`` moved by ``nbytes`` (a multiple of 16) in shared memory: the start address is the low
    14 bits, in 16-byte units, and the CTA's shared memory stays below 256 KiB, so no carry."""
    return desc + tirx.Cast("uint64", nbytes // 16)


def wgmma(dtype: str, acc, n: int, b_desc, accumulate, a_desc=None, a_regs=None, trans_b: int = 0):
    """``acc (+)= A B`` for one warpgroup, ``m64n<n>k16``: A from shared memory (``a_desc``) or
    registers (``a_regs``: four 32-bit registers), B from shared memory; ``acc`` the ``n / 2`` fp32
    accumulators of each thread (the m16n8 fragment layout per warp and 8 columns)."""
    t = MMA_TYPES[dtype]
    op = T.ptx[f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t}"]
    if a_regs is not None:
        T.evaluate(op(*acc, *a_regs, b_desc, accumulate, 1, 1, trans_b))
    else:
        T.evaluate(op(*acc, a_desc, b_desc, accumulate, 1, 1, 0, trans_b))


def wgmma_fence():
    """Before the first wgmma that reads registers written since the last one (accumulators, A)."""
    T.evaluate(T.ptx.wgmma.fence.sync.aligned())


def wgmma_commit():
    """Close the wgmma group issued since the last commit (``wgmma.wait_group`` counts groups)."""
    T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())


def wgmma_wait(pending: int = 0):
    """Until at most ``pending`` committed wgmma groups are in flight."""
    T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(pending))


def pin(regs):
    """An empty asm that reads and writes each register: the compiler may not move the accumulators of
    an in-flight wgmma across it (CUTLASS's ``warpgroup_fence_operand``)."""
    for r in regs:
        T.evaluate(T.cuda.wgmma.noop_barrier(r))


def named_barrier_sync(barrier_id, threads: int):
    """``bar.sync``: wait at hardware barrier ``barrier_id`` (1-15; 0 is ``__syncthreads``) until
    ``threads`` threads have arrived or synced there."""
    T.evaluate(T.ptx["bar.sync"](tirx.Cast("uint32", barrier_id), T.uint32(threads)))


def named_barrier_arrive(barrier_id, threads: int):
    """``bar.arrive``: count this thread at barrier ``barrier_id`` without waiting."""
    T.evaluate(T.ptx["bar.arrive"](tirx.Cast("uint32", barrier_id), T.uint32(threads)))


def set_max_registers(n: int, increase: bool):
    """``setmaxnreg``: this warpgroup's register budget per thread becomes ``n``."""
    T.evaluate(T.ptx[f"setmaxnreg.{'inc' if increase else 'dec'}.sync.aligned.u32"](n))


__all__ = ["CHUNK", "Barriers", "advance", "descriptor", "fence_barrier_init", "fence_proxy_async", "loop",
           "named_barrier_arrive",
           "named_barrier_sync", "pin", "set_max_registers", "smem", "tensor_map", "tma_load", "wgmma",
           "wgmma_commit", "wgmma_fence", "wgmma_wait"]

"""Block-sparse attention (BSR with any block size ``(R, C)``; vector-sparse is ``C = 1``).

Lineage: FlashInfer ``sparse.py`` ``BlockSparseAttentionWrapper``. The whole ``M x N`` matrix is one
request: variant hooks see the absolute query row and key column (so ``causal=True`` means
``col <= row + N - M``).
"""

from __future__ import annotations

from ..config import AttentionKey
from ..kv.formats import BlockSparseKV
import numpy as np

from ._common import check_tensor, data_dtypes, flashinfer_variant
from .prefill import CudaPrefillPlan


class BlockSparseAttentionWrapper(CudaPrefillPlan):
    """Example::

        >>> w = BlockSparseAttentionWrapper()
        >>> w.plan(indptr, indices, M=1024, N=1024, R=16, C=16, num_qo_heads=32, num_kv_heads=8, head_dim=128)
        >>> o = w.run(q, k, v)     # q [M, 32, 128], k/v [N, 8, 128]

    ``backend`` (CUDA) as for the prefill wrappers: ``"auto"`` takes the Hopper kernel on sm_90a for
    block rows of more than 64 GQA-packed query rows (``R * num_qo_heads / num_kv_heads``), else the
    mma.sync kernel; ``"fa2"`` / ``"fa3"`` pin one.
    """

    def __init__(self, *, device=None, cache=None, disable_split_kv: bool = False, backend: str = "auto"):
        super().__init__("NHD", device=device, cache=cache, disable_split_kv=disable_split_kv,
                         backend=backend)

    def plan(
        self, indptr, indices, M: int, N: int, R: int, C: int, num_qo_heads: int, num_kv_heads: int,
        head_dim: int, *, causal: bool = False, variant=None, pos_encoding_mode: str = "NONE",
        logits_soft_cap=None, q_data_type="float16", kv_data_type=None, sm_scale=None, rope_scale=None,
        rope_theta=None,
    ) -> None:
        fmt = BlockSparseKV(R, C)
        indptr, indices = fmt.validate(indptr, indices, M, N)
        q_dtype, kv_dtype = data_dtypes(q_data_type, kv_data_type)
        v = flashinfer_variant(
            variant, causal=causal, pos_encoding_mode=pos_encoding_mode, logits_soft_cap=logits_soft_cap,
            rope_scale=rope_scale, rope_theta=rope_theta,
        )
        key = AttentionKey("bsr", fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, v,
                           self._target)
        self._M, self._N = int(M), int(N)
        if self._target == "llvm":
            self._plan_call(key, sm_scale, (), (indptr, indices), self._M)
            return
        # on CUDA a block row is a request of R query rows whose keys are its column blocks
        rows = np.arange(0, self._M + 1, R, dtype=np.int32)
        full = np.full(indptr.size - 1, C, np.int32)
        self._plan_cuda(key, sm_scale, rows, indptr, full, C, ("kv_indptr", "indices"), self._M,
                        indices[: indptr[-1]])

    def run(self, q, k, v, *, out=None, lse=None, return_lse: bool = False, **variant_args):
        """``q`` ``[M, Hq, D]``, ``k``/``v`` ``[N, Hkv, D]`` -> ``o`` ``[M, Hq, D]``."""
        call = self._planned()
        key = call.key
        check_tensor("q", q, (self._M, key.num_qo_heads, key.head_dim), key.q_dtype)
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, (self._N, key.num_kv_heads, key.head_dim), key.kv_dtype)
        return call(q, [("k", k), ("v", v)], variant_args, out, lse, return_lse)

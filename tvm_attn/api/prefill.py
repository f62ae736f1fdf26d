"""Prefill and append attention (ragged query rows per request) over paged or ragged KV, and single.

Lineage: FlashInfer ``prefill.py``. Append is prefill with ``kv_len > qo_len``: with ``causal=True`` the
query rows are aligned to the end of the KV (``kv_idx <= qo_idx + kv_len - qo_len``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config import AttentionKey
from ..kv.formats import PagedKV, RaggedKV
from ..kv.validate import as_index_array, check_indptr
from ..tensor import shape_of
from ..variants.base import KeyRange, check_key_range
from ._common import (
    DevicePlan, KernelCall, Wrapper, check_tensor, data_dtypes, default_sm_scale, flashinfer_variant,
    planned_lengths, run_single,
)
from .decode import check_paged_cache


#: the wrappers' ``backend`` argument -> the kernel family it asks for (None: the registry chooses)
BACKENDS = {"auto": None, "fa2": "cuda_prefill_fa2", "fa3": "cuda_prefill_sm90"}


def pin_schedule(wrapper: CudaPrefillPlan, schedule: str) -> CudaPrefillPlan:
    """``wrapper``'s later plans take the kernel schedule ``schedule`` (e.g. ``"wsq128k128s2po"``)
    instead of the registry's choice, for tuning scripts: the benchmark and the GPU tier time and
    check each Hopper schedule this way. The family the wrapper's backend picks must build it."""
    choose = wrapper._cuda_key
    wrapper._cuda_key = lambda key, qo_indptr: dataclasses.replace(choose(key, qo_indptr), schedule=schedule)
    return wrapper


class CudaPrefillPlan(Wrapper):
    """The CUDA side of the prefill-family wrappers (prefill over paged or ragged KV, block-sparse).

    ``plan`` picks the query tile from the queries' lengths, runs the planner (the same one as
    decode, :mod:`tvm_attn.tir.plan`) over the GQA-packed query tiles, and uploads its work list;
    ``run`` launches the kernel over the fixed grid, then the merge kernel when a tile was cut.

    With ``use_cuda_graph=True`` every buffer is sized once from ``max_batch_size``,
    ``max_num_tokens`` (query rows) and ``max_num_pages`` (or KV rows), and the query tile is fixed,
    so a graph captured around ``run`` (with ``out`` and ``lse`` given) replays after the lengths
    change; ``q`` then has ``max_num_tokens`` rows, and rows past the planned ones are not written.
    ``disable_split_kv`` gives batch-invariant, deterministic results (no tile is cut).
    ``backend`` (CUDA): ``"auto"`` lets the kernel-family registry choose by the queries' lengths,
    ``"fa2"`` takes the mma.sync kernel (every GPU from sm_80), ``"fa3"`` the Hopper kernel (sm_90a,
    ragged KV; plan raises a ValueError for what it cannot build).

    The plan reads only the keys the variant shows at plan time
    (:meth:`~tvm_attn.variants.AttentionVariant.key_range`: causal, a sliding window); ``run``, on
    every target, refuses run-time arguments that show more.
    """

    def __init__(self, kv_layout: str = "NHD", *, device=None, cache=None, use_cuda_graph: bool = False,
                 max_batch_size: int | None = None, max_num_tokens: int | None = None,
                 max_num_pages: int | None = None, disable_split_kv: bool = False, backend: str = "auto"):
        super().__init__(kv_layout, device=device, cache=cache)
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        self._family = BACKENDS[backend]
        self._graph = bool(use_cuda_graph)
        if self._graph:
            if self._target == "llvm":
                raise ValueError("use_cuda_graph: needs a CUDA device")
            if not (max_batch_size and max_num_tokens and max_num_pages):
                raise ValueError("use_cuda_graph: give max_batch_size, max_num_tokens and max_num_pages "
                                 "(the fixed buffer sizes)")
        self._max_batch = int(max_batch_size or 0)
        self._max_tokens = int(max_num_tokens or 0)
        self._max_pages = int(max_num_pages or 0)
        self._allow_split = not disable_split_kv
        self._dev_plan = DevicePlan(self._device, self._graph) if self._target != "llvm" else None
        self._plan_range = None  # the keys the last plan reads per query row (KeyRange; None: every key)

    @staticmethod
    def plan_key_range(key: AttentionKey) -> KeyRange | None:
        """The keys a plan of ``key`` reads: the variant's plan-time range; block-sparse reads every
        block it lists (its keys are column blocks, not positions)."""
        return key.variant.key_range() if key.kind == "prefill" else None

    def _check_key_range(self, key: AttentionKey, variant_args: dict) -> None:
        if self._plan_range is not None:
            check_key_range(self._plan_range, key.variant.key_range(variant_args))

    def _cuda_key(self, key: AttentionKey, qo_indptr: np.ndarray) -> AttentionKey:
        from ..registry import scheduled

        lens = np.diff(qo_indptr)
        lens = lens[lens > 0]
        packed = None if self._graph or not lens.size else int(lens.mean() * key.group_size)
        return scheduled(key, packed, family=self._family, gpu=self.gpu)

    def _plan_cuda(self, key, sm_scale, qo_indptr, kv_indptr, last, page_size, order, num_q_rows,
                   indices=None):
        """``order``: the kernel's KV index arguments, by name: ``"kv_indptr"``, ``"last"`` (the
        planner's arrays) and ``"indices"`` (``indices``: page or block ids, ``max_num_pages`` of them
        under CUDA graphs)."""
        from ..planner import (
            NO_WINDOW, PLAN, PREFILL_PACK_SLACK_DIV, planned_heads, prefill_work_overhead, prefill_workspace,
        )
        from ..registry import family_of

        key = self._cuda_key(key, qo_indptr)
        scale = default_sm_scale(sm_scale, key.head_dim)  # every input is checked before the kernel lookup
        lengths = planned_lengths(key, qo_indptr, kv_indptr, last, page_size,
                                  (self._M, self._N) if key.kind == "bsr" else None)
        tiles = family_of(key).tiles.of(key)
        batch = qo_indptr.size - 1
        if self._graph:
            if batch > self._max_batch or qo_indptr[-1] > self._max_tokens:
                raise ValueError(
                    f"plan: {batch} requests / {int(qo_indptr[-1])} query rows exceed the wrapper's "
                    f"max_batch_size {self._max_batch} / max_num_tokens {self._max_tokens}"
                )
            pad = self._max_batch - batch  # padded requests have no rows and no keys
            qo_indptr = np.concatenate([qo_indptr, np.full(pad, qo_indptr[-1], np.int32)])
            kv_indptr = np.concatenate([kv_indptr, np.full(pad, kv_indptr[-1], np.int32)])
            last = np.concatenate([last, np.zeros(pad, np.int32)])
            if indices is not None:
                if indices.size > self._max_pages:
                    raise ValueError(f"plan: {indices.size} page-table entries exceed "
                                     f"max_num_pages {self._max_pages}")
                indices = np.concatenate([indices, np.zeros(self._max_pages - indices.size, np.int32)])
            num_q_rows = self._max_tokens
        need = (max(int(qo_indptr[-1]), self._max_tokens, 1), max(batch, self._max_batch, 1))
        arrays = {"kv_indptr": kv_indptr, "last": last, "indices": indices}
        index = ((qo_indptr,) if key.kind == "prefill" else ()) + tuple(arrays[name] for name in order)
        dp = self._dev_plan
        bufs = dp.workspace(
            ("prefill", key.num_qo_heads, key.num_kv_heads, key.head_dim, key.schedule), need,
            lambda tokens, reqs: prefill_workspace(tokens, reqs, key.num_qo_heads, key.num_kv_heads,
                                                   key.head_dim, tiles, self._device.multi_processor_count),
            tuple(a.size for a in index),
        )
        module = self._cache.module(key)
        # a cut tile's pieces are merged without the variant's context, so output transforms plan uncut
        split = self._allow_split and not key.variant.overrides("output_transform")
        keys = self.plan_key_range(key) or KeyRange()
        bufs.plan(module[PLAN], qo_indptr, kv_indptr, last, page_size=page_size, allow_split=split,
                  group_size=key.group_size, tile_q=tiles.tile_q, causal=keys.causal,
                  window_left=NO_WINDOW if keys.window_left is None else keys.window_left,
                  work_overhead=prefill_work_overhead(tiles.tile_q), pack_slack_div=PREFILL_PACK_SLACK_DIV,
                  kv_heads=planned_heads(tiles, key.num_kv_heads))
        dev = bufs.upload(index)
        qo_dev, index = (dev[:1], dev[1:]) if key.kind == "prefill" else ((), dev)
        merge = self._graph or bufs.num_partials > 0
        self._call = KernelCall(
            key, module[key.uri], self._device, qo_dev, index, num_q_rows, scale,
            workspace_args=(bufs.work_info, bufs.cta_indptr, bufs.tmp_o, bufs.tmp_lse),
            merge_fn=module[key.uri + "_merge"] if merge else None,
            merge_args=(bufs.merge_indptr, bufs.tmp_o, bufs.tmp_lse), lengths=lengths,
        )


def _qo_indptr(qo_indptr, batch_size: int) -> np.ndarray:
    qo_indptr = as_index_array("qo_indptr", qo_indptr)
    check_indptr("qo_indptr", qo_indptr)
    if qo_indptr.size != batch_size + 1:
        raise ValueError(
            f"qo_indptr: has {qo_indptr.size} entries, but the KV index describes {batch_size} requests "
            f"(expected {batch_size + 1})"
        )
    return qo_indptr


class BatchPrefillWithPagedKVCacheWrapper(CudaPrefillPlan):
    """Batch prefill / append over a paged KV cache.

    Example::

        >>> w = BatchPrefillWithPagedKVCacheWrapper("NHD")
        >>> w.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, 32, 8, 128, 16, causal=True)
        >>> o = w.run(q, paged_kv_cache)          # q: [qo_indptr[-1], 32, 128]
    """

    def plan(
        self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
        num_kv_heads: int, head_dim: int, page_size: int, *, causal: bool = False, variant=None,
        pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: float | None = None,
        q_data_type="float16", kv_data_type=None, sm_scale=None, rope_scale=None, rope_theta=None,
    ) -> None:
        """Check the query and page tables and pick the kernel (arguments as FlashInfer's; ``variant``
        composes with ``causal`` and the FlashInfer-style options)."""
        fmt = PagedKV(page_size, self._kv_layout)
        kv_indptr, kv_indices, last, _ = fmt.validate(paged_kv_indptr, paged_kv_indices,
                                                      paged_kv_last_page_len)
        qo_indptr = _qo_indptr(qo_indptr, kv_indptr.size - 1)
        q_dtype, kv_dtype = data_dtypes(q_data_type, kv_data_type)
        v = flashinfer_variant(
            variant, causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        key = AttentionKey("prefill", fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, v,
                           self._target)
        self._total_qo = int(qo_indptr[-1])
        self._max_page = int(kv_indices[: kv_indptr[-1]].max(initial=-1))
        if self._target == "llvm":
            self._plan_call(key, sm_scale, (qo_indptr,), (kv_indptr, kv_indices, last), self._total_qo)
        else:
            self._plan_cuda(key, sm_scale, qo_indptr, kv_indptr, last, page_size,
                            ("kv_indptr", "indices", "last"), self._total_qo, kv_indices[: kv_indptr[-1]])
            if self._graph:
                self._total_qo = self._max_tokens
        self._plan_range = self.plan_key_range(key)

    def run(self, q, paged_kv_cache, *, out=None, lse=None, return_lse: bool = False, **variant_args):
        """``q`` ``[qo_indptr[-1], num_qo_heads, head_dim]`` -> ``o`` of the same shape (and ``lse``)."""
        call = self._planned()
        key = call.key
        check_tensor("q", q, (self._total_qo, key.num_qo_heads, key.head_dim), key.q_dtype)
        check_paged_cache(paged_kv_cache, key, self._max_page)
        self._check_key_range(key, variant_args)
        return call(q, [("paged_kv_cache", paged_kv_cache)], variant_args, out, lse, return_lse)


class BatchPrefillWithRaggedKVCacheWrapper(CudaPrefillPlan):
    """Batch prefill over ragged K/V: request ``b`` owns rows ``kv_indptr[b]:kv_indptr[b+1]``
    of ``k``/``v``."""

    def plan(
        self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim: int,
        *, causal: bool = False, variant=None, pos_encoding_mode: str = "NONE", window_left: int = -1,
        logits_soft_cap=None, q_data_type="float16", kv_data_type=None, sm_scale=None, rope_scale=None,
        rope_theta=None,
    ) -> None:
        fmt = RaggedKV(self._kv_layout)
        kv_indptr, _ = fmt.validate(kv_indptr)
        qo_indptr = _qo_indptr(qo_indptr, kv_indptr.size - 1)
        q_dtype, kv_dtype = data_dtypes(q_data_type, kv_data_type)
        v = flashinfer_variant(
            variant, causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        key = AttentionKey("prefill", fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, v,
                           self._target)
        self._total_qo, self._total_kv = int(qo_indptr[-1]), int(kv_indptr[-1])
        if self._target == "llvm":
            self._plan_call(key, sm_scale, (qo_indptr,), (kv_indptr,), self._total_qo)
        else:
            ones = np.ones(kv_indptr.size - 1, np.int32)  # ragged KV: pages of one row
            self._plan_cuda(key, sm_scale, qo_indptr, kv_indptr, ones, 1, ("kv_indptr",), self._total_qo)
            if self._graph:
                self._total_qo = self._max_tokens
                self._total_kv = self._max_pages  # max_num_pages counts KV rows for ragged KV
        self._plan_range = self.plan_key_range(key)

    def run(self, q, k, v, *, out=None, lse=None, return_lse: bool = False, **variant_args):
        """``q`` ``[qo_indptr[-1], Hq, D]``; ``k``/``v`` ``[kv_indptr[-1], Hkv, D]``
        (``"HND"``: ``[Hkv, kv_indptr[-1], D]``)."""
        call = self._planned()
        key = call.key
        check_tensor("q", q, (self._total_qo, key.num_qo_heads, key.head_dim), key.q_dtype)
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, key.kv.kv_shape(self._total_kv, key.num_kv_heads, key.head_dim),
                         key.kv_dtype)
        self._check_key_range(key, variant_args)
        return call(q, [("k", k), ("v", v)], variant_args, out, lse, return_lse)


def single_prefill_with_kv_cache(
    q, k, v, *, causal: bool = False, kv_layout: str = "NHD", variant=None, pos_encoding_mode: str = "NONE",
    window_left: int | None = None, logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None,
    return_lse: bool = False, device=None, cache=None, **variant_args,
):
    """Prefill / append for one request: ``q`` ``[qo_len, Hq, D]``, ``k``/``v`` ``[kv_len, Hkv, D]``
    (``"NHD"``) or ``[Hkv, kv_len, D]`` (``"HND"``) -> ``o`` ``[qo_len, Hq, D]``."""
    if len(shape_of(q, "q")) != 3:
        raise ValueError(f"q: expected shape (qo_len, num_qo_heads, head_dim), got {shape_of(q)}")
    fi = dict(window_left=window_left, logits_soft_cap=logits_soft_cap, rope_scale=rope_scale,
              rope_theta=rope_theta)
    return run_single(
        "prefill", q, k, v, kv_layout=kv_layout, variant=variant, causal=causal,
        pos_encoding_mode=pos_encoding_mode, fi_options=fi, sm_scale=sm_scale, return_lse=return_lse,
        device=device, cache=cache, variant_args=variant_args,
    )

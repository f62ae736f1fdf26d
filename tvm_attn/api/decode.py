"""Decode attention (one new query token per request): batch over a paged KV cache, and single.

Lineage: FlashInfer ``decode.py`` (``BatchDecodeWithPagedKVCacheWrapper``, ``single_decode_with_kv_cache``).
"""

from __future__ import annotations

import dataclasses

from ..config import AttentionKey
from ..kv.formats import PagedKV
from ..kv.validate import as_index_array
from ..planner import NO_WINDOW, PLAN_DECODE, decode_workspace
from ..registry import family_named, scheduled
from ..schedule.decode import DecodeTiles
from ..tensor import shape_of
from ..variants.base import check_key_range
from ._common import (
    DevicePlan, KernelCall, Wrapper, PlanStatics, check_tensor, data_dtypes, default_sm_scale,
    default_tensors, flashinfer_variant, planned_lengths, reshape, run_single,
)


def pin_schedule(wrapper: BatchDecodeWithPagedKVCacheWrapper, schedule: str | None):
    """``wrapper``'s later plans take the CUDA decode schedule ``schedule`` (e.g. ``"w4u4g4b3"``)
    instead of the registry's choice (None: the registry's again), for tuning scripts: ``tvm-attn
    tune`` times each candidate this way. ``plan`` raises a ValueError naming the schedule if the
    decode family cannot build it for the planned heads, head_dim and dtype."""
    if not isinstance(wrapper, BatchDecodeWithPagedKVCacheWrapper):
        raise TypeError(f"wrapper: expected a BatchDecodeWithPagedKVCacheWrapper, "
                        f"got {type(wrapper).__name__}")
    if schedule is not None:
        if wrapper._target == "llvm":
            raise ValueError(f"schedule: {schedule!r}: a CPU wrapper's kernels have no schedule to pin")
        if not isinstance(schedule, str) or DecodeTiles.launch_bounds(schedule) is None:
            raise ValueError(f"schedule: {schedule!r} is not a decode schedule like 'w4u4g4b4'")
    wrapper._pinned = schedule
    wrapper._last_key = None
    return wrapper


class BatchDecodeWithPagedKVCacheWrapper(Wrapper):
    """Batch decode over a paged KV cache.

    Example::

        >>> w = BatchDecodeWithPagedKVCacheWrapper("NHD", device="cuda")
        >>> w.plan(kv_indptr, kv_indices, kv_last_page_len, num_qo_heads=32, num_kv_heads=8,
        ...        head_dim=128, page_size=16)
        >>> o = w.run(q, paged_kv_cache)          # q: [batch_size, 32, 128]

    Note: the plan depends only on the page table, so one plan serves every layer of a step.

    On CUDA, ``plan`` runs the split-KV planner (:mod:`tvm_attn.tir.plan`) and ``run`` launches the
    decode kernel over a fixed grid (which also merges the pieces of the requests it cut). A sliding
    window given to ``plan`` (``window_left``, or the variant's own) is planned for: only the keys
    inside it are split among the CTAs, so a long request costs what its window costs; ``run`` (on
    every target) may then narrow the window but not widen it. With ``use_cuda_graph=True`` every
    device buffer is
    allocated once for ``max_batch_size`` requests and ``max_num_pages`` page-table entries;
    ``plan`` refills them in place, so a graph captured around ``run`` (with ``out`` and ``lse``
    given) replays correctly after the lengths change. ``q`` then has ``max_batch_size`` rows; rows
    past the planned batch read no keys and come out as zeros. ``disable_split_kv`` gives
    batch-invariant, deterministic results (one work per request).
    """

    def __init__(self, kv_layout: str = "NHD", *, device=None, cache=None, use_cuda_graph: bool = False,
                 max_batch_size: int | None = None, max_num_pages: int | None = None,
                 disable_split_kv: bool = False):
        super().__init__(kv_layout, device=device, cache=cache)
        self._graph = bool(use_cuda_graph)
        if self._graph:
            if self._target == "llvm":
                raise ValueError("use_cuda_graph: needs a CUDA device")
            if not max_batch_size or not max_num_pages:
                raise ValueError("use_cuda_graph: give max_batch_size and max_num_pages "
                                 "(the fixed buffer sizes)")
        self._max_batch = int(max_batch_size) if max_batch_size else None
        self._max_pages = int(max_num_pages) if max_num_pages else None
        self._allow_split = not disable_split_kv
        self._dev_plan = DevicePlan(self._device, self._graph) if self._target != "llvm" else None
        self._statics = None
        self._bufs = None  # (plan statics, PlanBuffers) of the last CUDA plan
        self._plan_range = None  # the keys the last plan was cut for (KeyRange; None: every key)
        self._last_key = None
        self._pinned = None  # a schedule pin_schedule gave, instead of the registry's choice

    def plan(
        self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
        page_size: int, *, variant=None, pos_encoding_mode: str = "NONE", window_left: int = -1,
        logits_soft_cap: float | None = None, q_data_type="float16", kv_data_type=None, sm_scale=None,
        rope_scale: float | None = None, rope_theta: float | None = None,
    ) -> None:
        """Check the page table, pick the kernel and, on CUDA, plan the split of long requests.

        Parameters
        ----------
        indptr : int32 ``[batch_size + 1]``; indices : int32 ``[indptr[-1]]`` page ids;
        last_page_len : int32 ``[batch_size]``, in ``[1, page_size]`` (0 for a request with no pages).
        variant : an :class:`~tvm_attn.variants.AttentionVariant`, composed with the FlashInfer-style
            options ``pos_encoding_mode`` ("NONE", "ROPE_LLAMA", "ALIBI"), ``window_left``,
            ``logits_soft_cap``, ``rope_scale`` and ``rope_theta``.
        """
        # the kernel key depends only on the options, which a serving loop repeats every step
        options = (num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode, window_left,
                   logits_soft_cap, q_data_type, kv_data_type, rope_scale, rope_theta)
        last = self._last_key
        if last is not None and last[1] is variant and last[0] == options:
            key = last[2]
        else:
            key = self._key(options, variant)
            self._last_key = (options, variant, key)
        planned = key.variant.key_range()  # the keys this plan reads; a run may need no more
        if self._target == "llvm":
            indptr, indices, last_page_len, _ = key.kv.validate(indptr, indices, last_page_len)
            self._batch_size = indptr.size - 1
            self._max_page = int(indices[: indptr[-1]].max(initial=-1))
            self._plan_call(key, sm_scale, (), (indptr, indices, last_page_len), self._batch_size)
            self._plan_range = planned
            return
        # CUDA: the kernel module's decode plan checks the table, stages it and plans in one call
        indptr, indices, last_page_len = (as_index_array(name, a) for name, a in (
            ("kv_indptr", indptr), ("kv_indices", indices), ("kv_last_page_len", last_page_len)))
        if last_page_len.size != indptr.size - 1:
            key.kv.validate(indptr, indices, last_page_len)  # raises: says which length is off
        self._plan_cuda(key, sm_scale, indptr, indices, last_page_len, planned)
        self._plan_range = planned

    def _key(self, options, variant) -> AttentionKey:
        (num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode, window_left, logits_soft_cap,
         q_data_type, kv_data_type, rope_scale, rope_theta) = options
        fmt = PagedKV(page_size, self._kv_layout)
        q_dtype, kv_dtype = data_dtypes(q_data_type, kv_data_type)
        v = flashinfer_variant(
            variant, pos_encoding_mode=pos_encoding_mode, window_left=window_left,
            logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
        )
        key = AttentionKey("decode", fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, v,
                           self._target)
        if self._pinned is None:
            return scheduled(key, gpu=self.gpu)
        pinned = dataclasses.replace(key, schedule=self._pinned)
        reason = family_named("cuda_decode").supports(pinned)
        if reason is not None:
            raise ValueError(f"schedule: the pinned {self._pinned!r} cannot build {key.uri}: {reason}")
        return pinned

    def _plan_cuda(self, key, sm_scale, indptr, indices, last_page_len, planned) -> None:
        batch, used = indptr.size - 1, int(indptr[-1])
        if not 0 <= used <= indices.size:
            key.kv.validate(indptr, indices, last_page_len)  # raises: says what is wrong
        scale = default_sm_scale(sm_scale, key.head_dim)
        pad = None
        if self._graph:  # every buffer stays put: pad the table to the wrapper's maxima
            if batch > self._max_batch:
                raise ValueError(f"plan: batch_size {batch} exceeds the wrapper's "
                                 f"max_batch_size {self._max_batch}")
            if used > self._max_pages:
                raise ValueError(f"plan: {used} page-table entries exceed max_num_pages {self._max_pages}")
            pad = (self._max_batch, self._max_pages)
        st = self._statics
        if st is None or (st.key is not key and st.key != key):
            # a new key: check the whole table before the kernel lookup, so that bad input is the
            # ValueError naming it even on a host without that kernel (for the plans that follow,
            # the module's decode plan checks the table in the same host call that stages it)
            key.kv.validate(indptr, indices, last_page_len)
            st = self._static(key)
        rows = self._max_batch if self._graph else max(batch, self._max_batch or 0, 1)
        slots = (pad[0] + 1, pad[1], pad[0]) if pad else (batch + 1, used, batch)
        bufs = self._bufs
        if bufs is None or bufs[0] is not st or rows > bufs[1].ws.max_rows or not bufs[1].fits(slots):
            # another key, or more room: the device plan's buffers (grown, or refused under CUDA graphs)
            bufs = self._bufs = st, self._dev_plan.workspace(
                ("decode", key.num_qo_heads, key.num_kv_heads, key.head_dim, key.schedule), (rows,),
                lambda rows: decode_workspace(rows, key.num_qo_heads, key.num_kv_heads, key.head_dim,
                                              st.tiles, self._device.multi_processor_count),
                slots,
            )
        bufs = bufs[1]
        # a sliding window known at plan time: the plan reads only the keys inside it (a decode row,
        # the request's last position, sees every key a causal mask shows)
        window = getattr(planned, "window_left", None)
        self._max_page, index = bufs.plan_decode(st.planner, key.kv, indptr, indices, last_page_len,
                                                 self._allow_split, pad,
                                                 NO_WINDOW if window is None else window)
        self._batch_size = pad[0] if pad else batch
        call = self._call
        # a steady batch plans the same arguments step after step (the index views are kept while
        # their shapes repeat): the kernel call stays
        if (call is None or call.fn is not st.kernel or call.kv_args is not index or call.sm_scale != scale
                or call.num_q_rows != self._batch_size or call.workspace_args[0] is not bufs.work_info):
            self._call = KernelCall(
                key, st.kernel, self._device, (), index, self._batch_size, scale,
                workspace_args=(bufs.work_info, bufs.cta_indptr, bufs.tmp_o, bufs.tmp_lse, *bufs.merge_state),
                defaults=st.defaults,
            )
        self._call.lengths = planned_lengths(key, None, indptr, last_page_len, key.kv.page_size)

    def _static(self, key):
        """What a plan of ``key`` needs besides the lengths (the schedule, the kernel functions, the
        variant's default tensors), kept while the key stays the same, as it does step after step."""
        module = self._cache.module(key)
        st = self._statics = PlanStatics(
            key, DecodeTiles.parse(key.schedule, key.head_dim, key.kv_dtype), module[PLAN_DECODE],
            module[key.uri], default_tensors(key, self._device))
        return st

    def run(self, q, paged_kv_cache, *, out=None, lse=None, return_lse: bool = False, **variant_args):
        """``q`` ``[batch_size, num_qo_heads, head_dim]`` -> ``o`` of the same shape (and ``lse`` float32
        ``[batch_size, num_qo_heads]`` with ``return_lse``). ``variant_args``: the variant's extras."""
        call = self._planned()
        key = call.key
        check_tensor("q", q, (self._batch_size, key.num_qo_heads, key.head_dim), key.q_dtype)
        check_paged_cache(paged_kv_cache, key, self._max_page)
        if self._plan_range is not None:
            check_key_range(self._plan_range, key.variant.key_range(variant_args))
        return call(q, [("paged_kv_cache", paged_kv_cache)], variant_args, out, lse, return_lse)


def check_paged_cache(cache, key: AttentionKey, max_page: int) -> None:
    """``cache`` matches the planned format and holds every page the plan refers to."""
    shape = key.kv.cache_shape(None, key.num_kv_heads, key.head_dim)
    check_tensor("paged_kv_cache", cache, shape, key.kv_dtype)
    num_pages = shape_of(cache)[0]
    if max_page >= num_pages:
        raise ValueError(
            f"paged_kv_cache: has {num_pages} pages, but the plan's kv_indices refer to page {max_page}"
        )


def single_decode_with_kv_cache(
    q, k, v, *, kv_layout: str = "NHD", variant=None, pos_encoding_mode: str = "NONE",
    window_left: int | None = None, logits_soft_cap: float | None = None, sm_scale=None, rope_scale=None,
    rope_theta=None, return_lse: bool = False, device=None, cache=None, **variant_args,
):
    """Decode one request: ``q`` ``[num_qo_heads, head_dim]``,
    ``k``/``v`` ``[kv_len, num_kv_heads, head_dim]`` (``"NHD"``) or ``[num_kv_heads, kv_len, head_dim]``
    (``"HND"``) -> ``o`` ``[num_qo_heads, head_dim]``."""
    q_shape = shape_of(q, "q")
    if len(q_shape) != 2:
        raise ValueError(f"q: expected shape (num_qo_heads, head_dim), got {q_shape}")
    num_qo_heads, head_dim = q_shape
    fi = dict(window_left=window_left, logits_soft_cap=logits_soft_cap, rope_scale=rope_scale,
              rope_theta=rope_theta)
    res = run_single(
        "decode", reshape(q, (1, num_qo_heads, head_dim)), k, v, kv_layout=kv_layout, variant=variant,
        causal=False, pos_encoding_mode=pos_encoding_mode, fi_options=fi, sm_scale=sm_scale,
        return_lse=return_lse, device=device, cache=cache, variant_args=variant_args,
    )
    if return_lse:
        return reshape(res[0], (num_qo_heads, head_dim)), reshape(res[1], (num_qo_heads,))
    return reshape(res, (num_qo_heads, head_dim))

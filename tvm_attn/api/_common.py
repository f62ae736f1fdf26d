"""What every wrapper shares: device and target, the kernel cache, variant arguments, run calls."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm

from .. import dtypes
from ..cache import KernelCache, get_cache
from ..config import AttentionKey
from ..planner import PlanBuffers
from ..schedule.tuned import gpu_name
from ..tensor import check_writable, dtype_of, empty, like_input, shape_of, to_tvm
from ..variants import ALiBi, AttentionVariant, Causal, LogitsSoftCap, RoPE, SlidingWindow, compose
from ..variants.base import CONFIG_DIMS, ScalarParam, TensorParam, check_scalar
from ..variants.masks import check_window_left

_POS_ENCODING = ("NONE", "ROPE_LLAMA", "ALIBI")


def resolve_device(device) -> tuple[tvm.runtime.Device, str]:
    """``"cpu"`` (default), ``"cuda"``/``"cuda:N"``, or a ``tvm.runtime.Device`` -> (device, target name)."""
    if device is None or device in ("cpu", "llvm"):
        return tvm.cpu(0), "llvm"
    if isinstance(device, tvm.runtime.Device):
        if device.dlpack_device_type() == 1:
            return device, "llvm"
        if device.dlpack_device_type() == 2:
            return _cuda_device(device.index)
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"device: {device!r} is not 'cuda' or 'cuda:<index>'")
        return _cuda_device(int(index or 0))
    raise ValueError(f"device: {device!r} is not supported; use 'cpu' or 'cuda[:index]'")


def _cuda_device(index: int) -> tuple[tvm.runtime.Device, str]:
    from ..cuda_runtime import device_arch, ensure_cuda

    try:
        ensure_cuda()
        dev = tvm.cuda(index)
        exists = dev.exist
    except (RuntimeError, OSError) as err:  # no CUDA driver or runtime on this host
        first_line = str(err).splitlines()[0][:200]
        raise ValueError(f"device: 'cuda:{index}' is not available here ({first_line})") from None
    if not exists:
        raise ValueError(f"device: no CUDA device {index} here")
    return dev, f"cuda:{device_arch(index)}"


def check_variant(variant) -> None:
    """``variant`` is None or an AttentionVariant instance (TypeError naming it otherwise)."""
    if variant is None or isinstance(variant, AttentionVariant):
        return
    if isinstance(variant, type) and issubclass(variant, AttentionVariant):
        raise TypeError(f"variant: expected an AttentionVariant instance, got the class {variant.__name__} "
                        f"(write {variant.__name__}())")
    raise TypeError(f"variant: expected an AttentionVariant, got {type(variant).__name__} {variant!r:.60}")


def flashinfer_variant(
    variant: AttentionVariant | None = None, *, causal: bool = False, pos_encoding_mode: str = "NONE",
    window_left: int | None = -1, logits_soft_cap: float | None = None, rope_scale: float | None = None,
    rope_theta: float | None = None,
) -> AttentionVariant:
    """Compose FlashInfer's plan options (``causal``, ``pos_encoding_mode``, ``window_left``,
    ``logits_soft_cap``, ``rope_*``) with a user variant into one variant."""
    check_variant(variant)
    if not isinstance(pos_encoding_mode, str) or pos_encoding_mode not in _POS_ENCODING:
        raise ValueError(f"pos_encoding_mode: must be one of {_POS_ENCODING}, got {pos_encoding_mode!r}")
    window_left = check_window_left(-1 if window_left is None else window_left)
    cap = None
    if logits_soft_cap is not None:  # 0 or None: no cap (FlashInfer's default 0.0)
        cap = check_scalar("logits_soft_cap", "float32", logits_soft_cap)
        if cap < 0:
            raise ValueError(f"logits_soft_cap: must be > 0 (or 0/None for none), got {logits_soft_cap!r}")
    parts = []
    if causal:
        parts.append(Causal())
    if pos_encoding_mode == "ROPE_LLAMA":
        parts.append(RoPE("llama", rope_scale=rope_scale, rope_theta=rope_theta))
    elif rope_scale is not None or rope_theta is not None:
        raise ValueError("rope_scale/rope_theta: only apply with pos_encoding_mode='ROPE_LLAMA'")
    if pos_encoding_mode == "ALIBI":
        parts.append(ALiBi())
    if window_left >= 0:
        parts.append(SlidingWindow(int(window_left)))
    if cap:
        parts.append(LogitsSoftCap(cap))
    return compose(*parts, variant) if variant is not None else compose(*parts)


def single_call_variant(variant, causal: bool, pos_encoding_mode: str, fi_options: dict, variant_args: dict):
    """For the single-request calls, which take FlashInfer's options and the variant's run-time
    arguments in one keyword list: an option the user's variant declares is its argument; the rest
    build the FlashInfer-style variant. Returns (variant, variant_args)."""
    check_variant(variant)
    declared = {p.name for p in variant.extra_params()} if variant is not None else set()
    options = {}
    for name, value in fi_options.items():
        if value is None:
            continue
        if name in declared:
            variant_args.setdefault(name, value)
        else:
            options[name] = value
    v = flashinfer_variant(variant, causal=causal, pos_encoding_mode=pos_encoding_mode, **options)
    return v, variant_args


def default_sm_scale(sm_scale, head_dim: int) -> float:
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, (str, bytes, bool)) or not hasattr(sm_scale, "__float__"):
        raise TypeError(f"sm_scale: expected a positive finite number, got {sm_scale!r}")
    try:
        sm_scale = float(sm_scale)
    except (TypeError, ValueError):  # e.g. an array of more than one element
        raise TypeError(f"sm_scale: expected a positive finite number, got {sm_scale!r:.60}") from None
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        # the kernels take the row max of unscaled logits (scaling inside the exp2)
        raise ValueError(f"sm_scale: must be a positive finite number, got {sm_scale!r}")
    return sm_scale


def check_tensor(name: str, x, shape: tuple, dtype: str) -> None:
    """Shape and dtype check (``None`` in ``shape`` matches any size)."""
    got = shape_of(x, name)
    if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {got}")
    if dtype_of(x) != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {dtype_of(x)}")


def default_tensors(key: AttentionKey, device) -> dict:
    """The variant's default tensors (e.g. ALiBi's standard slopes), made and uploaded once per plan."""
    dims = {"num_qo_heads": key.num_qo_heads, "num_kv_heads": key.num_kv_heads, "head_dim": key.head_dim}
    return {
        p.name: to_tvm(np.asarray(p.default(**dims), dtype=dtypes.to_numpy_dtype(p.dtype)), device, p.name)
        for p in key.extra_params() if isinstance(p, TensorParam) and p.default is not None
    }


def pack_variant_args(key: AttentionKey, given: dict, device, defaults: dict | None = None,
                      lengths=None) -> list:
    """The variant's extra arguments in kernel order, from ``run``'s keywords and the defaults
    (``defaults``: the :func:`default_tensors` of the plan; ``lengths``: :func:`planned_lengths`)."""
    given = dict(given)
    dims = {"num_qo_heads": key.num_qo_heads, "num_kv_heads": key.num_kv_heads, "head_dim": key.head_dim}
    defaults = defaults if defaults is not None else default_tensors(key, device)
    values, args = {}, []
    for p in key.extra_params():
        if p.name in given:
            value = given.pop(p.name)
        elif p.name in defaults:
            value = defaults[p.name]
        elif p.default is not None:
            value = p.default
        else:
            raise TypeError(f"run: missing argument {p.name!r}, which the variant {key.variant!r} needs")
        if isinstance(p, ScalarParam):
            value = check_scalar(p.name, p.dtype, value)
            values[p.name] = value
            args.append(value)
            continue
        shape = tuple(dims[d] if d in CONFIG_DIMS else (d if isinstance(d, int) else None) for d in p.shape)
        if not hasattr(value, "shape"):
            try:
                value = np.asarray(value, dtype=dtypes.to_numpy_dtype(p.dtype))
            except (TypeError, ValueError) as err:
                raise TypeError(f"{p.name}: expected a {p.dtype} tensor, got {value!r:.60} ({err})") from None
        check_tensor(p.name, value, shape, p.dtype)
        values[p.name] = value
        args.append(to_tvm(value, device, p.name))
    if given:
        names = [p.name for p in key.extra_params()]
        raise TypeError(f"run: unexpected arguments {sorted(given)}; the variant takes {names}")
    key.variant.validate_args(values)
    if lengths is not None:
        key.variant.validate_lengths(values, *lengths)
    return args


def planned_lengths(key: AttentionKey, qo_indptr, kv_indptr, last_page_len=None, page_size: int = 1,
                    shape=None):
    """Each planned request's ``(qo_lens, kv_lens)`` (int64) when the variant checks its tensors
    against them (:meth:`~tvm_attn.variants.AttentionVariant.validate_lengths`), else None.
    ``qo_indptr`` None: decode (one row each); ``shape``: block-sparse ``(M, N)``, one request."""
    if not key.variant.checks_lengths():
        return None
    if shape is not None:
        return np.asarray([shape[0]], np.int64), np.asarray([shape[1]], np.int64)
    kv_indptr = np.asarray(kv_indptr, np.int64)
    kv = np.diff(kv_indptr)
    if last_page_len is not None:
        kv = np.where(kv > 0, (kv - 1) * page_size + np.asarray(last_page_len, np.int64), 0)
    qo = np.ones(kv.size, np.int64) if qo_indptr is None else np.diff(np.asarray(qo_indptr, np.int64))
    return qo, kv


@dataclass
class KernelCall:
    """A planned kernel: its key, function, device, and the tensors ``run`` passes each time.

    Call order: ``q, *qo_args, *data_args, *kv_args, *workspace_args, o, lse, sm_scale, *variant_args``
    (``qo_args`` is ``(qo_indptr,)`` for prefill; ``data_args`` the paged cache or ``k, v``; ``kv_args``
    the KV index; ``workspace_args`` the planner's work list and partial states on CUDA). A split-KV
    plan then calls ``merge_fn(*merge_args, o, lse, *variant_args)``.
    """

    key: AttentionKey
    fn: object
    device: tvm.runtime.Device
    qo_args: tuple
    kv_args: tuple
    num_q_rows: int
    sm_scale: float
    workspace_args: tuple = ()
    merge_fn: object = None
    merge_args: tuple = ()
    #: the variant's default tensors (:func:`default_tensors`), made here unless given
    defaults: dict | None = None
    #: the planned requests' lengths, for variants that check their tensors against them
    #: (:func:`planned_lengths`)
    lengths: tuple | None = None

    def __post_init__(self):
        if self.defaults is None:
            self.defaults = default_tensors(self.key, self.device)

    def launch_args(self, q, data_args, variant_args, out=None, lse=None):
        """The kernel's and the merge kernel's argument lists (for timing them in isolation)."""
        key = self.key
        extra = pack_variant_args(key, variant_args, self.device, self.defaults, self.lengths)
        o_shape = (self.num_q_rows, key.num_qo_heads, key.head_dim)
        o_t = _out_tensor("out", out, o_shape, key.o_dtype, self.device)
        lse_t = _out_tensor("lse", lse, o_shape[:2], "float32", self.device)
        data = [to_tvm(x, self.device, n) for n, x in data_args]
        q_t = to_tvm(q, self.device, "q")
        main = [q_t, *self.qo_args, *data, *self.kv_args, *self.workspace_args, o_t, lse_t, self.sm_scale,
                *extra]
        merge = [*self.merge_args, o_t, lse_t, *extra] if self.merge_fn is not None else None
        return main, merge, o_t, lse_t

    def __call__(self, q, data_args: list[tuple[str, object]], variant_args: dict, out=None, lse=None,
                 return_lse=False):
        if return_lse and not self.key.variant.use_softmax:
            raise ValueError(f"return_lse: the variant {self.key.variant!r} uses no softmax, "
                             "so it has no LSE")
        main, merge, o_t, lse_t = self.launch_args(q, data_args, variant_args, out, lse)
        self.fn(*main)
        if merge is not None:
            self.merge_fn(*merge)
        o_res = _finish(o_t, out, q)
        if return_lse:
            return o_res, _finish(lse_t, lse, q)
        return o_res


@dataclass
class PlanStatics:
    """A CUDA wrapper's per-key plan state: kept across plans of the same key."""

    key: AttentionKey
    tiles: object
    #: the module's decode plan (page-table check, staging and planner in one host call)
    planner: object
    kernel: object
    defaults: dict


def _out_tensor(name, given, shape, dtype, device):
    if given is None:
        return empty(shape, dtype, device)
    check_tensor(name, given, shape, dtype)
    if isinstance(given, np.ndarray):
        check_writable(given, name)
        return empty(shape, dtype, device)  # filled, then copied back by _finish
    return to_tvm(given, device, name, copy=False)


def _finish(t, given, like):
    if given is None:
        return like_input(t, like)
    if isinstance(given, np.ndarray):
        given[...] = t.numpy()
    return given


def kernel_cache(cache: KernelCache | str | None) -> KernelCache:
    if isinstance(cache, KernelCache):
        return cache
    return get_cache(cache)


class Wrapper:
    """Base of the plan/run wrappers: holds the device, the cache, and the current plan.

    ``plan`` does all host work (checks, kernel lookup, index upload) once per step; ``run`` only
    checks shapes and dtypes, then calls the kernel, so one plan serves every layer of a step.
    """

    def __init__(self, kv_layout: str = "NHD", *, device=None, cache: KernelCache | str | None = None):
        from ..kv.validate import check_layout

        self._kv_layout = check_layout(kv_layout)
        self._device, self._target = resolve_device(device)
        self._cache = kernel_cache(cache)
        self._call: KernelCall | None = None

    @property
    def kernel_key(self) -> AttentionKey:
        return self._planned().key

    @property
    def gpu(self) -> str | None:
        """The GPU whose tuned schedules this wrapper's plans take (:mod:`tvm_attn.schedule.tuned`):
        ``$TVM_ATTN_GPU``, else the name of the wrapper's CUDA device; None on the CPU, or with
        ``TVM_ATTN_GPU=none`` (the hand-written schedules)."""
        if self._target == "llvm":
            return None
        return gpu_name(device=self._device)

    def _planned(self) -> KernelCall:
        if self._call is None:
            raise RuntimeError(f"{type(self).__name__}.run: call plan(...) first")
        return self._call

    def _plan_call(self, key: AttentionKey, sm_scale, qo_args, kv_args, num_q_rows: int) -> None:
        scale = default_sm_scale(sm_scale, key.head_dim)
        fn = self._cache.get(key)
        upload = lambda arrs: tuple(tvm.runtime.tensor(a, self._device) for a in arrs)  # noqa: E731
        self._call = KernelCall(
            key, fn, self._device, upload(qo_args), upload(kv_args), int(num_q_rows), scale,
            lengths=self._lengths(key, qo_args, kv_args, num_q_rows),
        )

    def _lengths(self, key, qo_args, kv_args, num_q_rows):
        """:func:`planned_lengths` from the CPU plan's index arrays."""
        if key.kind == "bsr":
            return planned_lengths(key, None, None, shape=(num_q_rows, getattr(self, "_N", 0)))
        from ..kv.formats import PagedKV

        paged = isinstance(key.kv, PagedKV)
        return planned_lengths(key, qo_args[0] if qo_args else None, kv_args[0],
                               kv_args[2] if paged else None, key.kv.page_size if paged else 1)


class DevicePlan:
    """The CUDA side of a wrapper's plan: the planner's workspace and the slots of the index arrays
    (:class:`~tvm_attn.planner.PlanBuffers`, allocated for the wrapper's maxima), rebuilt only when a
    plan needs more room. With CUDA graphs it is sized once, so a plan allocates nothing and the
    captured pointers stay valid."""

    def __init__(self, device, graph: bool):
        self.device, self.graph = device, graph
        self.buffers = None
        self._ws_id = None

    def workspace(self, ws_id: tuple, need: tuple, make, index_sizes: tuple = ()):
        """The plan buffers of workspace kind ``ws_id`` with room for ``need`` (a tuple of maxima,
        e.g. (tokens, requests)) and index arrays of ``index_sizes`` entries; ``make(*size)`` builds
        the :class:`~tvm_attn.planner.Workspace`. Rebuilt, at the element-wise maximum of the old
        and new needs (index slots at twice the size), only when the kind changes or a need grows."""
        old = self.buffers
        same = old is not None and self._ws_id == ws_id
        if same and all(n <= h for n, h in zip(need, self._size)) and old.fits(index_sizes):
            return old
        if self.graph and old is not None:
            raise ValueError(
                f"use_cuda_graph: this plan needs room for {need} and index arrays of {list(index_sizes)} "
                f"entries (workspace {ws_id}), beyond the wrapper's fixed {self._size} and "
                f"{list(old.index_capacity)} "
                f"({self._ws_id}); size the wrapper's maxima for the largest step"
            )
        size = tuple(max(n, h) for n, h in zip(need, self._size)) if same else tuple(need)
        index_capacity = tuple(index_sizes) if self.graph else tuple(max(2 * n, 64) for n in index_sizes)
        if same:
            index_capacity = tuple(max(c, h) for c, h in zip(index_capacity, old.index_capacity))
        self.buffers = PlanBuffers(make(*size), self.device, index_capacity)
        self._ws_id, self._size = ws_id, size
        return self.buffers


def data_dtypes(q_data_type, kv_data_type) -> tuple[str, str]:
    q = dtypes.check_data_dtype("q_data_type", q_data_type)
    kv = dtypes.check_data_dtype("kv_data_type", kv_data_type if kv_data_type is not None else q)
    return q, kv


def reshape(x, shape):
    """Reshape a numpy array, torch tensor or TVM tensor (a view of contiguous data)."""
    if isinstance(x, tvm.runtime.Tensor):
        return x._create_view(tuple(shape))
    return x.reshape(tuple(shape))


def run_single(
    kind: str, q, k, v, *, kv_layout: str, variant, causal: bool, pos_encoding_mode: str, fi_options: dict,
    sm_scale, return_lse: bool, device, cache, variant_args: dict,
):
    """One request through the ragged kernel of ``kind``: ``q`` ``[qo_len, Hq, D]`` (decode: qo_len 1),
    ``k``/``v`` ``[kv_len, Hkv, D]`` (``"NHD"``) or ``[Hkv, kv_len, D]`` (``"HND"``)."""
    from ..kv.formats import RaggedKV

    dev, target = resolve_device(device)
    fmt = RaggedKV(kv_layout)
    qo_len, num_qo_heads, head_dim = shape_of(q, "q")
    k_shape = shape_of(k, "k")
    shape_of(v, "v")
    if len(k_shape) != 3:
        raise ValueError(f"k: expected a 3-D tensor, got shape {k_shape}")
    kv_len, num_kv_heads = (k_shape[0], k_shape[1]) if kv_layout == "NHD" else (k_shape[1], k_shape[0])
    q_dtype = dtypes.check_data_dtype("q.dtype", dtype_of(q, "q"))
    kv_dtype = dtypes.check_data_dtype("k.dtype", dtype_of(k, "k"))
    var, variant_args = single_call_variant(variant, causal, pos_encoding_mode, fi_options, variant_args)
    key = AttentionKey(kind, fmt, num_qo_heads, num_kv_heads, head_dim, q_dtype, kv_dtype, var, target)
    check_tensor("k", k, k_shape[:2] + (head_dim,), kv_dtype)
    check_tensor("v", v, k_shape[:2] + (head_dim,), kv_dtype)
    if target != "llvm":  # CUDA: the ragged prefill kernel, with its plan (decode is a one-row prefill)
        from .prefill import BatchPrefillWithRaggedKVCacheWrapper

        w = BatchPrefillWithRaggedKVCacheWrapper(kv_layout, device=dev, cache=cache)
        w.plan(np.asarray([0, qo_len], np.int32), np.asarray([0, kv_len], np.int32), num_qo_heads,
               num_kv_heads, head_dim, variant=var, q_data_type=q_dtype, kv_data_type=kv_dtype,
               sm_scale=sm_scale)
        return w.run(q, k, v, return_lse=return_lse, **variant_args)
    indptr = lambda n: tvm.runtime.tensor(np.asarray([0, n], np.int32), dev)  # noqa: E731
    qo_args = (indptr(qo_len),) if kind == "prefill" else ()
    scale = default_sm_scale(sm_scale, head_dim)
    call = KernelCall(key, kernel_cache(cache).get(key), dev, qo_args, (indptr(kv_len),), qo_len, scale,
                      lengths=planned_lengths(key, [0, qo_len], [0, kv_len]))
    return call(q, [("k", k), ("v", v)], variant_args, return_lse=return_lse)

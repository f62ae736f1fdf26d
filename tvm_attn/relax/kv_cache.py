"""TVM's runtime paged KV cache with tvm_attn's kernels in its attention slots.

:class:`AttnPagedKVCache` emits the same ``vm.builtin.paged_attention_kv_cache_create`` call as
TVM's ``TIRPagedKVCache`` (``tvm/relax/frontend/nn/llm/kv_cache.py``), so the runtime object is
TVM's own: sequence add / remove / fork / popn, ``begin_forward`` / ``end_forward``, page
management and the cascade over shared prefixes behave as they do for MLC-LLM. What changes is
what sits in the attention slots (:func:`slot_sources` lists them):

* ours: ragged prefill (the new tokens against themselves, causal), paged prefill (the queries
  against each shared-prefix depth of the cache) and paged decode. On the CPU (``llvm``) they are
  ``("tirx", f)`` slots with the builtin TIR signatures (:func:`tvm_attn.tir.abi.kv_cache_kernel`),
  and so is the in-place state merge. On CUDA they are ``("flashinfer", run, plan)`` slots
  (:mod:`tvm_attn.relax.kv_backend`): the cache plans once per forward with tvm_attn's planner
  and runs the tensor-core prefill and the split-KV decode kernels per layer, and the state merge
  is :mod:`tvm_attn.tir.merge_cuda`'s;
* TVM's: the page kernels (transpose-append of new K/V into pages, single-page copy for forks,
  compaction, debug read-out), the fused split + RoPE kernel, the sliding-window slots, the
  tree-mask (speculative decoding) slots.

Our kernels leave RoPE to the cache's split-rotary kernel, so ``rope_mode`` is ``RopeMode.NORMAL``
(or ``NONE``); inline RoPE raises.

CUDA graphs. Our CUDA slots are capture-safe for decode (``kv_backend.cc``'s header comment: fixed
workspaces, a fixed grid, all per-step work in ``plan``). TVM 0.27's runtime cache
(``src/runtime/vm/paged_kv_cache.cc``, ``attn_utils.h``) limits what a graph of a whole decode step
can replay:

* its per-step host work (packing the index arrays, the upload on its copy stream, the slots'
  plans: ``ComputeStreamWaitForCopyStream``) runs lazily in the step's first attention call, not in
  ``BeginForward``; ``vm.builtin.attention_kv_cache_get_query_positions`` runs it earlier, outside a
  capture (:meth:`tvm_attn.models.runtime.ModelSession.begin_step` with ``plan=True``);
* ``SyncAuxArrayToDevice`` packs the index arrays one after the other into one device buffer
  (``CachedPagedKVCacheAuxDataManager``, ``CopyAttnAuxVecToCache``), each start rounded up to 16
  bytes (4 int32): the query positions first, then per depth the qo and page indptrs, the page
  indices, the last-page lengths, ... and the append positions. The addresses that the captured
  kernels were given (ours: the last-page lengths, and the page indices of the second depth; TVM's
  transpose-append: the append positions) move whenever the batch size or the batch's page count
  after the step's append, rounded up to 4, changes;
* the number of cascade depths (sequences of the batch that share a forked prefix, see
  ``GetBlockIdsOnDepth``) decides how many attention calls and merges a layer makes and the sizes of
  each depth's arrays, and the compute stream is the one current when the cache was created.

So a captured decode step replays correctly for a later step of the same batch size and the same
rounded page count, over one depth. :meth:`tvm_attn.models.runtime.ModelSession.decode_graph_key`
gives that pair for a step (a ``DecodeGraphKey``), or None for a batch with a sequence that was
forked from or into another (its pages sit in several depths); a caller keeps its captured graphs by
that key, captures one for a new key and runs None steps eagerly. tests/gpu/test_kv_cache_graphs.py
does so over random steps in which lengths grow across pages and sequences come and go.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import tvm
from tvm import relax as rx
from tvm.relax.frontend.nn.extern import ExternModule
from tvm.relax.frontend.nn.llm import kv_cache as tvm_kv
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from ..build import generate
from ..config import MergeKey
from ..tir.abi import kv_cache_kernel


@dataclass(frozen=True)
class KVCacheConfig:
    """The static configuration of the cache and its kernels."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    dtype: str = "float16"
    page_size: int = 16
    rope_mode: int = int(RopeMode.NORMAL)
    rope_theta: float = 10000.0
    rope_scale: float = 1.0
    rope_scaling: tuple = ()  # (key, value) pairs of a Llama-3.1 style scaling dict, or ()
    target: str = "llvm"

    def __post_init__(self):
        if int(self.rope_mode) == int(RopeMode.INLINE):
            raise ValueError("rope_mode: tvm_attn's cache kernels need RoPE applied before attention "
                             "(RopeMode.NORMAL) or none (RopeMode.NONE), not RopeMode.INLINE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


def slot_sources(target: str) -> dict[str, str]:
    """Which kernel fills each slot of the cache for ``target``: ``"tvm_attn"`` or ``"tvm_builtin"``
    (``target="tvm_builtin"`` describes TVM's own ``TIRPagedKVCache``)."""
    ours = "tvm_builtin" if target == "tvm_builtin" else "tvm_attn"
    return {
        "prefill_ragged": ours, "prefill_paged": ours, "decode_paged": ours,
        "merge_state": ours,
        "prefill_sliding_window": "tvm_builtin", "decode_sliding_window": "tvm_builtin",
        "tree_mask": "tvm_builtin", "transpose_append": "tvm_builtin", "split_rotary": "tvm_builtin",
        "copy_single_page": "tvm_builtin", "compact_copy": "tvm_builtin", "debug_get_kv": "tvm_builtin",
    }


class AttnPagedKVCache(PagedKVCache):
    """TVM's runtime paged KV cache whose attention slots run tvm_attn's kernels.

    Build it inside an ``nn.Module`` method (the model's ``create_paged_kv_cache``); the per-layer
    calls (``attention_with_fused_qkv``, ``self_attention``, ...) are TVM's ``PagedKVCache`` methods.

    ``max_batch_size``, ``max_total_seq_len`` and ``prefill_chunk_size`` are usually symbolic
    (the create function's arguments); everything in ``config`` is static. ``variant``: an optional
    position-free variant applied in every attention slot (its run-time scalars bound to their
    defaults, see :func:`tvm_attn.tir.abi.kv_cache_kernel`).
    """

    def __init__(self, config: KVCacheConfig, max_batch_size, max_total_seq_len, prefill_chunk_size, *,
                 variant=None, name: str = "paged_kv_cache"):
        bb = rx.BlockBuilder.current()
        if bb is None:
            raise RuntimeError("AttnPagedKVCache is built inside a Relax function (an nn.Module method)")
        c = config
        target = _target(c.target)
        rope_scaling = dict(c.rope_scaling)  # TVM's kernels read it as a dict; {} is plain RoPE
        hq, hkv, d, dt = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.dtype

        def tir(func, name):
            return rx.Tuple([tvm.ir.StringImm("tirx"),
                             bb.add_func(func.with_attr("global_symbol", name), name)])

        if c.target == "llvm":
            ours = {slot: kv_cache_kernel(slot, hq, hkv, d, dt, c.page_size, variant)
                    for slot in ("prefill_ragged", "prefill_paged", "decode")}
            ragged = tir(ours["prefill_ragged"], "tvm_attn_prefill_ragged")
            paged = tir(ours["prefill_paged"], "tvm_attn_prefill_paged")
            decode = tir(ours["decode"], "tvm_attn_decode_paged")
            cpu = True
        else:
            # CUDA: the ("flashinfer", run, plan) convention with tvm_attn's planner (kv_backend)
            from tvm.relax.frontend import nn

            from .kv_backend import CudaKVBackend

            backend = CudaKVBackend(c, variant)
            for name, func in backend.functions().items():
                bb.add_func(func, name)
            nn.add_extern(_LoadedExtern(backend.static_library()))
            ragged, paged, decode = backend.slots()
            cpu = False
        # the cache merges the states of its prefix depths in place: tir/merge.py's kernel on the CPU,
        # tir/merge_cuda.py's on CUDA (TVM's arguments: v, s, v_other, s_other)
        merge_key = MergeKey("merge_state_in_place", dt, c.target)
        merge = bb.add_func(generate(merge_key)[merge_key.uri].with_attr(
            "global_symbol", "tvm_attn_merge_state_in_place"), "tvm_attn_merge_state_in_place")
        window = (tvm_kv._attention_prefill_cpu(hkv, hq, d, dt, True, rope_scaling, page_size=c.page_size)
                  if cpu else
                  tvm_kv._attention_prefill(hkv, hq, d, dt, True, rope_scaling, target,
                                            page_size=c.page_size))
        window_decode = (tvm_kv._attention_decode_cpu(hkv, hq, d, dt, True, rope_scaling,
                                                      page_size=c.page_size)
                         if cpu else
                         tvm_kv._attention_decode(hkv, hq, d, dt, True, rope_scaling, target,
                                                  page_size=c.page_size))
        # Slot 20 is the paged tree-mask kernel and 21 the ragged one (paged_kv_cache.cc). TVM's CPU
        # branch of TIRPagedKVCache passes them the other way round; here each goes to its own slot.
        # The tree kernels never apply RoPE (the runtime refuses tree attention with inline RoPE), so
        # they get no RoPE scaling: TVM 0.27's CUDA tree_attn with Llama-3 scaling at head_dim 128
        # fails to compile (CSE: "variable cse_v21 has been used before definition").
        tree_paged = (tvm_kv.tree_attn_with_paged_kv_cache_cpu(hkv, hq, d, dt, {}) if cpu
                      else tvm_kv.tree_attn_with_paged_kv_cache(hkv, hq, d, dt, {}, target))
        tree_ragged = (tvm_kv.tree_attn_cpu(hkv, hq, d, dt, {}) if cpu
                       else tvm_kv.tree_attn(hkv, hq, d, dt, {}, target))
        copy_page = (tvm_kv._copy_single_page_cpu(hkv, c.page_size, d, dt) if cpu
                     else tvm_kv._copy_single_page(hkv, c.page_size, d, dt, target))
        compact = (tvm_kv._compact_kv_copy_cpu(hkv, d, dt) if cpu
                   else tvm_kv._compact_kv_copy(hkv, d, dt, target))
        # no sliding-window support; the last field is its (unused) size
        config_shape = rx.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size, c.page_size,
                                     0, 1024])
        args = [
            config_shape,
            rx.ShapeExpr([0, c.num_hidden_layers]),                       # layer partition: one group
            rx.prim_value(hq), rx.prim_value(hkv), rx.prim_value(d), rx.prim_value(d),
            rx.ShapeExpr([int(tvm_kv.AttnKind.MHA)] * c.num_hidden_layers),
            rx.prim_value(False),                                          # no KV transfer (disaggregation)
            rx.prim_value(int(c.rope_mode)), rx.prim_value(float(c.rope_scale)),
            rx.prim_value(float(c.rope_theta)),
            rx.prim_value(0),                                              # no rope extension factors
            rx.op.zeros((), dt),                                           # carries the dtype and device
            bb.add_func(tvm_kv._kv_cache_transpose_append(hkv, d, dt), "kv_cache_transpose_append"),
            bb.add_func(tvm_kv._kv_cache_transpose_append_mla(d, dt), "kv_cache_transpose_append_mla"),
            ragged, paged, decode,
            tir(window, "tir_attention_prefill_sliding_window"),
            tir(window_decode, "tir_attention_decode_sliding_window"),
            tir(tree_paged, "tir_attention_prefill_with_tree_mask_with_paged_kv_cache"),
            tir(tree_ragged, "tir_attention_prefill_with_tree_mask"),
            rx.Tuple([]),                                                  # no MLA
            rx.Tuple([merge]),
            bb.add_func(tvm_kv.llama_rope_with_position_map(c.rope_theta, c.rope_scale, d, hq, hkv, dt,
                                                            rope_scaling, d),
                        "tir_split_rotary"),
            bb.add_func(copy_page, "kv_cache_copy_single_page"),
            bb.add_func(tvm_kv._kv_cache_debug_get_kv(c.num_hidden_layers, hkv, d, dt),
                        "kv_cache_debug_get_kv"),
            bb.add_func(compact, "kv_cache_compact_kv_copy"),
        ]
        super().__init__(_expr=rx.call_pure_packed("vm.builtin.paged_attention_kv_cache_create", *args,
                                                   ty_args=rx.AnyType()), _name=name)
        self.slots = slot_sources(c.target)


@contextlib.contextmanager
def tree_kernels_without_rope_scaling():
    """Within the block, TVM's ``TIRPagedKVCache`` builds its tree-mask kernels with no RoPE scaling.

    Those kernels never apply RoPE (the runtime refuses tree attention with inline RoPE), and TVM
    0.27's CUDA ``tree_attn`` with Llama-3 scaling at head_dim 128 fails to compile (CSE: "variable
    cse_v21 has been used before definition"); this lets the built-in baseline compile for Llama-3.1.
    """
    saved = tvm_kv.tree_attn, tvm_kv.tree_attn_with_paged_kv_cache
    tvm_kv.tree_attn = (
        lambda h_kv, h_q, d, dtype, _rope_scaling, target: saved[0](h_kv, h_q, d, dtype, {}, target))
    tvm_kv.tree_attn_with_paged_kv_cache = (
        lambda h_kv, h_q, d, dtype, _rope_scaling, target: saved[1](h_kv, h_q, d, dtype, {}, target))
    try:
        yield
    finally:
        tvm_kv.tree_attn, tvm_kv.tree_attn_with_paged_kv_cache = saved


class _LoadedExtern(ExternModule):
    """An already compiled runtime module (a static library) as an ``nn`` external module, so that
    ``export_tvm(..., allow_extern=True)`` hands it to the build (see :func:`external_mods`)."""

    def __init__(self, module):
        from .kv_backend import SYMBOLS

        super().__init__({name: None for name in SYMBOLS})
        self._module = module

    def load(self):
        return self._module


def external_mods(ext_mods) -> list:
    """The runtime modules of ``export_tvm``'s external modules, for the IRModule's ``external_mods``."""
    return [m.load() for m in ext_mods]


def _target(name: str) -> tvm.target.Target:
    from ..build import target_of

    return target_of(name)

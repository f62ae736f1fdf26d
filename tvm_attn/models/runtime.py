"""Running a compiled model with TVM's runtime only (no compiler, no ``tvm.relax``).

:class:`ModelSession` loads ``model.so`` (``tvm-attn build-model``) and its ``model.json``, uploads
the weights, creates the KV cache and drives it the way MLC-LLM's engine does::

    s = ModelSession("model.so", device="cpu")            # random weights from the recorded seed
    s.add_sequence(0); s.add_sequence(1)
    logits = s.forward([0, 1], [[1, 2, 3], [4, 5]])     # prefill: {seq_id: [new tokens]} in one batch
    s.fork_sequence(0, 2)                                # 2 shares 0's pages (copy-on-write)
    logits = s.forward([0, 2], [[7], [8]])               # decode: one token per sequence

Each ``forward`` is ``begin_forward`` -> the model's ``prefill`` (several tokens in some sequence) or
``decode`` (one token in each) -> ``end_forward``; it returns each sequence's logits rows.
:meth:`ModelSession.decode_graph_key` says which decode steps one captured CUDA graph replays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np


def _global(name: str):
    import tvm

    return tvm.get_global_func(name)


#: TVM's cache starts each index array of its packed device buffer on 16 bytes: 4 int32
_AUX_ALIGN = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class DecodeGraphKey:
    """What fixes the device addresses a captured decode step reads (:meth:`ModelSession.decode_graph_key`):
    the batch size and the batch's page count after the step's append, rounded up to a multiple of 4."""

    batch_size: int
    pages: int


class ModelSession:
    def __init__(self, library, device: str = "cpu", weights: dict | list | None = None,
                 max_batch_size: int = 8, max_total_seq_len: int = 4096, prefill_chunk_size: int = 2048):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        library = Path(library)
        self.meta = read_metadata(library)
        self.device = tvm.cpu() if device == "cpu" else tvm.cuda(0)
        if device != "cpu":
            from ..cuda_runtime import ensure_cuda

            ensure_cuda(library.parent / "cubin")
        self.vm = VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        if isinstance(weights, list):  # already on the device, in call order (shared between sessions)
            if len(weights) != len(self.meta["param_names"]):
                raise ValueError(f"weights: {len(weights)} tensors for "
                                 f"{len(self.meta['param_names'])} parameters")
            self.params = weights
        else:
            weights = self.default_weights() if weights is None else weights
            missing = [n for n in self.meta["param_names"] if n not in weights]
            if missing:
                raise ValueError(f"weights: missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
            self.params = [tvm.runtime.tensor(np.asarray(weights[n]), self.device)
                           for n in self.meta["param_names"]]
        shape = tvm.runtime.ShapeTuple
        self.cache = self.vm["create_paged_kv_cache"](shape([max_batch_size]), shape([max_total_seq_len]),
                                                      shape([prefill_chunk_size]))
        self._begin = _global("vm.builtin.kv_state_begin_forward")
        self._end = _global("vm.builtin.kv_state_end_forward")
        self._live: set[int] = set()  # the sequences in the cache (added or forked, not removed)
        # each sequence that took part in a fork: the ids it was forked from or into (see decode_graph_key)
        self._fork_relatives: dict[int, set[int]] = {}

    def default_weights(self) -> dict:
        """The weights ``build-model`` recorded: random from a seed, or a local safetensors file."""
        return self.default_weights_of(self.meta)

    @staticmethod
    def default_weights_of(meta: dict) -> dict:
        """:meth:`default_weights` of a model's metadata, without loading the library."""
        from .llama import load_safetensors, random_weights

        cfg = config_from_json(meta["config"])
        source = meta["weights"]
        if source["kind"] == "random":
            return random_weights(cfg, source["seed"])
        return load_safetensors(cfg, source["paths"])

    # -- sequences (TVM's runtime KV-state functions) -------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        _global("vm.builtin.kv_state_add_sequence")(self.cache, seq_id)
        self._live.add(seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        _global("vm.builtin.kv_state_remove_sequence")(self.cache, seq_id)
        self._live.discard(seq_id)
        # a later sequence of the same id is a new one; its relatives keep their record (decode_graph_key)
        self._fork_relatives.pop(seq_id, None)

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        """``child`` starts as ``parent``'s first ``fork_pos`` tokens (all of them with -1)."""
        _global("vm.builtin.kv_state_fork_sequence")(self.cache, parent, child, fork_pos)
        self._live.add(child)
        self._fork_relatives.setdefault(parent, set()).add(child)
        self._fork_relatives.setdefault(child, set()).add(parent)

    def popn(self, seq_id: int, n: int) -> None:
        _global("vm.builtin.kv_state_popn")(self.cache, seq_id, n)

    def sequence_length(self, seq_id: int) -> int:
        return int(_global("vm.builtin.attention_kv_cache_get_sequence_length")(self.cache, seq_id))

    @cached_property
    def page_size(self) -> int:
        """Tokens per page of the model's KV cache (its config's ``page_size``)."""
        return config_from_json(self.meta["config"]).page_size

    # -- CUDA graphs -----------------------------------------------------------------------------------
    def decode_graph_key(self, seq_ids) -> DecodeGraphKey | None:
        """The key of the next decode step of ``seq_ids`` (one new token each; call it before the step's
        :meth:`begin_step`): two decode steps with equal keys can share one captured CUDA graph of the
        model's ``decode``, and None says that no captured graph may replay this step.

        TVM's cache packs a step's index arrays back to back into one device buffer
        (``SyncAuxArrayToDevice`` through ``CachedPagedKVCacheAuxDataManager``), each start rounded up
        to 4 int32, and a captured kernel keeps the addresses it was given. In a decode batch of one
        cascade depth only the page indices vary in size, so the batch size and its page count after
        the append, rounded up to 4, fix every address a replay reads (:class:`DecodeGraphKey`).

        A sequence that was forked, from or into another, gives None: the fork splits its pages into a
        chain of blocks, one cascade depth each (``GetBlockIdsOnDepth``), whose sizes depend on the
        cache's block tree, and the chain stays after the relative is removed. Raises ``ValueError``
        for an empty batch, repeated ids or ids not in the cache."""
        seq_ids = self._check_batch(seq_ids)
        if any(i in self._fork_relatives for i in seq_ids):
            return None
        pages = sum(_ceil_div(self.sequence_length(i) + 1, self.page_size) for i in seq_ids)
        return DecodeGraphKey(len(seq_ids), _ceil_div(pages, _AUX_ALIGN) * _AUX_ALIGN)

    def _check_batch(self, seq_ids) -> list[int]:
        """``seq_ids`` as a list: a non-empty batch of distinct sequences of the cache."""
        ids = [int(i) for i in seq_ids]
        if not ids:
            raise ValueError(f"seq_ids: an empty batch ({seq_ids!r})")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"seq_ids: {seq_ids!r} names {repeated} more than once")
        unknown = [i for i in ids if i not in self._live]
        if unknown:
            raise ValueError(f"seq_ids: {seq_ids!r} names {unknown}, not in the cache (never added, or "
                             "removed)")
        return ids

    # -- one step --------------------------------------------------------------------------------------
    def begin_step(self, seq_ids, lengths, plan: bool = False) -> None:
        """``begin_forward`` of one step (``lengths[i]`` new tokens for ``seq_ids[i]``). With ``plan``, also
        the cache's host work for the step (packing and uploading its index arrays, every attention slot's
        plan), which TVM's cache otherwise does in the step's first attention call: what the model function
        does after it is then kernel launches only, which a CUDA graph capture or replay needs."""
        import tvm

        shape = tvm.runtime.ShapeTuple
        self._begin(self.cache, shape(list(seq_ids)), shape(list(lengths)))
        if plan:
            _global("vm.builtin.attention_kv_cache_get_query_positions")(self.cache)

    def end_step(self) -> None:
        """``end_forward`` of the step :meth:`begin_step` began."""
        self._end(self.cache)

    def forward(self, seq_ids, tokens, last_only: bool = False, fetch: bool = True):
        """Append ``tokens[i]`` to sequence ``seq_ids[i]`` for every i in one batch; return each
        sequence's logits ``[len(tokens[i]), vocab]`` (float32), or with ``last_only`` those of its
        last new token ``[1, vocab]`` (MLC-LLM's ``batch_prefill``). ``fetch=False`` returns the
        device tensor of the step instead (for timing without the copy to the host)."""
        import tvm

        if len(seq_ids) != len(tokens) or not seq_ids:
            raise ValueError(f"forward: {len(seq_ids)} sequence ids for {len(tokens)} token lists")
        lengths = [len(t) for t in tokens]
        if min(lengths) < 1:
            raise ValueError("forward: every sequence in the batch needs at least one new token")
        bounds = np.cumsum([0] + lengths)
        self.begin_step(seq_ids, lengths)
        if max(lengths) == 1:
            ids = np.asarray([t[0] for t in tokens], np.int32).reshape(-1, 1)
            out = self.vm["decode"](tvm.runtime.tensor(ids, self.device), self.cache, self.params)
            bounds, last_only = np.arange(len(lengths) + 1), False
        else:
            ids = tvm.runtime.tensor(np.concatenate([np.asarray(t, np.int32) for t in tokens]).reshape(1, -1),
                                     self.device)
            if last_only:
                positions = tvm.runtime.tensor((bounds[1:] - 1).astype(np.int32), self.device)
                out = self.vm["batch_prefill"](ids, positions, self.cache, self.params)
            else:
                out = self.vm["prefill"](ids, self.cache, self.params)
        self.end_step()
        if not fetch:
            return out
        rows = out.numpy().reshape(-1, out.shape[-1])
        if last_only:
            return [rows[i : i + 1] for i in range(len(lengths))]
        return [rows[bounds[i] : bounds[i + 1]] for i in range(len(lengths))]


def read_metadata(library) -> dict:
    """``<library>.json``, the metadata ``tvm-attn build-model`` writes beside the library."""
    meta_path = Path(library).with_suffix(".json")
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: the model's metadata (written by tvm-attn build-model) "
                                "is missing")
    return json.loads(meta_path.read_text())


def reference_config(meta: dict):
    """The :class:`~tvm_attn.models.llama.LlamaConfig` of a built model's metadata, with its attention
    variant, for the numpy forward pass (:func:`tvm_attn.models.llama.numpy_forward`). Raises
    ``ValueError`` where the metadata cannot say which variant the library runs."""
    from dataclasses import replace

    from ..variants import compose, variant_from_spec

    if "variant_spec" not in meta or meta["variant_spec"] is None:
        raise ValueError(f"model metadata: variant {meta.get('variant')!r} has no variant_spec to rebuild "
                         "it from (a variant class that is not importable by name, or built by an older "
                         "tvm-attn)")
    variant = compose(variant_from_spec(meta["variant_spec"]))
    if variant.uri() != meta.get("variant"):
        raise ValueError(f"model metadata: variant_spec {meta['variant_spec']!r} is {variant.uri()!r}, "
                         f"but the metadata's variant is {meta.get('variant')!r}")
    return replace(config_from_json(meta["config"]), variant=variant)


def load_params(path, param_names, device=None) -> list:
    """The weights of a ``.params`` file (``tvm-attn build-model --save-params``: keys ``param_0000``, ...
    in call order) as a list of tensors on ``device``, for :class:`ModelSession`'s ``weights``."""
    import tvm

    params = tvm.runtime.load_param_dict_from_file(str(path))
    keys = [f"param_{i:04d}" for i in range(len(param_names))]
    if sorted(params) != keys:
        raise ValueError(f"params: {path} holds {len(params)} tensors, the model takes {len(keys)} "
                         f"({keys[0]} .. {keys[-1]})")
    device = device or tvm.cpu()
    return [tvm.runtime.tensor(params[k].numpy(), device) for k in keys]


def config_from_json(d: dict):
    from .llama import LlamaConfig

    d = dict(d)
    d["rope_scaling"] = tuple(tuple(kv) for kv in d.get("rope_scaling", ()))
    d.pop("variant", None)
    return LlamaConfig(**d)

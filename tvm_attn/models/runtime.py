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
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _global(name: str):
    import tvm

    return tvm.get_global_func(name)


class ModelSession:
    def __init__(self, library, device: str = "cpu", weights: dict | None = None, max_batch_size: int = 8,
                 max_total_seq_len: int = 4096, prefill_chunk_size: int = 2048):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        library = Path(library)
        meta_path = library.with_suffix(".json")
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: the model's metadata (written by tvm-attn build-model) is missing")
        self.meta = json.loads(meta_path.read_text())
        self.device = tvm.cpu() if device == "cpu" else tvm.cuda(0)
        if device != "cpu":
            from ..cuda_runtime import ensure_cuda

            ensure_cuda(library.parent / "cubin")
        self.vm = VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        if weights is None:
            weights = self.default_weights()
        missing = [n for n in self.meta["param_names"] if n not in weights]
        if missing:
            raise ValueError(f"weights: missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.params = [tvm.runtime.tensor(np.asarray(weights[n]), self.device) for n in self.meta["param_names"]]
        shape = tvm.runtime.ShapeTuple
        self.cache = self.vm["create_paged_kv_cache"](shape([max_batch_size]), shape([max_total_seq_len]),
                                                      shape([prefill_chunk_size]))
        self._begin = _global("vm.builtin.kv_state_begin_forward")
        self._end = _global("vm.builtin.kv_state_end_forward")

    def default_weights(self) -> dict:
        """The weights ``build-model`` recorded: random from a seed, or a local safetensors file."""
        from .llama import LlamaConfig, load_safetensors, random_weights

        cfg = config_from_json(self.meta["config"])
        source = self.meta["weights"]
        if source["kind"] == "random":
            return random_weights(cfg, source["seed"])
        return load_safetensors(cfg, source["paths"])

    # -- sequences (TVM's runtime KV-state functions) -------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        _global("vm.builtin.kv_state_add_sequence")(self.cache, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        _global("vm.builtin.kv_state_remove_sequence")(self.cache, seq_id)

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        """``child`` starts as ``parent``'s first ``fork_pos`` tokens (all of them with -1)."""
        _global("vm.builtin.kv_state_fork_sequence")(self.cache, parent, child, fork_pos)

    def popn(self, seq_id: int, n: int) -> None:
        _global("vm.builtin.kv_state_popn")(self.cache, seq_id, n)

    def sequence_length(self, seq_id: int) -> int:
        return int(_global("vm.builtin.attention_kv_cache_get_sequence_length")(self.cache, seq_id))

    # -- one step --------------------------------------------------------------------------------------
    def forward(self, seq_ids, tokens) -> list[np.ndarray]:
        """Append ``tokens[i]`` to sequence ``seq_ids[i]`` for every i in one batch; return each
        sequence's logits ``[len(tokens[i]), vocab]`` (float32)."""
        import tvm

        if len(seq_ids) != len(tokens) or not seq_ids:
            raise ValueError(f"forward: {len(seq_ids)} sequence ids for {len(tokens)} token lists")
        lengths = [len(t) for t in tokens]
        if min(lengths) < 1:
            raise ValueError("forward: every sequence in the batch needs at least one new token")
        shape = tvm.runtime.ShapeTuple
        self._begin(self.cache, shape(list(seq_ids)), shape(lengths))
        if max(lengths) == 1:
            ids = np.asarray([t[0] for t in tokens], np.int32).reshape(-1, 1)
            logits = self.vm["decode"](tvm.runtime.tensor(ids, self.device), self.cache, self.params).numpy()
            rows = logits[:, 0]
        else:
            ids = np.concatenate([np.asarray(t, np.int32) for t in tokens]).reshape(1, -1)
            rows = self.vm["prefill"](tvm.runtime.tensor(ids, self.device), self.cache, self.params).numpy()[0]
        self._end(self.cache)
        bounds = np.cumsum([0] + lengths)
        return [rows[bounds[i] : bounds[i + 1]] for i in range(len(lengths))]


def config_from_json(d: dict):
    from .llama import LlamaConfig

    d = dict(d)
    d["rope_scaling"] = tuple(tuple(kv) for kv in d.get("rope_scaling", ()))
    d.pop("variant", None)
    return LlamaConfig(**d)

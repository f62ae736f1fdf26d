"""GPU tier: the tiny Llama model's decode step (float16, tvm_attn's CUDA kernels in TVM's runtime KV
cache) captured once in a CUDA graph and replayed over random steps, the logits of every step checked
against a numpy forward pass.

Each step runs the cache's host work outside the graph (``ModelSession.begin_step(..., plan=True)``:
the index arrays' upload and our slots' plans), then replays the graph: the replay must pick up the
new lengths, pages and sequences through the work lists the plan rewrote in place. What TVM 0.27's
cache itself lets a replay change (tvm_attn/relax/kv_cache.py, "CUDA graphs") bounds the workload:
a fixed batch of BATCH slots, each keeping its page count after the step's append, no shared
prefixes inside the batch. Within that, lengths grow every step, sequences leave the batch (and the
cache) and new ones, prefilled outside the graph, take their slots on pages that others freed, and
between replays sequences outside the batch are forked and run eagerly over their shared prefix
(whose plans overwrite the workspaces the graph reads).

Run on the GPU host with the prebuilt models (scripts/build_gpu_kernels.py writes <kernel dir>/models/):

    TVM_ATTN_CACHE_DIR=<kernel dir> python -m pytest -q tests/gpu/test_kv_cache_graphs.py
    TVM_ATTN_GRAPH_STEPS=8 TVM_ATTN_CACHE_DIR=<kernel dir> \\
        compute-sanitizer --tool memcheck python -m pytest -q tests/gpu/test_kv_cache_graphs.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


pytestmark = pytest.mark.gpu

#: replayed steps (the memcheck run takes fewer: TVM_ATTN_GRAPH_STEPS)
STEPS = int(os.environ.get("TVM_ATTN_GRAPH_STEPS", "120"))
BATCH = 4
#: the float16 model against float64 numpy, as in test_kv_cache_cuda.py
TOL = 2e-2
MODELS = ("tiny_g2", "tiny_g4")  # decode through the decode slot (group 2), the paged-prefill slot (group 4)


def _pages(n: int, page_size: int) -> int:
    return -(-n // page_size)


class Workload:
    """Random decode steps over BATCH slots that keep the cache's layout for a replay: slot i holds
    ``pages[i]`` pages after every step's append. A sequence whose next token would open a page
    (and, with probability ``churn``, any one other) is removed and a new sequence with a prompt of
    the same page count takes its slot, prefilled in one batch before the step.

    ``session``: a :class:`~tvm_attn.models.runtime.ModelSession`; ``ids``: its fixed ``[BATCH, 1]``
    int32 device tensor of the step's tokens; ``sync``: waits for the device (the graph's stream).
    """

    def __init__(self, session, config, weights, rng, ids, sync=lambda: None, churn=0.2, fork=0.15):
        from tvm_attn.models import llama

        self.s, self.cfg, self.rng, self.ids, self.sync = session, config, rng, ids, sync
        self.churn, self.fork = churn, fork
        self.w64 = {k: np.asarray(v, np.float64) for k, v in weights.items()}
        self.forward = llama.numpy_forward
        self.page = config.page_size
        self.seqs: dict[int, list[int]] = {}
        self.slots: list[int] = []
        self.next_id = 0
        self.worst = 0.0
        self.counts = {"steps": 0, "added": 0, "removed": 0, "forked": 0}
        # the first prompts fix each slot's pages after the step's append for good
        lengths = [int(n) for n in rng.integers(1, 3 * self.page, BATCH)]
        self.pages = [_pages(n + 1, self.page) for n in lengths]
        self.slots = self._add(lengths)

    def _check(self, tokens, logits, what):
        ref = self.forward(self.cfg, self.w64, tokens)[-len(logits):]
        err = float(np.abs(np.asarray(logits, np.float64) - ref).max())
        scale = float(np.abs(ref).max())
        self.worst = max(self.worst, err / (1 + scale))
        assert err <= TOL * (1 + scale), f"{what}: max |logits - numpy| = {err:.3e} (scale {scale:.2f})"

    def _add(self, lengths) -> list[int]:
        """New sequences with prompts of ``lengths``, prefilled in one batch outside the graph."""
        ids = list(range(self.next_id, self.next_id + len(lengths)))
        self.next_id += len(lengths)
        prompts = [[int(t) for t in self.rng.integers(0, self.cfg.vocab_size, n)] for n in lengths]
        for i, p in zip(ids, prompts):
            self.s.add_sequence(i)
            self.seqs[i] = p
        for i, logits in zip(ids, self._eager(ids, prompts)):
            self._check(self.seqs[i], logits, f"prefill of seq {i} ({len(self.seqs[i])} tokens)")
        self.counts["added"] += len(ids)
        return ids

    def _eager(self, ids, prompts):
        """One step of the model's prefill function (any lengths), outside the graph: each sequence's
        logits."""
        import tvm

        self.s.begin_step(ids, [len(p) for p in prompts])
        tokens = np.concatenate([np.asarray(p, np.int32) for p in prompts]).reshape(1, -1)
        out = self.s.vm["prefill"](tvm.runtime.tensor(tokens, self.s.device), self.s.cache, self.s.params)
        self.s.end_step()
        self.sync()
        rows = out.numpy().reshape(-1, out.shape[-1])
        bounds = np.cumsum([0] + [len(p) for p in prompts])
        return [rows[bounds[k] : bounds[k + 1]] for k in range(len(prompts))]

    def _churn(self) -> None:
        leave = [k for k, i in enumerate(self.slots) if len(self.seqs[i]) + 1 > self.pages[k] * self.page]
        if self.rng.random() < self.churn:
            leave.append(int(self.rng.integers(0, BATCH)))
        leave = sorted(set(leave))
        if not leave:
            return
        for k in leave:
            self.s.remove_sequence(self.slots[k])
            del self.seqs[self.slots[k]]
            self.counts["removed"] += 1
        # a prompt of n tokens holds pages[k] pages once the step appends one: n + 1 in (P(p-1), P p]
        lengths = [int(self.rng.integers(max(1, self.page * (self.pages[k] - 1)), self.page * self.pages[k]))
                   for k in leave]
        for k, i in zip(leave, self._add(lengths)):
            self.slots[k] = i

    def _fork_aside(self) -> None:
        """Between replays: a sequence outside the batch is prefilled and forked inside its prompt, both
        take one token in an eager step over a shared prefix (two cascade depths, our paged-prefill or
        decode plans into the same workspaces), then both are removed."""
        n = int(self.rng.integers(2, 3 * self.page))
        (parent,) = self._add([n])
        child, self.next_id = self.next_id, self.next_id + 1
        pos = int(self.rng.integers(1, n + 1))
        self.s.fork_sequence(parent, child, pos)
        self.seqs[child] = self.seqs[parent][:pos]
        new = [[int(t)] for t in self.rng.integers(0, self.cfg.vocab_size, 2)]
        for i, t, logits in zip((parent, child), new, self._eager([parent, child], new)):
            self.seqs[i] += t
            self._check(self.seqs[i], logits, f"fork of seq {parent} at {pos}: seq {i}")
        for i in (child, parent):
            self.s.remove_sequence(i)
            del self.seqs[i]
        self.counts["forked"] += 1
        self.counts["removed"] += 2

    def step(self, decode) -> None:
        """One decode step over the slots: ``decode()`` runs the model's decode on ``ids`` (eagerly, or
        by capturing or replaying the graph) and returns the logits tensor."""
        if self.rng.random() < self.fork:
            self._fork_aside()
        self._churn()
        for k, i in enumerate(self.slots):
            assert _pages(len(self.seqs[i]) + 1, self.page) == self.pages[k]
        new = [int(t) for t in self.rng.integers(0, self.cfg.vocab_size, BATCH)]
        self.s.begin_step(self.slots, [1] * BATCH, plan=True)
        # the uploads ran on the cache's copy stream; the cache orders its compute stream after them, and
        # this makes the replay's order not depend on which stream that is
        self.sync()
        self.ids.copyfrom(np.asarray(new, np.int32).reshape(BATCH, 1))
        out = decode()
        self.sync()
        logits = out.numpy().reshape(BATCH, -1)
        self.s.end_step()
        for k, (i, t) in enumerate(zip(self.slots, new)):
            self.seqs[i].append(t)
            self._check(self.seqs[i], logits[k : k + 1], f"step {self.counts['steps']} slot {k} seq {i} "
                        f"({len(self.seqs[i])} tokens)")
        self.counts["steps"] += 1


@pytest.mark.parametrize("name", MODELS)
def test_one_captured_decode_step_replays_random_steps(name):
    torch = pytest.importorskip("torch")
    import tvm
    import tvm_ffi

    from tvm_attn.models import llama
    from tvm_attn.models.runtime import ModelSession, config_from_json

    from .test_kv_cache_cuda import _library  # here: tests/test_kv_backend.py loads this file by path

    library = _library(name)
    meta = json.loads(library.with_suffix(".json").read_text())
    assert meta["kv_cache_slots"]["decode_paged"] == "tvm_attn"
    cfg = config_from_json(meta["config"])
    weights = llama.random_weights(cfg, meta["weights"]["seed"])
    stream = torch.cuda.Stream()
    # The cache takes the stream current at its creation as its compute stream: it must be the graph's,
    # so that the plans' uploads (on its copy stream) are ordered before each replay.
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        s = ModelSession(library, "cuda", weights=weights, max_batch_size=8, max_total_seq_len=2048,
                         prefill_chunk_size=512)
        ids = tvm.runtime.tensor(np.zeros((BATCH, 1), np.int32), s.device)
        work = Workload(s, cfg, weights, np.random.default_rng(11), ids, sync=torch.cuda.synchronize)

        def eager():
            return s.vm["decode"](ids, s.cache, s.params)

        work.step(eager)  # loads the kernels and fills the VM's memory pool before the capture
        graph, captured = torch.cuda.CUDAGraph(), {}

        def capture():
            torch.cuda.synchronize()
            # relaxed: TVM's VM may still take a new block from the driver for an allocation here;
            # use_torch_stream again: TVM's launches go to the capturing stream even if the cache's
            # plan left TVM's current stream at another one (the cache's compute stream)
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="relaxed"):
                with tvm_ffi.use_torch_stream():
                    captured["logits"] = s.vm["decode"](ids, s.cache, s.params)
            graph.replay()  # the capture ran nothing: this is the step's decode
            return captured["logits"]

        work.step(capture)

        def replay():
            graph.replay()
            return captured["logits"]

        for _ in range(STEPS):
            work.step(replay)
    c = work.counts
    assert c["steps"] == STEPS + 2, c
    if STEPS >= 50:  # the workload did replace sequences (a page filled up every 16 steps or sooner)
        assert c["removed"] > 0 and c["added"] > BATCH and c["forked"] > 0, c
    print(f"{name}: {c['steps']} steps ({STEPS} replays), {c['added']} sequences added, "
          f"{c['forked']} forked, {c['removed']} removed; worst |err| / (1 + scale) = {work.worst:.2e}")

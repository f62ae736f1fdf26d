"""GPU tier: the tiny Llama model's decode step (float16, tvm_attn's CUDA kernels in TVM's runtime KV
cache) captured in CUDA graphs, one per ``ModelSession.decode_graph_key``, and replayed over random
steps, the logits of every step checked against a numpy forward pass.

Each step runs the cache's host work outside the graph (``ModelSession.begin_step(..., plan=True)``:
the index arrays' upload and our slots' plans), then replays a graph: the replay must pick up the
new lengths, pages and sequences through the work lists the plan rewrote in place. What TVM 0.27's
cache itself lets a replay change (tvm_attn/relax/kv_cache.py, "CUDA graphs") is what the key holds:
a replay needs the batch size and the batch's page count after the step's append, rounded up to 4,
to be those of its capture (they fix the addresses of the cache's packed index arrays), and no
shared prefixes in the batch (the key is None then). So the test keeps a few graphs (the least
recently used dropped past MAX_GRAPHS) by key: a step replays the graph of its key, or captures one
when the key is new. Over a fixed batch of BATCH slots, lengths grow every step and cross pages
(the rounded page count moves, and back when sequences leave), sequences leave the batch (and the
cache) when they reach MAX_PAGES pages or at random, new ones, prefilled outside the graph, take
their slots on pages that others freed, and between replays sequences outside the batch are forked
and run eagerly over their shared prefix (whose plans overwrite the workspaces the graphs read).

Run on the GPU host with the prebuilt models (scripts/build_gpu_kernels.py writes <kernel dir>/models/):

    TVM_ATTN_CACHE_DIR=<kernel dir> python -m pytest -q tests/gpu/test_kv_cache_graphs.py
    TVM_ATTN_GRAPH_STEPS=8 TVM_ATTN_CACHE_DIR=<kernel dir> \\
        compute-sanitizer --tool memcheck python -m pytest -q tests/gpu/test_kv_cache_graphs.py
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import pytest


pytestmark = pytest.mark.gpu

#: random steps after the eager warm-up (the memcheck run takes fewer: TVM_ATTN_GRAPH_STEPS)
STEPS = int(os.environ.get("TVM_ATTN_GRAPH_STEPS", "120"))
BATCH = 4
#: a sequence leaves the batch when its next token would take a page past this many
MAX_PAGES = 6
#: captured graphs kept at once (each holds its logits tensor and the driver's graph)
MAX_GRAPHS = 8
#: at STEPS >= 50, at least this share of the steps replays a graph captured at an earlier step
MIN_REPLAYS = 0.6
#: the float16 model against float64 numpy, as in test_kv_cache_cuda.py
TOL = 2e-2
MODELS = ("tiny_g2", "tiny_g4")  # decode through the decode slot (group 2), the paged-prefill slot (group 4)


def _pages(n: int, page_size: int) -> int:
    return -(-n // page_size)


def _round4(n: int) -> int:
    return -(-n // 4) * 4


class Workload:
    """Random decode steps over BATCH slots. A sequence whose next token would take it past MAX_PAGES
    pages (and, with probability ``churn``, any one other) is removed and a new sequence with a random
    prompt takes its slot, prefilled in one batch before the step.

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
        self.key = None  # the last step's decode_graph_key
        self.pages: dict = {}  # each key's exact page counts (after the append) over the steps
        self.counts = {"steps": 0, "added": 0, "removed": 0, "forked": 0,
                       "key_changes": 0, "grown_across": 0}
        self.slots = self._add(self._prompt_lengths(BATCH))

    def _prompt_lengths(self, n: int) -> list[int]:
        return [int(k) for k in self.rng.integers(1, (MAX_PAGES - 2) * self.page, n)]

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

    def _churn(self) -> bool:
        """Replace the sequences that leave; True when some did."""
        leave = [k for k, i in enumerate(self.slots) if _pages(len(self.seqs[i]) + 1, self.page) > MAX_PAGES]
        if self.rng.random() < self.churn:
            leave.append(int(self.rng.integers(0, BATCH)))
        leave = sorted(set(leave))
        if not leave:
            return False
        for k in leave:
            self.s.remove_sequence(self.slots[k])
            del self.seqs[self.slots[k]]
            self.counts["removed"] += 1
        for k, i in zip(leave, self._add(self._prompt_lengths(len(leave)))):
            self.slots[k] = i
        return True

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
        assert self.s.decode_graph_key([parent, child]) is None  # shared pages: not for a replay
        new = [[int(t)] for t in self.rng.integers(0, self.cfg.vocab_size, 2)]
        for i, t, logits in zip((parent, child), new, self._eager([parent, child], new)):
            self.seqs[i] += t
            self._check(self.seqs[i], logits, f"fork of seq {parent} at {pos}: seq {i}")
        for i in (child, parent):
            self.s.remove_sequence(i)
            del self.seqs[i]
        self.counts["forked"] += 1
        self.counts["removed"] += 2

    def _next_key(self, churned: bool):
        """The step's decode_graph_key (before its begin_step), checked against the workload's own
        lengths, and the count of key changes: any, and those of growth alone (no sequence replaced)."""
        key = self.s.decode_graph_key(self.slots)
        pages = sum(_pages(len(self.seqs[i]) + 1, self.page) for i in self.slots)
        assert key is not None and (key.batch_size, key.pages) == (BATCH, _round4(pages)), (key, pages)
        self.pages.setdefault(key, set()).add(pages)
        if self.key is not None and key != self.key:
            self.counts["key_changes"] += 1
            self.counts["grown_across"] += not churned
        self.key = key
        return key

    def step(self, decode) -> None:
        """One decode step over the slots: ``decode(key)`` runs the model's decode on ``ids`` (eagerly, or
        by capturing or replaying the graph of ``key``, the step's decode_graph_key) and returns the
        logits tensor."""
        if self.rng.random() < self.fork:
            self._fork_aside()
        key = self._next_key(self._churn())
        new = [int(t) for t in self.rng.integers(0, self.cfg.vocab_size, BATCH)]
        self.s.begin_step(self.slots, [1] * BATCH, plan=True)
        # the uploads ran on the cache's copy stream; the cache orders its compute stream after them, and
        # this makes the replay's order not depend on which stream that is
        self.sync()
        self.ids.copyfrom(np.asarray(new, np.int32).reshape(BATCH, 1))
        out = decode(key)
        self.sync()
        logits = out.numpy().reshape(BATCH, -1)
        self.s.end_step()
        for k, (i, t) in enumerate(zip(self.slots, new)):
            self.seqs[i].append(t)
            self._check(self.seqs[i], logits[k : k + 1], f"step {self.counts['steps']} slot {k} seq {i} "
                        f"({len(self.seqs[i])} tokens, key {key})")
        self.counts["steps"] += 1


class Graphs:
    """Captured decode graphs by decode_graph_key, the least recently used dropped past ``limit``:
    called with a step's key, it replays the key's graph, or captures one (then replays it) for a new
    key, or runs ``eager()`` for None. ``capture()`` captures the decode and returns its replay (a
    function that replays the graph and returns the logits tensor the capture gave)."""

    def __init__(self, capture, eager, limit: int = MAX_GRAPHS):
        self.capture, self.eager, self.limit = capture, eager, limit
        self.replays: OrderedDict = OrderedDict()
        self.counts = {"captures": 0, "replays": 0, "eager": 0, "evicted": 0}

    def __call__(self, key):
        if key is None:
            self.counts["eager"] += 1
            return self.eager()
        if key in self.replays:
            self.replays.move_to_end(key)
            self.counts["replays"] += 1
            return self.replays[key]()
        while len(self.replays) >= self.limit:
            self.replays.popitem(last=False)  # its graph and logits go with it
            self.counts["evicted"] += 1
        self.replays[key] = replay = self.capture()
        self.counts["captures"] += 1
        return replay()  # the capture ran nothing: this is the step's decode


def run_steps(work: Workload, graphs: Graphs, steps: int) -> None:
    """One eager step (it loads the kernels and fills the VM's memory pool before any capture), then
    ``steps`` steps through ``graphs``."""
    work.step(lambda key: graphs.eager())
    for _ in range(steps):
        work.step(graphs)


def check_counts(work: Workload, graphs: Graphs, steps: int) -> str:
    """Assert that :func:`run_steps` served most steps by replays and that the workload did what it is
    for; returns the counts as a line."""
    c, g = work.counts, graphs.counts
    assert c["steps"] == steps + 1 and g["captures"] + g["replays"] + g["eager"] == steps, (c, g)
    assert g["eager"] == 0 and len(graphs.replays) <= graphs.limit, g  # no slot is ever forked
    if steps >= 50:
        assert g["replays"] >= MIN_REPLAYS * steps, (c, g)
        # sequences were replaced, forked aside, and growth alone moved the key (a page count across a
        # multiple of 4), so replays did run on other pages than their capture's
        assert c["removed"] > 0 and c["added"] > BATCH and c["forked"] > 0, c
        assert c["grown_across"] > 0, c
        # and some graph replayed steps of another page count than its capture's (the same rounded one)
        assert max(len(p) for p in work.pages.values()) > 1, work.pages
    return (f"{c['steps']} steps: {g['captures']} captures, {g['replays']} replays, {g['evicted']} graphs "
            f"dropped; {c['key_changes']} key changes ({c['grown_across']} by growth alone); "
            f"{c['added']} sequences added, {c['forked']} forked, {c['removed']} removed; "
            f"worst |err| / (1 + scale) = {work.worst:.2e}")


@pytest.mark.parametrize("name", MODELS)
def test_captured_decode_steps_replay_random_steps_by_key(name):
    torch = pytest.importorskip("torch")
    import tvm
    import tvm_ffi

    from tvm_attn.models import llama
    from tvm_attn.models.runtime import ModelSession, config_from_json

    from .test_kv_cache_cuda import _library  # here: tests/test_graph_key.py loads this file by path

    library = _library(name)
    meta = json.loads(library.with_suffix(".json").read_text())
    assert meta["kv_cache_slots"]["decode_paged"] == "tvm_attn"
    cfg = config_from_json(meta["config"])
    weights = llama.random_weights(cfg, meta["weights"]["seed"])
    stream = torch.cuda.Stream()
    # The cache takes the stream current at its creation as its compute stream: it must be the graphs',
    # so that the plans' uploads (on its copy stream) are ordered before each replay.
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        s = ModelSession(library, "cuda", weights=weights, max_batch_size=8, max_total_seq_len=2048,
                         prefill_chunk_size=512)
        ids = tvm.runtime.tensor(np.zeros((BATCH, 1), np.int32), s.device)
        work = Workload(s, cfg, weights, np.random.default_rng(11), ids, sync=torch.cuda.synchronize)

        def eager():
            return s.vm["decode"](ids, s.cache, s.params)

        def capture():
            # Each graph keeps the logits tensor of its capture. The intermediates the VM's pool gave it
            # go back to the pool for later calls (other captures, eager prefills): a replay rewrites
            # them before it reads them, and a step reads its logits right after its replay.
            graph, captured = torch.cuda.CUDAGraph(), {}
            torch.cuda.synchronize()
            # relaxed: TVM's VM may still take a new block from the driver for an allocation here;
            # use_torch_stream again: TVM's launches go to the capturing stream even if the cache's
            # plan left TVM's current stream at another one (the cache's compute stream)
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="relaxed"):
                with tvm_ffi.use_torch_stream():
                    captured["logits"] = s.vm["decode"](ids, s.cache, s.params)

            def replay():
                graph.replay()
                return captured["logits"]

            return replay

        graphs = Graphs(capture, eager)
        run_steps(work, graphs, STEPS)
    print(f"{name}: {check_counts(work, graphs, STEPS)}")

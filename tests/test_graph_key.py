"""ModelSession.decode_graph_key on the CPU model (the key's logic; replays need a GPU:
tests/gpu/test_kv_cache_graphs.py), and that GPU test's workload and graph table with the decode run
eagerly. The tiny model has 16-token pages, so a sequence of n tokens holds ceil((n + 1) / 16)
pages after a decode step's append."""

import numpy as np
import pytest

from tvm_attn.models.runtime import DecodeGraphKey, ModelSession


def _session(tiny_model, lengths) -> ModelSession:
    """A session whose sequences 0, 1, ... hold prompts of ``lengths``, prefilled in one batch."""
    s = ModelSession(tiny_model)
    ids = list(range(len(lengths)))
    for i in ids:
        s.add_sequence(i)
    s.forward(ids, [[1 + k % 200 for k in range(n)] for n in lengths], fetch=False)
    return s


def _decode(s: ModelSession, ids) -> None:
    s.forward(ids, [[7]] * len(ids), fetch=False)


def test_key_is_the_batch_size_and_the_page_count_rounded_to_4(tiny_model):
    s = _session(tiny_model, [14, 19, 69])  # after the append: 1 + 2 + 5 = 8 pages
    batch = [0, 1, 2]
    first = s.decode_graph_key(batch)
    assert first == DecodeGraphKey(batch_size=3, pages=8)
    _decode(s, batch)                       # 15, 20, 70 tokens: still 1 + 2 + 5 pages
    assert [s.sequence_length(i) for i in batch] == [15, 20, 70]
    same = s.decode_graph_key(batch)
    assert same == first and hash(same) == hash(first) and {first: "graph"}[same] == "graph"
    _decode(s, batch)                       # 16 tokens: seq 0's next token opens its second page
    assert s.decode_graph_key(batch) == DecodeGraphKey(3, 12)  # 9 pages: past a multiple of 4
    assert s.decode_graph_key([0, 1]) == DecodeGraphKey(2, 4)  # 2 + 2 pages
    assert s.decode_graph_key([2]) == DecodeGraphKey(1, 8)     # 5 pages, as many as the first batch
    assert s.decode_graph_key([2]) != first                    # ... but not its batch size
    assert s.decode_graph_key([1, 0]) == s.decode_graph_key([0, 1])  # the order moves no address


def test_forked_sequences_have_no_key(tiny_model):
    s = _session(tiny_model, [20, 9])
    s.fork_sequence(0, 2, 12)               # 2 shares 0's first 12 tokens
    for batch in ([0], [2], [0, 2], [1, 0], [2, 1]):
        assert s.decode_graph_key(batch) is None, batch
    assert s.decode_graph_key([1]) == DecodeGraphKey(1, 4)
    _decode(s, [0, 1, 2])                   # the eager step runs; the key stays None
    assert s.decode_graph_key([0, 1]) is None
    s.remove_sequence(2)                    # the parent keeps its blocks (cascade depths): still None
    assert s.decode_graph_key([0]) is None
    s.remove_sequence(0)
    s.add_sequence(0)                       # a new sequence under the parent's id shares nothing
    assert s.decode_graph_key([0, 1]) == DecodeGraphKey(2, 4)


@pytest.mark.parametrize("seq_ids, match", [
    ([], r"seq_ids: an empty batch \(\[\]\)"),
    ((), r"seq_ids: an empty batch"),
    ([0, 1, 0], r"seq_ids: \[0, 1, 0\] names \[0\] more than once"),
    ([0, 5], r"seq_ids: \[0, 5\] names \[5\], not in the cache"),
    ([3], r"seq_ids: \[3\] names \[3\], not in the cache \(never added, or removed\)"),
])
def test_key_refuses_bad_batches(tiny_model, seq_ids, match):
    s = _session(tiny_model, [4, 4])
    s.add_sequence(3)
    s.remove_sequence(3)
    with pytest.raises(ValueError, match=match):
        s.decode_graph_key(seq_ids)


def _graph_test():
    """tests/gpu/test_kv_cache_graphs.py as a module (its workload runs on the CPU model too)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("gpu") / "test_kv_cache_graphs.py"
    spec = importlib.util.spec_from_file_location("kv_cache_graphs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graph_table_replays_by_key_and_drops_the_least_recently_used():
    graphs = _graph_test()
    captured = []

    def capture():
        n = len(captured)
        captured.append(n)
        return lambda: n

    table = graphs.Graphs(capture, eager=lambda: "eager", limit=2)
    served = [table(k) for k in ("a", "b", "a", "c", "b", None, "a")]
    # a, b captured; a replays; c drops b (a was used last); b drops a; None runs eagerly; a drops c
    assert served == [0, 1, 0, 2, 3, "eager", 4]
    assert table.counts == {"captures": 5, "replays": 1, "eager": 1, "evicted": 3}
    assert list(table.replays) == ["b", "a"]


def test_graph_workload_runs_on_the_cpu_model(tiny_model):
    """The GPU graph test's workload and graph table, each "capture" a function that runs the decode
    eagerly: every step's logits match numpy while sequences grow across pages, leave and join (the
    key, checked against the workload's lengths, moves and comes back), and begin_step's early plan
    leaves the step runnable. The workload's random choices do not depend on the logits, so its counts
    are those of the GPU test at the same number of steps."""
    import tvm

    from tvm_attn.models import llama

    graphs = _graph_test()
    cfg = llama.get_config("tiny")
    weights = llama.random_weights(cfg, 3)
    s = ModelSession(tiny_model, weights=weights)
    ids = tvm.runtime.tensor(np.zeros((graphs.BATCH, 1), np.int32), s.device)
    work = graphs.Workload(s, cfg, weights, np.random.default_rng(11), ids)

    def eager():
        return s.vm["decode"](ids, s.cache, s.params)

    table = graphs.Graphs(lambda: eager, eager)
    steps = 50  # the GPU test's checks of the counts start at 50
    graphs.run_steps(work, table, steps)
    print(graphs.check_counts(work, table, steps))
    assert work.worst < 1e-4  # the float32 model (the GPU test's bound is float16's)

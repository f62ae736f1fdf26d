"""What the benchmark scripts share: CUDA-event and TVM timers, the names of the read-ceiling
kernels, the result file's header (device, date, commit) and writing it, and the grouped bar plot
of a result (shape: ``bench/results/*.json``, one row per workload and kernel). Needs no compiler;
matplotlib and torch are used only where the caller has them."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import numpy as np


#: (threads, unroll) of the streaming reads (tvm_attn.tir.stream) the decode benchmark's ceiling times
READ_CONFIGS = ((256, 4), (256, 8), (512, 4), (1024, 4))


def read_sum_name(threads: int, unroll: int) -> str:
    """The function name of the streaming read of ``threads`` threads and ``unroll`` loads in flight."""
    return f"read_sum_t{threads}u{unroll}"


def zipf_lengths(n: int, mean: int, seed: int = 0, lo: int = 1, hi: int = 32768) -> list[int]:
    """``n`` request lengths drawn from a Zipf law (exponent 1.5), scaled to mean ``mean`` and
    clipped to ``[lo, hi]``: a skewed serving batch of a few long requests among many short ones."""
    z = np.random.default_rng(seed).zipf(1.5, n).astype(np.float64)
    return np.clip(np.round(z / z.mean() * mean), lo, hi).astype(int).tolist()


def page_table(lens, page_size: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(kv_indptr, kv_indices, kv_last_page_len)`` of requests of ``lens`` keys over shuffled pages
    (a cache in use hands out pages in no order)."""
    pages = [(n + page_size - 1) // page_size for n in lens]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    indices = rng.permutation(int(indptr[-1])).astype(np.int32)
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(lens, pages)], np.int32)
    return indptr, indices, last


def time_torch(torch, fn, repeat: int = 10) -> float:
    """Median milliseconds of ``fn`` with CUDA events, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times = []
    for _ in range(repeat):
        ev[0].record()
        fn()
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]))
    return float(np.median(times))


def time_tvm(mod, name, dev, args, number: int, repeat: int) -> float:
    """Median milliseconds of ``mod[name](*args)`` by TVM's time evaluator."""
    t = mod.time_evaluator(name, dev, number=number, repeat=repeat)(*args)
    return float(np.median(t.results)) * 1e3


def result_header(device: str, command: str, root: Path) -> dict:
    """``device``, ``date``, ``commit`` (``TVM_ATTN_COMMIT`` where the tree has no .git, as on the
    GPU host, else ``git rev-parse HEAD``) and ``command`` of a result file."""
    commit = os.environ.get("TVM_ATTN_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, cwd=root,
    ).stdout.strip()
    return {"device": device, "date": datetime.date.today().isoformat(), "commit": commit or None,
            "command": command}


def write_result(out, result: dict, plot) -> None:
    """Write ``result`` as JSON to ``out`` and ``plot(result, <out>.png)`` beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))


def bar_plot(result: dict, path, *, value, label, ylabel: str, title: str, figsize=(12, 5), kernels=None,
             hline=None, rotation: int = 20, fontsize: int = 8, ha: str = "center") -> None:
    """One group of bars per workload, one bar per kernel: ``value(row)`` is the bar, ``label(workload)``
    the tick text, ``kernels(name)`` filters the kernels, ``hline = (y, label)`` draws a ceiling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed here: no plot")
        return
    rows = result["rows"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    names = [k for k in dict.fromkeys(r["kernel"] for r in rows) if kernels is None or kernels(k)]
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / max(len(names), 1)
    for i, k in enumerate(names):
        vals = [next((value(r) for r in rows if r["workload"] == w and r["kernel"] == k), 0)
                for w in workloads]
        ax.bar(np.arange(len(workloads)) + i * width, vals, width, label=k)
    if hline is not None and hline[0]:
        ax.axhline(hline[0], color="k", ls="--", label=hline[1])
    ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2)
    ax.set_xticklabels([label(w) for w in workloads], rotation=rotation, ha=ha, fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

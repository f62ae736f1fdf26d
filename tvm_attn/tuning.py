"""Tuning kernel schedules per GPU: ``tvm-attn tune`` (and ``scripts/tune.py``, the same code).

A kernel family's default schedule is one hand-written choice for every GPU (the CUDA decode
kernel's, :func:`tvm_attn.schedule.decode.choose_decode_tiles`, was made on an H100). Tuning times
the candidate schedules of each workload class on one GPU and writes a tuned table
(:mod:`tvm_attn.schedule.tuned`: per family, GPU and class, the schedule measured fastest); the
registry then picks the table's schedule for that GPU and the hand-written one elsewhere. It runs
in two steps, since a GPU host may have TVM's runtime only:

1. Where TVM's compiler (and nvcc) is::

       tvm-attn tune --build tune-kernels/ --family cuda_decode [--arch sm_90a] [--jobs 4]

   builds every candidate of every class into ``tune-kernels/`` (a kernel cache: ``.so`` files and
   precompiled cubins), with a progress bar, ``--jobs`` processes in parallel, and drops (listing
   why) candidates that fail to generate or whose kernels spill registers under ptxas. It writes
   ``tune-kernels/candidates.json``: the classes, their workloads, and each candidate's kernel
   names and build status.

2. On the GPU host, with TVM's runtime only::

       tvm-attn tune --run tune-kernels/ --out tuned.json [--gpu "NVIDIA H200"] [--plot tuned.png]

   plans each workload with the decode wrapper pinned to each candidate
   (:func:`tvm_attn.api.decode.pin_schedule`), checks the output against the numpy reference on
   the first requests (a mismatch drops the candidate, with a note), times the kernel
   (:func:`tvm_attn.benchmark.time_tvm`, :data:`ROUNDS` rounds in alternating order, the fastest
   round kept), and scores each candidate by the geometric mean over the class's workloads of its
   time relative to the hand-written default, which is always measured in the same run. The
   lowest score wins; ties within :data:`TIE` (0.5%) go to the hand-written default, then to the
   candidate earliest in the fixed order, so the same timings always give the same table.
   ``tuned.json`` gets one entry per class for that GPU (``--gpu``, else the device's name); an
   existing table there keeps its other entries. Beside it: ``tuned.result.json`` (every timing and
   note) and a plot of the speed-up per workload.

``--classes`` limits either step to some classes (names as ``d128-float16-g4-plain``), ``--small``
takes one class, 2 workloads and 6 candidates (a quick check of the whole path).

Using a table: ``TVM_ATTN_TUNED_TABLE=tuned.json`` (or
``tvm_attn.schedule.tuned.use_table("tuned.json")``) makes it the user table, whose entries win
over the package's (``tvm_attn/schedule/tuned.json``; commit entries there to ship them). A wrapper
on a CUDA host looks up its device's name; kernels built elsewhere for that host must be built for
the same GPU (``tvm-attn build --gpu "NVIDIA H200"``, ``scripts/build_gpu_kernels.py --gpu ...``,
or ``TVM_ATTN_GPU``, which also covers ``tvm-attn build-model``), else their names differ.

The decode classes (:data:`DECODE_CLASSES`; a class is what the schedule may depend on: head_dim,
KV dtype, GQA group and variant class, :func:`tvm_attn.schedule.decode.workload_class`):
head_dim 128, fp16, page 16, 32/8 heads plain, RoPE (heavy), and soft-cap + ALiBi + sliding
window (logits hooks; every variant's workloads count toward the class's score), 32/32 heads
(MHA) and 64/8 heads plain. The workloads (:data:`DECODE_WORKLOADS`) are the decode benchmark's:
64 x 2048, 16 x 8192, 128 x 1024, 1 x 32768 keys and a Zipf batch of 64 (mean 2048), with the
class's heads; the window is 4096 keys, given to ``plan``. The candidates are
:func:`tvm_attn.schedule.decode.candidate_schedules`: 19-20 a class, 139 kernels for the five
classes (the logits class builds each candidate for its three variants).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: the format of candidates.json
MANIFEST_VERSION = 1
MANIFEST = "candidates.json"
#: score ties within this fraction go to the hand-written default, then to the earlier candidate
TIE = 0.005
#: timing rounds over a workload's candidates (in alternating order; each candidate's fastest kept)
ROUNDS = 2
#: time_tvm's calls a measurement averages, and the measurements of which the median is taken
NUMBER, REPEAT = 20, 15
#: requests of each workload checked against the reference
CHECK_ROWS = 2
#: the sliding window of the window variant (planned for, as in scripts/bench_decode.py)
WINDOW = 4096
#: |o - ref| <= tol * (1 + |ref|): the test suite's rule (tests/conftest.py)
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-4}
#: --small: the first class, its workloads of these names, this many candidates
SMALL_WORKLOADS, SMALL_CANDIDATES = ("b64 l2048", "b1 l32768"), 6


def _variant(name: str):
    import tvm_attn as ta
    from .api._common import flashinfer_variant

    made = {"plain": None, "rope": ta.RoPE, "softcap": ta.LogitsSoftCap, "alibi": ta.ALiBi,
            "window": lambda: ta.SlidingWindow(WINDOW)}
    if name not in made:
        raise ValueError(f"variant: {name!r} is not one of {', '.join(made)}")
    return flashinfer_variant(made[name]() if made[name] else None)


@dataclass(frozen=True)
class DecodeClass:
    """One decode workload class to tune: the heads its workloads run with, and its variants (every
    one of the same variant class; each candidate is built and timed for each)."""

    num_qo_heads: int
    num_kv_heads: int
    variants: tuple[str, ...] = ("plain",)
    head_dim: int = 128
    dtype: str = "float16"
    page_size: int = 16

    def key(self, variant: str, target: str, schedule: str = "default"):
        from .config import AttentionKey
        from .kv.formats import PagedKV

        return AttentionKey("decode", PagedKV(self.page_size, "NHD"), self.num_qo_heads, self.num_kv_heads,
                            self.head_dim, self.dtype, self.dtype, _variant(variant), target, schedule)

    def name(self) -> str:
        from .schedule.tuned import workload_class

        names = {workload_class("cuda_decode", self.key(v, "cuda:sm_90a")) for v in self.variants}
        if len(names) != 1:
            raise ValueError(f"variants: {self.variants} fall in different classes {sorted(names)}")
        return names.pop()


DECODE_CLASSES = (
    DecodeClass(32, 8), DecodeClass(32, 8, ("rope",)), DecodeClass(32, 8, ("softcap", "alibi", "window")),
    DecodeClass(32, 32), DecodeClass(64, 8),
)


def decode_workloads() -> list[tuple[str, list[int]]]:
    """(name, each request's keys): the decode benchmark's batches."""
    from .benchmark import zipf_lengths

    zipf = zipf_lengths(64, 2048)
    return [("b64 l2048", [2048] * 64), ("b16 l8192", [8192] * 16), ("b128 l1024", [1024] * 128),
            ("b1 l32768", [32768]), (f"b64 zipf mean{int(np.mean(zipf))}", zipf)]


DECODE_WORKLOADS = decode_workloads()
FAMILIES = ("cuda_decode",)


# -- scoring (no GPU needed) ----------------------------------------------------------------------

def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def scores(times: dict, default: str) -> dict[str, float]:
    """schedule -> the geometric mean over the default's workloads of its time relative to the
    default's (``times``: schedule -> workload -> microseconds); schedules missing one of those
    workloads are left out."""
    base = times[default]
    return {s: geomean(t[w] / base[w] for w in base) for s, t in times.items() if all(w in t for w in base)}


def select(times: dict, default: str, order, tie: float = TIE) -> str:
    """The winner: the lowest score; the default where it is within ``tie`` of it, else the first
    schedule of ``order`` within ``tie`` of it."""
    sc = scores(times, default)
    bound = min(sc.values()) * (1 + tie)
    if sc[default] <= bound:
        return default
    return next(s for s in order if s in sc and sc[s] <= bound)


def table_entry(family: str, gpu: str, cls: str, times: dict, default: str, order) -> dict:
    """The tuned-table entry of one class from its timings (see :func:`select`)."""
    best = select(times, default, order)
    base = times[default]
    return {"family": family, "gpu": gpu, "class": cls, "schedule": best,
            "median_us": round(geomean(times[best][w] for w in base), 2), "default_schedule": default,
            "default_us": round(geomean(base.values()), 2),
            "workloads": {w: [round(times[best][w], 2), round(base[w], 2)] for w in base}}


# -- the build step -------------------------------------------------------------------------------

def _selected(classes: tuple, names) -> tuple:
    if not names:
        return classes
    by_name = {c.name(): c for c in classes}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"--classes: {unknown} are not among {sorted(by_name)}")
    return tuple(by_name[n] for n in names)


def _small_pick(schedules: list[str], default: str) -> list[str]:
    """--small: the default and candidates spread evenly over the fixed order."""
    others = [s for s in schedules if s != default]
    step = max(1, len(others) // (SMALL_CANDIDATES - 1))
    return [default] + others[::step][: SMALL_CANDIDATES - 1]


def plan_build(family: str = "cuda_decode", arch: str = "sm_90a", classes=None, small: bool = False) -> list:
    """The classes to build: ``{"class", "heads", "head_dim", "dtype", "page_size", "variants"
    (name -> variant spec), "workloads", "default_schedule", "candidates" (schedule -> variant ->
    key)}``, in the fixed order (the default first)."""
    from .registry import family_named
    from .schedule.decode import candidate_schedules
    from .schedule.tuned import NO_GPU

    if family not in FAMILIES:
        raise ValueError(f"--family: {family!r}: tuning covers {', '.join(FAMILIES)}")
    fam, target = family_named(family), f"cuda:{arch}"
    chosen = _selected(DECODE_CLASSES, classes)
    if small:
        chosen = chosen[:1]
    out = []
    for c in chosen:
        keys = {v: c.key(v, target) for v in c.variants}
        default = fam.choose(next(iter(keys.values())), arch, gpu=NO_GPU)
        lists = [candidate_schedules(k.head_dim, k.kv_dtype, k.group_size, k.variant, arch)
                 for k in keys.values()]
        schedules = [s for s in lists[0] if all(s in other for other in lists[1:])]
        schedules = [default] + [s for s in schedules if s != default]
        if small:
            schedules = _small_pick(schedules, default)
        workloads = [(n, lens) for n, lens in DECODE_WORKLOADS if not small or n in SMALL_WORKLOADS]
        out.append({"class": c.name(), "heads": [c.num_qo_heads, c.num_kv_heads], "head_dim": c.head_dim,
                    "dtype": c.dtype, "page_size": c.page_size,
                    "variants": {v: k.variant.spec() for v, k in keys.items()},
                    "workloads": [{"name": n, "lens": lens} for n, lens in workloads],
                    "default_schedule": default,
                    "candidates": {s: {v: c.key(v, target, s) for v in c.variants} for s in schedules}})
    return out


def _build_one(directory: str, spec: dict) -> dict:
    """Build one kernel into the cache at ``directory``: its status (``ok``, ``spills``, ``failed``),
    the reason, and ptxas's registers, shared memory and spills where nvcc ran."""
    from .cache import KernelCache
    from .config import key_from_spec
    from .cuda_runtime import spill_bytes

    key = key_from_spec(spec)
    cache = KernelCache(directory)
    start = time.perf_counter()
    try:
        cache.build(key)
    except Exception as err:  # noqa: BLE001 - a candidate that does not generate or compile is listed
        return {"uri": key.uri, "status": "failed", "reason": f"{type(err).__name__}: {str(err)[:300]}"}
    row = {"uri": key.uri, "status": "ok", "build_s": round(time.perf_counter() - start, 2)}
    meta = json.loads((cache.directory / f"{key.uri}.json").read_text())
    ptxas = meta.get("ptxas")
    if ptxas is None:
        row["reason"] = "ptxas not run (no nvcc here)"
        return row
    row["registers"] = max((r["registers"] for r in ptxas if "registers" in r), default=None)
    row["smem_bytes"] = max((r.get("smem_bytes", 0) for r in ptxas if "registers" in r), default=None)
    row["spill_bytes"] = spill_bytes(ptxas)
    if row["spill_bytes"]:
        row["status"] = "spills"
        row["reason"] = f"ptxas spills {row['spill_bytes']} bytes ({row['registers']} registers)"
    return row


def build(directory, family: str = "cuda_decode", arch: str = "sm_90a", classes=None, jobs: int = 1,
          small: bool = False, progress: bool = True) -> dict:
    """Build every candidate kernel of the classes into ``directory``; write and return its
    ``candidates.json`` (see the module docstring)."""
    from .cache import compiler_available
    from .progress import Progress

    if not compiler_available():
        raise ValueError("--build: TVM's compiler is not available in this process (build where it is)")
    if jobs < 1:
        raise ValueError(f"--jobs: must be a positive integer, got {jobs}")
    plan = plan_build(family, arch, classes, small)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    work = [(f"{c['class']} {s} {v}", key) for c in plan for s, keys in c["candidates"].items()
            for v, key in keys.items()]
    rows = {}
    start = time.perf_counter()
    with Progress([label for label, _ in work], stream=sys.stderr if progress else io.StringIO()) as bar:
        if jobs == 1:
            for label, key in work:
                rows[label] = _build_one(str(directory), key.to_json())
                bar.finish(label, rows[label]["status"])
        else:
            import concurrent.futures as cf
            import multiprocessing

            # spawn: TVM's threads and runtime state do not survive a fork
            with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_build_one, str(directory), key.to_json()): label
                           for label, key in work}
                for done in cf.as_completed(futures):
                    label = futures[done]
                    rows[label] = done.result()
                    bar.finish(label, rows[label]["status"])
    manifest = _manifest(plan, rows, family, arch, small, time.perf_counter() - start)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _manifest(plan, rows, family, arch, small, seconds) -> dict:
    from .benchmark import result_header

    classes, skipped = [], []
    for c in plan:
        candidates = []
        for s, keys in c["candidates"].items():
            kernels = {v: {**rows[f"{c['class']} {s} {v}"], "key": k.to_json()} for v, k in keys.items()}
            bad = [f"{v}: {k['reason']}" for v, k in kernels.items() if k["status"] != "ok"]
            # the default is always timed, as the baseline (a spilling one still runs)
            runnable = not bad or (s == c["default_schedule"]
                                   and all(k["status"] != "failed" for k in kernels.values()))
            candidates.append({"schedule": s, "runnable": runnable, "kernels": kernels})
            if bad:
                skipped.append({"class": c["class"], "schedule": s, "reasons": bad})
        classes.append({**{k: v for k, v in c.items() if k != "candidates"}, "candidates": candidates})
    header = result_header(None, "tvm-attn tune --build", Path(__file__).resolve().parent.parent)
    return {"version": MANIFEST_VERSION, "family": family, "arch": arch, "small": small,
            "date": header["date"], "commit": header["commit"], "build_s": round(seconds, 1),
            "kernels": len(rows), "classes": classes, "skipped": skipped}


def read_manifest(directory) -> dict:
    """``candidates.json`` of a ``--build`` directory (a ValueError naming it if it is missing or of
    another version)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--run: {path}: not a candidates file of `tvm-attn tune --build` ({err})") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"--run: {path}: version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    return manifest


# -- the run step (GPU host) ------------------------------------------------------------------------

@dataclass
class _Run:
    """What the run's workloads share: the device, the cache of built kernels, torch (or None),
    each class's timings (schedule -> workload -> us) and dropped schedules, and the notes."""

    dev: object
    cache: object
    torch: object
    times: dict
    dropped: dict
    notes: list


def _run_classes(manifest: dict, classes, small: bool) -> list[dict]:
    chosen = manifest["classes"]
    if classes:
        names = [c["class"] for c in chosen]
        unknown = [n for n in classes if n not in names]
        if unknown:
            raise ValueError(f"--classes: {unknown} are not in this build's classes {names}")
        chosen = [c for c in chosen if c["class"] in classes]
    if not small:
        return chosen
    c = chosen[0]
    picked = _small_pick([x["schedule"] for x in c["candidates"]], c["default_schedule"])
    return [{**c, "workloads": [w for w in c["workloads"] if w["name"] in SMALL_WORKLOADS],
             "candidates": [x for x in c["candidates"] if x["schedule"] in picked]}]


def _workload_data(state: _Run, c: dict, lens: list[int], rng):
    """The page table, the cache (on the device, and the checked requests' pages on the host), q."""
    import tvm

    from .benchmark import page_table
    from .dtypes import to_numpy_dtype

    hq, hkv = c["heads"]
    D, P, np_dtype = c["head_dim"], c["page_size"], to_numpy_dtype(c["dtype"])
    indptr, indices, last = page_table(lens, P, rng)
    shape = (int(indptr[-1]), 2, P, hkv, D)
    n = min(len(lens), CHECK_ROWS)
    sub = indices[: indptr[n]]
    torch = state.torch
    if torch is not None:  # GBs of random data: made on the GPU
        cache_t = torch.randn(shape, dtype=getattr(torch, c["dtype"]), device="cuda")
        cache_d = tvm.runtime.from_dlpack(cache_t)
        host = cache_t[torch.from_numpy(sub).long().cuda()].float().cpu().numpy().astype(np_dtype)
    else:
        host_all = rng.standard_normal(shape, dtype=np.float32).astype(np_dtype)
        cache_d, host = tvm.runtime.tensor(host_all, state.dev), host_all[sub]
    q = rng.standard_normal((len(lens), hq, D)).astype(np.float32).astype(np_dtype)
    checked = (q[:n], None, host, indptr[: n + 1], np.arange(sub.size, dtype=np.int32), last[:n])
    return (indptr, indices, last), cache_d, tvm.runtime.tensor(q, state.dev), checked


def _time_workload(state: _Run, c: dict, workload: dict, candidates: list[dict], seed: int) -> None:
    """Check and time every candidate on one workload, for each of the class's variants."""
    from . import reference as R
    from .api.decode import BatchDecodeWithPagedKVCacheWrapper, pin_schedule
    from .benchmark import time_tvm
    from .variants import variant_from_spec

    hq, hkv = c["heads"]
    table, cache_d, q_d, checked = _workload_data(state, c, workload["lens"], np.random.default_rng(seed))
    dropped = state.dropped[c["class"]]
    for v_name, spec in c["variants"].items():
        variant = variant_from_spec(spec)
        label = workload["name"] if len(c["variants"]) == 1 else f"{v_name} {workload['name']}"
        ref = R.paged_attention(*checked, variant=variant)[0]
        calls = {}
        for cand in (x for x in candidates if x["schedule"] not in dropped):
            s, uri = cand["schedule"], cand["kernels"][v_name]["uri"]
            try:
                w = BatchDecodeWithPagedKVCacheWrapper("NHD", device=state.dev, cache=state.cache)
                pin_schedule(w, s).plan(*table, hq, hkv, c["head_dim"], c["page_size"], variant=variant,
                                        q_data_type=c["dtype"])
                if w.kernel_key.uri != uri:
                    raise ValueError(f"planned {w.kernel_key.uri}, built {uri}")
                o = w.run(q_d, cache_d).numpy()[: ref.shape[0]].astype(np.float32)
            except Exception as err:  # noqa: BLE001 - a candidate that cannot run is dropped, with a note
                _drop(state, c, s, f"{label}: {type(err).__name__}: {str(err)[:200]}")
                continue
            err = float(np.max(np.abs(o - ref) / (1 + np.abs(ref))))
            if not err <= TOLERANCE[c["dtype"]]:
                _drop(state, c, s, f"{label}: output differs from the reference ({err:.2e} relative)")
                continue
            args = w._call.launch_args(q_d, [("paged_kv_cache", cache_d)], {})[0]
            calls[s] = (state.cache.module(w.kernel_key), uri, args)
        for r in range(ROUNDS):  # alternate the order, so drift over the rounds favours no one
            for s in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                mod, uri, args = calls[s]
                us = time_tvm(mod, uri, state.dev, args, NUMBER, REPEAT) * 1e3
                times = state.times[c["class"]].setdefault(s, {})
                times[label] = min(us, times.get(label, math.inf))


def _drop(state: _Run, c: dict, schedule: str, why: str) -> None:
    """A candidate that failed a workload leaves the class (its scores need every workload)."""
    state.dropped[c["class"]].add(schedule)
    state.times[c["class"]].pop(schedule, None)
    state.notes.append(f"{c['class']}: {schedule} dropped: {why}")


def run(directory, out, gpu: str | None = None, plot=None, result=None, classes=None, small: bool = False,
        progress: bool = True, command: str = "tvm-attn tune --run") -> dict:
    """Time the candidates built into ``directory`` on this host's GPU and write the tuned table
    ``out`` (see the module docstring); returns the result (also written to ``result``, default
    ``<out>.result.json``, and plotted to ``plot``, default beside it)."""
    import tvm

    from .cache import KernelCache
    from .cuda_runtime import ensure_cuda
    from .progress import Progress
    from .schedule.tuned import gpu_name

    manifest = read_manifest(directory)
    chosen = _run_classes(manifest, classes, small)
    try:
        ensure_cuda(Path(directory) / "cubin")
        dev = tvm.cuda(0)
        exists = dev.exist
    except (RuntimeError, OSError) as err:  # no CUDA driver or runtime here
        raise ValueError(f"--run: needs a CUDA GPU here ({str(err).splitlines()[0][:200]})") from None
    if not exists:
        raise ValueError("--run: needs a CUDA GPU here (none found)")
    name = gpu_name(gpu, device=dev)
    if name is None:
        raise ValueError("--run: give the GPU's name (--gpu), which TVM_ATTN_GPU=none hides")
    try:
        import torch
    except ImportError:
        torch = None
    state = _Run(dev, KernelCache(directory), torch, {c["class"]: {} for c in chosen},
                 {c["class"]: set() for c in chosen}, [])
    steps = [f"{c['class']} {w['name']}" for c in chosen for w in c["workloads"]]
    with Progress(steps, stream=sys.stderr if progress else io.StringIO()) as bar:
        for c in chosen:
            runnable = [x for x in c["candidates"] if x["runnable"]]
            for i, workload in enumerate(c["workloads"]):
                bar.step(f"{c['class']} {workload['name']}")
                _time_workload(state, c, workload, runnable, seed=i + 1)
    return _write_run(state, chosen, manifest, name, out, result, plot, command)


def _write_run(state: _Run, chosen, manifest, gpu: str, out, result, plot, command) -> dict:
    from .benchmark import result_header
    from .schedule.tuned import load_table, write_table

    entries, summaries, rows = [], [], []
    for c in chosen:
        times, default = state.times[c["class"]], c["default_schedule"]
        if default not in times or len(times[default]) < len(c["workloads"]) * len(c["variants"]):
            state.notes.append(f"{c['class']}: the hand-written {default} did not run everywhere: no entry")
            continue
        order = [x["schedule"] for x in c["candidates"]]
        entry = table_entry(manifest["family"], gpu, c["class"], times, default, order)
        entries.append(entry)
        sc = scores(times, default)
        summaries.append({"class": c["class"], "default_schedule": default, "schedule": entry["schedule"],
                          "scores": {s: round(sc[s], 4) for s in order if s in sc},
                          "times": {s: {w: round(t, 2) for w, t in times[s].items()}
                                    for s in order if s in times}})
        rows += [{"workload": f"{c['class']} {w}", "kernel": s, "median_us": round(t, 2)}
                 for s in order if s in times for w, t in times[s].items()]
    out = Path(out)
    measured = {(e["family"], e["gpu"], e["class"]) for e in entries}
    kept = [e for e in (load_table(out) if out.exists() else [])
            if (e.family, e.gpu, e.workload_class) not in measured]
    write_table(out, kept + entries)
    root = Path(__file__).resolve().parent.parent
    res = {**result_header(gpu, command, root),
           "build": {k: manifest.get(k) for k in ("commit", "date", "arch")},
           "tie": TIE, "rounds": ROUNDS, "classes": summaries, "rows": rows, "notes": state.notes}
    result = Path(result) if result else out.with_name(out.stem + ".result.json")
    result.write_text(json.dumps(res, indent=1) + "\n")
    plot_speedups(res, Path(plot) if plot else result.with_suffix(".png"))
    return res


def plot_speedups(res: dict, path) -> None:
    """Bars: each workload's speed-up of the tuned schedule over the hand-written one."""
    from .benchmark import bar_plot

    rows = []
    for c in res["classes"]:
        times = c["times"]
        for w, base in times[c["default_schedule"]].items():
            rows.append({"workload": f"{c['class']} {w}", "kernel": "tuned (each class's winner)",
                         "speedup": base / times[c["schedule"]][w]})
    bar_plot({"rows": rows}, path, value=lambda r: r["speedup"], label=lambda w: w,
             ylabel="speed-up over the hand-written schedule",
             title=f"Tuned decode schedules, {res['device']}",
             hline=(1.0, "hand-written"), rotation=60, ha="right", figsize=(14, 6))


# -- the command line ------------------------------------------------------------------------------

def add_arguments(p) -> None:
    """The arguments of ``tvm-attn tune`` and ``scripts/tune.py``."""
    step = p.add_mutually_exclusive_group(required=True)
    step.add_argument("--build", metavar="DIR", help="build every candidate kernel into DIR (compiler host)")
    step.add_argument("--run", metavar="DIR", help="time DIR's candidates on this GPU (GPU host)")
    p.add_argument("--family", default="cuda_decode", help="the kernel family to tune (cuda_decode)")
    p.add_argument("--arch", default="sm_90a", help="--build: the CUDA arch, e.g. sm_90a")
    p.add_argument("--jobs", type=int, default=1, help="--build: parallel build processes")
    p.add_argument("--classes", help="comma-separated class names, e.g. d128-float16-g4-plain (default: all)")
    p.add_argument("--small", action="store_true", help="one class, 2 workloads, 6 candidates")
    p.add_argument("--out", metavar="TABLE", help="--run: the tuned table to write (JSON)")
    p.add_argument("--gpu", help="--run: the GPU's name in the table (default: the device's)")
    p.add_argument("--result", help="--run: the result file (default: <TABLE stem>.result.json)")
    p.add_argument("--plot", metavar="PNG", help="--run: the plot (default: beside the result)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main_from_args(args, command: str) -> dict:
    """Run the step ``args`` asks for (:func:`add_arguments`); a ValueError names a bad argument."""
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if args.build:
        for name in ("out", "gpu", "result", "plot"):
            if getattr(args, name):
                raise ValueError(f"--{name}: goes with --run, not --build")
        manifest = build(args.build, args.family, args.arch, classes, args.jobs, args.small, not args.quiet)
        _print_build(manifest)
        return manifest
    if not args.out:
        raise ValueError("--run: give --out TABLE.json, the tuned table to write")
    res = run(args.run, args.out, args.gpu, args.plot, args.result, classes, args.small, not args.quiet,
              command)
    for c in res["classes"]:
        speedup = 1 / c["scores"][c["schedule"]]
        print(f"{c['class']:<28} {c['default_schedule']:>12} -> {c['schedule']:<12} {speedup:.3f}x")
    for note in res["notes"]:
        print("note:", note)
    print(f"wrote {args.out}")
    return res


def _print_build(manifest: dict) -> None:
    runnable = sum(x["runnable"] for c in manifest["classes"] for x in c["candidates"])
    print(f"built {manifest['kernels']} kernels in {manifest['build_s']:.0f} s: {runnable} candidate "
          f"schedules to time over {len(manifest['classes'])} classes")
    for s in manifest["skipped"]:
        print(f"skipped {s['class']} {s['schedule']}: {'; '.join(s['reasons'])}")

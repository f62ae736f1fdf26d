"""Tuned tables: the schedule measured fastest for a kernel family's workload class on one GPU.

A family's default schedule is a hand-written choice (e.g. :func:`tvm_attn.schedule.decode.default_schedule`,
made on an H100). ``tvm-attn tune`` (:mod:`tvm_attn.tuning`) times the candidates on a GPU and
writes a table; :meth:`tvm_attn.registry.KernelFamily.choose` then takes the table's schedule for
the GPU the kernel is for, and the hand-written one where the table has no entry.

A table is JSON::

    {"version": 1,
     "entries": [{"family": "cuda_decode", "gpu": "NVIDIA H200", "class": "d128-float16-g4-plain",
                  "schedule": "w4u4g4b3", "median_us": 151.2, "default_schedule": "w4u2g4b4p",
                  "default_us": 160.4, "workloads": {"b64 l2048": [150.0, 161.3], ...}}]}

``family`` (a tunable family: :data:`TUNABLE`), ``gpu`` (the device name, as
``tvm.cuda(0).device_name`` gives it), ``class`` (the family's workload class of the key, e.g.
:func:`tvm_attn.schedule.decode.workload_class`) and ``schedule`` choose; the rest record the
measurement: ``median_us`` and ``default_us`` are geometric means over the class's workloads of
the median times of ``schedule`` and of the hand-written ``default_schedule``, and ``workloads``
holds each workload's pair. One entry per (family, gpu, class).

Tables, the first with an entry winning: the user table (:func:`use_table`, else the path in
``$TVM_ATTN_TUNED_TABLE``), then the package's (``tuned.json`` beside this module, shipped with
it: the entries of the committed tuning runs, ``bench/results/tuned-decode-<gpu>.json``). A table
that is not JSON, has another version, or holds an entry that does not check (unknown family, a
class or schedule that does not parse for it, a duplicate) raises a ValueError naming the file and
the entry when it is first read.

The GPU (:func:`gpu_name`): a ``gpu=`` argument (``tvm-attn build --gpu``,
``scripts/build_gpu_kernels.py --gpu``: kernels built for another host), else ``$TVM_ATTN_GPU``,
else the name of the CUDA device a wrapper plans on, else none (hand-written schedules). ``"none"``
in either place also means none.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

TABLE_VERSION = 1
TABLE_ENV = "TVM_ATTN_TUNED_TABLE"
GPU_ENV = "TVM_ATTN_GPU"
#: the GPU name that asks for the hand-written schedules
NO_GPU = "none"
PACKAGE_TABLE = Path(__file__).with_name("tuned.json")

_REQUIRED = ("family", "gpu", "class", "schedule")
_OPTIONAL = ("median_us", "default_schedule", "default_us", "workloads")


@dataclass(frozen=True)
class Tunable:
    """What a tuned table needs of a family: the workload class of a key (``classify(key) -> str``)
    and the check of a schedule for a class (``check(schedule, cls)`` raises a ValueError)."""

    classify: object
    check: object


def _decode() -> Tunable:
    from . import decode

    return Tunable(decode.workload_class, decode.check_class_schedule)


#: the families that take tuned schedules, by registry name
TUNABLE = {"cuda_decode": _decode}


def tunable(family: str) -> Tunable:
    """The class and check functions of ``family``; a ValueError naming it if it takes no tables."""
    make = TUNABLE.get(family)
    if make is None:
        raise ValueError(f"family: {family!r} takes no tuned schedules (tunable: {', '.join(TUNABLE)})")
    return make()


def workload_class(family: str, key) -> str:
    """The workload class of ``key`` in ``family``: what the search times and the lookup matches."""
    return tunable(family).classify(key)


@dataclass(frozen=True)
class Entry:
    family: str
    gpu: str
    workload_class: str
    schedule: str
    #: the measurement fields, as the table has them
    record: tuple = ()

    def to_json(self) -> dict:
        return {"family": self.family, "gpu": self.gpu, "class": self.workload_class,
                "schedule": self.schedule, **dict(self.record)}


# -- the GPU ---------------------------------------------------------------------------------------

def gpu_name(gpu: str | None = None, device=None) -> str | None:
    """The GPU whose tuned schedules apply: ``gpu`` if given, else ``$TVM_ATTN_GPU``, else the name of
    ``device`` (a ``tvm.runtime.Device``; only a CUDA device that exists has one), else None.
    ``"none"`` (either place) is None: the hand-written schedules."""
    name = gpu if gpu is not None else (os.environ.get(GPU_ENV) or None)
    if name is None and device is not None:
        name = _device_name(device.dlpack_device_type(), device.index)
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"gpu: expected a GPU name such as 'NVIDIA H200', got {name!r}")
    name = name.strip()
    return None if name.lower() in ("", NO_GPU) else name


@functools.lru_cache(maxsize=None)
def _device_name(device_type: int, index: int) -> str | None:
    if device_type != 2:  # DLPack's kDLCUDA
        return None
    import tvm

    dev = tvm.cuda(index)
    return dev.device_name if dev.exist else None


# -- tables ----------------------------------------------------------------------------------------

_STATE: dict = {"user": None}


def use_table(path) -> None:
    """Take the table at ``path`` as the user table (instead of ``$TVM_ATTN_TUNED_TABLE``'s); None
    goes back to the environment variable. The table is read and checked now."""
    if path is not None:
        path = Path(path)
        _load.cache_clear()
        _load(str(path))
    _STATE["user"] = path


def user_table() -> Path | None:
    """The user table's path: :func:`use_table`'s, else ``$TVM_ATTN_TUNED_TABLE``'s, else None."""
    if _STATE["user"] is not None:
        return _STATE["user"]
    env = os.environ.get(TABLE_ENV)
    return Path(env) if env else None


def tuned_schedule(family: str, gpu: str | None, key) -> str | None:
    """The tuned schedule of ``key`` in ``family`` on ``gpu`` (a name from :func:`gpu_name`), or
    None: no gpu, a family without tables, or no entry for the key's class."""
    if gpu is None or family not in TUNABLE:
        return None
    cls = workload_class(family, key)
    for path in (user_table(), PACKAGE_TABLE):
        if path is None:
            continue
        entry = _load(str(path)).get((family, gpu, cls))
        if entry is not None:
            return entry.schedule
    return None


def load_table(path) -> list[Entry]:
    """The checked entries of the table at ``path`` (a ValueError naming the file and entry if it
    does not check)."""
    return list(_load(str(path)).values())


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"tuned table {path}: cannot read it ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"tuned table {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        got = data.get("version") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"tuned table {path}: version {got!r}; this tvm_attn reads version {TABLE_VERSION} "
                         "({\"version\": 1, \"entries\": [...]})")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"tuned table {path}: 'entries' must be a list, got {type(entries).__name__}")
    unknown = sorted(set(data) - {"version", "entries"})
    if unknown:
        raise ValueError(f"tuned table {path}: unknown top-level keys {unknown}")
    out: dict = {}
    for i, raw in enumerate(entries):
        entry = _entry(path, i, raw)
        where = (entry.family, entry.gpu, entry.workload_class)
        if where in out:
            raise ValueError(f"tuned table {path}: entry {i}: a second entry for {'/'.join(where)}")
        out[where] = entry
    return out


def _entry(path: str, i: int, raw) -> Entry:
    if not isinstance(raw, dict):
        raise ValueError(f"tuned table {path}: entry {i}: expected an object, got {raw!r:.60}")
    what = "/".join(str(raw.get(k, "?")) for k in ("family", "gpu", "class"))
    where = f"tuned table {path}: entry {i} ({what})"
    missing = [k for k in _REQUIRED if not isinstance(raw.get(k), str) or not raw[k].strip()]
    if missing:
        raise ValueError(f"{where}: needs the strings {missing}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (an entry has {', '.join(_REQUIRED + _OPTIONAL)})")
    try:
        family = tunable(raw["family"])
        family.check(raw["schedule"], raw["class"])
        if raw.get("default_schedule") is not None:
            family.check(raw["default_schedule"], raw["class"])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    record = tuple((k, raw[k]) for k in _OPTIONAL if k in raw)
    return Entry(raw["family"], raw["gpu"].strip(), raw["class"], raw["schedule"], record)


def table_json(entries) -> str:
    """The text of a table of ``entries`` (:class:`Entry` or their JSON objects), sorted by family,
    GPU and class, so the same entries always give the same file."""
    objs = [e.to_json() if isinstance(e, Entry) else dict(e) for e in entries]
    objs.sort(key=lambda e: (e["family"], e["gpu"], e["class"]))
    return json.dumps({"version": TABLE_VERSION, "entries": objs}, indent=1) + "\n"


def write_table(path, entries) -> Path:
    """Write a table of ``entries`` to ``path``, after checking it reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table_json(entries))
    _load.cache_clear()
    load_table(path)
    return path

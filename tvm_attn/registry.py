"""Kernel families: which generator builds a key, with which schedule, and with which launch bounds.

Every kernel belongs to one family. A family says which keys it serves (key type, kinds, KV
formats, target, oldest GPU arch and its own limits), how its schedules are named (its tiles type),
which schedule a key gets by default, which functions its module holds, and the resident blocks per
SM its kernels declare in ``__launch_bounds__``. :mod:`~tvm_attn.build`, the wrappers,
:func:`~tvm_attn.config.key_from_spec`, ``tvm-attn build`` and :mod:`~tvm_attn.cuda_runtime` all ask
here. Generators are named ``"module:function"`` and imported only when a module is generated, so
this module loads with TVM's runtime alone.

A new family is one generator file (a function ``key -> PrimFunc``) and one entry in
:data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import tvm

from .config import KINDS, KV_FORMATS, MERGE_OPS, AttentionKey, MergeKey, PlannerKey
from .kv.formats import BlockSparseKV, PagedKV, RaggedKV
from .planner import PLAN, PLAN_DECODE
from .schedule import decode as decode_tiles
from .schedule import hopper as hopper_tiles
from .schedule import prefill as prefill_tiles
from .schedule import tuned


@dataclass(frozen=True)
class KernelFamily:
    """One family of kernels: the keys it builds, its schedules, and its module's generators."""

    name: str
    #: the key type it serves, and the kinds of that key (attention kinds, merge ops, "split_kv")
    key_type: type
    kinds: tuple[str, ...]
    #: "llvm" or "cuda"
    target: str
    #: the module's kernels: (name, "module:function"), the function called with the key; names may
    #: use ``{uri}``
    kernels: tuple[tuple[str, str], ...] = ()
    #: host functions of the module: (name, "module:function"), the function called with its name;
    #: in a CUDA module they run on the host (the planner)
    host: tuple[tuple[str, str], ...] = ()
    #: KV formats served (empty: every one)
    formats: tuple[type, ...] = ()
    #: the schedule's tiles type: ``of(key)``, and ``launch_bounds(schedule) -> (threads, blocks)``
    tiles: type | None = None
    #: oldest CUDA arch, as the number of ``sm_80``
    min_sm: int = 0
    #: the family's own limits: why it cannot build a key, or None
    limits: Callable[[object], str | None] | None = None
    #: the hand-written default schedule: ``(key, arch, shape) -> str``; without one, "default". A
    #: tuned table (:mod:`tvm_attn.schedule.tuned`) may replace it for a GPU (see :meth:`choose`)
    chooser: Callable[..., str] | None = None
    #: ``(key, arch, shape) -> bool``: whether this family is the better choice for work of ``shape``
    #: (see :meth:`choose`) among the families that build the key; without one, always
    prefers: Callable[..., bool] | None = None

    def supports(self, key, arch: str | None = None) -> str | None:
        """None if this family builds ``key`` for ``arch`` (default: the key's target's), else why not."""
        if not isinstance(key, self.key_type):
            return f"builds {self.key_type.__name__}s, not {type(key).__name__}s"
        target = key.target.partition(":")[0]
        if target != self.target:
            return f"runs on {self.target}, not {target}"
        if _kind(key) not in self.kinds:
            return f"builds {'/'.join(self.kinds)}, not {_kind(key)}"
        if self.formats and not isinstance(key.kv, self.formats):
            (given,) = _format_names((type(key.kv),))
            return f"reads {'/'.join(_format_names(self.formats))} KV, not {given}"
        if self.min_sm:
            arch = arch or arch_of(key.target)
            if sm_number(arch) < self.min_sm:
                return f"needs sm_{self.min_sm} or newer, not {arch}"
        if self.tiles is not None and key.schedule != "default":
            try:
                self.tiles.of(key)
            except ValueError as e:
                return str(e)
        return self.limits(key) if self.limits is not None else None

    def choose(self, key, arch: str | None = None, shape=None, gpu: str | None = None) -> str:
        """The schedule this family builds ``key`` with by default on ``arch``. ``shape`` describes the
        work where the choice depends on it (prefill: GQA-packed query rows per request). ``gpu``: the
        GPU the kernel is for (:func:`tvm_attn.schedule.tuned.gpu_name`: this name, else
        ``$TVM_ATTN_GPU``); where a tuned table has an entry for it and the key's workload class, that
        entry's schedule, else the hand-written choice (``gpu="none"``: always the hand-written one)."""
        reason = self.supports(key, arch)
        if reason is not None:
            raise ValueError(f"{self.name} cannot build {key.uri}: {reason}")
        if self.name in tuned.TUNABLE:
            schedule = tuned.tuned_schedule(self.name, tuned.gpu_name(gpu), key)
            if schedule is not None:
                return schedule
        if self.chooser is None:
            return "default"
        return self.chooser(key, arch or arch_of(key.target), shape)

    def generate(self, key) -> dict:
        """name -> PrimFunc: the functions of ``key``'s module, kernels first."""
        if self.tiles is not None and key.schedule == "default":
            raise ValueError(
                f"{key.uri}: {self.name} kernels name their schedule; this key's default is "
                f"{self.choose(key)!r} (tvm_attn.registry.scheduled(key) gives the key with it)"
            )
        funcs = {name.format(uri=key.uri): _load(fn)(key) for name, fn in self.kernels}
        host = tvm.target.Target({"kind": "llvm"}) if self.target != "llvm" else None
        for name, fn in self.host:
            name = name.format(uri=key.uri)
            func = _load(fn)(name)
            funcs[name] = func if host is None else func.with_attr("target", host)
        return funcs

    def launch_bounds(self, kernel: str) -> tuple[int, int] | None:
        """(threads, minimum resident blocks per SM) of the CUDA kernel named ``kernel`` (a key's uri)
        if this family built it, else None. The schedule is the last part of the name."""
        if self.tiles is None or self.key_type is not AttentionKey:
            return None
        parts = kernel.split("_")
        if len(parts) < 4 or parts[:1] != ["attn"] or parts[1] not in self.kinds:
            return None
        if not parts[-2].startswith(self.target):
            return None
        return self.tiles.launch_bounds(parts[-1])

    def describe(self) -> str:
        over = f" over {'/'.join(_format_names(self.formats))} KV" if self.formats else ""
        return f"{self.name} ({'/'.join(self.kinds)}{over})"


#: the split-KV planner and the decode plan, host functions of every CUDA attention module: the
#: wrappers and the KV-cache backend call them on host tensors before a launch
_HOST_PLAN = ((PLAN, "tvm_attn.tir.plan:make_planner"), (PLAN_DECODE, "tvm_attn.tir.plan:make_decode_plan"))

#: Every kernel family, asked in order.
FAMILIES: tuple[KernelFamily, ...] = (
    KernelFamily("cpu_generic", AttentionKey, KINDS, "llvm",
                 kernels=(("{uri}", "tvm_attn.tir.attention:make_attention"),)),
    KernelFamily("cuda_decode", AttentionKey, ("decode",), "cuda", formats=(PagedKV,), min_sm=80,
                 tiles=decode_tiles.DecodeTiles, chooser=decode_tiles.default_schedule,
                 kernels=(("{uri}", "tvm_attn.tir.decode_cuda:make_batch_decode_cuda"),), host=_HOST_PLAN),
    # asked before the FA2-class family: on sm_90a it takes the prefill and block-sparse keys it
    # supports, but not short queries (schedule.hopper.prefers)
    KernelFamily("cuda_prefill_sm90", AttentionKey, ("prefill", "bsr"), "cuda",
                 formats=(RaggedKV, PagedKV, BlockSparseKV),
                 min_sm=90,
                 limits=hopper_tiles.unsupported, tiles=hopper_tiles.HopperTiles,
                 chooser=hopper_tiles.default_schedule, prefers=hopper_tiles.prefers,
                 kernels=(("{uri}", "tvm_attn.tir.prefill_hopper:make_prefill_hopper"),
                          ("{uri}_merge", "tvm_attn.tir.prefill_cuda:make_prefill_merge_cuda")),
                 host=_HOST_PLAN),
    KernelFamily("cuda_prefill_fa2", AttentionKey, ("prefill", "bsr"), "cuda",
                 formats=(PagedKV, RaggedKV, BlockSparseKV), min_sm=80, limits=prefill_tiles.unsupported,
                 tiles=prefill_tiles.PrefillTiles, chooser=prefill_tiles.default_schedule,
                 kernels=(("{uri}", "tvm_attn.tir.prefill_cuda:make_prefill_cuda"),
                          ("{uri}_merge", "tvm_attn.tir.prefill_cuda:make_prefill_merge_cuda")),
                 host=_HOST_PLAN),
    KernelFamily("cpu_merge", MergeKey, MERGE_OPS, "llvm",
                 kernels=(("{uri}", "tvm_attn.tir.merge:make_merge"),)),
    KernelFamily("cuda_merge", MergeKey, MERGE_OPS, "cuda",
                 kernels=(("{uri}", "tvm_attn.tir.merge_cuda:make_merge_cuda"),)),
    KernelFamily("planner", PlannerKey, ("split_kv",), "llvm",
                 host=(("{uri}", "tvm_attn.tir.plan:make_planner"),
                       (PLAN_DECODE, "tvm_attn.tir.plan:make_decode_plan"))),
)


def family_of(key, arch: str | None = None) -> KernelFamily:
    """The family that builds ``key`` for ``arch`` (default: the key's target's); a ValueError that
    says why each family of the key's type refused, and what the key's target has, if none does."""
    if not isinstance(key, (AttentionKey, MergeKey, PlannerKey)):
        raise TypeError(f"key: expected an AttentionKey, MergeKey or PlannerKey, got {type(key).__name__}")
    refusals = []
    for family in FAMILIES:
        reason = family.supports(key, arch)
        if reason is None:
            return family
        if isinstance(key, family.key_type):
            refusals.append(f"{family.name} {reason}")
    target = key.target.partition(":")[0]
    here = [f.describe() for f in FAMILIES if f.target == target]
    raise ValueError(f"no kernel family builds {key.uri}: {'; '.join(refusals)}. "
                     f"On {target}: {', '.join(here)}")


def family_named(name: str) -> KernelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"no kernel family is named {name!r}; families: {', '.join(f.name for f in FAMILIES)}")


def preferred_family(key, shape=None) -> KernelFamily:
    """The first family that builds ``key`` and prefers work of ``shape`` (the planned query rows, see
    :meth:`KernelFamily.choose`); else the first that builds it (:func:`family_of`)."""
    arch = arch_of(key.target) if key.target.startswith("cuda") else None
    for family in FAMILIES:
        prefers = family.prefers is None or family.prefers(key, arch, shape)
        if prefers and family.supports(key, arch) is None:
            return family
    return family_of(key)


def scheduled(key, shape=None, family: str | None = None, gpu: str | None = None):
    """``key`` with the default schedule of its preferred family for ``shape`` on ``gpu`` (see
    :meth:`KernelFamily.choose`), or of the family named ``family`` (a ValueError if that one cannot
    build it)."""
    if not isinstance(key, AttentionKey):
        return key
    if family is None:
        fam = preferred_family(key, shape)
    else:
        fam = family_named(family)
        reason = fam.supports(key)
        if reason is not None:
            raise ValueError(f"kernel family {family} cannot build {key.uri}: {reason}")
    schedule = fam.choose(key, shape=shape, gpu=gpu)
    return key if schedule == key.schedule else dataclasses.replace(key, schedule=schedule)


def launch_bounds(kernel: str) -> tuple[int, int] | None:
    """(threads, minimum resident blocks per SM) that CUDA kernel ``kernel`` declares, from its family's
    schedule name: the persistent grids assume that many resident blocks; None for other kernels."""
    for family in FAMILIES:
        bounds = family.launch_bounds(kernel)
        if bounds is not None:
            return bounds
    return None


def arch_of(target: str) -> str | None:
    """``"cuda:sm_90a"`` -> ``"sm_90a"``; None for ``"llvm"``."""
    kind, _, arch = target.partition(":")
    if kind != "cuda":
        return None
    if not arch:
        raise ValueError(f"target: {target!r} needs an arch, e.g. 'cuda:sm_90a'")
    return arch


def sm_number(arch: str) -> int:
    """``"sm_90a"`` -> 90."""
    m = re.fullmatch(r"sm_(\d+)[a-z]?", arch or "")
    if m is None:
        raise ValueError(f"arch: {arch!r} is not a CUDA arch like 'sm_80' or 'sm_90a'")
    return int(m.group(1))


def _kind(key) -> str:
    if isinstance(key, MergeKey):
        return key.op
    return key.kind if isinstance(key, AttentionKey) else "split_kv"


def _format_names(formats) -> list[str]:
    return [name for name, cls in KV_FORMATS.items() if cls in formats]


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)

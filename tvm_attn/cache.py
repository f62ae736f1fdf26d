"""The kernel cache: built modules by kernel name, in memory and on disk.

``KernelCache.get(key)`` returns the kernel function for a key. It looks in memory, then in the
cache directory (``<uri>.so`` plus ``<uri>.json``), and only then generates and compiles, which needs
TVM's compiler. A process with TVM's runtime alone (``TVM_USE_RUNTIME_LIB=1``, or a deployment
without ``libtvm_compiler.so``) serves every kernel that ``tvm-attn build`` put in the directory and
raises :class:`KernelNotBuiltError`, naming the command to run, for the others.

The default directory is ``$TVM_ATTN_CACHE_DIR``, else ``~/.cache/tvm_attn/<version>-<digest>``,
where the digest covers this package's sources, so an edited generator never meets stale kernels.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import tvm

from . import __version__
from .config import AttentionKey, MergeKey


class KernelNotBuiltError(RuntimeError):
    """A kernel is missing from the cache and this process cannot compile it."""


def build_command(key, directory) -> str:
    """The ``tvm-attn build`` command that builds exactly ``key`` into ``directory``."""
    spec = key_spec(key)
    if spec is None:
        return (f"tvm-attn build --kernels <a JSON spec of {key.uri}, with your variant as "
                f"\"package.module:ClassName\"> -o {directory}")
    text = json.dumps(spec, separators=(",", ":"))
    return f"tvm-attn build --kernels '{text}' -o {directory}"


def key_spec(key) -> dict | None:
    """The ``--kernels`` spec of ``key`` (checked to give back the same kernel), or None when its
    variant has no spec (a user variant)."""
    from .config import PlannerKey, key_from_spec
    from .kv.formats import BlockSparseKV, PagedKV

    if isinstance(key, PlannerKey):
        return None
    if isinstance(key, MergeKey):
        spec = {"merge": key.op, "dtype": key.dtype, "target": key.target}
    else:
        variant = _variant_spec(key.variant)
        if variant is None:
            return None
        fmt = ("paged" if isinstance(key.kv, PagedKV)
               else "bsr" if isinstance(key.kv, BlockSparseKV) else "ragged")
        spec = {"kind": key.kind, "kv": {"format": fmt, **vars(key.kv)}, "num_qo_heads": key.num_qo_heads,
                "num_kv_heads": key.num_kv_heads, "head_dim": key.head_dim, "q_dtype": key.q_dtype,
                "kv_dtype": key.kv_dtype, "target": key.target}
        if variant != "default":
            spec["variant"] = variant
        if key.schedule != "default":
            spec["schedule"] = key.schedule
    try:
        same = key_from_spec(dict(spec)).uri == key.uri
    except Exception:  # noqa: BLE001 - a spec that does not rebuild the key is no hint
        same = False
    return spec if same else None


#: the constructor arguments of the built-in variants, from the attributes that keep them
_VARIANT_ARGS = {"sliding_window": {"window_left": "_window_left"}, "logits_soft_cap": {"cap": "_cap"},
                 "sigmoid": {"bias": "_bias"}}


def _variant_spec(variant):
    from .variants import BUILTIN

    if hasattr(variant, "spec"):
        return variant.spec()
    parts = getattr(variant, "parts", None)
    if parts is not None:
        specs = [_variant_spec(p) for p in parts]
        return None if any(s is None for s in specs) else specs
    names = [n for n, cls in BUILTIN.items() if type(variant) is cls]
    if not names:
        return None
    name = names[0]
    if name == "rope":
        return {"name": "rope", "style": variant.style, "rope_scale": variant._scale,
                "rope_theta": variant._theta, **{k: v for k, v in variant.config().items() if k != "style"}}
    args = {arg: getattr(variant, attr) for arg, attr in _VARIANT_ARGS.get(name, {}).items()}
    return {"name": name, **args} if args else name


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """sha256 (12 hex digits) of the package's Python sources."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def compiler_available() -> bool:
    """Whether this process may generate and compile kernels."""
    if os.environ.get("TVM_ATTN_NO_COMPILE", "0") == "1":
        return False
    return not tvm.base._RUNTIME_ONLY


def default_cache_dir() -> Path:
    env = os.environ.get("TVM_ATTN_CACHE_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tvm_attn" / f"{__version__}-{source_digest()}"


class KernelCache:
    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self._functions: dict[str, object] = {}
        self._lock = threading.Lock()
        #: seconds spent generating + compiling, by uri (this process only)
        self.build_seconds: dict[str, float] = {}

    def name(self, key) -> str:
        """The file name (without ``.so``) of ``key``'s module: its uri, and for a CPU key built for
        this host's CPU that CPU's tag (:mod:`tvm_attn.cpu_target`), so that kernels compiled for one
        CPU's features are never loaded on another."""
        from .cpu_target import cache_tag

        tag = cache_tag() if key.target == "llvm" else None
        return key.uri if tag is None else f"{key.uri}_{tag}"

    def path(self, key) -> Path:
        return self.directory / f"{self.name(key)}.so"

    def get(self, key: AttentionKey | MergeKey, name: str | None = None):
        """The function ``name`` (default: the kernel ``key.uri``) of ``key``'s module, building the
        module on a miss when a compiler is available."""
        return self.module(key)[name or key.uri]

    def module(self, key: AttentionKey | MergeKey):
        """``key``'s loaded module (the kernel, and for CUDA its planner, decode plan and, for
        prefill, merge kernel)."""
        name = self.name(key)
        mod = self._functions.get(name)
        if mod is not None:
            return mod
        with self._lock:
            mod = self._functions.get(name)
            if mod is None:
                path = self.path(key)
                portable = self.directory / f"{key.uri}.so"  # built for the generic CPU: runs on any
                if path.exists():
                    pass
                elif compiler_available():
                    self._build(key)
                elif portable.exists():
                    path = portable
                else:
                    raise KernelNotBuiltError(
                        f"kernel {key.uri} is not in the cache {self.directory} and TVM's compiler is not "
                        f"available here; build it first, where TVM's compiler is, with "
                        f"`{build_command(key, self.directory)}`{_cpu_hint(key, name)}"
                    )
                if key.target.startswith("cuda"):
                    from .cuda_runtime import ensure_cuda

                    ensure_cuda(self.directory / "cubin")
                mod = tvm.runtime.load_module(str(path))
                self._functions[name] = mod
        return mod

    def build(self, key: AttentionKey | MergeKey, force: bool = False) -> float:
        """Build ``key`` into the directory (unless there already); return the seconds it took."""
        with self._lock:
            if self.path(key).exists() and not force:
                return 0.0
            return self._build(key)

    def _build(self, key) -> float:
        from .build import compile_key, cuda_source, kernel_target

        start = time.perf_counter()
        executable = compile_key(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        source = cuda_source(executable)
        ptxas = None
        if source is not None:  # compile the cubin here, so the GPU host needs no compiler
            from .cuda_runtime import precompile, ptxas_report

            ptxas = ptxas_report(precompile(source, key.target.partition(":")[2], self.directory / "cubin"))
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=self.directory)
        os.close(fd)
        try:
            executable.export_library(tmp)
            os.replace(tmp, self.path(key))  # atomic: readers never see half a library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        seconds = time.perf_counter() - start
        meta = {"uri": key.uri, "key": key.to_json(), "target": str(kernel_target(key)),
                "build_seconds": round(seconds, 4), "tvm_attn": __version__, "source_digest": source_digest(),
                "tvm": tvm.__version__}
        if ptxas is not None:  # registers, shared memory and spills of the cubin's kernels
            meta["ptxas"] = ptxas
        (self.directory / f"{self.name(key)}.json").write_text(json.dumps(meta, indent=1))
        self.build_seconds[key.uri] = seconds
        self._functions.pop(self.name(key), None)
        return seconds

    def entries(self) -> list[dict]:
        """Metadata of every kernel in the directory."""
        out = []
        for meta in sorted(self.directory.glob("*.json")):
            try:
                out.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue
        return out


def _cpu_hint(key, name: str) -> str:
    if name == key.uri:
        return ""
    return (f" (CPU kernels built for this host's CPU are filed as {name}.so; kernels built with "
            f"TVM_ATTN_CPU_TARGET=generic, {key.uri}.so, run on any CPU)")


_DEFAULT: dict[str, KernelCache] = {}


def get_cache(directory: str | os.PathLike | None = None) -> KernelCache:
    """The process-wide cache for ``directory`` (default: :func:`default_cache_dir`)."""
    path = str(Path(directory) if directory is not None else default_cache_dir())
    if path not in _DEFAULT:
        _DEFAULT[path] = KernelCache(path)
    return _DEFAULT[path]

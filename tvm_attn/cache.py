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

    def path(self, key) -> Path:
        return self.directory / f"{key.uri}.so"

    def get(self, key: AttentionKey | MergeKey, name: str | None = None):
        """The function ``name`` (default: the kernel ``key.uri``) of ``key``'s module, building the
        module on a miss when a compiler is available."""
        return self.module(key)[name or key.uri]

    def module(self, key: AttentionKey | MergeKey):
        """``key``'s loaded module (the kernel, and for CUDA its planner, decode plan and, for
        prefill, merge kernel)."""
        uri = key.uri
        mod = self._functions.get(uri)
        if mod is not None:
            return mod
        with self._lock:
            mod = self._functions.get(uri)
            if mod is None:
                path = self.path(key)
                if not path.exists():
                    if not compiler_available():
                        raise KernelNotBuiltError(
                            f"kernel {uri} is not in the cache {self.directory} and TVM's compiler is not "
                            f"available here; build it first with `tvm-attn build --target {key.target}` "
                            f"into that directory"
                        )
                    self._build(key)
                if key.target.startswith("cuda"):
                    from .cuda_runtime import ensure_cuda

                    ensure_cuda(self.directory / "cubin")
                mod = tvm.runtime.load_module(str(path))
                self._functions[uri] = mod
        return mod

    def build(self, key: AttentionKey | MergeKey, force: bool = False) -> float:
        """Build ``key`` into the directory (unless there already); return the seconds it took."""
        with self._lock:
            if self.path(key).exists() and not force:
                return 0.0
            return self._build(key)

    def _build(self, key) -> float:
        from .build import compile_key, cuda_source

        start = time.perf_counter()
        executable = compile_key(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        source = cuda_source(executable)
        if source is not None:  # compile the cubin here, so the GPU host needs no compiler
            from .cuda_runtime import precompile

            precompile(source, key.target.partition(":")[2], self.directory / "cubin")
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=self.directory)
        os.close(fd)
        try:
            executable.export_library(tmp)
            os.replace(tmp, self.path(key))  # atomic: readers never see half a library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        seconds = time.perf_counter() - start
        meta = {"uri": key.uri, "key": key.to_json(), "build_seconds": round(seconds, 4),
                "tvm_attn": __version__, "source_digest": source_digest(), "tvm": tvm.__version__}
        (self.directory / f"{key.uri}.json").write_text(json.dumps(meta, indent=1))
        self.build_seconds[key.uri] = seconds
        self._functions.pop(key.uri, None)
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


_DEFAULT: dict[str, KernelCache] = {}


def get_cache(directory: str | os.PathLike | None = None) -> KernelCache:
    """The process-wide cache for ``directory`` (default: :func:`default_cache_dir`)."""
    path = str(Path(directory) if directory is not None else default_cache_dir())
    if path not in _DEFAULT:
        _DEFAULT[path] = KernelCache(path)
    return _DEFAULT[path]

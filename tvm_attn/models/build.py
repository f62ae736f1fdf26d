"""``tvm-attn build-model``: compile a model, with our kernels, into one deployable library.

Writes ``<name>.so`` (the Relax VM executable: the model's functions, our attention kernels in the KV
cache's slots, TVM's page kernels) and ``<name>.json`` (the config, the weight names in call order
and where the weights come from). For CUDA targets the cubin of the library's CUDA source is
compiled here too (``cubin/`` beside the library), so a GPU host with TVM's runtime alone loads it
with no compiler (:func:`tvm_attn.cuda_runtime.ensure_cuda`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..progress import Progress

STEPS = ["generate", "compile", "export", "cubin"]


def build_model(config_name: str, target: str, output, *, safetensors=None, seed: int = 0, variant=None,
                kv_cache: str = "tvm_attn", progress: bool = True, **overrides) -> dict:
    """Build ``config_name`` (``tiny`` or ``llama3-8b``) for ``target`` into ``output`` (a ``.so`` path).

    ``safetensors``: local weight file(s) recorded for the runner (no download); default random
    weights from ``seed``. ``kv_cache``: ``"tvm_attn"`` or ``"tvm_builtin"`` (TVM's ``TIRPagedKVCache``,
    the baseline). ``overrides``: LlamaConfig fields (e.g. ``num_hidden_layers=2``).
    Returns the metadata written beside the library.
    """
    import tvm

    from ..build import target_of
    from ..relax.kv_cache import slot_sources
    from ..variants import compose, variant_from_spec
    from .llama import get_config

    output = Path(output)
    if output.suffix != ".so":
        raise ValueError(f"output: the library path must end in .so, got {output}")
    config = get_config(config_name, variant=variant_from_spec(variant), **overrides)
    if kv_cache == "tvm_attn":  # refuse a variant the cache cannot run before anything is generated
        from ..tir.abi import fixed_scalars

        fixed_scalars(compose(config.variant))
    elif compose(config.variant).uri() != "default":
        raise ValueError(f"variant: TVM's TIRPagedKVCache (kv_cache={kv_cache!r}) runs no variant, got "
                         f"{compose(config.variant).uri()!r}")
    tvm_target = _schedule_target(target_of(target))
    if safetensors:
        paths = [str(Path(p).resolve()) for p in ([safetensors] if isinstance(safetensors, (str, os.PathLike))
                                                  else safetensors)]
        for p in paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"safetensors: {p} does not exist")
        weights = {"kind": "safetensors", "paths": paths}
    else:
        weights = {"kind": "random", "seed": int(seed)}
    steps = STEPS if target.startswith("cuda") else STEPS[:-1]
    stream = None if progress else open(os.devnull, "w")
    output.parent.mkdir(parents=True, exist_ok=True)
    with Progress(steps, stream=stream) as bar:
        bar.step("generate")
        from .llama import build_module

        mod, names = build_module(config, target, kv_cache)
        bar.step("compile")
        # nn.Linear is matmul(x, permute_dims(w)): fused here into one NT matmul (as MLC-LLM's pipeline
        # does), else every step would transpose every weight in a kernel of its own
        mod = tvm.relax.transform.FuseTransposeMatmul()(mod)
        executable = tvm.compile(mod, target=tvm_target)
        bar.step("export")
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=output.parent)
        os.close(fd)
        try:
            executable.export_library(tmp)
            os.replace(tmp, output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        cubin = None
        if target.startswith("cuda"):
            bar.step("cubin")
            from ..cuda_runtime import precompile

            source = _cuda_source(executable.mod)
            path = precompile(source, target.partition(":")[2], output.parent / "cubin") if source else None
            cubin = str(path) if path else None
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k != "variant"}
    meta = {
        "config_name": config_name, "config": cfg, "variant": compose(config.variant).uri(),
        "variant_spec": variant_spec(config.variant),
        "target": target, "param_names": names, "weights": weights, "kv_cache": kv_cache,
        "kv_cache_slots": slot_sources(target) if kv_cache == "tvm_attn" else slot_sources("tvm_builtin"),
        "cubin": cubin, "build_seconds": {k: round(v, 3) for k, v in bar.seconds.items()},
    }
    output.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    if stream is not None:
        stream.close()
    return meta


def variant_spec(variant):
    """The JSON spec :func:`tvm_attn.variants.variant_from_spec` rebuilds ``variant`` from (the numpy
    reference of ``run_model.py --check`` needs it), or None where it cannot be written down: a class
    that is not importable by name, or constructor arguments the instance does not keep."""
    import inspect

    from ..variants import BUILTIN, AttentionVariant, ComposedVariant, compose, variant_from_spec

    variant = compose(variant)
    if isinstance(variant, ComposedVariant):
        parts = [variant_spec(p) for p in variant.parts]
        return None if None in parts else parts
    cls = type(variant)
    if cls is AttentionVariant:
        return "default"
    names = [n for n, c in BUILTIN.items() if c is cls]
    name = names[0] if names else f"{cls.__module__}:{cls.__qualname__}"
    if not names and (cls.__module__ == "__main__" or "." in cls.__qualname__):
        return None
    spec = {"name": name}
    for arg in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD):
            return None
        for attr in (arg.name, "_" + arg.name):
            if hasattr(variant, attr):
                spec[arg.name] = getattr(variant, attr)
                break
        else:
            return None
    try:
        json.dumps(spec)
        rebuilt = variant_from_spec(spec)
    except (TypeError, ValueError, ImportError, AttributeError):
        return None
    return spec if _scalars(rebuilt) == _scalars(variant) and rebuilt.uri() == variant.uri() else None


def _scalars(variant) -> list:
    return [(p.name, getattr(p, "default", None)) for p in variant.extra_params()]


def _schedule_target(target):
    """The target the model compiles for. TVM 0.27's dlight reads the CUDA arch as an integer, so
    ``sm_90a`` disables its tensor-core matmul schedule (``check_sm_version`` returns -1) and every
    GEMM of the model falls back to CUDA cores (measured on an H100: ~100 ms per Llama-8B decode step).
    The model is therefore compiled for the arch without its feature suffix (``sm_90``): the CUDA
    source is the same, and the cubin is still built for the arch asked for (``cubin`` step)."""
    import tvm

    if target.kind.name != "cuda":
        return target
    arch = str(target.attrs.get("arch", ""))
    base = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
    if base == arch:
        return target
    config = {"kind": "cuda", "arch": base}
    return tvm.target.Target(config, host=target.host)


def _cuda_source(mod) -> str | None:
    """The CUDA source anywhere in the module tree (a Relax executable nests it under its host library)."""
    if mod.kind == "cuda":
        return mod.inspect_source()
    for sub in mod.imports:
        found = _cuda_source(sub)
        if found is not None:
            return found
    return None


def save_params(library, weights: dict | None = None) -> Path:
    """Write the model's weights beside ``library`` as ``<name>.params`` for C++ callers: TVM's param
    dict format (``runtime.LoadParamsFromFile``) with the keys ``param_0000``, ... in call order.
    ``weights``: default the ones ``<name>.json`` records (random from its seed, or its safetensors)."""
    import tvm

    from .runtime import ModelSession

    library = Path(library)
    meta = json.loads(library.with_suffix(".json").read_text())
    if weights is None:
        weights = ModelSession.default_weights_of(meta)
    names = meta["param_names"]
    if names[0] != "model.embed_tokens.weight":
        raise AssertionError(f"the C++ example reads the vocabulary from the first weight; it is {names[0]}")
    path = library.with_suffix(".params")
    tvm.runtime.save_param_dict_to_file(
        {f"param_{i:04d}": tvm.runtime.tensor(np.asarray(weights[n])) for i, n in enumerate(names)},
        str(path))
    return path

"""Command line: ``tvm-attn demo`` (the main job), ``tvm-attn build`` (precompile kernels),
``tvm-attn build-model`` (compile a model with our kernels into one library) and ``tvm-attn tune``
(per-GPU tuned schedules, :mod:`tvm_attn.tuning`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


class UsageError(ValueError):
    """A mistake in the command line: ``main`` prints it as one line and exits with status 2."""


def _positive(name: str, value: int, allow_zero: bool = False) -> int:
    if value < (0 if allow_zero else 1):
        raise UsageError(f"{name}: must be {'>= 0' if allow_zero else 'a positive integer'}, got {value}")
    return value


def parse_prompt_lens(text: str) -> tuple[int, ...]:
    """``"1,37,128"`` -> (1, 37, 128): positive integers."""
    try:
        lens = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--prompt-lens: expected comma-separated positive integers, got {text!r}") from None
    if any(n < 1 for n in lens):
        raise UsageError(f"--prompt-lens: every prompt length must be >= 1, got {text!r}")
    return lens


def load_kernel_specs(arg: str, target: str, gpu: str | None = None) -> list:
    """``--kernels``: a JSON list of kernel specs (or one spec) inline, or the path of a file that
    holds one -> their keys (``target`` for specs without one, the tuned schedules of ``gpu`` for
    specs without a schedule); a UsageError names the spec and what is wrong with it
    (:func:`tvm_attn.config.key_from_spec` checks the keys)."""
    from .config import key_from_spec
    from .registry import family_of

    inline = arg.lstrip().startswith(("[", "{"))
    where = "--kernels" if inline else f"--kernels {arg}"
    if inline:
        text = arg
    else:
        try:
            with open(arg) as f:
                text = f.read()
        except OSError as err:
            raise UsageError(f"--kernels: cannot read {arg!r} ({err.strerror or err}); "
                             "give a JSON file or inline JSON")
    try:
        specs = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON ({err})") from None
    specs = [specs] if isinstance(specs, dict) else specs
    if not isinstance(specs, list):
        raise UsageError(f"{where}: must hold a JSON list of kernel specs, got {type(specs).__name__}")
    keys = []
    for i, spec in enumerate(specs):  # every spec checked before the first build
        try:
            key = key_from_spec({"target": target, **spec} if isinstance(spec, dict) else spec, gpu=gpu)
            family_of(key)  # raises if no family builds it
        except (ValueError, TypeError) as err:
            raise UsageError(f"{where}: spec {i}: {err}") from None
        keys.append(key)
    return keys


def _best_device() -> str:
    """The best device this build has kernels for. The CUDA kernels are not in this build, so: the CPU."""
    return "cpu"


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(decode_steps=args.decode_steps, num_layers=args.layers, dtype=args.dtype,
                     kv_layout=args.kv_layout)
    if args.prompt_lens:
        cfg.prompt_lens = parse_prompt_lens(args.prompt_lens)
    device = _best_device() if args.device == "auto" else args.device
    rows = run_demo(cfg, device=device)
    tol = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-4}[cfg.dtype]
    worst = max(r["max_abs_err"] for r in rows)
    if worst > tol:
        print(f"FAILED: max error {worst:.3e} exceeds {tol:.0e}", file=sys.stderr)
        return 1
    print(f"all outputs match the reference (max error {worst:.2e} <= {tol:.0e})")
    return 0


def demo_kernel_specs(dtype: str = "float16", kv_layout: str = "NHD") -> list[dict]:
    """The kernels ``tvm-attn demo`` uses."""
    kv = {"format": "paged", "page_size": 16, "layout": kv_layout}
    common = {"kv": kv, "num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "q_dtype": dtype}
    return [{"kind": "decode", **common}, {"kind": "prefill", "variant": "causal", **common}]


def cmd_build(args) -> int:
    from .cache import KernelCache, compiler_available

    if not compiler_available():
        print("tvm-attn build: TVM's compiler is not available in this process", file=sys.stderr)
        return 2
    keys = load_kernel_specs(args.kernels or json.dumps(demo_kernel_specs()), args.target, args.gpu)
    cache = KernelCache(args.output) if args.output else KernelCache()
    print(f"building {len(keys)} kernels for {args.target} into {cache.directory}")
    total = time.perf_counter()
    for i, key in enumerate(keys):
        seconds = cache.build(key, force=args.force)
        status = f"{seconds:6.2f} s" if seconds else "  cached"
        print(f"[{i + 1:>3}/{len(keys)}] {status}  {key.uri}")
    print(f"done in {time.perf_counter() - total:.2f} s")
    return 0


def cmd_build_model(args) -> int:
    from .cache import compiler_available
    from .models.build import build_model

    if not compiler_available():
        print("tvm-attn build-model: TVM's compiler is not available in this process", file=sys.stderr)
        return 2
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    variant = args.variant
    if variant and variant.lstrip().startswith(("[", "{")):
        try:
            variant = json.loads(variant)
        except json.JSONDecodeError as err:
            raise UsageError(f"--variant: not valid JSON ({err})") from None
    meta = build_model(args.config, args.target, args.output, safetensors=args.safetensors or None,
                       seed=args.seed, variant=variant, progress=not args.quiet, **overrides)
    if args.save_params:
        from .models.build import save_params

        print(f"wrote {save_params(args.output)}")
    ours = [slot for slot, src in meta["kv_cache_slots"].items() if src == "tvm_attn"]
    print(f"wrote {args.output} and its .json ({meta['config_name']}, {args.target}); "
          f"KV-cache slots with tvm_attn kernels: {', '.join(ours) or 'none'}")
    return 0


def cmd_tune(args) -> int:
    from .tuning import main_from_args

    main_from_args(args, " ".join(["tvm-attn", *sys.argv[1:]]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tvm-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prefill + decode of a small Llama-shaped batch, checked against numpy")
    d.add_argument("--device", default="auto", help="auto (best available) or cpu")
    d.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    d.add_argument("--kv-layout", default="NHD", choices=["NHD", "HND"])
    d.add_argument("--decode-steps", type=int, default=4)
    d.add_argument("--layers", type=int, default=2)
    d.add_argument("--prompt-lens", default="", help="comma-separated prompt lengths, e.g. 1,37,128,260")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("build", help="precompile kernels into a cache directory for runtime-only processes")
    b.add_argument("--kernels", help="kernel specs: a JSON file, or inline JSON (a spec or a list of them); "
                                     "default: the demo's kernels")
    b.add_argument("--target", default="llvm",
                   help="llvm or cuda:<arch>, e.g. cuda:sm_90a (for specs without one)")
    b.add_argument("-o", "--output", help="cache directory (default: the user cache)")
    b.add_argument("--force", action="store_true", help="rebuild kernels already in the directory")
    b.add_argument("--gpu", help="the GPU the kernels are for, e.g. 'NVIDIA H200': its tuned schedules "
                                 "(tvm_attn.schedule.tuned; default: $TVM_ATTN_GPU, else hand-written)")
    b.set_defaults(func=cmd_build)
    m = sub.add_parser("build-model",
                       help="compile a Llama-architecture model with our kernels into one library")
    m.add_argument("--config", default="tiny", help="tiny (CI) or llama3-8b")
    m.add_argument("--target", default="llvm", help="llvm or cuda:<arch>, e.g. cuda:sm_90a")
    m.add_argument("-o", "--output", required=True, help="the library to write, e.g. model.so (+ model.json)")
    m.add_argument("--safetensors", nargs="*",
                   help="local weight files (Hugging Face Llama naming); default random")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    m.add_argument("--variant",
                   help='attention variant spec, e.g. \'{"name": "logits_soft_cap", "cap": 30}\'')
    m.add_argument("--layers", type=int,
                   help="override the number of layers (e.g. a short llama3-8b for tests)")
    m.add_argument("--save-params", action="store_true",
                   help="also write the weights as <output>.params (C++)")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_build_model)
    from .tuning import add_arguments

    t = sub.add_parser("tune", help="time the candidate schedules of a kernel family on a GPU "
                                    "into a tuned table (--build here, then --run on the GPU host)")
    add_arguments(t)
    t.set_defaults(func=cmd_tune)
    args = parser.parse_args(argv)
    np.set_printoptions(precision=4)
    try:
        _check_args(args)
        return args.func(args)
    except (ValueError, TypeError, KeyError) as err:
        # a bad argument or spec (the library's errors name the argument): one line, no traceback
        text = str(err) if not isinstance(err, KeyError) else f"missing key {err}"
        print(f"tvm-attn {args.command}: error: {text}", file=sys.stderr)
        return 2


def _check_args(args) -> None:
    """Range checks argparse's types do not do."""
    if args.command == "demo":
        _positive("--layers", args.layers)
        _positive("--decode-steps", args.decode_steps, allow_zero=True)
    if args.command == "build-model" and args.layers is not None:
        _positive("--layers", args.layers)
    if args.command == "tune":
        _positive("--jobs", args.jobs)


if __name__ == "__main__":
    sys.exit(main())

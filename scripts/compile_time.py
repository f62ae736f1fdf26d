"""How long a new variant takes to generate and compile (the JIT cost a user pays once per kernel).

Usage: python scripts/compile_time.py [--small]
"""

from __future__ import annotations

import argparse
import time

import tvm

import tvm_attn as ta
from tvm_attn.build import generate, target_of
from tvm_attn.config import AttentionKey


class Temperature(ta.AttentionVariant):
    scalars = (ta.ScalarParam("temperature", "float32", default=1.0),)

    def logits_transform(self, ctx, logits):
        return logits / ctx["temperature"]


def measure(key: AttentionKey) -> tuple[float, float]:
    t0 = time.perf_counter()
    mod = generate(key)
    t1 = time.perf_counter()
    tvm.compile(mod, target=target_of(key.target))
    return t1 - t0, time.perf_counter() - t1


def main(small: bool = False) -> list[dict]:
    variants = [ta.AttentionVariant(), Temperature(), ta.Causal() + ta.SlidingWindow(), ta.RoPE("llama3.1"),
                ta.CustomMask() + ta.ALiBi(), ta.SigmoidAttention()]
    kinds = [("decode", ta.PagedKV(16)), ("prefill", ta.PagedKV(16)), ("prefill", ta.RaggedKV())]
    if small:
        variants, kinds = variants[:2], kinds[:1]
    rows = []
    print(f"{'kind':<8}{'kv':<12}{'variant':<40}{'generate ms':>12}{'compile ms':>12}")
    for kind, kv in kinds:
        for v in variants:
            key = AttentionKey(kind, kv, 32, 8, 128, "float16", "float16", v)
            gen, comp = measure(key)
            rows.append({"kind": kind, "kv": kv.uri(), "variant": v.uri(), "generate_s": gen,
                         "compile_s": comp})
            print(f"{kind:<8}{kv.uri():<12}{v.uri()[:38]:<40}{gen * 1e3:>12.1f}{comp * 1e3:>12.1f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", action="store_true")
    main(parser.parse_args().small)

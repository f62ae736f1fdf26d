"""The main job: a small Llama-shaped serving step, prefill then decode, checked against the reference.

A batch of requests with mixed prompt lengths lives in a paged KV cache (shuffled pages). Each step
plans once and runs the attention of every layer with that plan, as a serving engine does; every
output is compared with :mod:`tvm_attn.reference`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import reference
from .api import BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper
from .cache import get_cache
from .kv.formats import PagedKV


@dataclass
class DemoConfig:
    """Llama-3-8B attention shapes (32 query / 8 KV heads, head_dim 128), fewer layers and tokens."""

    prompt_lens: tuple[int, ...] = (1, 37, 128, 260)
    decode_steps: int = 4
    num_layers: int = 2
    num_qo_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "float16"
    kv_layout: str = "NHD"
    seed: int = 0
    rows: list = field(default_factory=list)


def _pages_for(n: int, page_size: int) -> int:
    return (n + page_size - 1) // page_size


class PagedCache:
    """Per-layer paged caches plus the page table of each request (host side, numpy)."""

    def __init__(self, cfg: DemoConfig, rng: np.random.Generator):
        self.cfg = cfg
        max_tokens = [n + cfg.decode_steps for n in cfg.prompt_lens]
        num_pages = sum(_pages_for(n, cfg.page_size) for n in max_tokens) + 3
        self.free = list(rng.permutation(num_pages))  # shuffled: pages of a request are scattered
        shape = PagedKV(cfg.page_size, cfg.kv_layout).cache_shape(num_pages, cfg.num_kv_heads, cfg.head_dim)
        self.layers = [np.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)]
        self.pages: list[list[int]] = [[] for _ in cfg.prompt_lens]
        self.lens = [0 for _ in cfg.prompt_lens]

    def append(self, layer: int, b: int, k: np.ndarray, v: np.ndarray) -> None:
        """Append ``k``/``v`` ``[n, Hkv, D]`` to request ``b`` of ``layer`` (page allocation on layer 0)."""
        S = self.cfg.page_size
        start = self.lens[b] - (len(k) if layer > 0 else 0)
        for t in range(len(k)):
            pos = start + t
            if layer == 0 and pos // S >= len(self.pages[b]):
                self.pages[b].append(int(self.free.pop()))
            page, slot = self.pages[b][pos // S], pos % S
            cache = self.layers[layer]
            if self.cfg.kv_layout == "NHD":
                cache[page, 0, slot], cache[page, 1, slot] = k[t], v[t]
            else:
                cache[page, 0, :, slot], cache[page, 1, :, slot] = k[t], v[t]
        if layer == 0:
            self.lens[b] += len(k)

    def table(self):
        S = self.cfg.page_size
        indptr = np.cumsum([0] + [len(p) for p in self.pages]).astype(np.int32)
        indices = np.asarray([p for ps in self.pages for p in ps], np.int32)
        last = np.asarray([n - (len(p) - 1) * S if p else 0 for n, p in zip(self.lens, self.pages)], np.int32)
        return indptr, indices, last


def run_demo(cfg: DemoConfig | None = None, device: str = "cpu", out=print) -> list[dict]:
    cfg = cfg or DemoConfig()
    rng = np.random.default_rng(cfg.seed)
    cache = PagedCache(cfg, rng)
    Hq, Hkv, D = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
    kcache = get_cache()
    rows = []

    def step(name, wrapper, qo_indptr, new_tokens):
        # new K/V of every layer go into the cache first, as a model appends before attention
        qs = []
        for layer in range(cfg.num_layers):
            for b, n in enumerate(new_tokens):
                k = rng.standard_normal((n, Hkv, D)).astype(cfg.dtype)
                v = rng.standard_normal((n, Hkv, D)).astype(cfg.dtype)
                cache.append(layer, b, k, v)
            qs.append(rng.standard_normal((sum(new_tokens), Hq, D)).astype(cfg.dtype))
        indptr, indices, last = cache.table()
        t0 = time.perf_counter()
        before = dict(kcache.build_seconds)
        plan_args = (indptr, indices, last, Hq, Hkv, D, cfg.page_size)
        if qo_indptr is None:
            wrapper.plan(*plan_args, q_data_type=cfg.dtype)
        else:
            wrapper.plan(qo_indptr, *plan_args, causal=True, q_data_type=cfg.dtype)
        plan_s = time.perf_counter() - t0
        compile_s = sum(v for k, v in kcache.build_seconds.items() if k not in before)
        run_s, err, lse_err = 0.0, 0.0, 0.0
        for layer in range(cfg.num_layers):
            t0 = time.perf_counter()
            o, lse = wrapper.run(qs[layer], cache.layers[layer], return_lse=True)
            run_s += time.perf_counter() - t0
            ref_o, ref_lse = reference.paged_attention(
                qs[layer], qo_indptr, cache.layers[layer], indptr, indices, last, cfg.kv_layout,
                causal=qo_indptr is not None,
            )
            err = max(err, float(np.abs(o.astype(np.float32) - ref_o).max()))
            finite = np.isfinite(ref_lse)
            lse_err = max(lse_err, float(np.abs(lse[finite] - ref_lse[finite]).max(initial=0)))
        tokens = int(sum(new_tokens))
        row = {"step": name, "kernel": wrapper.kernel_key.uri, "requests": len(new_tokens),
               "q_tokens": tokens, "kv_tokens": int(sum(cache.lens)), "max_abs_err": err, "lse_err": lse_err,
               "plan_ms": (plan_s - compile_s) * 1e3, "compile_s": compile_s,
               "run_ms_per_layer": run_s / cfg.num_layers * 1e3}
        rows.append(row)
        return row

    prefill = BatchPrefillWithPagedKVCacheWrapper(cfg.kv_layout, device=device)
    qo_indptr = np.cumsum([0, *cfg.prompt_lens]).astype(np.int32)
    step("prefill", prefill, qo_indptr, list(cfg.prompt_lens))
    decode = BatchDecodeWithPagedKVCacheWrapper(cfg.kv_layout, device=device)
    for i in range(cfg.decode_steps):
        step(f"decode {i + 1}", decode, None, [1] * len(cfg.prompt_lens))
    _print_table(rows, cfg, device, out)
    return rows


def _print_table(rows, cfg: DemoConfig, device: str, out) -> None:
    out(
        f"tvm_attn demo on {device}: {len(cfg.prompt_lens)} requests, prompts {list(cfg.prompt_lens)}, "
        f"{cfg.num_qo_heads}/{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}, {cfg.dtype}, "
        f"page {cfg.page_size} ({cfg.kv_layout}), {cfg.num_layers} layers"
    )
    head = (f"{'step':<10}{'q tok':>7}{'kv tok':>8}{'max|err|':>11}{'lse err':>10}{'plan ms':>9}"
            f"{'compile s':>11}{'run ms/layer':>14}")
    out(head)
    out("-" * len(head))
    for r in rows:
        out(
            f"{r['step']:<10}{r['q_tokens']:>7}{r['kv_tokens']:>8}{r['max_abs_err']:>11.2e}{r['lse_err']:>10.2e}"
            f"{r['plan_ms']:>9.2f}{r['compile_s']:>11.2f}{r['run_ms_per_layer']:>14.2f}"
        )
    out("kernels: " + ", ".join(sorted({r["kernel"] for r in rows})))

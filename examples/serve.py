"""Serve decode steps from precompiled kernels, in a process that has TVM's runtime only.

    tvm-attn build -o kernels/ --kernels my_kernels.json       # where TVM's compiler is
    TVM_ATTN_CACHE_DIR=kernels/ TVM_USE_RUNTIME_LIB=1 python examples/serve.py

my_kernels.json must list the kernel this plans: a paged decode over NHD pages of 16 tokens, 32 query
and 8 KV heads, head_dim 128, float16 (the README's list). A kernel missing from kernels/ raises
KernelNotBuiltError naming the command that builds it. Each step is checked against numpy.
"""

import numpy as np

import tvm_attn as ta
from tvm_attn import reference

rng = np.random.default_rng(0)
pages, page_size, num_qo_heads, num_kv_heads, head_dim = 64, 16, 32, 8, 128
cache = rng.standard_normal((pages, 2, page_size, num_kv_heads, head_dim)).astype(np.float16)   # NHD pages
w = ta.BatchDecodeWithPagedKVCacheWrapper("NHD")
lengths = [37, 90, 5]                                         # tokens in each request's pages
for step in range(3):                                          # each step: plan once, then run (every layer)
    num_pages = [(n + page_size - 1) // page_size for n in lengths]
    kv_indptr = np.cumsum([0] + num_pages).astype(np.int32)
    kv_indices = rng.permutation(pages)[: kv_indptr[-1]].astype(np.int32)
    kv_last_page_len = np.array([n - (p - 1) * page_size for n, p in zip(lengths, num_pages)], np.int32)
    w.plan(kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size)
    q = rng.standard_normal((len(lengths), num_qo_heads, head_dim)).astype(np.float16)
    o = w.run(q, cache)
    ref, _ = reference.paged_attention(q, None, cache, kv_indptr, kv_indices, kv_last_page_len)
    err = float(np.abs(o.astype(np.float32) - ref).max())
    assert err <= 2e-3 * (1 + np.abs(ref).max()), f"step {step}: max |o - numpy| = {err:.2e}"
    print(f"step {step}: {len(lengths)} requests, {sum(lengths)} keys, max |o - numpy| {err:.1e}")
    lengths = [n + 1 for n in lengths]                          # each request decoded one token
print("ok")

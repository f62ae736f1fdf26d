"""The CUDA decode configurations the gpu tier checks (and that scripts/build_gpu_kernels.py builds).

One base (fp16, head_dim 128, 32/8 heads, page 16, NHD) and one axis changed at a time, rather
than a full cross product: every layout, page size, dtype, head_dim, head grouping and variant.
"""

from __future__ import annotations

import numpy as np

import tvm_attn as ta

BASE = dict(layout="NHD", page_size=16, dtype="float16", head_dim=128, heads=(32, 8), variant="default")


def variant_of(name: str):
    return {
        "default": None,
        "rope": ta.RoPE(),
        "rope31": ta.RoPE("llama3.1"),
        "window": ta.SlidingWindow(),
        "softcap": ta.LogitsSoftCap(),
        "alibi": ta.ALiBi(),
        "custom_mask": ta.CustomMask(),
        "sigmoid": ta.SigmoidAttention(),
        "window_softcap": ta.SlidingWindow() + ta.LogitsSoftCap(),
    }[name]


def page_table(rng, kv_lens, page_size, spare: int = 5):
    """A shuffled page table for ``kv_lens`` in a cache of ``spare`` more pages than it uses:
    (kv_indptr, kv_indices, kv_last_page_len, num_pages)."""
    pages = [(n + page_size - 1) // page_size for n in kv_lens]
    indptr = np.cumsum([0] + pages).astype(np.int32)
    num_pages = int(indptr[-1]) + spare
    indices = rng.permutation(num_pages)[: indptr[-1]].astype(np.int32)
    last = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)], np.int32)
    return indptr, indices, last, num_pages


def _cases():
    out = [dict(BASE)]
    for axis, values in [
        ("layout", ["HND"]), ("page_size", [1, 8, 32]), ("dtype", ["bfloat16"]), ("head_dim", [64, 256]),
        ("heads", [(32, 32), (8, 1), (64, 8), (12, 4)]),
        ("variant", ["rope", "rope31", "window", "softcap", "alibi", "custom_mask", "sigmoid",
                     "window_softcap"]),
    ]:
        for v in values:
            out.append({**BASE, axis: v})
    return out


CASES = _cases()


def case_id(c) -> str:
    return (f"{c['layout']}-p{c['page_size']}-{c['dtype']}-d{c['head_dim']}"
            f"-h{c['heads'][0]}x{c['heads'][1]}-{c['variant']}")


def key_of(c, target: str = "cuda:sm_90a", gpu: str | None = None):
    """The decode key of case ``c``: its ``schedule`` if it has one, else the registry's for ``gpu``
    (a wrapper's ``gpu``; None: ``$TVM_ATTN_GPU``, which ``build_gpu_kernels.py --gpu`` sets)."""
    from tvm_attn.config import AttentionKey
    from tvm_attn.registry import scheduled
    from tvm_attn.variants import AttentionVariant

    (hq, hkv), variant = c["heads"], variant_of(c["variant"]) or AttentionVariant()
    key = AttentionKey("decode", ta.PagedKV(c["page_size"], c["layout"]), hq, hkv, c["head_dim"], c["dtype"],
                       c["dtype"], variant, target, c.get("schedule") or "default")
    return key if c.get("schedule") else scheduled(key, gpu=gpu)


#: cp.async ring schedules that no default picks, kept correct by the GPU tier (key_of's "schedule")
RING_SCHEDULES = {(32, 8): "w4u2g4b4s3", (32, 32): "w4u2g1b4s3"}


def capture_graph(run):
    """A CUDA graph of one ``run()``, captured on a side stream that TVM's calls follow; ``run`` is
    called once before, outside capture (it loads the module)."""
    import torch
    import tvm_ffi

    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), tvm_ffi.use_torch_stream():
        run()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            run()
    return graph

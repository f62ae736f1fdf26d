"""The CUDA prefill configurations the gpu tier checks (and that scripts/build_gpu_kernels.py builds).

One base (ragged NHD KV, fp16, head_dim 128, 32/8 heads, causal) and one axis changed at a time:
KV format and layout (paged page 16 and page 1, HND), dtype, head_dim, head grouping (MHA, group 8,
group 3), causal off, and every variant. The query tile follows the queries' lengths as the wrapper
picks it, so each test's lengths name the kernels it needs (:func:`build_keys`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

import tvm_attn as ta

from .cases import variant_of

BASE = dict(kv="ragged", layout="NHD", page_size=16, dtype="float16", head_dim=128, heads=(32, 8),
            causal=True, variant="default")

#: (qo_len, kv_len) per request: empty queries, one token, tile and page boundaries, append, a long
#: decode-like row, and a request whose keys are fewer than its queries (causal: early rows see nothing)
LENGTHS = [(0, 17), (1, 1), (17, 17), (130, 300), (1, 1000), (300, 300), (64, 64), (5, 0), (129, 1500)]
#: short queries (append of a few tokens: the one-warp 16-row tile) and medium ones (the 64-row tile)
SHORT = [(1, 500), (2, 100), (3, 1000), (0, 5), (2, 1)]
MEDIUM = [(10, 500), (12, 600), (17, 17), (9, 2000)]
#: one request with few query tiles and many keys: the planner cuts its tiles over the CTAs
LONG = [(64, 20000)]
#: lengths at the Hopper kernel's tile edges (128 query rows / 32 tokens of group 4, 128 keys),
#: an empty request and one with no keys
HOPPER_EDGES = [(128, 128), (127, 129), (129, 256), (0, 40), (32, 0), (255, 383), (256, 1024), (40, 4000)]
#: the Hopper kernel's own axes, each with backend="fa3": dtype, head_dim, grouping, causal, variants
HOPPER_CASES = [{**BASE, **change} for change in (
    {}, {"causal": False}, {"dtype": "bfloat16"}, {"head_dim": 64}, {"head_dim": 256}, {"heads": (32, 32)},
    {"heads": (64, 4)}, {"layout": "HND"}, {"variant": "softcap"}, {"variant": "window"},
    {"variant": "alibi"}, {"variant": "custom_mask"}, {"variant": "sigmoid"},
    # paged KV: page-sized TMA boxes, a page longer than the tile, and a window's first key mid-page
    {"kv": "paged"}, {"kv": "paged", "layout": "HND"}, {"kv": "paged", "layout": "HND", "page_size": 256},
    {"kv": "paged", "variant": "window"},
    # the gather producer (cp.async through the page table): one-key pages at every head_dim, pages
    # that are not a power of two, a window over one-key pages
    {"kv": "paged", "page_size": 1}, {"kv": "paged", "page_size": 1, "head_dim": 64},
    {"kv": "paged", "page_size": 1, "head_dim": 256}, {"kv": "paged", "page_size": 12, "layout": "HND"},
    {"kv": "paged", "page_size": 1, "variant": "window"},
    {"kv": "paged", "page_size": 1, "dtype": "bfloat16"},
)]


def _cases():
    out = [dict(BASE)]
    for axis, values in [
        ("kv", ["paged"]), ("page_size", [1]), ("layout", ["HND"]), ("dtype", ["bfloat16"]),
        ("head_dim", [64, 256]), ("heads", [(32, 32), (64, 8), (12, 4)]), ("causal", [False]),
        ("variant", ["rope", "window", "softcap", "alibi", "custom_mask", "sigmoid"]),
    ]:
        for v in values:
            c = {**BASE, axis: v}
            if axis == "page_size":
                c["kv"] = "paged"
            out.append(c)
    out.append({**BASE, "kv": "paged", "layout": "HND"})
    return out


CASES = _cases()


def case_id(c) -> str:
    kv = c["kv"] + (str(c["page_size"]) if c["kv"] == "paged" else "")
    causal = "causal" if c["causal"] else "full"
    return (f"{kv}-{c['layout']}-{c['dtype']}-d{c['head_dim']}-h{c['heads'][0]}x{c['heads'][1]}"
            f"-{causal}-{c['variant']}")


def variant(c):
    v = variant_of(c["variant"])
    return ta.Causal() + v if c["causal"] and v is not None else (ta.Causal() if c["causal"] else v)


def packed_rows(c, lengths):
    """The wrapper's shape for the schedule choice: mean GQA-packed rows of the non-empty requests."""
    qo = np.array([q for q, _ in lengths])
    qo = qo[qo > 0]
    hq, hkv = c["heads"]
    return int(qo.mean() * (hq // hkv)) if qo.size else None


def key_of(c, lengths, target: str = "cuda:sm_90a", backend: str = "auto", schedule: str | None = None):
    """The key the wrapper plans for these lengths with ``backend`` (its ``backend`` argument), or
    with its schedule pinned to ``schedule`` (:func:`tvm_attn.api.prefill.pin_schedule`)."""
    from tvm_attn.api.prefill import BACKENDS
    from tvm_attn.config import AttentionKey
    from tvm_attn.registry import scheduled
    from tvm_attn.variants import AttentionVariant

    (hq, hkv) = c["heads"]
    fmt = ta.PagedKV(c["page_size"], c["layout"]) if c["kv"] == "paged" else ta.RaggedKV(c["layout"])
    key = AttentionKey("prefill", fmt, hq, hkv, c["head_dim"], c["dtype"], c["dtype"],
                       variant(c) or AttentionVariant(), target)
    key = scheduled(key, packed_rows(c, lengths), family=BACKENDS[backend])
    return key if schedule is None else dataclasses.replace(key, schedule=schedule)


#: every Hopper consumer loop (serial or overlapped GEMMs, with or without the ping-pong), 176-key
#: stages, and the gather producer over ragged KV (serial and overlapped loops)
HOPPER_SCHEDULES = ("wsq128k128s2", "wsq128k128s2p", "wsq128k128s2o", "wsq128k128s2po", "wsq128k176s2o",
                    "wsq128k176s2po", "wsq128k128s2og", "wsq128k128s2g")


def backends(c):
    """The wrapper backends a case runs with: both prefill families (on sm_90a, auto is the Hopper
    kernel for the long queries of LENGTHS)."""
    return ("auto", "fa2")


#: block-sparse cases: (M, N, R, C, causal); block rows of 16 rows (64 GQA-packed) and fewer take the
#: FA2-class kernel, of 32 and 64 the Hopper kernel's gather producer
BSR = [(256, 512, 16, 16, False), (256, 512, 16, 1, True), (64, 300, 1, 4, False), (256, 512, 64, 16, True),
       (512, 640, 32, 1, False)]


def bsr_key(M, N, R, C, causal, target: str = "cuda:sm_90a"):
    """The key BlockSparseAttentionWrapper plans (a block row is a request of R query rows)."""
    from tvm_attn.config import AttentionKey
    from tvm_attn.registry import scheduled
    from tvm_attn.variants import AttentionVariant

    v = ta.Causal() if causal else AttentionVariant()
    return scheduled(AttentionKey("bsr", ta.BlockSparseKV(R, C), 32, 8, 128, "float16", "float16", v, target),
                     R * 4)


def build_keys(target: str = "cuda:sm_90a") -> list:
    """Every prefill kernel the gpu tier uses."""
    keys = {}
    for c in CASES:
        for backend in backends(c):
            k = key_of(c, LENGTHS, target, backend)
            keys[k.uri] = k
    for lengths in (SHORT, MEDIUM, LONG, HOPPER_EDGES):
        for backend in backends(BASE):
            k = key_of(BASE, lengths, target, backend)
            keys[k.uri] = k
    for c in HOPPER_CASES:
        k = key_of(c, HOPPER_EDGES, target, "fa3")
        keys[k.uri] = k
    for schedule in HOPPER_SCHEDULES:
        for causal in (True, False):
            k = key_of({**BASE, "causal": causal}, HOPPER_EDGES, target, "fa3", schedule)
            keys[k.uri] = k
    k = key_of({**BASE, "causal": False}, [(200, 300)], target)  # single prefill
    keys[k.uri] = k
    k = key_of({**BASE, "causal": False}, [(1, 300)], target)  # single decode on CUDA
    keys[k.uri] = k
    for b in BSR:
        k = bsr_key(*b, target=target)
        keys[k.uri] = k
    return list(keys.values())

"""The CUDA prefill configurations the gpu tier checks (and that scripts/build_gpu_kernels.py builds).

One base (ragged NHD KV, fp16, head_dim 128, 32/8 heads, causal) and one axis changed at a time:
KV format and layout (paged page 16 and page 1, HND), dtype, head_dim, head grouping (MHA, group 8,
group 3), causal off, and every variant. The query tile follows the queries' lengths as the wrapper
picks it, so each test's lengths name the kernels it needs (:func:`build_keys`).
"""

from __future__ import annotations

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


def schedule_for(c, lengths) -> str:
    """The schedule the wrapper picks for these lengths (mean GQA-packed rows of non-empty requests)."""
    from tvm_attn.schedule.prefill import prefill_schedule

    qo = np.array([q for q, _ in lengths])
    qo = qo[qo > 0]
    hq, hkv = c["heads"]
    return prefill_schedule(c["head_dim"], int(qo.mean() * (hq // hkv)) if qo.size else None, variant(c))


def key_of(c, lengths, target: str = "cuda:sm_90a"):
    from tvm_attn.config import AttentionKey
    from tvm_attn.variants import AttentionVariant

    (hq, hkv) = c["heads"]
    fmt = ta.PagedKV(c["page_size"], c["layout"]) if c["kv"] == "paged" else ta.RaggedKV(c["layout"])
    return AttentionKey("prefill", fmt, hq, hkv, c["head_dim"], c["dtype"], c["dtype"],
                        variant(c) or AttentionVariant(), target, schedule_for(c, lengths))


#: block-sparse cases: (M, N, R, C, causal)
BSR = [(256, 512, 16, 16, False), (256, 512, 16, 1, True), (64, 300, 1, 4, False)]


def bsr_key(M, N, R, C, causal, target: str = "cuda:sm_90a"):
    from tvm_attn.config import AttentionKey
    from tvm_attn.schedule.prefill import prefill_schedule
    from tvm_attn.variants import AttentionVariant

    v = ta.Causal() if causal else AttentionVariant()
    return AttentionKey("bsr", ta.BlockSparseKV(R, C), 32, 8, 128, "float16", "float16", v, target,
                        prefill_schedule(128, R * 4))


def build_keys(target: str = "cuda:sm_90a") -> list:
    """Every prefill kernel the gpu tier uses."""
    keys = {}
    for c in CASES:
        k = key_of(c, LENGTHS, target)
        keys[k.uri] = k
    for lengths in (SHORT, MEDIUM, LONG):
        k = key_of(BASE, lengths, target)
        keys[k.uri] = k
    k = key_of({**BASE, "causal": False}, [(200, 300)], target)  # single prefill
    keys[k.uri] = k
    k = key_of({**BASE, "causal": False}, [(1, 300)], target)  # single decode on CUDA
    keys[k.uri] = k
    for b in BSR:
        k = bsr_key(*b, target=target)
        keys[k.uri] = k
    return list(keys.values())

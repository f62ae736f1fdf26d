"""What the CUDA generators emit, checked on the CUDA source (no GPU needed; the kernels themselves
run in tests/gpu): the RoPE frequencies are computed once per block, not per key, and a prefetching
decode schedule issues the next step's loads before it computes."""

import re

import numpy as np
import pytest

from tvm_attn.api._common import flashinfer_variant
from tvm_attn.build import compile_key, cuda_source
from tvm_attn.config import AttentionKey
from tvm_attn.kv.formats import PagedKV, RaggedKV
from tvm_attn.schedule.decode import DecodeTiles, decode_schedule
from tvm_attn.schedule.prefill import PrefillTiles, choose_prefill_tiles

TARGET = "cuda:sm_90a"


def _kernel_body(src: str, name: str) -> str:
    """The definition of kernel ``name`` (not its declaration), up to the next kernel."""
    for m in re.finditer(re.escape(f"{name}_kernel("), src):
        end_of_head = min(i for i in (src.find("{", m.end()), src.find(";", m.end())) if i >= 0)
        if src[end_of_head] == "{":
            nxt = src.find("__global__", end_of_head)
            return src[m.start(): nxt if nxt > 0 else len(src)]
    raise AssertionError(f"no definition of {name}_kernel in the source")


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_rope_frequencies_once_per_block(kind):
    v = flashinfer_variant(pos_encoding_mode="ROPE_LLAMA", causal=kind == "prefill")
    if kind == "decode":
        key = AttentionKey("decode", PagedKV(16, "NHD"), 32, 8, 128, "float16", "float16", v, TARGET,
                           decode_schedule(128, "float16", 4, v))
    else:
        key = AttentionKey("prefill", RaggedKV("NHD"), 32, 8, 128, "float16", "float16", v, TARGET,
                           choose_prefill_tiles(128).uri())
    body = _kernel_body(cuda_source(compile_key(key)), key.uri)
    assert re.search(r"__shared__[^;]*float rope_freq\w*\[64\]", body), \
        "the frequency table is not in shared memory"
    assert body.count("powf(") == 1, \
        f"powf evaluated {body.count('powf(')} times, expected once (the table fill)"
    assert "rope_freq" in body.split("powf(", 1)[1], "the rotations do not read the table"


def test_decode_prefetch_schedule():
    t = DecodeTiles.parse("w4u2g4b4p", 128, "float16")
    assert t.prefetch and t.unroll == 2 and t.uri() == "w4u2g4b4p"
    assert not DecodeTiles.parse("w4u4g4b4", 128, "float16").prefetch
    for bad in ("w4u4g4b4q", "w4u0g4b4", "w4u4g4"):
        with pytest.raises(ValueError, match="schedule"):
            DecodeTiles.parse(bad, 128, "float16")
    v = flashinfer_variant()
    loads = {}
    for sched in ("w4u2g4b4", "w4u2g4b4p"):
        key = AttentionKey("decode", PagedKV(16, "NHD"), 32, 8, 128, "float16", "float16", v, TARGET, sched)
        body = _kernel_body(cuda_source(compile_key(key)), key.uri)
        loads[sched] = len(re.findall(r"\*\(uint4\*\)\(paged_kv_cache", body))
    # the first step's loads before the loop, then the next step's inside it
    assert loads["w4u2g4b4p"] == 2 * loads["w4u2g4b4"] > 0, loads


def test_prefill_one_barrier_per_tile_and_lazy_rescale():
    """One block barrier per KV tile and none between works (each warp loads its own query rows),
    and the output rescale sits behind one warp vote."""
    tiles = choose_prefill_tiles(128)
    v = flashinfer_variant(causal=True)
    key = AttentionKey("prefill", RaggedKV("NHD"), 32, 8, 128, "float16", "float16", v, TARGET, tiles.uri())
    body = _kernel_body(cuda_source(compile_key(key)), key.uri)
    assert body.count("__syncthreads()") == 1, body.count("__syncthreads()")
    # a KV tile's copies are issued at a work's start (its first tile) and in the loop (the next one)
    per_issue = tiles.kv_tile * (128 // 8) // tiles.threads
    k_copies = len(re.findall(r"cp_async\w*\([^;]*k_ptr\[", body))
    assert k_copies == 2 * per_issue, (k_copies, per_issue)
    assert body.count("__any_sync(") == 1
    # the softmax scale is applied inside the exponent (raw q.k kept in registers)
    assert re.search(r"exp2f\(\(\(s_acc_ptr\[\d+\] \* [^;]*\) - m_safe\)\)", body)


@pytest.mark.parametrize("causal", [False, True])
def test_prefill_output_and_copy_placement(causal):
    """The output leaves in 16-byte stores (staged through shared memory), never element by element,
    and the next tile's K and V copies are issued at two points of a tile's compute: after the
    barrier and after S (masked kernels), after S and after the softmax (the others)."""
    tiles = choose_prefill_tiles(128)
    v = flashinfer_variant(causal=causal)
    key = AttentionKey("prefill", RaggedKV("NHD"), 32, 8, 128, "float16", "float16", v, TARGET, tiles.uri())
    body = _kernel_body(cuda_source(compile_key(key)), key.uri)
    assert not re.search(r"(?<![\w])o_ptr\[[^;]*\] =", body), "o is stored element by element"
    per_warp_rows = 16 * tiles.m_tiles
    assert len(re.findall(r"st_vec_global_v4_b32\(", body)) == per_warp_rows * 16 // 32
    loop = body[body.index("__syncthreads()"):]
    first_mma, first_exp = loop.index("mma_sync"), loop.index("exp2f(")
    k_at = re.search(r"cp_async\w*\([^;]*k_ptr\[", loop).start()
    v_at = re.search(r"cp_async\w*\([^;]*v_ptr\[", loop).start()
    if causal:
        assert k_at < first_mma < v_at < first_exp, (k_at, first_mma, v_at, first_exp)
    else:
        assert first_mma < k_at < first_exp < v_at, (first_mma, k_at, first_exp, v_at)


def test_prefill_key_staging_has_two_barriers_per_tile():
    """RoPE keys are rotated once per KV tile into their own buffer: a barrier before (the tile has
    landed) and after (rotated keys visible), plus the table fill's -- none per rotated element."""
    v = flashinfer_variant(pos_encoding_mode="ROPE_LLAMA", causal=True)
    key = AttentionKey("prefill", RaggedKV("NHD"), 32, 8, 128, "float16", "float16", v, TARGET,
                       choose_prefill_tiles(128).uri())
    body = _kernel_body(cuda_source(compile_key(key)), key.uri)
    assert body.count("__syncthreads()") == 3, body.count("__syncthreads()")


def test_prefill_key_stages_shrink_for_register_hungry_logits_hooks():
    """At head_dim 128 the 128-row tile takes 64-key stages, 32 for a soft-cap or a mask that reads
    a run-time scalar (RuntimeCausal spilled 48 bytes with 64), and 16 for logits hooks that read
    tensors (ALiBi, a custom mask): the stages ptxas compiles without spills. The wrappers and the
    runtime KV cache's tile table pick the same."""
    import tvm_attn as ta
    from tvm_attn.relax.kv_backend import prefill_tile_table
    from tvm_attn.schedule.prefill import logits_weight
    from tvm_attn.variants import RuntimeCausal

    cases = [(None, 64), (ta.Causal(), 64), (ta.Causal() + ta.SlidingWindow(), 32), (RuntimeCausal(), 32),
             (RuntimeCausal() + ta.RoPE(), 32),
             (ta.SigmoidAttention(), 64), (ta.RoPE(), 64), (ta.Causal() + ta.LogitsSoftCap(), 32),
             (ta.ALiBi(), 16),
             (ta.Causal() + ta.CustomMask(), 16), (ta.LogitsSoftCap() + ta.ALiBi(), 16)]
    for variant, kv_tile in cases:
        assert choose_prefill_tiles(128, None, variant).kv_tile == kv_tile, variant
        assert choose_prefill_tiles(128, 4096, variant).kv_tile == kv_tile, variant
        assert prefill_tile_table(128, variant)[-1][1].kv_tile == kv_tile, variant
        # only the 128-row tile at head_dim 128 changes
        assert choose_prefill_tiles(64, None, variant).kv_tile == 64
        assert choose_prefill_tiles(128, 16, variant) == choose_prefill_tiles(128, 16)
    weights = [logits_weight(v) for v in (None, ta.Causal(), ta.LogitsSoftCap(), RuntimeCausal(), ta.ALiBi())]
    assert weights == [0, 0, 1, 1, 2]
    cuda_key = ta.BatchPrefillWithRaggedKVCacheWrapper("NHD", device="cpu", backend="fa2")._cuda_key
    for variant, kv_tile in cases:
        v = variant if variant is not None else ta.Causal()
        key = AttentionKey("prefill", RaggedKV("NHD"), 32, 8, 128, "float16", "float16", v, TARGET, "default")
        assert PrefillTiles.parse(cuda_key(key, np.array([0, 4096], np.int32)).schedule).kv_tile == kv_tile


def test_decode_window_is_a_key_range_not_a_mask():
    """A sliding window clips each decode piece to the keys it shows (the variant's kv_range, a
    range mask): inside the key loop no key is tested against the window."""
    v = flashinfer_variant(window_left=100)
    key = AttentionKey("decode", PagedKV(16, "NHD"), 32, 8, 128, "float16", "float16", v, TARGET,
                       decode_schedule(128, "float16", 4, v))
    body = _kernel_body(cuda_source(compile_key(key)), key.uri)
    key_loop = body[body.index("for (int it = 0;"):]
    assert "window_left" in body.split("for (int it = 0;")[0], "the piece is not clipped to the window"
    assert "window_left" not in key_loop, "the key loop still evaluates the window mask"

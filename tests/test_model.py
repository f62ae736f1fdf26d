"""The tiny Llama model end to end on the CPU: built with `tvm-attn build-model`, run through TVM's
runtime KV cache with our kernels in its attention slots, checked against a pure numpy forward pass.

3 sequences of different lengths are prefilled in one batch, one is forked (shared prefix), then 8
decode steps run over all of them; popn and remove_sequence follow."""

import json

import numpy as np
import pytest

from tvm_attn.cli import main
from tvm_attn.models import llama
from tvm_attn.models.runtime import ModelSession

TOL = 1e-4  # float32 model; the numpy pass is float64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.so"
    assert main(["build-model", "--config", "tiny", "-o", str(path), "--seed", "3", "--quiet"]) == 0
    return path


def _check(config, weights, tokens, logits, what):
    ref = llama.numpy_forward(config, weights, tokens)[-len(logits):]
    err = np.abs(logits - ref).max()
    assert err <= TOL * (1 + np.abs(ref).max()), f"{what}: max |logits - numpy| = {err:.2e}"


def test_prefill_fork_decode_matches_numpy(tiny):
    meta = json.loads(tiny.with_suffix(".json").read_text())
    assert meta["kv_cache_slots"]["decode_paged"] == "tvm_attn" and meta["weights"] == {"kind": "random", "seed": 3}
    cfg = llama.get_config("tiny")
    s = ModelSession(tiny)
    weights = llama.random_weights(cfg, 3)
    rng = np.random.default_rng(7)
    seqs = {i: rng.integers(0, cfg.vocab_size, n).tolist() for i, n in ((0, 5), (1, 23), (2, 41))}
    for i in seqs:
        s.add_sequence(i)
    out = s.forward(list(seqs), list(seqs.values()))
    for i, logits in zip(seqs, out):
        assert logits.shape == (len(seqs[i]), cfg.vocab_size)
        _check(cfg, weights, seqs[i], logits, f"prefill seq {i}")

    s.fork_sequence(1, 3)              # seq 3 shares seq 1's 23 tokens (two pages) with it
    seqs[3] = list(seqs[1])
    s.fork_sequence(2, 4, 18)          # seq 4 shares the first 18 tokens of seq 2
    seqs[4] = seqs[2][:18]
    for step in range(8):
        ids = [0, 1, 2, 3, 4]
        new = [[int(t)] for t in rng.integers(0, cfg.vocab_size, len(ids))]
        for i, n, logits in zip(ids, new, s.forward(ids, new)):
            seqs[i] += n
            _check(cfg, weights, seqs[i], logits, f"decode step {step} seq {i}")
    assert s.sequence_length(3) == 23 + 8 and s.sequence_length(4) == 18 + 8

    s.popn(2, 5)                       # drop seq 2's last 5 tokens, then continue it
    seqs[2] = seqs[2][:-5]
    s.remove_sequence(0)
    new = [[1], [2, 3, 4]]             # a mixed batch: one decode token and a 3-token append
    for i, n, logits in zip([2, 3], new, s.forward([2, 3], new)):
        seqs[i] += n
        _check(cfg, weights, seqs[i], logits, f"after popn/remove seq {i}")
    with pytest.raises(Exception, match="sequence \"0\" cannot be found"):
        s.forward([0], [[1]])          # a removed sequence is gone


def test_variant_runs_in_the_cache_slots(tmp_path):
    """A soft cap of 0.5 changes every logit: matching numpy with the cap (and not without) shows our
    kernels fill the attention slots."""
    path = tmp_path / "capped.so"
    llama_cfg = llama.get_config("tiny", num_hidden_layers=1)
    from tvm_attn.models.build import build_model

    build_model("tiny", "llvm", path, variant={"name": "logits_soft_cap", "cap": 0.5}, progress=False,
                num_hidden_layers=1)
    import tvm_attn as ta

    capped = llama.get_config("tiny", num_hidden_layers=1, variant=ta.LogitsSoftCap(0.5))
    weights = llama.random_weights(llama_cfg, 0)
    s = ModelSession(path)
    s.add_sequence(0)
    tokens = list(range(3, 40))
    logits = s.forward([0], [tokens])[0]
    _check(capped, weights, tokens, logits, "soft-capped prefill")
    plain = llama.numpy_forward(llama_cfg, weights, tokens)
    assert np.abs(logits - plain).max() > 100 * TOL
    out = s.forward([0], [[5]])[0]
    _check(capped, weights, tokens + [5], out, "soft-capped decode")
    s.add_sequence(1)                  # batch_prefill: the last token's logits of each sequence only
    last = s.forward([0, 1], [[6, 7], tokens[:9]], last_only=True)
    assert [x.shape for x in last] == [(1, 256), (1, 256)]
    _check(capped, weights, tokens + [5, 6, 7], last[0], "batch_prefill seq 0")
    _check(capped, weights, tokens[:9], last[1], "batch_prefill seq 1")


def test_safetensors_roundtrip(tmp_path):
    cfg = llama.get_config("tiny", num_hidden_layers=1)
    fused = llama.random_weights(cfg, 1)
    hf = {}
    d, hq, hkv, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    for name, w in fused.items():
        if name.endswith("qkv_proj.weight"):
            p = name[: -len("qkv_proj.weight")]
            q, k, v = np.split(w, [hq * d, (hq + hkv) * d])
            hf.update({p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v})
        elif name.endswith("gate_up_proj.weight"):
            p = name[: -len("gate_up_proj.weight")]
            hf.update({p + "gate_proj.weight": w[:inter], p + "up_proj.weight": w[inter:]})
        else:
            hf[name] = w.astype(np.float16)
    llama.write_safetensors(tmp_path / "w.safetensors", hf)
    loaded = llama.load_safetensors(cfg, tmp_path / "w.safetensors")
    for name, w in fused.items():
        np.testing.assert_allclose(loaded[name], w, rtol=1e-3, atol=1e-3)
    del hf["model.norm.weight"]
    llama.write_safetensors(tmp_path / "bad.safetensors", hf)
    with pytest.raises(ValueError, match="model.norm.weight"):
        llama.load_safetensors(cfg, tmp_path / "bad.safetensors")

"""The tiny Llama model end to end on the CPU: built with `tvm-attn build-model`, run through TVM's
runtime KV cache with our kernels in its attention slots, checked against a pure numpy forward pass.

3 sequences of different lengths are prefilled in one batch, one is forked (shared prefix), then 8
decode steps run over all of them; popn and remove_sequence follow."""

import json

import numpy as np
import pytest

from tvm_attn.models import llama
from tvm_attn.models.runtime import ModelSession

TOL = 1e-4  # float32 model; the numpy pass is float64


def _check(config, weights, tokens, logits, what):
    ref = llama.numpy_forward(config, weights, tokens)[-len(logits):]
    err = np.abs(logits - ref).max()
    assert err <= TOL * (1 + np.abs(ref).max()), f"{what}: max |logits - numpy| = {err:.2e}"


def test_prefill_fork_decode_matches_numpy(tiny_model):
    meta = json.loads(tiny_model.with_suffix(".json").read_text())
    assert meta["kv_cache_slots"]["decode_paged"] == "tvm_attn"
    assert meta["weights"] == {"kind": "random", "seed": 3}
    cfg = llama.get_config("tiny")
    s = ModelSession(tiny_model)
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


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """One layer of the tiny model with a soft cap of 0.5, which changes every logit."""
    from tvm_attn.models.build import build_model

    path = tmp_path_factory.mktemp("capped") / "capped.so"
    build_model("tiny", "llvm", path, variant={"name": "logits_soft_cap", "cap": 0.5}, progress=False,
                num_hidden_layers=1)
    return path


def test_variant_runs_in_the_cache_slots(capped):
    """Matching numpy with the cap (and not without) shows our kernels fill the attention slots."""
    import tvm_attn as ta

    llama_cfg = llama.get_config("tiny", num_hidden_layers=1)
    capped_cfg = llama.get_config("tiny", num_hidden_layers=1, variant=ta.LogitsSoftCap(0.5))
    weights = llama.random_weights(llama_cfg, 0)
    s = ModelSession(capped)
    s.add_sequence(0)
    tokens = list(range(3, 40))
    logits = s.forward([0], [tokens])[0]
    _check(capped_cfg, weights, tokens, logits, "soft-capped prefill")
    plain = llama.numpy_forward(llama_cfg, weights, tokens)
    assert np.abs(logits - plain).max() > 100 * TOL
    out = s.forward([0], [[5]])[0]
    _check(capped_cfg, weights, tokens + [5], out, "soft-capped decode")
    s.add_sequence(1)                  # batch_prefill: the last token's logits of each sequence only
    last = s.forward([0, 1], [[6, 7], tokens[:9]], last_only=True)
    assert [x.shape for x in last] == [(1, 256), (1, 256)]
    _check(capped_cfg, weights, tokens + [5, 6, 7], last[0], "batch_prefill seq 0")
    _check(capped_cfg, weights, tokens[:9], last[1], "batch_prefill seq 1")


def _run_model():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "run_model.py"
    spec = importlib.util.spec_from_file_location("run_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soft_cap_model_matches_numpy_like_the_default(tmp_path):
    """LogitsSoftCap(30) on the 2-layer tiny model: prefill, fork and decode through run_model.py's
    check match numpy as closely as the default model does (~3e-6; the reference once dropped the
    variant, and the check then saw 2e-3..1e-2)."""
    from tvm_attn.models.build import build_model
    from tvm_attn.models.runtime import read_metadata, reference_config

    path = tmp_path / "cap30.so"
    meta = build_model("tiny", "llvm", path, variant={"name": "logits_soft_cap", "cap": 30}, progress=False)
    assert meta["variant_spec"] == {"name": "logits_soft_cap", "cap": 30.0}
    assert reference_config(read_metadata(path)).variant.extra_params()[0].default == 30.0
    rows = _run_model().run(path, "cpu", [7, 30, 45], 3, check=True)
    assert max(r["max_abs_err"] for r in rows) <= 2e-5, rows


def _tamper(src, dst_dir, **changes):
    """A copy of the model ``src`` whose metadata says something else (``changes``; None deletes)."""
    import shutil

    dst = dst_dir / src.name
    shutil.copy(src, dst)
    meta = json.loads(src.with_suffix(".json").read_text())
    for k, v in changes.items():
        meta.pop(k) if v is None else meta.__setitem__(k, v)
    dst.with_suffix(".json").write_text(json.dumps(meta))
    return dst


def test_check_fails_on_a_wrong_variant_claim(capped, tmp_path):
    run_model = _run_model()
    assert run_model.main(argv=["--model", str(capped), "--check", "--steps", "1"])   # the truth passes
    lying = _tamper(capped, tmp_path, variant="default", variant_spec="default")
    with pytest.raises(SystemExit, match="logits differ from numpy"):
        run_model.main(argv=["--model", str(lying), "--check", "--steps", "1"])
    (tmp_path / "unknown").mkdir()
    unknown = _tamper(capped, tmp_path / "unknown", variant_spec=None)
    with pytest.raises(SystemExit) as e:
        run_model.main(argv=["--model", str(unknown), "--check", "--steps", "1"])
    assert e.value.code == 2


def test_check_fails_on_corrupted_params(capped, tmp_path):
    import shutil

    import tvm

    from tvm_attn.models.build import save_params

    model = tmp_path / capped.name
    shutil.copy(capped, model)
    shutil.copy(capped.with_suffix(".json"), model.with_suffix(".json"))
    params = save_params(model)
    run_model = _run_model()
    assert run_model.main(argv=["--model", str(model), "--params", str(params), "--check", "--steps", "1"])
    saved = {k: v.numpy() for k, v in tvm.runtime.load_param_dict_from_file(str(params)).items()}
    saved["param_0001"] = saved["param_0001"] * np.float32(1.01)     # layer 0's input norm, 1% off
    tvm.runtime.save_param_dict_to_file({k: tvm.runtime.tensor(v) for k, v in saved.items()}, str(params))
    with pytest.raises(SystemExit, match="logits differ from numpy"):
        run_model.main(argv=["--model", str(model), "--params", str(params), "--check", "--steps", "1"])


@pytest.mark.parametrize("spec, hook", [({"name": "sliding_window", "window_left": 4}, "logits_mask"),
                                        ("rope", "query_transform"), ("causal", "logits_mask")])
def test_position_dependent_variants_are_refused_at_build_time(spec, hook, tmp_path):
    """The cache's slots see positions within one shared-prefix depth or the new tokens only, so a
    variant that reads positions would run with wrong ones (sliding window: 3.2, RoPE: 1.5 off)."""
    import tvm_attn as ta
    from tvm_attn.models.build import build_model
    from tvm_attn.relax.kv_backend import CudaKVBackend
    from tvm_attn.relax.kv_cache import KVCacheConfig
    from tvm_attn.tir.abi import kv_cache_kernel
    from tvm_attn.variants import variant_from_spec

    name = variant_from_spec(spec).uri()
    with pytest.raises(ValueError, match=f"variant '{name}'.*its {hook} reads .*position-free"):
        build_model("tiny", "llvm", tmp_path / "m.so", variant=spec, progress=False)
    assert not (tmp_path / "m.so").exists()
    with pytest.raises(ValueError, match="position-free"):
        kv_cache_kernel("decode", 4, 2, 64, "float32", 16, variant_from_spec(spec))
    with pytest.raises(ValueError, match="position-free"):
        CudaKVBackend(KVCacheConfig(1, 4, 2, 64, "float16", target="cuda:sm_90a"), variant_from_spec(spec))
    kv_cache_kernel("decode", 4, 2, 64, "float32", 16, ta.LogitsSoftCap(30.0))      # position-free: taken


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


def test_builtin_cache_refuses_a_variant(tmp_path):
    """TVM's own cache has no variant slot: building it with one would run plain attention."""
    from tvm_attn.models.build import build_model

    with pytest.raises(ValueError, match="runs no variant, got 'soft_cap'"):
        build_model("tiny", "llvm", tmp_path / "m.so", variant="logits_soft_cap", kv_cache="tvm_builtin",
                    progress=False)

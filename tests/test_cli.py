"""The main job and the API's tensor kinds."""

import numpy as np
import pytest

import tvm
import tvm_attn as ta
from tvm_attn.cli import main
from tvm_attn.demo import DemoConfig, run_demo

from conftest import randn


def test_demo_small(capsys):
    rows = run_demo(DemoConfig(prompt_lens=(1, 20, 33), decode_steps=2, num_layers=1))
    assert [r["step"] for r in rows] == ["prefill", "decode 1", "decode 2"]
    assert max(r["max_abs_err"] for r in rows) < 2e-3
    assert rows[0]["q_tokens"] == 54 and rows[-1]["kv_tokens"] == 60
    assert "max|err|" in capsys.readouterr().out


def test_cli_demo_exit_code(capsys):
    assert main(["demo", "--prompt-lens", "3,17", "--decode-steps", "1", "--layers", "1", "--kv-layout", "HND"]) == 0
    assert "all outputs match the reference" in capsys.readouterr().out


def test_tvm_tensor_in_tvm_tensor_out(rng):
    q, k, v = randn(rng, (3, 4, 64), "float16"), randn(rng, (8, 2, 64), "float16"), randn(rng, (8, 2, 64), "float16")
    o_np = ta.single_prefill_with_kv_cache(q, k, v)
    o_tvm = ta.single_prefill_with_kv_cache(*(tvm.runtime.tensor(x) for x in (q, k, v)))
    assert isinstance(o_tvm, tvm.runtime.Tensor)
    np.testing.assert_array_equal(o_tvm.numpy(), o_np)


def test_out_buffer_is_filled(rng):
    w = ta.BatchDecodeWithPagedKVCacheWrapper()
    w.plan([0, 1], [0], [3], 4, 2, 64, 4)
    q, cache = randn(rng, (1, 4, 64), "float16"), randn(rng, (1, 2, 4, 2, 64), "float16")
    out = np.zeros((1, 4, 64), np.float16)
    res = w.run(q, cache, out=out)
    assert res is out and np.array_equal(out, w.run(q, cache))


def test_torch_dlpack_roundtrip(rng):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(randn(rng, s, "float32")) for s in ((3, 4, 64), (8, 2, 64), (8, 2, 64)))
    o = ta.single_prefill_with_kv_cache(q, k, v)
    assert isinstance(o, torch.Tensor) and o.shape == (3, 4, 64)
    ref = ta.single_prefill_with_kv_cache(q.numpy(), k.numpy(), v.numpy())
    np.testing.assert_allclose(o.numpy(), ref, atol=1e-6)

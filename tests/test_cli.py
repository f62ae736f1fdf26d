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
    assert main(["demo", "--prompt-lens", "3,17", "--decode-steps", "1", "--layers", "1", "--kv-layout",
                 "HND"]) == 0
    assert "all outputs match the reference" in capsys.readouterr().out


def test_tvm_tensor_in_tvm_tensor_out(rng):
    q, k, v = (randn(rng, (3, 4, 64), "float16"), randn(rng, (8, 2, 64), "float16"),
               randn(rng, (8, 2, 64), "float16"))
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


@pytest.mark.parametrize(
    "argv, match",
    [
        (["demo", "--prompt-lens", "0"], r"--prompt-lens: every prompt length must be >= 1, got '0'"),
        (["demo", "--prompt-lens", "3,x"],
         r"--prompt-lens: expected comma-separated positive integers, got '3,x'"),
        (["demo", "--layers", "0"], r"--layers: must be a positive integer, got 0"),
        (["demo", "--decode-steps", "-1"], r"--decode-steps: must be >= 0, got -1"),
        (["build", "--kernels", '[{"kind": "decode", "num_qo_heads": 4, "num_kv_heads": 4, "head_dim": 64}]'],
         r"spec 0: kernel spec: missing 'kv'"),
        (["build", "--kernels", "[{"], r"--kernels: not valid JSON"),
        (["build", "--kernels", "/nonexistent/kernels.json"],
         r"--kernels: cannot read '/nonexistent/kernels.json'"),
        (["build", "--kernels",
          '{"kind": "decode", "kv": {"format": "paged", "page_size": 4}, "num_qo_heads": 4, '
                                '"num_kv_heads": 4, "head_dim": 64, "heads": 4}'],
         r"spec 0: kernel spec: unknown keys \['heads'\]"),
        (["build", "--kernels",
          '{"kind": "decode", "kv": {"format": "paged", "pagesize": 4}, "num_qo_heads": 4, '
                                '"num_kv_heads": 4, "head_dim": 64}'], r"kv: unknown keys \['pagesize'\]"),
        (["build", "--kernels",
          '{"kind": "decode", "kv": {"format": "paged", "page_size": 4}, "num_qo_heads": 4, '
                                '"num_kv_heads": 4, "head_dim": 96}'], r"head_dim: 96 is not supported"),
        (["build", "--kernels", '["causal"]'],
         r"--kernels: spec 0: kernel spec: expected a JSON object, got 'causal'"),
        (["build-model", "-o", "/tmp/x.so", "--variant", "{bad"], r"--variant: not valid JSON"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, match):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


def test_cli_error_exit_code_in_a_process(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "k.json"
    path.write_text("[{]")
    run = subprocess.run([sys.executable, "-m", "tvm_attn", "build", "--kernels", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"--kernels {path}: not valid JSON" in run.stderr


def test_kernel_not_built_hint_builds_that_kernel(tmp_path, monkeypatch, capsys):
    import shlex

    from tvm_attn.cache import KernelCache, KernelNotBuiltError
    from tvm_attn.config import AttentionKey

    key = AttentionKey("decode", ta.PagedKV(2, "HND"), 4, 2, 64, "float32", "float32",
                       ta.SlidingWindow(3) + ta.LogitsSoftCap(20.0))
    monkeypatch.setenv("TVM_ATTN_NO_COMPILE", "1")
    with pytest.raises(KernelNotBuiltError) as info:
        KernelCache(tmp_path).get(key)
    command = str(info.value).split("`")[1]
    argv = shlex.split(command)
    assert argv[:3] == ["tvm-attn", "build", "--kernels"] and argv[-2:] == ["-o", str(tmp_path)], command
    monkeypatch.delenv("TVM_ATTN_NO_COMPILE")
    assert main(argv[1:]) == 0
    assert key.uri in capsys.readouterr().out
    assert KernelCache(tmp_path).path(key).exists()

"""examples/cpp: the C++ program is built against the wheels' headers and libraries, runs the tiny
model (prefill of 3 sequences, a fork, decode steps) through packed functions with no Python, and
compares its logits itself with the numpy forward pass (expected_logits.py writes them): it exits 0
when they match and 1 when they do not. Skipped only where there is no C++ compiler."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_attn.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cpp"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None or shutil.which("make") is None, reason="no C++ compiler or make")
def test_cpp_example_matches_numpy(tmp_path):
    model = tmp_path / "tiny.so"
    assert main(["build-model", "--config", "tiny", "-o", str(model), "--seed", "5", "--save-params",
                 "--quiet"]) == 0
    subprocess.run(["make", "-s", "-C", str(EXAMPLE), f"BUILD_DIR={tmp_path}", f"PYTHON={sys.executable}",
                    f"CXX={CXX}"], check=True)
    lens, steps = ["5", "23", "41"], "3"
    expected = tmp_path / "expected.bin"
    subprocess.run([sys.executable, str(EXAMPLE / "expected_logits.py"), str(model), *lens, "--steps", steps,
                    "-o", str(expected)], check=True)
    ref = np.fromfile(expected, np.float32).reshape(-1, 256)
    assert ref.shape[0] == len(lens) + int(steps) * (len(lens) + 1)

    def run(expect):
        return subprocess.run([str(tmp_path / "run_model"), str(model), str(model.with_suffix(".params")),
                               *lens, "--steps", steps, "--expect", str(expect)],
                              capture_output=True, text=True, timeout=120,
                              check=False)

    res = run(expected)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok: 3 sequences + 1 fork, 3 decode steps, logits match the expected ones" in res.stdout

    wrong = ref.copy()
    wrong[-1, 7] += 0.01                 # one logit of the fork's last decode step
    wrong.tofile(tmp_path / "wrong.bin")
    res = run(tmp_path / "wrong.bin")
    assert res.returncode == 1, res.stderr
    assert "logits differ from" in res.stderr and "in 1 rows" in res.stderr, res.stderr
    ref[:-1].tofile(tmp_path / "short.bin")
    assert run(tmp_path / "short.bin").returncode == 2

"""examples/cpp: the C++ program is built against the wheels' headers and libraries, runs the tiny
model (prefill of 3 sequences, a fork, decode steps) through packed functions with no Python, and its
logits match the numpy forward pass. Skipped only where there is no C++ compiler."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_attn.cli import main
from tvm_attn.models import llama

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cpp"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(CXX is None or shutil.which("make") is None, reason="no C++ compiler or make")
def test_cpp_example_runs_the_model(tmp_path):
    model = tmp_path / "tiny.so"
    assert main(["build-model", "--config", "tiny", "-o", str(model), "--seed", "5", "--save-params", "--quiet"]) == 0
    subprocess.run(["make", "-s", "-C", str(EXAMPLE), f"BUILD_DIR={tmp_path}", f"PYTHON={sys.executable}",
                    f"CXX={CXX}"], check=True)
    lens, steps = [5, 23, 41], 3
    out = tmp_path / "logits.txt"
    res = subprocess.run([str(tmp_path / "run_model"), str(model), str(model.with_suffix(".params")),
                          *map(str, lens), "--steps", str(steps), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok: 3 sequences + 1 fork, 3 decode steps" in res.stdout

    cfg = llama.get_config("tiny")
    weights, vocab = llama.random_weights(cfg, 5), cfg.vocab_size
    seqs = {i: [(31 * i + 7 * j + 1) % vocab for j in range(n)] for i, n in enumerate(lens)}
    seqs[len(lens)] = list(seqs[0])                    # the fork of sequence 0, made after the prefill
    rows = [line.split() for line in out.read_text().splitlines()]
    assert len(rows) == len(lens) + steps * (len(lens) + 1)
    seen_fork = False
    for row in rows:
        step, seq, logits = int(row[0]), int(row[1]), np.array(row[2:], np.float64)
        if step > 0:
            seqs[seq].append((17 * step + 5 * seq + 3) % vocab)
            seen_fork |= seq == len(lens)
        ref = llama.numpy_forward(cfg, weights, seqs[seq])[-1]
        assert np.abs(logits - ref).max() <= 1e-4 * (1 + np.abs(ref).max()), f"step {step} seq {seq}"
    assert seen_fork

"""GPU tier: the tiny Llama model (float16) through TVM's runtime KV cache with tvm_attn's CUDA kernels
in its ("flashinfer", run, plan) slots (tvm_attn/relax/kv_backend.py), against a numpy forward pass.

Two builds (scripts/build_gpu_kernels.py writes them to <kernel dir>/models/): 4/2 heads, where the
cache sends decode steps to the decode slot (planned from page counts, the kernel clips the last
page), and 8/2 heads, where it sends them to the paged-prefill slot (whose plan picks the decode
kernel). 3 sequences of different lengths prefill in one batch (ragged prefill), two are forked
(shared prefixes: paged prefill over cascade depths), 8 decode steps run, then popn and a mixed
decode + append batch.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

#: float16 model against the float64 numpy pass: each of the 2 layers rounds q, k, v, attention, the
#: MLP and the residual stream to float16 (2^-11 relative); 2e-2 of the logits' scale bounds that and
#: is far below the error of a wrong key set or a wrong softmax (O(1) of the scale)
TOL = 2e-2
MODELS = ("tiny_g2", "tiny_g4")


def _library(name: str) -> Path:
    root = Path(os.environ.get("TVM_ATTN_CACHE_DIR", Path(__file__).resolve().parents[2] / ".kernels"))
    path = root / "models" / f"{name}.so"
    if not path.exists():
        pytest.skip(f"{path} not built (scripts/build_gpu_kernels.py builds it)")
    return path


@pytest.mark.parametrize("name", MODELS)
def test_cache_with_our_cuda_kernels_matches_numpy(name):
    from tvm_attn.models import llama
    from tvm_attn.models.runtime import ModelSession, config_from_json

    library = _library(name)
    meta = json.loads(library.with_suffix(".json").read_text())
    assert meta["kv_cache_slots"]["decode_paged"] == "tvm_attn"
    cfg = config_from_json(meta["config"])
    weights = llama.random_weights(cfg, meta["weights"]["seed"])
    s = ModelSession(library, "cuda", weights=weights, max_batch_size=8, max_total_seq_len=1024,
                     prefill_chunk_size=512)
    worst = []

    def check(tokens, logits, what):
        ref = llama.numpy_forward(cfg, {k: v.astype(np.float64) for k, v in weights.items()},
                                  tokens)[-len(logits):]
        err = float(np.abs(logits.astype(np.float64) - ref).max())
        scale = float(np.abs(ref).max())
        worst.append(err / (1 + scale))
        assert err <= TOL * (1 + scale), \
            f"{name} {what}: max |logits - numpy| = {err:.3e} (scale {scale:.2f})"

    rng = np.random.default_rng(7)
    seqs = {i: rng.integers(0, cfg.vocab_size, n).tolist() for i, n in ((0, 5), (1, 23), (2, 141))}
    for i in seqs:
        s.add_sequence(i)
    for i, logits in zip(seqs, s.forward(list(seqs), list(seqs.values()))):
        check(seqs[i], logits, f"prefill seq {i}")
    s.fork_sequence(1, 3)
    seqs[3] = list(seqs[1])
    s.fork_sequence(2, 4, 40)
    seqs[4] = seqs[2][:40]
    for step in range(8):
        ids = [0, 1, 2, 3, 4]
        new = [[int(t)] for t in rng.integers(0, cfg.vocab_size, len(ids))]
        for i, n, logits in zip(ids, new, s.forward(ids, new)):
            seqs[i] += n
            check(seqs[i], logits, f"decode step {step} seq {i}")
    s.popn(2, 5)
    seqs[2] = seqs[2][:-5]
    new = [[1], [2, 3, 4]]
    for i, n, logits in zip([2, 3], new, s.forward([2, 3], new)):
        seqs[i] += n
        check(seqs[i], logits, f"after popn seq {i}")
    print(f"{name}: worst |err| / (1 + scale) = {max(worst):.2e}")

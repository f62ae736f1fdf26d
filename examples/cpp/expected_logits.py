"""The logits run_model (run_model.cc) must produce, from the numpy forward pass, for its --expect.

    python examples/cpp/expected_logits.py model.so 5 23 41 --steps 3 -o expected.bin

Replays run_model's tokens (prompt token j of sequence i is (31 i + 7 j + 1) % vocab; after the
prefill, sequence len(prompts) forks sequence 0; the decode token of step k for sequence i is
(17 k + 5 i + 3) % vocab) through tvm_attn.models.llama.numpy_forward with the config, variant and
weights that model.json records, and writes the last new token's logits of every report, float32.
"""

import argparse
import sys
from pathlib import Path

import numpy as np


def expected_logits(library, prompt_lens, steps: int) -> np.ndarray:
    """``[reports, vocab]`` float32, in run_model's report order."""
    from tvm_attn.models.llama import numpy_forward
    from tvm_attn.models.runtime import ModelSession, read_metadata, reference_config

    meta = read_metadata(library)
    cfg = reference_config(meta)
    weights = ModelSession.default_weights_of(meta)
    vocab = cfg.vocab_size
    seqs = [[(31 * i + 7 * j + 1) % vocab for j in range(n)] for i, n in enumerate(prompt_lens)]
    rows = [numpy_forward(cfg, weights, s)[-1] for s in seqs]
    seqs.append(list(seqs[0]))                     # the fork of sequence 0, made after the prefill
    for step in range(1, steps + 1):
        for i, s in enumerate(seqs):
            s.append((17 * step + 5 * i + 3) % vocab)
            rows.append(numpy_forward(cfg, weights, s)[-1])
    return np.asarray(rows, np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the library from tvm-attn build-model (its .json is read)")
    p.add_argument("prompt_lens", nargs="+", type=int)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("-o", "--output", required=True, help="float32 file for run_model --expect")
    args = p.parse_args(argv)
    expected_logits(Path(args.model), args.prompt_lens, args.steps).tofile(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

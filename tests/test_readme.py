"""Every code block of README.md runs as written.

Python blocks run one by one, each in a fresh interpreter in an empty directory. Bash blocks run in
order in one directory (a later block uses what an earlier one wrote, as a reader typing them would),
with ``examples/`` and ``scripts/`` of this checkout beside them, and ``tvm-attn``/``python`` being this
checkout's. A block whose first line is

* ``# needs a CUDA GPU: ...`` is skipped (reported as skipped, never passed) where there is no GPU;
* ``# not run in CI: <reason>`` is skipped with that reason, which the README shows to its readers.

The opening block installs the package and runs this suite, which is CI's own job (``.ci/run``): its
``pip install`` prefixes are the environment this test already runs in, and its pytest command must be
the one ``.ci/run`` runs (running it here would recurse); the rest (``tvm-attn demo``) runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GPU_MARK = "# needs a CUDA GPU"
SKIP_MARK = "# not run in CI:"
#: the opening block's setup, which the environment running this test has already done
INSTALLED = ('pip install -e . && ', 'pip install -e ".[test]" && ')
CI_TESTS = "python -m pytest -q"


def blocks() -> list[tuple[str, str, str]]:
    """``(language, code, heading)`` of every fenced block, in README order."""
    out, heading = [], "top"
    fence = re.compile(r"^```(\S*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
    text = README.read_text()
    pos = 0
    for m in fence.finditer(text):
        for line in text[pos : m.start()].splitlines():
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
        pos = m.end()
        out.append((m.group(1), m.group(2), heading))
    return out


def _id(i, block):
    return f"{i}-{re.sub(r'[^A-Za-z0-9]+', '_', block[2]).strip('_')[:40]}"


PYTHON = [(i, b) for i, b in enumerate(blocks()) if b[0] == "python"]
BASH = [(i, b) for i, b in enumerate(blocks()) if b[0] == "bash"]


def test_every_block_is_python_or_bash():
    """So that no snippet escapes the tests below."""
    langs = {b[0] for b in blocks()}
    assert langs <= {"python", "bash"}, \
        f"README blocks in {langs - {'python', 'bash'}} are not run by any test"
    assert len(PYTHON) >= 6 and len(BASH) >= 4


def _env(tmp: Path) -> dict:
    """This checkout first on the path, and ``tvm-attn``/``python``/``python3`` that run it."""
    shims = tmp / ".bin"
    shims.mkdir(exist_ok=True)
    for name, cmd in (("tvm-attn", f'exec "{sys.executable}" -m tvm_attn "$@"'),
                      ("python", f'exec "{sys.executable}" "$@"'),
                      ("python3", f'exec "{sys.executable}" "$@"')):
        (shims / name).write_text(f"#!/usr/bin/env bash\n{cmd}\n")
        (shims / name).chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _skip_reason(code: str) -> str | None:
    first = code.splitlines()[0] if code else ""
    if first.startswith(SKIP_MARK):
        return first[len(SKIP_MARK):].strip()
    if first.startswith(GPU_MARK):
        from conftest import has_cuda_gpu

        if not has_cuda_gpu():
            return "needs a CUDA GPU"
    return None


@pytest.mark.parametrize("index, block", PYTHON, ids=[_id(i, b) for i, b in PYTHON])
def test_python_block_runs(index, block, tmp_path):
    code = block[1]
    reason = _skip_reason(code)
    if reason:
        pytest.skip(reason)
    (tmp_path / "snippet.py").write_text(code)
    res = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, \
        f"README block {index} ({block[2]}):\n{code}\n--- stderr:\n{res.stderr[-4000:]}"


def _opening(code: str) -> str:
    """The opening block less what CI has done already (see the module docstring)."""
    lines = []
    for line in code.splitlines():
        for prefix in INSTALLED:
            line = line.replace(prefix, "")
        command = line.split("#")[0].strip()
        if command == CI_TESTS:
            ci = (ROOT / ".ci" / "run").read_text()
            # CI may install more extras (lint) beside the README's test extra
            assert re.search(r'pip install -q -e "\.\[test[],]', ci) and "-m pytest -q" in ci, \
                ".ci/run no longer runs the README's tests"
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_bash_blocks_run_in_order(tmp_path):
    for name in ("examples", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    env, ran, skipped = _env(tmp_path), [], []
    for n, (index, (_, code, heading)) in enumerate(BASH):
        reason = _skip_reason(code)
        if reason is None and "make " in code and not (shutil.which("make") and shutil.which("g++")):
            reason = "needs make and g++"
        if reason:
            skipped.append(f"block {index} ({heading}): {reason}")
            continue
        script = _opening(code) if n == 0 else code
        start = time.perf_counter()
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900, check=False)
        assert res.returncode == 0, (f"README block {index} ({heading}):\n{script}"
                                     f"\n--- stdout:\n{res.stdout[-3000:]}"
                                     f"\n--- stderr:\n{res.stderr[-3000:]}")
        ran.append(f"block {index} ({heading}): {time.perf_counter() - start:.1f} s")
    print("\n".join(["ran:", *ran, "skipped:", *skipped]))
    assert len(ran) >= 4
    assert (tmp_path / "model.params").exists() and (tmp_path / "expected.bin").exists()

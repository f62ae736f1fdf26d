"""Every script under scripts/ runs in its small configuration (``main(small=True)``)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "scripts").glob("*.py"))
#: scripts with no small configuration, and why CI does not run them
NOT_IN_CI = {
    "cuda_source_hashes.py": "the byte-identity oracle of refactors: it regenerates the CUDA source of every "
                             "GPU-tier kernel (~65 s) against a baseline file, run by hand",
}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_small(path):
    if path.name in NOT_IN_CI:
        pytest.skip(NOT_IN_CI[path.name])
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if getattr(module, "REQUIRES", None) == "gpu":
        from conftest import has_cuda_gpu

        if not has_cuda_gpu():
            pytest.skip("needs a CUDA GPU")
    rows = module.main(small=True)
    assert rows

"""Every script under scripts/ runs in its small configuration (``main(small=True)``)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_small(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if getattr(module, "REQUIRES", None) == "gpu":
        from conftest import has_cuda_gpu

        if not has_cuda_gpu():
            pytest.skip("needs a CUDA GPU")
    rows = module.main(small=True)
    assert rows

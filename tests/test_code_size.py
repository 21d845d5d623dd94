"""Code bytes count what a training run imports with one backend, nothing more and nothing less."""

import subprocess
import sys

import pytest

from core.size import ROOT, code_bytes, code_files


def test_counted_files_are_the_training_path():
    names = {str(p.relative_to(ROOT)) for p in code_files("torch")}
    for needed in ("core/loop.py", "core/quant.py", "core/artifact.py", "backend_torch/model.py", "backend_torch/trainer.py"):
        assert needed in names
    for tool_only in ("tools/formats.py", "tools/pickle_safe.py", "core/tolerances.py", "backend_mlx/model.py"):
        assert tool_only not in names
    assert code_bytes("torch") == sum(p.stat().st_size for p in code_files("torch"))


@pytest.mark.slow
def test_every_core_module_a_training_run_loads_is_counted():
    # What Python really imports for a torch training run must be a subset of what we count.
    probe = ("import sys, core.loop, core.manifest, core.tokenizer, backend_torch.trainer; "
             "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('core', 'backend_torch')))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    counted = {str(p.relative_to(ROOT)).removesuffix(".py").removesuffix("/__init__").replace("/", ".")
               for p in code_files("torch")}
    assert set(loaded.stdout.split()) <= counted

from __future__ import annotations

import os

import pytest

# Before anything imports torch: idle OpenMP threads sleep instead of spinning, so torch and MLX in one
# process do not fight over the 2 CI cores (backend_torch/__init__.py sets the same default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The Shakespeare demo data root (manifest.json, datasets/shakespeare_sp1024, tokenizers/), built once.

    Read-only for tests: copy it (shutil.copytree) before changing anything in it.
    """
    from tools.make_mini_shards import main

    root = tmp_path_factory.mktemp("demo_data")
    rc = main(["--demo", "--out", str(root)])
    assert rc == 0, "make_mini_shards --demo failed"
    return root

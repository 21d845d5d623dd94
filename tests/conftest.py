from __future__ import annotations

import pytest


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

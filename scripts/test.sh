#!/usr/bin/env bash
# The test suite on a fresh machine: install, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The optional trackers (loopgolf[track]) too, so the --log-to tests run instead of skipping.
.venv/bin/python -m pip install -q -e '.[track]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# Run MLX's CPU tests with OpenBLAS when it is installed (tools/blas.py explains why).
lib=$(ls /usr/lib/*/openblas-pthread/libopenblas.so.0 /usr/lib/*/libopenblas.so.0 2>/dev/null | head -n 1 || true)
if [ "$(uname -s)" = Linux ] && [ -n "$lib" ]; then export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"; fi
# One thread per test process, one process per core (pytest-xdist): two OpenMP/BLAS pools spinning against each
# other on a 2-core machine made a demo training step 25x slower (12 s instead of 0.46 s, docs/benchmarks.md).
# LOOPGOLF_TEST_WORKERS=0 runs in this process alone (as plain pytest, e.g. for -s).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -n "${LOOPGOLF_TEST_WORKERS:-auto}" --dist worksteal "$@"

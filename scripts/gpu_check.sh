#!/usr/bin/env bash
# The GPU check in one call: every fact about the CUDA path, written to --out (default runs/gpu-check) as
# gpu_check.json and gpu_check.md. Arguments go to `loopgolf gpu-check` (see --help); docs/benchmarks.md
# says how to run it when a GPU is lent.
#
# It runs without installing loopgolf, as on a bare GPU image: the repository goes on PYTHONPATH, and the
# wheels in .whl/ (zstandard, which such an image lacks) are installed into a scratch site directory
# when the interpreter cannot import zstandard.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import zstandard" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check.sh: $py cannot import zstandard and .whl/ holds no wheel for it (docs/benchmarks.md, The GPU check)" >&2
    exit 2
  fi
  site=${TMPDIR:-/tmp}/loopgolf-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" -m tools.cli gpu-check "$@"

#!/usr/bin/env bash
# Set-up shared by the demo and the test commands: a virtual environment in .venv with loopgolf, MLX,
# torch and the test tools; on Debian/Ubuntu as root, OpenBLAS for MLX's CPU matrix products.
# TORCH_SPEC picks the torch build (default torch==2.13.0; see README: CPU wheel vs CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [ "$(uname -s)" = Darwin ]; then TORCH_SPEC=${TORCH_SPEC:-torch}; else TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}; fi
echo "setup: installing loopgolf with mlx, $TORCH_SPEC and test tools"
quiet_pip .venv/bin/python -m pip install -q --upgrade pip
quiet_pip .venv/bin/python -m pip install -q "$TORCH_SPEC" -e '.[mlx,torch,test]'

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/libopenblas.so.0 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's OpenBLAS for MLX's CPU matrix products (libopenblas0-pthread)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) >/dev/null \
      || echo "setup: OpenBLAS install failed; MLX on CPU will be slow but correct"
  else
    echo "setup: tip: 'apt-get install libopenblas0-pthread' makes MLX on a Linux CPU about 6x faster"
  fi
fi

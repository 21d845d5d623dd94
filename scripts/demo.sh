#!/usr/bin/env bash
# The main job on a fresh machine: install, make the demo shards from the built-in corpus, train the
# demo config, print its bpb. Extra arguments go to `loopgolf train` (e.g. --backend mlx).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -d data/datasets/shakespeare_sp1024 ] || .venv/bin/make_mini_shards --demo --out data  # beside any fetched data
echo "demo: training configs/demo.toml into runs/demo (the commands live in .venv: . .venv/bin/activate to use them)"
# runs/demo is the demo's own directory: running the demo again starts it afresh (--force)
exec .venv/bin/loopgolf train --config configs/demo.toml --out runs/demo --force "$@"

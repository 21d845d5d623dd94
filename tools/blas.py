"""MLX's Linux CPU wheel links a reference BLAS (about 5 GFLOP/s). Preloading Debian's OpenBLAS
(`apt-get install libopenblas0-pthread`) routes its fp32 matrix products to OpenBLAS: measured 6.3x on
the demo config (366 -> 2,297 tok/s, identical losses; docs/benchmarks.md). The console script re-execs
itself once with LD_PRELOAD when it is about to run MLX on Linux; LOOPGOLF_NO_OPENBLAS=1 turns this off."""

from __future__ import annotations

import glob
import os
import sys

CANDIDATES = ("/usr/lib/*/openblas-pthread/libopenblas.so.0", "/usr/lib/*/libopenblas.so.0", "/usr/lib/libopenblas.so.0")


def find_openblas() -> str | None:
    for pattern in CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def maybe_reexec_with_openblas(uses_mlx: bool) -> None:
    if not uses_mlx or not sys.platform.startswith("linux") or os.environ.get("LOOPGOLF_NO_OPENBLAS") == "1":
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = find_openblas()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "tools.cli", *sys.argv[1:]], env)

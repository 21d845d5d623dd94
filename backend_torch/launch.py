"""`loopgolf train --nproc N`: re-run the same command as N ranks through torch's own launcher.

The ranks run `python -m tools.cli <the same arguments>` with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, ...), which is also what an outer `torchrun ... -m tools.cli train ...` gives them, so one
code path serves both.
"""

from __future__ import annotations

import os
import sys


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def rank_threads(nproc: int) -> int:
    """The OMP_NUM_THREADS each of `nproc` local ranks gets when the user sets none: a share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def launch(nproc: int, argv: list[str]) -> int:
    """Run `argv` (loopgolf's arguments) as `nproc` local ranks; return the first failing rank's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torchrun would set 1 and warn; share the cores instead. torchrun's ranks inherit os.environ, so it is set
    # for the launch only: left behind, it would change this process's later runs (their thread count).
    own_threads = "OMP_NUM_THREADS" not in os.environ
    if own_threads:
        os.environ["OMP_NUM_THREADS"] = str(rank_threads(nproc))
    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "tools.cli", *strip_nproc(argv)]
    try:
        torchrun(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    except SignalException as e:  # Ctrl-C or a kill: torchrun has already stopped the ranks
        print(f"loopgolf: interrupted ({e.sigval.name})", file=sys.stderr)
        return 130
    finally:
        if own_threads:
            del os.environ["OMP_NUM_THREADS"]
    return 0

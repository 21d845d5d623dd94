"""torch.compile for the trainer: whole graphs (fullgraph: a graph break is an error, not a silent slowdown),
static shapes, and a recompile limit that counts the variants this process builds.

Dynamo keeps its compiled graphs per code object, each guarded by the Python values it read. Every closure
of one function (a depth variant, a QAT variant, a second trainer in the same process) is therefore one
more entry of the same code object's cache, and past torch._dynamo.config.recompile_limit (8) a fullgraph
function fails (FailOnRecompileLimitHit). So each closure compiled here raises the limit by its share:
SHAPES_PER_CLOSURE entries, room for the shapes one closure legitimately sees (training: one micro-batch
shape; evaluation: full batches and the last, shorter one). A step that recompiles every time still hits the
limit, loudly, after a few steps.
"""

from __future__ import annotations

import collections

import torch

# "inductor" everywhere; tests set "aot_eager" to count graphs, guards and recompiles (decided by dynamo,
# the same whatever the backend) without inductor's C++ code generation, which takes minutes on a small CPU.
BACKEND = "inductor"
SHAPES_PER_CLOSURE = 4
BASE_LIMIT = 8  # dynamo's default

_closures: collections.Counter = collections.Counter()  # code object -> closures compiled over it


def _limit_name() -> str:
    config = torch._dynamo.config
    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the older name


def compile_graph(fn):
    """fn compiled as one static-shape graph with the current BACKEND."""
    _closures[fn.__code__] += 1
    config, name = torch._dynamo.config, _limit_name()
    need = BASE_LIMIT + SHAPES_PER_CLOSURE * _closures[fn.__code__]
    setattr(config, name, max(getattr(config, name), need))
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=BACKEND)


def dynamo_counts() -> dict[str, int]:
    """Dynamo's process-wide counters: graphs compiled and graph breaks (as torch._dynamo.utils.counters)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}

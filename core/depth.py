"""Depth over the loops of a cyclic plan: progressive depth in training (#895) and extra loops at eval (#167).

Both work on plans that cycle K blocks R times ("KxR": 0 1 .. K-1 repeated R times), where "r loops" means
the first r*K effective layers. Other plans (flat with R = 1 aside, or "0 1 2 3 4 5 4 5 6 7 8") have no
single loop to drop or repeat, so they are refused with one clear error.

Progressive depth. `train.depth_schedule = "0.3:2,0.5:3,0.75:4,1.0:5"`: r loops while the training
fraction is below f (then the next entry), as #895's PROG_DEPTH. The fraction is elapsed training time over
train.max_wallclock_seconds (`depth_schedule_by = "wallclock"`, agreed across ranks with a MAX all-reduce) or
completed steps over train.iterations (`"step"`). The active model is `truncated_spec(spec, layers)` over the
SAME weights: every per-layer table is indexed by effective layer, so a truncated model reads only its
first rows (`truncate_weights` makes that explicit and the tests check it). Within the truncated model
everything is computed at the current depth, as a model built with the shorter plan: XSA on its last N
layers (#895), the U-Net over its n layers (the first n//2 skip weights, innermost pair first), loop gates
and loop embeddings of the loops it runs. Depth only grows, so rows of a per-layer table that are not yet in
use have never had a gradient: Adam's moments stay exactly 0 and its update is 0/(0 + eps) = 0, as in #895
(one Adam over whole tensors, global step count); Muon only sees block matrices, which every depth uses.

Eval-time extra loops (`evaluate_loops`). After the trained R loops the last loop is run again, reusing the
last loop's per-layer rows (iteration embeddings, per-layer scales, gates, its loop embedding and gate,
cross-repeat scales against the previous loop's outputs); the U-Net skips are all consumed by then, so
none are added. (#167 instead reused the block's own scales and no embeddings; with per-layer tables those
do not exist, and the last loop's rows are the conditioning the trained model last saw.) For every loop
k it reports delta_k = rms(x_k - x_{k-1}) / rms(x_{k-1}) of the residual stream at the loop's end, over
every validation token, and the bpb of the final norm + head applied there (an early exit below R).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from core.bpb import bpb_from_sums, count_bytes
from core.errors import UserError
from core.params import param_table
from core.spec import ModelSpec

SCHEDULE_BY = ("wallclock", "step")


def cyclic_shape(spec: ModelSpec) -> tuple[int, int] | None:
    """(K, R) if the plan is K blocks cycled R times, else None."""
    k = spec.num_blocks
    r, rest = divmod(spec.num_layers, k)
    return (k, r) if not rest and spec.layer_plan == tuple(range(k)) * r else None


def require_cyclic(spec: ModelSpec, what: str) -> tuple[int, int]:
    shape = cyclic_shape(spec)
    if shape is None:
        plan = " ".join(map(str, spec.layer_plan))
        raise UserError(f"{what} needs a cyclic layer plan 'KxR' (K blocks repeated R times); "
                        f"model.layer_plan = {plan} has no single loop to drop or repeat")
    return shape


def truncated_spec(spec: ModelSpec, layers: int) -> ModelSpec:
    """The spec of the first `layers` effective layers. Cross-repeat skips need a second loop, so with one
    loop they are off (the term is zero for the first loop anyway), as are #319's gates (none after the first
    loop); VE runs at the layers the truncated plan still has."""
    if layers == spec.num_layers:
        return spec
    plan = spec.layer_plan[:layers]
    changes: dict = {"layer_plan": plan, "num_layers": layers}
    if spec.cross_repeat_skips and len(set(plan)) == len(plan):
        changes["cross_repeat_skips"] = False
    if spec.loop_gate_style == "seed319" and len(set(plan)) == len(plan):  # #319 gates no first loop
        changes.update(loop_gates=False, loop_gate_style="every_loop")
    if spec.ve_layers:  # VE at the layers the truncated plan still has (the leading rows of ve_layer_scales)
        changes["ve_layers"] = ",".join(str(i) for i in spec.ve_layer_list if i < layers)
    try:
        return dataclasses.replace(spec, **changes)
    except UserError as e:
        raise UserError(f"train.depth_schedule: the model truncated to {layers} layers is not valid: {e}") from None


def truncate_weights(spec: ModelSpec, weights: dict[str, np.ndarray], layers: int) -> dict[str, np.ndarray]:
    """The weights of `truncated_spec(spec, layers)`: each tensor's leading rows, to the truncated table's shapes
    (per-layer tables (L, ...) -> (layers, ...), cross_repeat_scales (K, R-1, d) -> (K, r-1, d), ...)."""
    out = {}
    for info in param_table(truncated_spec(spec, layers)):
        out[info.name] = weights[info.name][tuple(slice(0, n) for n in info.shape)]
    return out


# ---- progressive depth -----------------------------------------------------------------------------------

def parse_stages(text: str, key: str = "train.depth_schedule") -> tuple[tuple[float, int], ...]:
    """"f1:r1,f2:r2,..." -> ((f1, r1), ...): fractions rising in (0, 1] and ending at 1.0, loops rising."""
    expected = "expected 'f:r,...' such as '0.3:2,0.5:3,0.75:4,1.0:5' (r loops while the fraction is below f)"
    stages = []
    for part in text.split(","):
        f_text, sep, r_text = part.strip().partition(":")
        if not sep and part.strip():
            raise UserError(f"{key} = {text!r}: {part.strip()!r} has no ':'; {expected}")
        try:
            f, r = float(f_text), int(r_text)
        except ValueError:
            raise UserError(f"{key} = {text!r}: cannot read {part.strip()!r}; {expected}") from None
        if not (0 < f <= 1) or not math.isfinite(f):
            raise UserError(f"{key} = {text!r}: fraction {f_text.strip()} is not in (0, 1]")
        if r < 1:
            raise UserError(f"{key} = {text!r}: loops {r_text.strip()} must be 1 or more")
        stages.append((f, r))
    for (f0, r0), (f1, r1) in zip(stages, stages[1:]):
        if f1 <= f0:
            raise UserError(f"{key} = {text!r}: fractions must rise ({f0:g} then {f1:g})")
        if r1 <= r0:
            raise UserError(f"{key} = {text!r}: loops must rise ({r0} then {r1}); depth only grows, so "
                            "unused per-layer rows never carry stale optimizer moments")
    if stages[-1][0] != 1.0:
        raise UserError(f"{key} = {text!r}: the last fraction must be 1.0 (the end of training)")
    return tuple(stages)


@dataclasses.dataclass(frozen=True)
class DepthSchedule:
    stages: tuple[tuple[float, int], ...]  # (until fraction, loops)
    block_count: int  # K: layers per loop
    by: str  # "wallclock" or "step"

    def layers_at(self, fraction: float) -> int:
        for until, loops in self.stages:
            if fraction < until:
                return loops * self.block_count
        return self.stages[-1][1] * self.block_count

    @property
    def layer_counts(self) -> tuple[int, ...]:
        return tuple(r * self.block_count for _, r in self.stages)

    def fraction(self, step: int, iterations: int, elapsed_ms: float, cap_ms: float) -> float:
        return step / iterations if self.by == "step" else elapsed_ms / cap_ms


def depth_schedule(cfg) -> DepthSchedule | None:
    """The run's progressive-depth schedule (None when train.depth_schedule is empty), checked against the
    spec: a cyclic plan, at most R loops, ending at R, and a wallclock cap when keyed to the wallclock."""
    t, spec = cfg.train, cfg.model
    if not t.depth_schedule:
        return None
    stages = parse_stages(t.depth_schedule)
    k, r = require_cyclic(spec, f"train.depth_schedule = {t.depth_schedule!r}")
    if r == 1:
        raise UserError(f"train.depth_schedule = {t.depth_schedule!r} needs a plan that loops ('KxR' with R >= 2); "
                        f"model.layer_plan runs each of its {k} blocks once, so there is no loop to drop")
    if stages[-1][1] != r:
        raise UserError(f"train.depth_schedule = {t.depth_schedule!r}: the last entry must train all {r} loops of "
                        f"model.layer_plan (export and evaluation run at full depth), not {stages[-1][1]}")
    if t.depth_schedule_by == "wallclock" and t.max_wallclock_seconds <= 0:
        raise UserError("train.depth_schedule_by = 'wallclock' needs train.max_wallclock_seconds > 0 (the fractions "
                        "are of it); set it, or train.depth_schedule_by = 'step' for fractions of train.iterations")
    schedule = DepthSchedule(stages, k, t.depth_schedule_by)
    for layers in schedule.layer_counts:
        truncated_spec(spec, layers)  # every stage is a valid model (e.g. XSA's last N fits)
    return schedule


# ---- eval-time extra loops -------------------------------------------------------------------------------

@dataclasses.dataclass
class LoopEval:
    trained_loops: int
    block_count: int
    losses: list[float]  # val loss (nats/token) at the end of loop 1..N
    bpbs: list[float]
    deltas: list[float]  # rms(x_k - x_{k-1}) / rms(x_{k-1}); nan for loop 1
    eps: float | None = None

    @property
    def converged_loop(self) -> int | None:
        """The first loop (1-based, past the trained ones) whose delta is below eps."""
        if self.eps is None:
            return None
        for k in range(self.trained_loops + 1, len(self.deltas) + 1):
            if self.deltas[k - 1] < self.eps:
                return k
        return None

    def rows(self) -> list[dict]:
        return [{"loop": k + 1, "layers": (k + 1) * self.block_count, "delta": self.deltas[k],
                 "val_loss": self.losses[k], "val_bpb": self.bpbs[k], "extra": k + 1 > self.trained_loops}
                for k in range(len(self.losses))]

    def to_dict(self) -> dict:
        return {"trained_loops": self.trained_loops, "eps": self.eps, "converged_loop": self.converged_loop,
                "loops": self.rows()}


def check_loops(spec: ModelSpec, loops: int | None, converge: float | None, max_loops: int | None) -> tuple[int, float | None]:
    """(total loops to run, eps or None) from --loops / --converge / --max-loops, with one clear error each."""
    _, r = require_cyclic(spec, "eval-time extra loops")
    if loops is not None and converge is not None:
        raise UserError("give either --loops N or --converge EPS (with --max-loops M), not both")
    if max_loops is not None and converge is None:
        raise UserError("--max-loops needs --converge EPS")
    if converge is not None:
        if not (converge > 0 and math.isfinite(converge)):
            raise UserError(f"--converge {converge}: expected a positive number such as 1e-3")
        loops = 2 * r if max_loops is None else max_loops
        flag = "--max-loops"
    else:
        flag = "--loops"
    if loops is None or loops < r:
        raise UserError(f"{flag} {loops}: expected at least the {r} loops the model was trained with "
                        f"(model.layer_plan cycles {spec.num_blocks} blocks {r} times)")
    return loops, converge


def evaluate_loops(backend, loop_stats, val_tokens: np.ndarray, seq_len: int, batch_tokens: int, luts,
                   total_loops: int, eps: float | None = None) -> LoopEval:
    """Every validation sequence (split across ranks, as core.loop.evaluate) through `total_loops` loops.
    `loop_stats(x, y, total_loops)` (backend_*/depth_eval.py) returns a (total_loops, 3) float64 array per
    batch: loss sum in nats, sum of (x_k - x_{k-1})^2, sum of x_{k-1}^2. Every batch runs all loops, so each
    loop's numbers cover the same tokens; --converge then picks the first loop whose whole-set delta < eps.
    The trained loops are the model's own forward pass (model.hidden_states), so loop R is the standard eval."""
    k, r = require_cyclic(backend.spec, "eval-time extra loops")
    total_seqs = (len(val_tokens) - 1) // seq_len
    start = total_seqs * backend.rank // backend.world_size
    end = total_seqs * (backend.rank + 1) // backend.world_size
    batch_seqs = max(batch_tokens // (backend.world_size * seq_len), 1)
    stats = np.zeros((total_loops, 3), np.float64)
    counts = np.zeros(2, np.float64)  # tokens, bytes
    for s in range(start, end, batch_seqs):
        e = min(s + batch_seqs, end)
        chunk = np.asarray(val_tokens[s * seq_len: e * seq_len + 1], dtype=np.int64)
        x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
        stats += loop_stats(x, y, total_loops)
        counts += (y.size, count_bytes(x.reshape(-1), y.reshape(-1), luts))
    flat = backend.all_reduce_sum(np.concatenate([stats.reshape(-1), counts]))
    stats, (tokens, nbytes) = flat[:-2].reshape(total_loops, 3), flat[-2:]
    losses, bpbs = zip(*(bpb_from_sums(s, tokens, nbytes) for s in stats[:, 0]))
    deltas = [float("nan")] + [math.sqrt(d / p) if p > 0 else float("nan") for d, p in stats[1:, 1:]]
    return LoopEval(r, k, list(losses), list(bpbs), deltas, eps)


def format_rows(result: LoopEval) -> list[str]:
    lines = []
    for row in result.rows():
        delta = "-" if math.isnan(row["delta"]) else f"{row['delta']:.5f}"
        tag = " (extra)" if row["extra"] else ""
        lines.append(f"loop:{row['loop']} layers:{row['layers']} delta:{delta} val_loss:{row['val_loss']:.4f} "
                     f"val_bpb:{row['val_bpb']:.4f}{tag}")
    if result.eps is not None:
        k = result.converged_loop
        lines.append(f"converged: loop:{k} (delta < {result.eps:g}) val_bpb:{result.bpbs[k - 1]:.4f}" if k else
                     f"not converged: delta >= {result.eps:g} up to loop {len(result.deltas)}")
    return lines

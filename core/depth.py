"""Depth schedules in training (#895's progressive depth, the records' loop switch-on) and extra loops at eval (#167).

"r loops" works on plans that cycle K blocks R times ("KxR": 0 1 .. K-1 repeated R times) and means the
first r*K effective layers. Other plans (flat with R = 1 aside, or "0 1 2 3 4 5 4 5 6 7 8") have no single
loop to drop or repeat: a depth schedule names their earlier stages by plan instead (below), and eval-time
extra loops refuse them with one clear error.

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

Stages named by plan (#1394, #1493: 11 flat layers, then the plan with a middle segment run three times, from
50% or 35% of the wallclock). `train.depth_schedule = "0.5:flat,1.0:full"`: an entry's right side is a loop
count r as above, "flat" (blocks 0..K-1 once each), "full" (model.layer_plan), or a plan in model.layer_plan's
own notation with spaces, not commas, between indices ("0.5:0 1 2 3 4 5,1.0:full"; core.spec.parse_layer_plan
reads it). The last stage is model.layer_plan (export, size and eval run it). There is one weight set, the
final plan's; an earlier plan P maps onto it so every per-effective-layer table has a row for each of P's
layers:
- P must be a subsequence of the final plan; P's layer j reads the rows of the final-plan layer it matches
  first (greedy, left to right: `plan_rows`). For the records' flat 0..10 under 0 1 2 3 4 5 4 5 4 5 6 .. 10,
  layers 0-5 read rows 0-5 and layers 6-10 rows 10-14, the rows those blocks have once looping is on.
- Per-layer tables (LAYER_TABLES) take those rows; vrl_alphas (one per layer after the first) the row of the
  matched layer; VE runs at P's layers matched to a model.ve_layers layer, with that layer's ve_layer_scales.
  The rest is P's own model, as for a truncated one: XSA on P's last N layers, parallel blocks by block.
- The U-Net skips of P (n//2 pairs over its n layers) use the first n//2 rows of each skip table
  (SKIP_TABLES), innermost pair first: as the records, whose flat stage uses 5 of the 7 skip pairs.
- Tables indexed by loop (loop_embeds, loop_gates, #319's gates, cross_repeat_scales) have no such row, so
  those options with a stage that is not a leading part of the final plan are one error naming the key; so is
  any other table whose size changes with the plan and has no rule here.
- A stage that is a leading part of the final plan (every "r loops" stage) is the truncated model above,
  reading leading rows in place: exactly the behaviour before plans could be named.
- Each stage's rows contain the previous stage's (depth only grows, as for loop counts); so every stage is
  longer than the one before and is identified by its length, as the loop, the checkpoint and the backends'
  set_depth(layers) identify depths. The backends gather the mapped rows with static indices inside their
  loss functions (differentiable: gradients land in the full tables; `DepthVariant.rows`).

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
import functools
import math

import numpy as np

from core.bpb import bpb_from_sums, count_bytes
from core.errors import UserError
from core.params import param_table
from core.spec import ModelSpec, parse_layer_plan

SCHEDULE_BY = ("wallclock", "step")
KEY = "train.depth_schedule"
# Tables with one row per effective layer, mapped row by row onto an earlier stage's plan (see above).
LAYER_TABLES = ("iter_embeds", "value_scales", "layer_attn_scales", "layer_mlp_scales", "layer_resid_mixes",
                "iter_scales", "layer_in_gains", "layer_out_gains")
SKIP_TABLES = ("skip_weights", "skip_gates")  # one row per U-Net pair, innermost first: a stage uses the first ones
LOOP_OPTIONS = ("loop_embeds", "loop_gates", "cross_repeat_skips")  # tables per loop: no row for a mapped stage


def cyclic_shape(spec: ModelSpec) -> tuple[int, int] | None:
    """(K, R) if the plan is K blocks cycled R times, else None."""
    k = spec.num_blocks
    r, rest = divmod(spec.num_layers, k)
    return (k, r) if not rest and spec.layer_plan == tuple(range(k)) * r else None


def require_cyclic(spec: ModelSpec, what: str, hint: bool = False) -> tuple[int, int]:
    shape = cyclic_shape(spec)
    if shape is None:
        plan = " ".join(map(str, spec.layer_plan))
        raise UserError(f"{what} needs a cyclic layer plan 'KxR' (K blocks repeated R times); "
                        f"model.layer_plan = {plan} has no single loop to drop or repeat"
                        + ("; or name each stage's plan, e.g. '0.5:flat,1.0:full'" if hint else ""))
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


# ---- depth schedules -------------------------------------------------------------------------------------

PLAN_WORDS = ("flat", "full")


def parse_stages(text: str, key: str = KEY) -> tuple[tuple[float, int | str | tuple[int, ...]], ...]:
    """"f1:r1,f2:r2,..." -> ((f1, r1), ...): fractions rising in (0, 1] and ending at 1.0. Each right side is
    a loop count (int, rising between neighbours), "flat", "full", or a plan tuple (core.spec.parse_layer_plan's
    notation); plans are checked against model.layer_plan by depth_schedule."""
    expected = ("expected 'f:r,...' such as '0.3:2,0.5:3,0.75:4,1.0:5' (r loops while the fraction is below f) or "
                "'f:PLAN,...' such as '0.5:flat,1.0:full' (PLAN: flat, full, or block indices with spaces)")
    stages = []
    for part in text.split(","):
        f_text, sep, r_text = part.strip().partition(":")
        if not sep and part.strip():
            raise UserError(f"{key} = {text!r}: {part.strip()!r} has no ':'; {expected}")
        try:
            f = float(f_text)
            value = _stage_value(r_text, key)
        except (ValueError, UserError):
            raise UserError(f"{key} = {text!r}: cannot read {part.strip()!r}; {expected}") from None
        if not (0 < f <= 1) or not math.isfinite(f):
            raise UserError(f"{key} = {text!r}: fraction {f_text.strip()} is not in (0, 1]")
        if isinstance(value, int) and value < 1:
            raise UserError(f"{key} = {text!r}: loops {r_text.strip()} must be 1 or more")
        stages.append((f, value))
    for (f0, r0), (f1, r1) in zip(stages, stages[1:]):
        if f1 <= f0:
            raise UserError(f"{key} = {text!r}: fractions must rise ({f0:g} then {f1:g})")
        if isinstance(r0, int) and isinstance(r1, int) and r1 <= r0:
            raise UserError(f"{key} = {text!r}: loops must rise ({r0} then {r1}); depth only grows, so "
                            "unused per-layer rows never carry stale optimizer moments")
    if stages[-1][0] != 1.0:
        raise UserError(f"{key} = {text!r}: the last fraction must be 1.0 (the end of training)")
    return tuple(stages)


def _stage_value(text: str, key: str) -> int | str | tuple[int, ...]:
    text = text.strip()
    if text.isdigit() or (text[:1] in "+-" and text[1:].isdigit()):
        return int(text)
    if text in PLAN_WORDS:
        return text
    return parse_layer_plan(text, None, key)[0]  # its UserError becomes parse_stages' one line


@dataclasses.dataclass(frozen=True)
class DepthSchedule:
    stages: tuple[tuple[float, int | str | tuple[int, ...]], ...]  # (until fraction, loops or plan)
    block_count: int  # K: layers per loop
    by: str  # "wallclock" or "step"
    plans: tuple[tuple[int, ...], ...] | None = None  # each stage's plan when one is named by plan; None: loops

    def layers_at(self, fraction: float) -> int:
        counts = self.layer_counts
        for (until, _), layers in zip(self.stages, counts):
            if fraction < until:
                return layers
        return counts[-1]

    @property
    def layer_counts(self) -> tuple[int, ...]:
        if self.plans is not None:
            return tuple(len(plan) for plan in self.plans)
        return tuple(r * self.block_count for _, r in self.stages)

    def fraction(self, step: int, iterations: int, elapsed_ms: float, cap_ms: float) -> float:
        return step / iterations if self.by == "step" else elapsed_ms / cap_ms


def depth_schedule(cfg) -> DepthSchedule | None:
    """The run's depth schedule (None when train.depth_schedule is empty), checked against the spec: stages
    that fit the plan (loop counts: a cyclic plan, at most R loops; plans: module docstring), ending at
    model.layer_plan, and a wallclock cap when keyed to the wallclock."""
    t, spec = cfg.train, cfg.model
    if not t.depth_schedule:
        return None
    stages = parse_stages(t.depth_schedule)
    by_plan = not all(isinstance(v, int) for _, v in stages)
    if by_plan:
        plans = stage_plans(spec, t.depth_schedule)
        k = cyclic_shape(spec)[0] if cyclic_shape(spec) else spec.num_blocks
    else:
        k, r = require_cyclic(spec, f"{KEY} = {t.depth_schedule!r}", hint=True)
        if r == 1:
            raise UserError(f"{KEY} = {t.depth_schedule!r} needs a plan that loops ('KxR' with R >= 2); "
                            f"model.layer_plan runs each of its {k} blocks once, so there is no loop to drop")
        if stages[-1][1] != r:
            raise UserError(f"{KEY} = {t.depth_schedule!r}: the last entry must train all {r} loops of "
                            f"model.layer_plan (export and evaluation run at full depth), not {stages[-1][1]}")
    if t.depth_schedule_by == "wallclock" and t.max_wallclock_seconds <= 0:
        raise UserError("train.depth_schedule_by = 'wallclock' needs train.max_wallclock_seconds > 0 (the fractions "
                        "are of it); set it, or train.depth_schedule_by = 'step' for fractions of train.iterations")
    if by_plan:
        return DepthSchedule(stages, k, t.depth_schedule_by, plans)
    schedule = DepthSchedule(stages, k, t.depth_schedule_by)
    for layers in schedule.layer_counts:
        truncated_spec(spec, layers)  # every stage is a valid model (e.g. XSA's last N fits)
    return schedule


def _show(plan: tuple[int, ...]) -> str:
    return " ".join(map(str, plan))


@functools.lru_cache(maxsize=32)
def stage_plans(spec: ModelSpec, text: str) -> tuple[tuple[int, ...], ...]:
    """Each stage's plan for a schedule that names plans, checked: the last is model.layer_plan, each earlier
    one a subsequence of it whose rows (plan_rows) the next stage's contain, and each a valid model."""
    what = f"{KEY} = {text!r}"
    plans = []
    for _, value in parse_stages(text):
        if isinstance(value, int):
            k, r = require_cyclic(spec, f"{what}: a loop count", hint=True)
            if value > r:
                raise UserError(f"{what}: {value} loops is more than the {r} of model.layer_plan")
            plans.append(spec.layer_plan[:value * k])
        else:
            plans.append({"full": spec.layer_plan, "flat": tuple(range(spec.num_blocks))}.get(value, value))
    if plans[-1] != spec.layer_plan:
        raise UserError(f"{what}: the last entry must be model.layer_plan ('full'; export and evaluation run it), "
                        f"not {_show(plans[-1])}")
    rows = []
    for plan in plans:
        mapped = plan_rows(plan, spec.layer_plan)
        if mapped is None:
            raise UserError(f"{what}: the stage plan {_show(plan)} is not a subsequence of model.layer_plan = "
                            f"{_show(spec.layer_plan)} (each stage's layers must appear in it in order, so each has "
                            "a row in its per-layer tables)")
        rows.append(set(mapped))
    for i in range(len(plans) - 1):
        if not rows[i] < rows[i + 1]:
            raise UserError(f"{what}: the stage plan {_show(plans[i + 1])} drops layers the stage before it "
                            f"({_show(plans[i])}) trains; depth only grows, so unused per-layer rows never carry "
                            "stale optimizer moments")
    for plan in plans:
        _variant_of_plan(spec, plan, what)  # a valid model, with a row rule for every table
    return tuple(plans)


def plan_rows(plan: tuple[int, ...], final: tuple[int, ...]) -> tuple[int, ...] | None:
    """The final-plan layer each of `plan`'s layers reads its rows from: its first match, left to right
    (None when `plan` is not a subsequence of `final`)."""
    rows, i = [], 0
    for block in plan:
        while i < len(final) and final[i] != block:
            i += 1
        if i == len(final):
            return None
        rows.append(i)
        i += 1
    return tuple(rows)


def row_selectors(rows: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[tuple[str, slice | list[int]], ...]:
    """(name, selector) for a variant's rows: a slice where the rows run in order (a view, as truncation reads
    them), else the index list; both constant, so a compiled step sees static indices. () (a table the export
    folds in that the stage lacks) is the empty slice."""
    out = []
    for name, index in rows:
        start = index[0] if index else 0
        out.append((name, slice(start, start + len(index)) if index == tuple(range(start, start + len(index)))
                    else list(index)))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DepthVariant:
    """The model a backend trains at one depth: its spec, and the tables whose rows it reads from the final
    plan's weights: (name, final-table row indices), () for a truncated stage (leading rows, read in place)."""
    spec: ModelSpec
    rows: tuple[tuple[str, tuple[int, ...]], ...] = ()


@functools.lru_cache(maxsize=64)
def depth_variant(spec: ModelSpec, layers: int, schedule: str = "") -> DepthVariant:
    """The stage of `schedule` (train.depth_schedule) with `layers` effective layers; the truncated model when
    no stage names a plan of that length (loop counts, or a checkpoint's depth: today's behaviour)."""
    if layers == spec.num_layers:
        return DepthVariant(spec)
    plan = spec.layer_plan[:layers]
    if schedule and not all(isinstance(v, int) for _, v in parse_stages(schedule)):
        plan = next((p for p in stage_plans(spec, schedule) if len(p) == layers), plan)
    return _variant_of_plan(spec, plan, f"{KEY} = {schedule!r}")


def _variant_of_plan(spec: ModelSpec, plan: tuple[int, ...], what: str) -> DepthVariant:
    if plan == spec.layer_plan[:len(plan)]:
        return DepthVariant(truncated_spec(spec, len(plan)))
    for name in LOOP_OPTIONS:
        if getattr(spec, name):
            raise UserError(f"{what}: model.{name} = true keeps a table per loop, and the stage plan {_show(plan)} "
                            "is not a leading part of model.layer_plan, so it has no rows there; switch "
                            f"model.{name} off or give only stages that are leading parts of the plan")
    rows = plan_rows(plan, spec.layer_plan)
    ve = set(spec.ve_layer_list)
    try:
        sub = dataclasses.replace(spec, layer_plan=plan, num_layers=len(plan),
                                  ve_layers=",".join(str(j) for j, m in enumerate(rows) if m in ve))
    except UserError as e:
        raise UserError(f"{what}: the model with the stage plan {_show(plan)} is not valid: {e}") from None
    full = {info.name: info.shape for info in param_table(spec)}
    mapped = []
    for info in param_table(sub):
        shape = full.get(info.name)
        if info.name in LAYER_TABLES:
            index = rows
        elif info.name == "vrl_alphas":  # row l - 1 belongs to layer l
            index = tuple(m - 1 for m in rows[1:])
        elif info.name == "ve_layer_scales":
            index = tuple(spec.ve_layer_list.index(rows[j]) for j in sub.ve_layer_list)
        elif info.name in SKIP_TABLES:
            index = tuple(range(info.shape[0]))
        elif shape == info.shape:
            continue  # per block or per model: the same tensor at every depth
        else:
            index = None
        if index is None or shape is None or (len(index),) + tuple(shape[1:]) != info.shape:
            raise UserError(f"{what}: the model tensor {info.name} changes size with the plan and has no rule for the "
                            f"rows of the stage plan {_show(plan)} (core/depth.py); give only stages that are "
                            "leading parts of model.layer_plan")
        if index != tuple(range(shape[0])):
            mapped.append((info.name, index))
    return DepthVariant(sub, tuple(mapped))


def variant_weights(spec: ModelSpec, weights: dict[str, np.ndarray], layers: int,
                    schedule: str = "") -> dict[str, np.ndarray]:
    """The weights of depth_variant(spec, layers, schedule) as a model of its own (the reference the backends'
    in-graph gathers are tested against): truncate_weights for a truncated stage, else the mapped rows."""
    variant = depth_variant(spec, layers, schedule)
    if not variant.rows:
        return truncate_weights(spec, weights, layers)
    out = {info.name: weights[info.name] for info in param_table(variant.spec)}
    out.update({name: weights[name][list(index)] for name, index in variant.rows})
    return out


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

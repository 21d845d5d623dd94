"""Schedules shared by both backends: learning-rate multiplier, Muon momentum warmup, per-group LRs and weight decays."""

from __future__ import annotations

import fnmatch

from core.config import OptimConfig, TrainConfig
from core.errors import UserError
from core.params import EMBED, HEAD, MATRIX, SCALAR, param_table
from core.spec import ModelSpec


def group_base_lrs(spec: ModelSpec, optim: OptimConfig) -> dict[str, float]:
    return {
        MATRIX: optim.matrix_lr,
        SCALAR: optim.scalar_lr,
        EMBED: optim.tied_embed_lr if spec.tie_embeddings else optim.embed_lr,
        HEAD: optim.head_lr,
    }


def weight_decays(spec: ModelSpec, optim: OptimConfig) -> dict[str, float]:
    """{parameter name: its decoupled weight decay} for every parameter that decays (its group's
    optim.<group>_weight_decay > 0 and no optim.weight_decay_exempt pattern matches its name)."""
    by_group = {MATRIX: optim.matrix_weight_decay, SCALAR: optim.scalar_weight_decay,
                EMBED: optim.embed_weight_decay, HEAD: optim.head_weight_decay}
    names = [info.name for info in param_table(spec)]
    for pattern in optim.weight_decay_exempt:
        if not fnmatch.filter(names, pattern):
            raise UserError(f"optim.weight_decay_exempt: {pattern!r} matches no parameter of this model "
                            f"(names are as `loopgolf size --config` lists them, e.g. {names[-1]!r})")
    return {info.name: by_group[info.group] for info in param_table(spec) if by_group[info.group] > 0
            and not any(fnmatch.fnmatchcase(info.name, pattern) for pattern in optim.weight_decay_exempt)}


def lr_multiplier(step: int, elapsed_ms: float, train: TrainConfig) -> float:
    """Upstream's linear warmdown to 0, with PR #470's step-based start as an option.

    - warmdown_start_step > 0: 1 before that step, then max(1 - (step - start)/warmdown_iters, 0).
    - a wallclock cap: warm down over the last warmdown_iters * (average ms/step) of the budget
      (max_wallclock_seconds less train.gptq_reserve_seconds).
    - no cap: warm down over the last warmdown_iters steps of train.iterations.
    - warmdown_fraction > 0 (#1394/#1493): with frac = elapsed / cap (step / iterations with no cap),
      (1 - frac) / warmdown_fraction once frac >= 1 - warmdown_fraction, down to 0.
    """
    if train.warmdown_fraction > 0:
        cap_ms = train.train_wallclock_seconds * 1000.0
        frac = elapsed_ms / cap_ms if cap_ms > 0 else step / train.iterations
        return max(min((1.0 - frac) / train.warmdown_fraction, 1.0), 0.0)
    if train.warmdown_iters <= 0:
        return 1.0
    if train.warmdown_start_step > 0:
        if step < train.warmdown_start_step:
            return 1.0
        return max(1.0 - (step - train.warmdown_start_step) / train.warmdown_iters, 0.0)
    if train.max_wallclock_seconds <= 0:
        start = max(train.iterations - train.warmdown_iters, 0)
        if start <= step < train.iterations:
            return max((train.iterations - step) / train.warmdown_iters, 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = train.warmdown_iters * step_ms
    remaining_ms = max(train.train_wallclock_seconds * 1000.0 - elapsed_ms, 0.0)  # the cap less the GPTQ reserve
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(step: int, optim: OptimConfig) -> float:
    """Linear warmup from muon_momentum_warmup_start to muon_momentum over the first warmup steps."""
    if optim.muon_momentum_warmup_steps <= 0:
        return optim.muon_momentum
    frac = min(step / optim.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * optim.muon_momentum_warmup_start + frac * optim.muon_momentum

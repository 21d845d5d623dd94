"""Learning-rate warmdown (wallclock, iterations, step-based) and Muon momentum warmup."""

import pytest

from core.config import OptimConfig, TrainConfig
from core.schedule import lr_multiplier, muon_momentum


def test_iteration_warmdown_without_cap():
    t = TrainConfig(iterations=100, warmdown_iters=20, max_wallclock_seconds=0)
    assert lr_multiplier(79, 0, t) == 1.0
    assert lr_multiplier(80, 0, t) == pytest.approx(1.0)
    assert lr_multiplier(90, 0, t) == pytest.approx(0.5)
    assert lr_multiplier(99, 0, t) == pytest.approx(0.05)


def test_wallclock_warmdown_uses_average_step_time():
    t = TrainConfig(warmdown_iters=100, max_wallclock_seconds=10)
    # 10 ms/step: warmdown spans the last 1000 ms of the 10 s budget.
    assert lr_multiplier(800, 8000, t) == 1.0
    assert lr_multiplier(950, 9500, t) == pytest.approx(0.5)
    assert lr_multiplier(1000, 10000, t) == 0.0


def test_step_based_warmdown_start():
    t = TrainConfig(warmdown_iters=100, warmdown_start_step=400, max_wallclock_seconds=600)
    assert lr_multiplier(399, 1e9, t) == 1.0  # the wallclock fallback does not apply
    assert lr_multiplier(450, 0, t) == pytest.approx(0.5)
    assert lr_multiplier(600, 0, t) == 0.0


def test_no_warmdown():
    assert lr_multiplier(10**6, 10**9, TrainConfig(warmdown_iters=0)) == 1.0


def test_muon_momentum_warmup():
    o = OptimConfig(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert muon_momentum(0, o) == pytest.approx(0.85)
    assert muon_momentum(250, o) == pytest.approx(0.90)
    assert muon_momentum(5000, o) == pytest.approx(0.95)


def test_warmdown_fraction_of_the_training_clock_as_the_records():
    """#1394's WARMDOWN_FRAC: 1 until the last fraction of the clock (cap less the GPTQ reserve), then linear to 0."""
    t = TrainConfig(warmdown_fraction=0.5, max_wallclock_seconds=600, gptq_reserve_seconds=12, warmdown_iters=7)
    assert lr_multiplier(10, 0, t) == 1.0 and lr_multiplier(10, 294_000 * 0.999, t) == 1.0
    assert lr_multiplier(10, 441_000, t) == pytest.approx(0.5)  # 3/4 of the 588 s clock
    assert lr_multiplier(10, 588_000, t) == 0.0 and lr_multiplier(10, 700_000, t) == 0.0
    steps = TrainConfig(warmdown_fraction=0.25, max_wallclock_seconds=0, iterations=100)
    assert lr_multiplier(75, 1e9, steps) == 1.0 and lr_multiplier(90, 0, steps) == pytest.approx(0.4)


@pytest.mark.parametrize("kw, match", [({"warmdown_fraction": 1.5}, "warmdown_fraction = 1.5"),
                                       ({"warmdown_fraction": -0.1}, "warmdown_fraction"),
                                       ({"warmdown_fraction": 0.5, "warmdown_start_step": 10}, "choose one")])
def test_warmdown_fraction_bad_values(kw, match):
    from core.errors import UserError

    with pytest.raises(UserError, match=match):
        TrainConfig(**kw)

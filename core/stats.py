"""Statistics over seeds: summaries and the challenge's significance test.

The challenge accepts a record that beats the standing one by at least 0.005 nats of val_loss at
p < 0.01. Here that is a one-sided Welch t-test (unequal variances) of H1: mean(baseline) - mean(variant)
> delta, on the runs' losses in nats. scipy is imported when a test runs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CHALLENGE_DELTA_NATS = 0.005
CHALLENGE_ALPHA = 0.01


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof 1); nan for one run
    min: float
    max: float


def summarize(values) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to summarize")
    std = float(x.std(ddof=1)) if x.size > 1 else math.nan
    return Summary(int(x.size), float(x.mean()), std, float(x.min()), float(x.max()))


@dataclasses.dataclass(frozen=True)
class Improvement:
    t: float
    df: float
    p: float  # nan when it cannot be computed (see `why`)
    why: str = ""


def welch_improvement(baseline, variant, delta: float = CHALLENGE_DELTA_NATS) -> Improvement:
    """One-sided Welch t-test that the variant's mean loss is below the baseline's by more than `delta`
    (H0: mean(baseline) - mean(variant) <= delta). Needs at least 2 runs on each side and some spread."""
    b = np.asarray(baseline, dtype=np.float64)
    v = np.asarray(variant, dtype=np.float64)
    if b.size < 2 or v.size < 2:
        return Improvement(math.nan, math.nan, math.nan, "needs 2 or more runs on each side")
    if b.var(ddof=1) == 0 and v.var(ddof=1) == 0:
        return Improvement(math.nan, math.nan, math.nan, "no spread between seeds on either side")
    from scipy import stats

    result = stats.ttest_ind(b, v + delta, equal_var=False, alternative="greater")
    df = getattr(result, "df", math.nan)
    return Improvement(float(result.statistic), float(df), float(result.pvalue))

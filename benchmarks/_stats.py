"""Paired-seed statistics shared by the experiments (arithmetic.py, pretrain_effect.py)."""
from __future__ import annotations

import math
import statistics

# two-sided 95 % Student t quantiles by degrees of freedom (1.96 beyond)
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262}


def finite(values):
    return [v for v in values if v == v and abs(v) != float("inf")]


def mean_sd(values):
    """(mean, sample sd) of the finite values; (nan, nan) without any."""
    values = finite(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def t_interval(diffs):
    """(mean, low, high): the 95 % t-interval of the finite paired differences."""
    diffs = finite(diffs)
    n = len(diffs)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, float("nan"), float("nan")
    half = T_95.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half

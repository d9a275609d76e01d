"""Is a difference between two configurations real? Welch's t-test over their seeds (scipy).

experiments/README.md#reports
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats

MIN_SEEDS = 3  # per side, for an interval: with 2 seeds Welch's t interval is ±12.7 standard errors (df = 1)
SPAN = 100.0  # a difference of two errors in percent lies in [-100, 100]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``second - first`` of two groups of per-seed errors (percent), with its 95% interval (Welch)."""

    first: str
    second: str
    difference: float
    low: float | None  # None: too few seeds for an interval
    high: float | None
    p: float | None
    seeds: tuple[int, int]
    untestable: str = ""  # why there is no test, when p is None
    cut: bool = False  # the t interval reached past ±SPAN (what a difference of errors can be) and was cut there

    @property
    def distinguishable(self) -> bool | None:
        """Whether the difference stands out from seed-to-seed noise (p < 0.05); None when untestable."""
        return None if self.p is None else bool(self.p < 0.05)

    def sentence(self, what: str = "top-1 error") -> str:
        change = f"{self.second} - {self.first}: {self.difference:+.2f} points of {what}"
        seeds = f"{self.seeds[0]} vs {self.seeds[1]} seeds"
        if self.p is None:
            return f"{change} ({seeds}: {self.untestable})"
        verdict = "distinguishable from seed noise" if self.distinguishable else "NOT distinguishable from seed noise"
        if self.low is None:
            interval = f"too few seeds for an interval (run --seeds={MIN_SEEDS} or more)"
        else:
            interval = f"95% interval [{self.low:+.2f}, {self.high:+.2f}]" + (
                f" (cut at ±{SPAN:.0f}, the range a difference of errors can span)" if self.cut else ""
            )
        return f"{change}, {interval}, Welch p = {self.p:.3f} ({seeds}): {verdict}"


def welch(first: str, a: Sequence[float], second: str, b: Sequence[float]) -> Comparison:
    """Compares the mean of ``b`` with the mean of ``a`` (Welch's unequal-variance t-test, two-sided)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    difference = float(b.mean() - a.mean())
    seeds = (len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return Comparison(first, second, difference, None, None, None, seeds, "too few for an interval; run --seeds=3")
    if np.all(a == a[0]) and np.all(b == b[0]):  # the test is undefined: say so rather than claim p = 0
        why = "every seed gave the same error on both sides, so the seed noise is unmeasured; evaluate more images"
        return Comparison(first, second, difference, None, None, None, seeds, why)
    result = stats.ttest_ind(b, a, equal_var=False)
    if min(seeds) < MIN_SEEDS:
        return Comparison(first, second, difference, None, None, float(result.pvalue), seeds)
    interval = result.confidence_interval(0.95)
    low, high = max(float(interval.low), -SPAN), min(float(interval.high), SPAN)
    cut = (low, high) != (float(interval.low), float(interval.high))
    return Comparison(first, second, difference, low, high, float(result.pvalue), seeds, cut=cut)

"""Seed statistics for the benchmark scripts: spread of a row, and each start's difference from a reference start
paired by seed with a 95% t-interval.

Pairing is what resolves a comparison at a few seeds: a seed fixes the fine-tuning batches and the detector's
initialisation for every start, so much of a seed's luck is shared and cancels in the difference.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

# two-sided 95% quantiles of Student's t by degrees of freedom, used where scipy is not installed
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (1 degree of freedom), got df={df}")
    try:
        from scipy.stats import t
    except ImportError:  # the table: exact at its entries, the next smaller listed df (wider) between them
        return _T95[max(k for k in _T95 if k <= df)] if df <= 30 else 1.96
    return float(t.ppf(0.975, df))


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% t-interval."""
    mean = statistics.mean(values)
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def spread(values: Sequence[float]) -> str:
    """'mean ± sd' in points (values are fractions)."""
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def paired_table(results: dict[str, dict[int, float]], reference: str, label: str = "AP") -> str:
    """A Markdown table, one row per start: the value per seed, its mean, and the difference from `reference`
    on each seed both have, with its mean and 95% t-interval (points; values are fractions)."""
    lines = [f"| start | seeds | {label} per seed | {label}, mean | Δ vs {reference} per seed | Δ mean [95% CI] |",
             "|---|---:|---|---:|---|---:|"]
    for name, by_seed in results.items():
        seeds = sorted(by_seed)
        if not seeds:
            continue
        row = f"| {name} | {len(seeds)} | {' / '.join(f'{100 * by_seed[s]:.1f}' for s in seeds)} | " \
              f"{100 * statistics.mean(by_seed.values()):.1f} |"
        shared = [s for s in seeds if s in results[reference]]
        if name == reference or not shared:
            lines.append(row + " - | - |")
            continue
        delta = [100 * (by_seed[s] - results[reference][s]) for s in shared]
        if len(delta) > 1:
            mean, low, high = t_interval(delta)
            ci = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
        else:
            ci = f"{delta[0]:+.1f} [one seed]"
        lines.append(row + f" {' / '.join(f'{d:+.1f}' for d in delta)} | {ci} |")
    return "\n".join(lines)

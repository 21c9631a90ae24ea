"""The statistic behind every ratio in docs/benchmarks.md (benchmarks/peers.py): the median
per-round ratio's distribution-free confidence interval, checked against exact binomial
coverage and by simulation."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "peers", Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(peers)


def coverage(n: int, j: int) -> float:
    """Exact coverage of ``[x_(j+1), x_(n-j)]`` (0-based ``j``) for the median."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2 ** n


@pytest.mark.parametrize("n", [5, 7, 11, 15, 21, 31])
def test_interval_is_the_narrowest_with_90_percent_coverage(n):
    values = [float(v) for v in range(n)]
    random.Random(n).shuffle(values)
    lo, hi = peers.median_interval(values)
    j = int(lo)
    assert hi == n - 1 - j  # symmetric order statistics
    assert coverage(n, j) >= 0.9
    if j + 1 < n // 2:
        assert coverage(n, j + 1) < 0.9  # one step narrower would not do


def test_eleven_rounds_give_the_3rd_and_9th():
    assert peers.median_interval([float(v) for v in range(1, 12)]) == (3.0, 9.0)


def test_too_few_rounds_give_the_range():
    assert peers.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)


def test_simulated_coverage():
    """On 2000 draws of 11 log-normal ratios around a true median of 1, the interval holds 1
    in at least 90 % of them."""
    rng = random.Random(0)
    hits = sum(lo <= 1.0 <= hi for lo, hi in (
        peers.median_interval([math.exp(rng.gauss(0, 0.03)) for _ in range(11)])
        for _ in range(2000)))
    assert hits / 2000 >= 0.9

"""What both ``bitrain bench`` benchmarks (``bench.py``, ``bench_inference.py``) measure with."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i]: each round's two runs are neighbours in time, so a
    change of the machine's load between rounds cancels out."""
    return statistics.median(x / y for x, y in zip(a, b))

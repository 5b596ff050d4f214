"""What sources share for splitting records: `--ratios` parsing and seeds that agree across processes."""

from __future__ import annotations

import hashlib
import math
from typing import Any

from kdcli.errors import UsageError


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


RATIO_TOLERANCE = 1e-6


def parse_ratios(value: Any, example: str = "0.7,0.1,0.2") -> tuple[float, float, float]:
    """`train,dev,test` fractions that sum to 1. Another sum is refused, not normalised: 0.7,0.1,0.1 is more
    likely a typo than a wish for 78/11/11 (the error shows what normalising would give)."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        ratios = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UsageError(f"--ratios {value!r}: expected three numbers train,dev,test like {example}") from None
    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios) or sum(ratios) <= 0:
        raise UsageError(f"--ratios {value!r}: expected three non-negative numbers train,dev,test like {example}")
    total = sum(ratios)
    if abs(total - 1.0) > RATIO_TOLERANCE:
        scaled = ",".join(f"{r / total:.4g}" for r in ratios)
        raise UsageError(f"--ratios {value!r} sums to {total:g}, not 1: give fractions of the whole, e.g. {scaled}")
    return ratios[0] / total, ratios[1] / total, ratios[2] / total

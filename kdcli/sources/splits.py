"""What sources share for splitting records: `--ratios` parsing and seeds that agree across processes."""

from __future__ import annotations

import hashlib
from typing import Any

from kdcli.errors import KdcliError


def stable_seed(*parts: object) -> int:
    """A seed that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


def parse_ratios(value: Any, example: str = "0.7,0.1,0.2") -> tuple[float, float, float]:
    """`train,dev,test` fractions (any positive scale), normalised to sum 1."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        ratios = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise KdcliError(f"--ratios {value!r}: expected three numbers train,dev,test like {example}") from None
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise KdcliError(f"--ratios {value!r}: expected three non-negative numbers train,dev,test like {example}")
    total = sum(ratios)
    return ratios[0] / total, ratios[1] / total, ratios[2] / total

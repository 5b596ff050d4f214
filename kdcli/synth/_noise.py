"""Shared by the phantoms' `--label-noise RHO`: each flips a training label with a probability that grows towards
the class boundary, min(cap, c * w(margin)); the scale c is solved so that the expected share flipped is RHO."""

from __future__ import annotations

from collections.abc import Callable


def scale_for_rate(rate: Callable[[float], float], rho: float) -> float:
    """The c with rate(c) = rho, for a rate that grows with c: doubled until it brackets rho, then bisected 60
    times (to float precision)."""
    lo, hi = 0.0, 1.0
    while rate(hi) < rho:
        hi *= 2
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if rate((lo + hi) / 2) < rho else (lo, (lo + hi) / 2)
    return (lo + hi) / 2

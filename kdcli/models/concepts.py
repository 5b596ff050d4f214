"""Concept banks for concept-similarity heads (OCT-CoDA)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from kdcli.errors import KdcliError


def load_concept_texts(path: Path) -> list[str]:
    """The official `concepts_raw.npy` (numpy unicode array) or a text file, one concept per line."""
    path = Path(path)
    if not path.is_file():
        raise KdcliError("concept file not found", path=path)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise KdcliError(f"not a plain numpy string array ({exc})", path=path) from None
        texts = [str(t) for t in array.reshape(-1)]
    else:
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise KdcliError("no concepts in file", path=path)
    return texts


def load_concept_embeddings(path: Path, count: int) -> np.ndarray:
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise KdcliError(f"unreadable embeddings ({exc})", path=path, hint="save a float (K, D) array") from None
    if array.ndim != 2 or array.shape[0] != count:
        raise KdcliError(f"embeddings have shape {array.shape}, expected ({count}, D)", path=path,
                         hint="one row per concept, in the concept file's order")
    return normalise(array)


def deterministic_embeddings(texts: list[str], dim: int = 512) -> np.ndarray:
    """Fixed unit vectors seeded by each concept's text: stable across runs and machines without a text
    encoder. They carry no language meaning, only a fixed, well-spread basis for similarities."""
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        rows.append(np.random.default_rng(seed).standard_normal(dim))
    return normalise(np.stack(rows).astype(np.float32))


def normalise(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=1, keepdims=True).clip(min=1e-8)

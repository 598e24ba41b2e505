"""Train / validation splits of a store: of its samples, or of its cases for a volume store."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import OptionError, truncate
from ..store.reader import open_store

__all__ = ["split"]


def split(store: Any, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train / validation indices: samples of a 2D store, cases of a volume store.

    Parameters
    ----------
    store : Store, VolumeStore or path
        The store (or its path) to split.  For a ``--layout volumes`` store the indices are
        cases (``PatchDataset(cases=...)``); for a ``--layout slices`` store converted from
        volumes, split by case yourself (slices of one case are correlated).
    val_fraction : float
        Share for validation, in ``(0, 1)``.
    seed : int
        Seed of the random split.

    Returns
    -------
    train, val : numpy.ndarray
        Sorted int64 index arrays, disjoint, together covering every sample (case).
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise OptionError(f"val_fraction must be in (0, 1). Received: val_fraction={truncate(val_fraction)}")
    if isinstance(store, (str, os.PathLike)):
        store = open_store(store)
    n = len(store)
    if n < 2:
        raise OptionError(f"A split needs at least 2 samples (cases); the store holds {n}. Received: {n}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng([seed, 0x5B117]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])

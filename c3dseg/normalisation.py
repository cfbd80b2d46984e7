"""Intensity normalisation shared by training and prediction.

The network is trained on images mapped with :func:`percentile_range` + :func:`apply_range`, and the
predictor applies the very same functions (read from the model's metadata), tile by tile, so the
whole volume is never copied.  Percentiles are estimated on a regular subsample of at most
``max_samples`` voxels (exact for small volumes; a deterministic, memory-light estimate for large
ones).
"""

from __future__ import annotations

import math

import numpy as np


def _subsample(data: np.ndarray, max_samples: int) -> np.ndarray:
    n = data.size
    if n <= max_samples:
        return data
    # the same integer stride along every axis keeps the sample regular and deterministic
    step = int(math.ceil((n / max_samples) ** (1.0 / data.ndim)))
    return data[(slice(None, None, step),) * data.ndim]


def percentile_range(data: np.ndarray, lower: float = 1.0, upper: float = 99.8, *,
                     max_samples: int = 1 << 22) -> tuple[float, float]:
    """Intensity values at the ``lower`` and ``upper`` percentiles (0-100).

    Parameters
    ----------
    data : ndarray
        Any shape; non-finite values are ignored.
    lower, upper : float
        Percentiles, ``0 <= lower < upper <= 100``.
    max_samples : int
        Voxels used at most (a regular subsample of larger arrays).

    Returns
    -------
    (lo, hi) : floats
        ``hi > lo`` unless the image is constant.
    """
    if not (0 <= lower < upper <= 100):
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
    sample = np.asarray(_subsample(np.asarray(data), int(max_samples)), dtype=np.float32).ravel()
    if not np.all(np.isfinite(sample)):
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [lower, upper])
    return float(lo), float(hi)


def apply_range(data: np.ndarray, lo: float, hi: float, *, clip: bool = False) -> np.ndarray:
    """``(data - lo) / (hi - lo)`` as float32 (optionally clipped to [0, 1]); a constant image gives 0."""
    scale = float(hi) - float(lo)
    out = np.asarray(data, dtype=np.float32) - np.float32(lo)
    if scale > 0:
        out *= np.float32(1.0 / scale)
    else:
        out[...] = 0
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def normalise_percentile(data: np.ndarray, lower: float = 1.0, upper: float = 99.8, *,
                         clip: bool = False) -> np.ndarray:
    """Map the ``lower``/``upper`` percentiles of ``data`` to 0/1 (float32)."""
    lo, hi = percentile_range(data, lower, upper)
    return apply_range(data, lo, hi, clip=clip)

"""Resampling a volume onto another voxel grid (to a spacing, by factors, or onto a reference
shape).

The grid convention keeps the physical extent: voxel ``i`` of an axis with ``n`` voxels covers
``[i, i + 1) * spacing``, and the output grid with ``m`` voxels covers the same extent
``n * spacing``.  Resampling to a spacing and back onto the original shape therefore lands on the
original voxel centres.  Arrays are ``(Z, Y, X)`` or ``(C, Z, Y, X)``; spacing is (z, y, x) in um.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["output_shape", "resample"]


def output_shape(shape: Sequence[int], spacing: Sequence[float], *,
                 new_spacing: Sequence[float | None] | None = None,
                 factors: Sequence[float | None] | None = None) -> tuple[int, ...]:
    """The voxel counts of the resampled grid.

    ``new_spacing`` (um; None or <= 0 keeps an axis) gives ``round(n * spacing / new_spacing)``;
    ``factors`` (None or <= 0 keeps an axis) gives ``round(n * factor)``; at least 1 voxel.
    """
    shape = tuple(int(n) for n in shape)
    out = list(shape)
    if new_spacing is not None and factors is not None:
        raise ValueError("give new_spacing or factors, not both")
    for i, n in enumerate(shape):
        if new_spacing is not None and new_spacing[i] is not None and new_spacing[i] > 0:
            out[i] = max(1, int(round(n * float(spacing[i]) / float(new_spacing[i]))))
        elif factors is not None and factors[i] is not None and factors[i] > 0:
            out[i] = max(1, int(round(n * float(factors[i]))))
    return tuple(out)


def resample(data: np.ndarray, spacing: Sequence[float], shape: Sequence[int], *,
             order: int = 1) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample ``data`` onto a grid of ``shape`` voxels covering the same physical extent.

    Parameters
    ----------
    data : ndarray ``(Z, Y, X)`` or ``(C, Z, Y, X)``
    spacing : 3 floats (z, y, x) in um
    shape : 3 ints, the output ``(Z, Y, X)``
    order : int
        0 nearest neighbour (labels: values are copied, never blended), 1 linear (default),
        3 cubic.

    Returns
    -------
    resampled : ndarray of the input's dtype (float64 becomes float32; integer results of linear
        interpolation are rounded)
    spacing : the output spacing (z, y, x) in um: ``n * spacing / m`` per axis
    """
    spatial = data.shape[-3:]
    shape = tuple(int(m) for m in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"output shape must be 3 positive ints, got {shape}")
    new_spacing = tuple(float(s) * n / m for s, n, m in zip(spacing, spatial, shape))
    if data.dtype == np.float64 or data.dtype == np.float16:
        data = data.astype(np.float32)
    if data.dtype == np.bool_:
        data = data.view(np.uint8)
    if tuple(spatial) == shape:
        return data.copy(), new_spacing
    zoom = (1.0,) * (data.ndim - 3) + tuple(m / n for m, n in zip(shape, spatial))
    out = ndimage.zoom(data, zoom, order=order, mode="nearest", grid_mode=True,
                       prefilter=order > 1)
    if out.shape[-3:] != shape:  # zoom rounds its output shape; never off by more than one
        raise RuntimeError(f"resampled shape {out.shape[-3:]} differs from {shape}")
    return out, new_spacing

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

from .parallel import run_jobs

__all__ = ["output_shape", "resample", "source_index", "source_box", "resample_box"]


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


def output_spacing(spacing: Sequence[float], in_shape: Sequence[int], out_shape: Sequence[int]
                   ) -> tuple[float, ...]:
    """The spacing of ``in_shape`` voxels resampled to ``out_shape`` over the same physical extent."""
    return tuple(float(s) * n / m for s, n, m in zip(spacing, in_shape, out_shape))


def resample(data: np.ndarray, spacing: Sequence[float], shape: Sequence[int], *,
             order: int = 1, threads: int = 1) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample ``data`` onto a grid of ``shape`` voxels covering the same physical extent.

    Parameters
    ----------
    data : ndarray ``(Z, Y, X)`` or ``(C, Z, Y, X)``
    spacing : 3 floats (z, y, x) in um
    shape : 3 ints, the output ``(Z, Y, X)``
    order : int
        0 nearest neighbour (labels: values are copied, never blended), 1 linear (default),
        3 cubic.
    threads : int
        Slabs of output planes computed at the same time (orders 0 and 1); the result does not
        depend on it.

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
    new_spacing = output_spacing(spacing, spatial, shape)
    if data.dtype == np.float64 or data.dtype == np.float16:
        data = data.astype(np.float32)
    if data.dtype == np.bool_:
        data = data.view(np.uint8)
    if tuple(spatial) == shape:
        return data.copy(), new_spacing
    if order in (0, 1):
        # our own separable interpolation (also used block by block: identical values either way)
        out = np.empty(data.shape[:-3] + shape, _out_dtype(data.dtype))
        step = max(1, int(_SLAB_VOXELS // max(1, int(np.prod(spatial[1:])))))

        def slab(z0):
            z1 = min(shape[0], z0 + step)
            lo, hi = source_box(spatial, shape, (z0, 0, 0), (z1,) + shape[1:], order)
            src = data[(Ellipsis,) + tuple(slice(a, b) for a, b in zip(lo, hi))]
            part = resample_box(src, lo, spatial, shape, (z0, 0, 0), (z1,) + shape[1:], order)
            out[(Ellipsis, slice(z0, z1), slice(None), slice(None))] = part

        run_jobs(slab, range(0, shape[0], step), threads)
        return out, new_spacing
    zoom = (1.0,) * (data.ndim - 3) + tuple(m / n for m, n in zip(shape, spatial))
    out = ndimage.zoom(data, zoom, order=order, mode="nearest", grid_mode=True,
                       prefilter=order > 1)
    if out.shape[-3:] != shape:  # zoom rounds its output shape; never off by more than one
        raise RuntimeError(f"resampled shape {out.shape[-3:]} differs from {shape}")
    return out, new_spacing


#: input voxels (per z plane times planes) the whole-volume path reads per slab of output planes
_SLAB_VOXELS = 1 << 22


def _out_dtype(dt: np.dtype) -> np.dtype:
    dt = np.dtype(dt)
    if dt == np.float64 or dt == np.float16:
        return np.dtype(np.float32)
    if dt == np.bool_:
        return np.dtype(np.uint8)
    return dt


def source_index(n: int, m: int, lo: int, hi: int, order: int):
    """Where output voxels ``lo..hi-1`` of an axis resampled from ``n`` to ``m`` voxels read.

    The grid convention above: output voxel ``o`` sits at input coordinate
    ``c = (o + 0.5) * (n / m) - 0.5`` (computed exactly so, in float64, for every caller).  Order 0
    returns the nearest voxel ``floor(c + 0.5)``; order 1 the two neighbours ``floor(c)``,
    ``floor(c) + 1`` and the weight of the second, ``c - floor(c)``.  Indices are clamped to
    ``[0, n - 1]`` (the edge value continues outside, as ``mode="nearest"``).

    Returns
    -------
    order 0: ``idx``; order 1: ``(i0, i1, w)`` (int64, int64, float64 arrays of ``hi - lo``)
    """
    c = (np.arange(lo, hi, dtype=np.float64) + 0.5) * (float(n) / float(m)) - 0.5
    if order == 0:
        return np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.int64)
    if order != 1:
        raise ValueError(f"order must be 0 or 1, got {order}")
    f = np.floor(c)
    w = c - f
    i0 = np.clip(f, 0, n - 1).astype(np.int64)
    i1 = np.clip(f + 1, 0, n - 1).astype(np.int64)
    return i0, i1, w


def source_box(in_shape: Sequence[int], out_shape: Sequence[int], lo: Sequence[int], hi: Sequence[int],
               order: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input box ``[lo', hi')`` that output box ``[lo, hi)`` reads (its voxels plus the
    interpolation neighbours: one voxel for order 1, none for order 0)."""
    a, b = [], []
    for n, m, l_, h in zip(in_shape, out_shape, lo, hi):
        if h <= l_:
            a.append(0)
            b.append(0)
            continue
        ix = source_index(int(n), int(m), int(l_), int(h), order)
        first, last = (ix, ix) if order == 0 else (ix[0], ix[1])
        a.append(int(first.min()))
        b.append(int(last.max()) + 1)
    return tuple(a), tuple(b)


def resample_box(src: np.ndarray, src_lo: Sequence[int], in_shape: Sequence[int], out_shape: Sequence[int],
                 lo: Sequence[int], hi: Sequence[int], order: int) -> np.ndarray:
    """Output box ``[lo, hi)`` of resampling a volume of ``in_shape`` onto ``out_shape`` voxels,
    from ``src``, the input over a box starting at ``src_lo`` that holds :func:`source_box`.

    Every output voxel is computed from the same input voxels with the same operations whatever
    the box, so boxes (blocks) reproduce :func:`resample` of the whole volume exactly.  Order 1 is
    separable (z, then y, then x, in float64); integer results are rounded half away from zero.
    """
    dt = _out_dtype(src.dtype)
    data = src.view(np.uint8) if src.dtype == np.bool_ else src
    lead = data.ndim - 3
    for ax in range(3):
        idx = source_index(int(in_shape[ax]), int(out_shape[ax]), int(lo[ax]), int(hi[ax]), order)
        axis = lead + ax
        if order == 0:
            data = np.take(data, idx - int(src_lo[ax]), axis=axis)
            continue
        i0, i1, w = idx
        shp = [1] * data.ndim
        shp[axis] = -1
        w = w.reshape(shp)
        a = np.take(data, i0 - int(src_lo[ax]), axis=axis)
        b = np.take(data, i1 - int(src_lo[ax]), axis=axis)
        data = a * (1.0 - w) + b * w
    if order == 0:
        return np.ascontiguousarray(data, dtype=dt)
    if dt.kind in "iu":
        data = np.trunc(data + np.copysign(0.5, data))
    return data.astype(dt)

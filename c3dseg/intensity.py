"""Intensity transforms on numpy arrays: rescaling, windowing, thresholding and ITK's discrete
Gaussian smoothing.  (Percentile normalisation lives in :mod:`c3dseg.normalisation`, shared with
training and prediction.)

Arrays are ``(Z, Y, X)`` (or any shape, where noted); spacing is (z, y, x) in micrometres.
Floats are produced as float32.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import ndimage, special

log = logging.getLogger("c3dseg.intensity")

__all__ = ["rescale_intensity", "window_intensity", "binary_threshold", "discrete_gaussian_kernel",
           "discrete_gaussian"]


def rescale_intensity(data: np.ndarray, limits: tuple[float, float] | None = None) -> np.ndarray:
    """Min-max rescaling as XPIWIT's RescaleIntensityImageFilter (ITK's RescaleIntensity with
    the output type's range).

    Float input goes to float32 in [0, 1]; integer input keeps its type and is stretched to the
    type's full range (e.g. uint16: [0, 65535]).  A constant image maps to the range minimum.

    Parameters
    ----------
    data : ndarray, any shape
    limits : (lo, hi), optional
        The extrema to map from (default: the data's own; the blockwise runner passes the whole
        volume's).

    Returns
    -------
    ndarray of the same shape: float32 for float (and bool) input, else the input's dtype.
    """
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        out_lo, out_hi, out_dtype = float(info.min), float(info.max), data.dtype
    else:
        out_lo, out_hi, out_dtype = 0.0, 1.0, np.float32
    work = np.array(data, dtype=np.float64 if data.dtype.itemsize > 2 and data.dtype.kind in "iu"
                    else np.float32, copy=True)
    if work.size == 0:
        return work.astype(out_dtype)
    lo, hi = (float(work.min()), float(work.max())) if limits is None else (float(limits[0]), float(limits[1]))
    if hi <= lo:
        return np.full(data.shape, out_lo, dtype=out_dtype)
    work -= lo
    work *= (out_hi - out_lo) / (hi - lo)
    work += out_lo
    if np.dtype(out_dtype).kind in "iu":
        np.rint(work, out=work)
        np.clip(work, out_lo, out_hi, out=work)
    return work.astype(out_dtype, copy=False)


def window_intensity(data: np.ndarray, window_min: float = 0.0, window_max: float = 1.0,
                     out_min: float = 0.0, out_max: float = 1.0) -> np.ndarray:
    """ITK's IntensityWindowingImageFilter: values <= ``window_min`` become ``out_min``, values
    >= ``window_max`` become ``out_max``, values in between map linearly.

    Parameters
    ----------
    data : ndarray, any shape
    window_min, window_max : float
        The input window; ``window_max`` must exceed ``window_min``.
    out_min, out_max : float
        The output range (``out_max < out_min`` inverts).

    Returns
    -------
    float32 ndarray of the same shape.
    """
    if not window_max > window_min:
        raise ValueError(f"window_max ({window_max}) must be greater than window_min ({window_min})")
    out = np.array(data, dtype=np.float32, copy=True)
    np.clip(out, window_min, window_max, out=out)
    scale = (out_max - out_min) / (window_max - window_min)
    out -= np.float32(window_min)
    out *= np.float32(scale)
    out += np.float32(out_min)
    return out


def binary_threshold(data: np.ndarray, lower: float = 0.5, upper: float = 1.0,
                     inside: float = 1.0, outside: float = 0.0) -> np.ndarray:
    """ITK's BinaryThresholdImageFilter: ``inside`` where ``lower <= v <= upper``, else
    ``outside``.

    Returns
    -------
    ndarray of the input's shape: uint8 when both values are integers in [0, 255] (a mask),
    else float32.
    """
    if upper < lower:
        raise ValueError(f"upper ({upper}) must be >= lower ({lower})")
    mask = data >= lower
    mask &= data <= upper
    small = all(float(v).is_integer() and 0 <= v <= 255 for v in (inside, outside))
    dtype = np.uint8 if small else np.float32
    if inside == 1 and outside == 0:
        return mask.view(np.uint8) if small else mask.astype(np.float32)
    out = np.full(data.shape, outside, dtype=dtype)
    out[mask] = inside
    return out


def discrete_gaussian_kernel(variance: float, maximum_error: float = 0.01,
                             maximum_kernel_width: int = 32) -> np.ndarray:
    """ITK's discrete Gaussian kernel (``itk::GaussianOperator``) for a variance in voxels^2.

    The coefficients are ``exp(-t) I_n(t)`` (modified Bessel functions, t = variance): the
    exact discrete analogue of a Gaussian.  One-sided coefficients are added until the kernel
    holds ``1 - maximum_error`` of the mass or counts more than ``maximum_kernel_width``
    coefficients (ITK's truncation), then the kernel is normalised to sum 1.  Matches
    ``sitk.DiscreteGaussian`` to float precision up to ~100 voxels^2; beyond that ITK's Bessel
    recurrence loses accuracy (its kernels turn ragged) while ``scipy.special.ive`` stays exact.

    Returns
    -------
    float64 ndarray of odd length ``2 r + 1``.
    """
    if variance < 0:
        raise ValueError(f"variance must be >= 0, got {variance}")
    if variance == 0:
        return np.ones(1)
    if not 0 < maximum_error < 1:
        raise ValueError(f"maximum_error must be in (0, 1), got {maximum_error}")
    t = float(variance)
    cap = 1.0 - maximum_error
    coeff = [float(special.ive(0, t)), float(special.ive(1, t))]
    total = coeff[0] + 2 * coeff[1]
    n = 2
    while total < cap:
        c = float(special.ive(n, t))
        coeff.append(c)
        total += 2 * c
        if c <= total * np.finfo(float).eps:
            break
        if len(coeff) > maximum_kernel_width:
            log.debug("discrete Gaussian kernel truncated to %d coefficients (variance %g voxels^2)",
                      len(coeff), t)
            break
        n += 1
    half = np.asarray(coeff)
    kernel = np.concatenate([half[:0:-1], half])
    return kernel / kernel.sum()


def discrete_gaussian(data: np.ndarray, variance: float | Sequence[float] = 1.0,
                      spacing: Sequence[float] | None = None, *, maximum_error: float = 0.01,
                      maximum_kernel_width: int = 32) -> np.ndarray:
    """ITK's DiscreteGaussianImageFilter: separable smoothing with :func:`discrete_gaussian_kernel`
    and zero-flux (nearest) boundaries.

    Parameters
    ----------
    data : ndarray ``(Z, Y, X)``
        (a ``(C, Z, Y, X)`` array is smoothed per channel).
    variance : float or 3 floats (z, y, x)
        The Gaussian's variance: in um^2 when ``spacing`` is given (ITK's UseImageSpacing=1),
        else in voxels^2.  0 along an axis leaves that axis unsmoothed.
    spacing : 3 floats (z, y, x) in um, optional
    maximum_error, maximum_kernel_width : see :func:`discrete_gaussian_kernel`.

    Returns
    -------
    float32 ndarray of the input's shape.
    """
    spatial = data.shape[-3:] if data.ndim >= 3 else data.shape
    nd = len(spatial)
    var = np.broadcast_to(np.asarray(variance, dtype=float), (nd,)).copy()
    if spacing is not None:
        sp = np.asarray(spacing, dtype=float)[-nd:]
        if np.any(sp <= 0):
            raise ValueError(f"spacing must be > 0, got {tuple(spacing)}")
        var = var / sp ** 2
    out = np.array(data, dtype=np.float32, copy=True)
    offset = data.ndim - nd
    for ax, v in enumerate(var):
        if v <= 0 or spatial[ax] == 1:
            continue
        k = discrete_gaussian_kernel(v, maximum_error, maximum_kernel_width).astype(np.float32)
        ndimage.correlate1d(out, k, axis=offset + ax, output=out, mode="nearest")
    return out

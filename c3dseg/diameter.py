"""Median cell diameter from a membrane image alone.

:func:`estimate_cell_diameter` measures the cells a seeded watershed finds
(:func:`c3dseg.watershed.seeded_watershed`), in two passes: the first with light smoothing (one
lateral voxel), the second with the smoothing scaled to the first estimate (``smoothing`` x the
diameter), so that small cells are not smoothed away and large ones are not split by noise.  Seeds
are the basins deeper than a multiple of the image's own noise level, which makes the count
insensitive to the signal-to-noise ratio.  The median equivalent-sphere diameter of the interior
regions, times a calibration factor (the watershed merges cells whose walls it cannot see, so it
over-estimates slightly and consistently), is the estimate.

What was tried and measured (``benchmarks/diameter.py``, validation volumes of ``c3d-synth``):
the peak of the radially averaged power spectrum / autocorrelation of the membrane image (drowned
by the tissue outline and illumination: no usable peak), a scale-space LoG blob measure (noise and
background blobs dominate), morphological granulometry (background dominated), and the
watershed measure kept here.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .watershed import region_diameters, seeded_watershed

__all__ = ["estimate_cell_diameter", "CALIBRATION"]

#: True median diameter / median watershed region diameter, fitted on ``c3d-synth --preset train``
#: volumes (seeds 0-39, never the validation seeds) by ``benchmarks/diameter.py --calibrate 40``,
#: which printed 0.8692 (1/1.150).
CALIBRATION = 0.8692

#: Second-pass smoothing sigma as a fraction of the first estimate.
SMOOTHING = 0.1

#: Seed depth in units of the noise left after smoothing.
H_FACTOR = 2.0


def _central_block(data, max_voxels):
    if data.size <= max_voxels:
        return data
    shape = np.array(data.shape, dtype=np.float64)
    # shrink the lateral axes first (keep the z extent: cells must stay whole along z)
    f = math.sqrt(max_voxels / data.size)
    target = shape.copy()
    target[1:] = np.maximum(np.floor(shape[1:] * f), 16)
    if np.prod(target) > max_voxels:
        target[0] = max(16, math.floor(max_voxels / (target[1] * target[2])))
    target = np.minimum(target, shape).astype(int)
    start = ((shape.astype(int) - target) // 2)
    return data[tuple(slice(s, s + t) for s, t in zip(start, target))]


def estimate_cell_diameter(image, spacing=(1.0, 1.0, 1.0), *, max_voxels=4_000_000,
                           calibration=None, return_details=False):
    """Median equivalent-sphere cell diameter (um) of a membrane-stained stack.

    Parameters
    ----------
    image : ndarray (Z, Y, X)
        Membrane image (bright walls on darker cells), any numeric type.
    spacing : tuple of 3 floats
        (z, y, x) voxel size in um.
    max_voxels : int
        Larger images are measured on a central block of about this many voxels (laterally
        cropped first), which keeps the cost to a few seconds.
    calibration : float, optional
        Factor applied to the measured median (default :data:`CALIBRATION`).
    return_details : bool
        Also return a dict with the passes (``passes``: list of (smoothing_um, h, regions,
        median_um)) and the block shape.

    Returns
    -------
    float
        Diameter in um; NaN when the image holds no cells (fewer than 3 regions).
    """
    data = np.asarray(image)
    if data.ndim != 3:
        raise InputError(f"estimate_cell_diameter needs a 3D (Z, Y, X) image, got shape {data.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be 3 positive numbers (z, y, x) in um, got {spacing}")
    cal = CALIBRATION if calibration is None else float(calibration)
    block = _central_block(data, int(max_voxels))
    passes = []
    estimate = float("nan")
    diameter = None
    for _ in range(2):
        labels, info = seeded_watershed(block, spacing, diameter_um=diameter, smoothing=SMOOTHING,
                                        h_factor=H_FACTOR, background="auto-regions", return_info=True)
        d = region_diameters(labels, spacing)
        if len(d) < 3:
            passes.append((info["sigma_um"], info["h"], int(len(d)), float("nan")))
            break
        med = float(np.median(d))
        passes.append((info["sigma_um"], info["h"], int(len(d)), med))
        estimate = med * cal
        diameter = med
    if return_details:
        return estimate, {"passes": passes, "block_shape": tuple(block.shape)}
    return estimate

"""A classical seeded watershed on the smoothed membrane image (the baseline the networks must beat,
and the measuring stick of :func:`c3dseg.diameter.estimate_cell_diameter`).

Steps: percentile normalisation; Gaussian smoothing with a physical (isotropic, in um) sigma;
seeds = the h-minima of the smoothed image, with ``h`` a multiple of the noise level measured in the
image itself (so noise basins do not become cells while walls of real contrast separate them);
``skimage.segmentation.watershed`` from those seeds plus one background seed covering the
surround (where :func:`tissue_mask` finds no walls), or everything below an explicit threshold.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .errors import InputError

__all__ = ["normalise_percentiles", "noise_sigma", "smooth_physical", "seeded_watershed",
           "region_diameters"]


def normalise_percentiles(image, low=1.0, high=99.5, *, clip=False):
    """``image`` mapped linearly so that its ``low`` / ``high`` percentiles become 0 / 1 (clipped
    to [0, 1] with ``clip``; unclipped by default, so dark regions keep their noise and form no
    flat plateaus).

    Returns float32 (Z, Y, X); a constant image gives zeros."""
    x = np.asarray(image, dtype=np.float32)
    sample = x[::2, ::2, ::2] if x.size > 4_000_000 else x
    lo, hi = np.percentile(sample, [low, high])
    if not hi > lo:
        return np.zeros(x.shape, np.float32)
    out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def noise_sigma(image) -> float:
    """Robust standard deviation of voxel-independent noise.

    The median absolute value of the finest 3D Haar detail (the 2x2x2 "HHH" coefficient, +/- signs
    alternating along all three axes) / 0.6745.  Sheets, edges and smooth gradients give no HHH
    response unless they vary along all three axes at the voxel scale, so membranes barely bias
    the estimate, while independent noise of variance s^2 gives coefficients of variance s^2.
    """
    a = np.asarray(image, dtype=np.float32)
    if min(a.shape) < 2:
        d = np.diff(a.reshape(-1))
        return float(np.median(np.abs(d)) / 0.6745 / math.sqrt(2)) if d.size else 0.0
    z, y, x = (s - s % 2 for s in a.shape)
    a = a[:z, :y, :x]
    h = (a[0::2, 0::2, 0::2] - a[1::2, 0::2, 0::2] - a[0::2, 1::2, 0::2] + a[1::2, 1::2, 0::2]
         - a[0::2, 0::2, 1::2] + a[1::2, 0::2, 1::2] + a[0::2, 1::2, 1::2] - a[1::2, 1::2, 1::2])
    return float(np.median(np.abs(h)) / (0.6745 * math.sqrt(8)))


def _kernel_l2(sigma_vox) -> float:
    """L2 norm of the discrete separable Gaussian kernel (noise gain of the smoothing)."""
    total = 1.0
    for s in sigma_vox:
        if s <= 0:
            continue
        r = int(4.0 * s + 0.5)
        d = np.zeros(2 * r + 1)
        d[r] = 1.0
        k = ndimage.gaussian_filter1d(d, s, truncate=4.0)
        total *= float((k * k).sum())
    return math.sqrt(total)


def smooth_physical(image, spacing, sigma_um):
    """Gaussian smoothing with the same physical sigma (um) along every axis (float32)."""
    sv = [float(sigma_um) / float(s) for s in spacing]
    return ndimage.gaussian_filter(np.asarray(image, np.float32), sv, truncate=4.0), sv


def seeded_watershed(image, spacing=(1.0, 1.0, 1.0), *, diameter_um=None, smoothing=0.1,
                     smoothing_um=None, h=None, h_factor=2.0, background="auto",
                     background_size=10.0, min_size_fraction=0.05, planar=False,
                     return_info=False):
    """Seeded watershed segmentation of a membrane image.

    Parameters
    ----------
    image : ndarray (Z, Y, X)
        Membrane-stained image (bright walls), any numeric type.
    spacing : tuple of 3 floats
        (z, y, x) voxel size in um.
    diameter_um : float, optional
        Typical cell diameter (um); sets the smoothing.  None: smoothing of one lateral voxel.
    smoothing : float
        Gaussian sigma as a fraction of ``diameter_um`` (default 0.1), at least half a lateral
        voxel.
    smoothing_um : float, optional
        Explicit Gaussian sigma in um (overrides ``smoothing``).
    h : float, optional
        Depth (in normalised intensity, 0..1) a basin needs to seed a cell.  None:
        ``h_factor`` x the noise left after smoothing (see :func:`noise_sigma`).
    h_factor : float
        Default 2.
    background : "auto", "auto-regions", "none" or float
        "auto": the surround found by :func:`tissue_mask` (no walls nearby) seeds one background
        basin, which meets the cells on the crest of the tissue's outer wall; regions no brighter
        than that surround are dropped.  "auto-regions": regions larger than
        ``background_size`` x the median region volume and darker than the median region become
        background.  A float: voxels of the smoothed, normalised image below it are background
        (and seed nothing).  "none": every voxel belongs to a cell.
    background_size : float
        See ``background``.
    min_size_fraction : float
        Regions smaller than this fraction of the median region volume are dropped (0).
    planar : bool
        Segment every z-slice on its own (2D seeds and flooding); used by the diameter estimate
        on stacks whose z-steps are too coarse to separate cells axially.
    return_info : bool
        Also return a dict (sigma_um, h, noise, n_seeds).

    Returns
    -------
    labels : ndarray (Z, Y, X) uint16 (uint32 past 65535 cells), 0 background, 1..N consecutive
    info : dict, only with ``return_info``
    """
    from skimage.morphology import h_minima
    from skimage.segmentation import watershed

    data = np.asarray(image)
    if data.ndim != 3:
        raise InputError(f"seeded_watershed needs a 3D (Z, Y, X) image, got shape {data.shape}")
    if data.size == 0:
        raise InputError("seeded_watershed: the image is empty")
    spacing = tuple(float(s) for s in spacing)
    x = normalise_percentiles(data)
    if smoothing_um is None:
        smoothing_um = (max(0.5 * spacing[2], smoothing * float(diameter_um)) if diameter_um
                        else spacing[2])
    g, sv = smooth_physical(x, spacing, smoothing_um)
    noise = noise_sigma(x)
    if h is None:
        h = h_factor * noise * _kernel_l2(sv)
    h = max(float(h), 1e-4)
    if planar:
        conn = np.zeros((3, 3, 3), bool)
        conn[1] = ndimage.generate_binary_structure(2, 1)
        full = np.zeros((3, 3, 3), bool)
        full[1] = True
    else:
        conn = ndimage.generate_binary_structure(3, 1)
        full = np.ones((3, 3, 3), bool)
    mask = bg_marker = None
    if not isinstance(background, str):
        mask = g >= float(background)
    elif background == "auto":
        # the empty surround seeds one background basin, which meets the cells on the crest of
        # the tissue's outer wall
        tissue = tissue_mask(g, spacing, diameter_um or 8.0 * spacing[2], noise=noise * _kernel_l2(sv))
        if tissue is not None:
            bg_marker = ~tissue
    seeds = h_minima(g, h, footprint=full).astype(bool)
    if mask is not None:
        seeds &= mask
    if bg_marker is not None:
        seeds &= ~bg_marker
    markers, n_seeds = ndimage.label(seeds, structure=full)
    if bg_marker is not None:
        markers[bg_marker] = n_seeds + 1
    labels = watershed(g, markers, connectivity=conn, mask=mask)
    if bg_marker is not None:
        bg = labels == n_seeds + 1
        labels[bg] = 0
        _drop_dark_regions(labels, g, float(g[bg].mean()) if bg.any() else None,
                           3.0 * noise * _kernel_l2(sv))
    labels = _clean_regions(labels, g, background=background, background_size=background_size,
                            min_size_fraction=min_size_fraction)
    if return_info:
        return labels, {"sigma_um": float(smoothing_um), "h": h, "noise": noise, "n_seeds": int(n_seeds)}
    return labels


def wall_box_sizes(spacing, diameter_um, reach=0.75):
    """Box edges (voxels per axis) of :func:`wall_density`: the local mean's (one cell across) and
    the density's (``2 * reach`` cells across)."""
    size = [max(3, 2 * int(round(0.5 * float(diameter_um) / s)) + 1) for s in spacing]
    reach_size = [max(3, 2 * int(round(reach * float(diameter_um) / s)) + 1) for s in spacing]
    return size, reach_size


def wall_density(g, spacing, diameter_um, noise, *, k=3.0, reach=0.75):
    """Fraction of wall voxels within ``reach`` cell diameters (a box), per voxel (float32).

    Wall voxels are those of the smoothed image ``g`` brighter than their neighbourhood (a box
    about one cell across) by ``k`` x ``noise`` (the noise standard deviation of ``g``).  Local:
    each voxel depends on the boxes around it only (:func:`wall_box_sizes`)."""
    size, reach_size = wall_box_sizes(spacing, diameter_um, reach)
    local = ndimage.uniform_filter(g, size=size, mode="nearest")
    walls = g > local + k * max(float(noise), 1e-6)
    return ndimage.uniform_filter(walls.astype(np.float32), size=reach_size, mode="constant")


def tissue_mask(g, spacing, diameter_um, *, noise=None, k=3.0, reach=0.75, min_density=0.02,
                min_fraction=0.02, min_tissue=0.05):
    """Tissue (True) versus an empty surround, from the structure of a smoothed membrane image.

    Wall voxels are those brighter than their neighbourhood (a box about one cell across) by
    ``k`` x the noise of ``g``; tissue is everything within ``reach`` cell diameters of a wall
    voxel, without the pieces smaller than one cell (specks).  Depth attenuation and uneven
    illumination do not matter (the test is local), and a flat dark surround has no walls.
    Returns None when (almost) everything is tissue, or when less than ``min_tissue`` of the
    volume would be (walls too faint to find: better no background than no cells).

    Parameters
    ----------
    g : ndarray (Z, Y, X) float32, smoothed and normalised membrane image
    spacing : (z, y, x) um
    diameter_um : float, typical cell diameter
    noise : float, optional
        Noise standard deviation of ``g``; default :func:`noise_sigma` of ``g``.
    """
    if noise is None:
        noise = noise_sigma(g)
    tissue = wall_density(g, spacing, diameter_um, noise, k=k, reach=reach) > min_density
    lab, n = ndimage.label(tissue)
    if n > 1:
        vol = np.bincount(lab.ravel())
        cell = (np.pi / 6) * float(diameter_um) ** 3 / float(np.prod(spacing))
        keep = vol >= cell
        keep[0] = False
        tissue = keep[lab]
    frac = float(tissue.mean())
    if frac > 1.0 - min_fraction or frac < min_tissue:
        return None     # dense tissue everywhere, or walls too faint to tell tissue from surround
    return tissue


def _drop_dark_regions(labels, g, bg_level, margin):
    """Regions (in place) whose mean is within ``margin`` (or a tenth of the way to the typical
    region) of the background level are background: no wall of their own."""
    if bg_level is None:
        return
    n = int(labels.max())
    if n == 0:
        return
    flat = labels.ravel()
    vol = np.bincount(flat, minlength=n + 1)
    mean = np.bincount(flat, weights=g.ravel(), minlength=n + 1) / np.maximum(vol, 1)
    present = vol > 0
    present[0] = False
    if not present.any():
        return
    typical = float(np.median(mean[present]))
    limit = bg_level + max(margin, 0.1 * (typical - bg_level))
    drop = present & (mean < limit)
    if drop.any():
        labels[drop[labels]] = 0


def _clean_regions(labels, g, *, background, background_size, min_size_fraction):
    n = int(labels.max())
    flat = labels.ravel()
    vol = np.bincount(flat, minlength=n + 1).astype(np.float64)
    keep = vol > 0
    keep[0] = False
    if keep.any():
        med = float(np.median(vol[keep]))
        if background == "auto-regions" and keep.sum() > 2:
            mean = np.bincount(flat, weights=g.ravel(), minlength=n + 1) / np.maximum(vol, 1)
            dark = mean < float(np.median(mean[keep]))
            keep &= ~((vol > background_size * med) & dark)
        keep &= vol >= min_size_fraction * med
    lut = np.zeros(n + 1, np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    m = int(keep.sum())
    return lut[labels].astype(np.uint16 if m <= 65535 else np.uint32)


def region_diameters(labels, spacing=(1.0, 1.0, 1.0), *, planar=False, exclude_border=True,
                     min_regions=5):
    """Equivalent diameters (um) of the regions of a label image.

    3D: equivalent-sphere diameters.  ``planar``: every label lies in one z-slice and the
    equivalent-circle diameter of its area is returned.  Regions touching the volume border (for
    ``planar``, the lateral border) are left out unless fewer than ``min_regions`` remain.
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel().astype(np.int64))
    present = counts > 0
    present[0] = False
    if exclude_border:
        border = np.zeros_like(present)
        axes = (1, 2) if planar else (0, 1, 2)
        for ax in axes:
            for sl in (0, -1):
                border[np.unique(np.take(labels, sl, axis=ax))] = True
        inner = present & ~border
        if inner.sum() >= min_regions:
            present = inner
    if planar:
        area = counts[present] * spacing[1] * spacing[2]
        return np.sqrt(4.0 * area / np.pi)
    vol = counts[present] * float(np.prod(spacing))
    return (6.0 * vol / np.pi) ** (1.0 / 3.0)

"""Synthetic tissue: label volumes and membrane images for tests, benchmarks and training data.

- :func:`voronoi_labels`: the common test volume (dense Voronoi tissue, labels only).
- :func:`make_sample`: a membrane-stained tissue stack and its cells, every setting drawn from
  ranges (:data:`TRAIN_RANGES`, presets ``train`` / ``validation`` / ``ood``); see the section
  comment below for how it is made.
- :func:`main`: the ``c3d-synth`` command line (image/label TIFF pairs, ``params.json``, previews).

Seed convention: sample ``i`` of ``c3d-synth --seed S`` uses seed ``S + i`` plus 10**6 for
``--preset validation`` and 2 * 10**6 for ``--preset ood`` (:data:`PRESET_SEED_OFFSET`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def voronoi_labels(shape, n_cells, *, seed=0, spacing=(1.0, 1.0, 1.0), weights=None,
                   background=None, dtype=None):
    """Dense Voronoi (or power-diagram) tissue.

    Parameters
    ----------
    shape : tuple of 3 ints
        Volume shape (Z, Y, X).
    n_cells : int
        Number of seeds.  Some seeds may end with no voxel; labels are relabelled consecutively.
    seed : int
        Random seed.
    spacing : tuple of 3 floats
        Physical voxel size (z, y, x); distances are measured in physical units, so a coarse z gives
        cells that span fewer slices (anisotropic volumes).
    weights : ndarray of shape (n_cells,), optional
        Power-diagram weights (squared-distance offsets, physical units^2): larger weights make
        larger cells, giving touching cells of very different sizes.
    background : ndarray of bool, optional
        Voxels forced to 0 (e.g. outside the tissue).
    dtype : numpy dtype, optional
        Output type; default uint16 when the count fits, else uint32.

    Returns
    -------
    labels : ndarray (Z, Y, X)
        0 background, 1..N cells.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * spacing
    seeds = rng.random((int(n_cells), 3)) * extent
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)],
                                indexing="ij"), axis=-1).reshape(-1, 3)
    if weights is None:
        _, nearest = cKDTree(seeds).query(grid, k=1, workers=-1)
    else:
        weights = np.asarray(weights, dtype=np.float64)
        k = min(16, len(seeds))
        d, idx = cKDTree(seeds).query(grid, k=k, workers=-1)
        idx = idx.reshape(len(grid), k)
        power = d.reshape(len(grid), k) ** 2 - weights[idx]
        nearest = idx[np.arange(len(grid)), np.argmin(power, axis=1)]
    labels = (nearest + 1).reshape(shape)
    if background is not None:
        labels[np.asarray(background, dtype=bool)] = 0
    # consecutive relabelling (some seeds may own no voxel)
    present = np.zeros(int(n_cells) + 1, dtype=bool)
    present[labels.ravel()] = True
    present[0] = False
    lut = np.zeros(int(n_cells) + 1, dtype=np.int64)
    lut[present] = np.arange(1, present.sum() + 1)
    n = int(present.sum())
    if dtype is None:
        dtype = np.uint16 if n <= 65535 else np.uint32
    return lut[labels].astype(dtype)


# =============================================================================================
# Synthetic tissue with membrane images (training data generator, ``c3d-synth``)
# =============================================================================================
#
# How a sample is made (all in physical micrometres, on the final anisotropic voxel grid):
#
# 1. A tissue outline is an implicit function phi (dome, slab, ovoid, irregular union of lobes, or
#    full tissue with no background).  ``depth = phi / |grad phi|`` approximates the signed distance to
#    the tissue surface (positive inside).
# 2. Epidermis-like sheets: the voxels with depth in [0, t1), [t1, t2) ... form layers, each tiled by
#    its own cells (seeds at mid-depth, so anticlinal walls stand perpendicular to the surface and
#    the layer boundaries are periclinal walls).  The rest is inner tissue.
# 3. Cells are power diagrams (Voronoi with per-seed weights) of seeds placed with a spatially
#    varying density, relaxed by a few Lloyd iterations, in transformed coordinates
#    ``x' = A (x + u(x))``: ``u`` is a smooth random displacement (curved, irregular walls) and ``A``
#    a volume-preserving stretch (elongated cells).
# 4. The k nearest seeds of every voxel give its cell (the label) and, analytically, the distance
#    to its nearest walls (bisector planes) and their normals.  The membrane image is the PSF-blurred
#    wall rendered from that distance: a wall with normal n seen through a Gaussian PSF of
#    covariance S has a Gaussian cross-section of variance n'Sn (+ thickness and pixel terms), so
#    walls facing z come out dimmer and wider, exactly as in a confocal stack, and coarse z-steps do
#    not alias.
# 5. Imaging: per-wall contrast (faint or missing walls), wall texture, cytoplasmic haze, bright
#    specks, background, depth attenuation along z, uneven illumination, then Poisson shot noise and
#    Gaussian read noise in photon units plus a camera offset.


#: Ranges of the ``train`` preset (also used by ``validation``).  Each value is a fixed value or a
#: spec: ``{"uniform": [lo, hi]}``, ``{"loguniform": [lo, hi]}``, ``{"int": [lo, hi]}`` (inclusive)
#: or ``{"choice": [...], "p": [...]}``.
TRAIN_RANGES: dict[str, Any] = {
    # tissue
    "tissue": {"choice": ["dome", "slab", "ovoid", "irregular", "full"], "p": [0.3, 0.2, 0.12, 0.2, 0.18]},
    "surface_roughness": {"uniform": [0.0, 0.3]},     # bumps of the outline, x cell diameter
    "epidermis_layers": {"choice": [1, 2, 3], "p": [0.45, 0.4, 0.15]},  # a surface always has whole cells
    "layer_thickness": {"uniform": [0.4, 1.0]},       # x cell diameter
    "layer_cell_width": {"uniform": [0.9, 1.5]},      # x cell diameter
    # grid
    "spacing_xy": {"loguniform": [0.2, 1.0]},         # um
    "anisotropy": {"uniform": [1.0, 4.0]},            # spacing z / spacing xy
    # cells
    "cell_diameter_vox": {"loguniform": [7.0, 26.0]}, # typical cell diameter, in xy voxels
    "size_cv": {"uniform": [0.0, 0.35]},              # log-normal sigma of per-cell size
    "size_gradient": {"uniform": [0.0, 0.7]},         # log size change across the volume
    "lloyd_iterations": {"int": [1, 5]},
    "stretch": {"loguniform": [1.0, 2.2]},            # elongation factor along a random direction
    "wall_curvature": {"uniform": [0.0, 0.35]},       # displacement amplitude, x cell diameter
    # membrane image
    "wall_thickness_vox": {"uniform": [0.3, 2.0]},    # in xy voxels
    "psf_sigma_xy_vox": {"uniform": [0.4, 1.6]},      # Gaussian PSF sigma, xy voxels
    "psf_z_ratio": {"uniform": [1.5, 4.5]},           # sigma z / sigma xy (physical)
    "psf_z_min_step": {"uniform": [0.3, 0.6]},        # sigma z >= this x z-step
    "max_blur": {"uniform": [0.07, 0.12]},            # PSF sigma xy <= this x cell diameter (z: 2.5x)
    "min_z_slices": {"uniform": [2.2, 3.0]},          # anisotropy reduced so a cell spans >= this many slices
    "outer_wall_gain": {"uniform": [0.7, 2.5]},       # brightness of the tissue surface
    "layer_wall_gain": {"uniform": [0.6, 1.5]},       # brightness of the periclinal layer walls
    "wall_contrast_cv": {"uniform": [0.0, 0.5]},      # log-normal sigma of per-wall brightness
    "faint_wall_fraction": {"uniform": [0.0, 0.25]},  # walls at 0-15 % brightness
    "wall_texture": {"uniform": [0.0, 0.5]},          # patchiness along walls
    "haze": {"uniform": [0.0, 0.35]},                 # cytoplasm level, x wall peak
    "background": {"uniform": [0.0, 0.1]},            # outside the tissue, x wall peak
    "speck_density": {"uniform": [0.0, 0.3]},         # bright specks per cell (3/4 inside the tissue)
    "speck_brightness": {"uniform": [0.5, 3.0]},      # x wall peak
    "depth_decay": {"uniform": [0.0, 1.8]},           # log intensity lost through the tissue depth of the volume
    "illumination": {"uniform": [0.0, 0.35]},         # amplitude of a smooth illumination field
    "photons": {"loguniform": [4.0, 400.0]},          # expected photons at a wall peak
    "read_noise": {"uniform": [0.0, 6.0]},            # photons
    "offset": {"uniform": [0.0, 120.0]},              # camera offset, counts
    "dome_flip": {"choice": [False, True], "p": [0.8, 0.2]},
}

#: Settings outside the training ranges: each ``ood`` sample takes ``_ood_count`` of them at random
#: (the others from :data:`TRAIN_RANGES`).
OOD_SHIFTS: dict[str, Any] = {
    "cell_diameter_vox": {"choice": [{"uniform": [4.5, 6.5]}, {"uniform": [28.0, 40.0]}]},
    "anisotropy": {"group": {"anisotropy": {"uniform": [4.5, 6.5]}, "min_z_slices": {"uniform": [1.0, 1.5]}}},
    "photons": {"uniform": [1.5, 3.5]},
    "psf_sigma_xy_vox": {"group": {"psf_sigma_xy_vox": {"uniform": [1.8, 2.6]}, "max_blur": {"uniform": [0.16, 0.22]}}},
    "wall_thickness_vox": {"uniform": [2.3, 3.5]},
    "haze": {"uniform": [0.4, 0.7]},
    "faint_wall_fraction": {"uniform": [0.3, 0.45]},
    "stretch": {"uniform": [2.5, 3.5]},
    "wall_curvature": {"uniform": [0.4, 0.55]},
    "size_cv": {"uniform": [0.45, 0.6]},
    "depth_decay": {"uniform": [2.2, 3.0]},
    "illumination": {"uniform": [0.5, 0.7]},
}

PRESETS: dict[str, dict[str, Any]] = {
    "train": dict(TRAIN_RANGES),
    "validation": dict(TRAIN_RANGES),
    "ood": {**TRAIN_RANGES, "_ood": OOD_SHIFTS, "_ood_count": 2},
}

#: Seed convention: sample ``i`` of a run with ``--seed S`` uses ``S + i + PRESET_SEED_OFFSET[preset]``,
#: so validation (10**6 + ...) and ood (2 * 10**6 + ...) seeds never meet training seeds as long as
#: training runs use fewer than 10**6 samples from seeds below 10**6.
PRESET_SEED_OFFSET = {"train": 0, "validation": 10 ** 6, "ood": 2 * 10 ** 6}

DEFAULT_SHAPE = (64, 128, 128)

#: Threads of the nearest-seed queries (-1: all cores; c3d-synth --jobs sets 1 per worker process).
_KD_WORKERS = -1


# ---------------------------------------------------------------------------------------------
# parameter drawing
# ---------------------------------------------------------------------------------------------

def _draw(spec, rng):
    if isinstance(spec, dict):
        if "uniform" in spec:
            lo, hi = spec["uniform"]
            return float(rng.uniform(lo, hi))
        if "loguniform" in spec:
            lo, hi = spec["loguniform"]
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        if "int" in spec:
            lo, hi = spec["int"]
            return int(rng.integers(int(lo), int(hi) + 1))
        if "choice" in spec:
            options = list(spec["choice"])
            p = spec.get("p")
            if p is not None:
                p = np.asarray(p, float) / np.sum(p)
            value = options[int(rng.choice(len(options), p=p))]
            return _draw(value, rng)
        raise ValueError(f"unknown range spec {spec!r}")
    if isinstance(spec, (np.generic,)):
        return spec.item()
    return spec


def draw_params(ranges=None, seed=0):
    """Draw one value for every setting.

    Parameters
    ----------
    ranges : dict or str, optional
        A preset name (``"train"``, ``"validation"``, ``"ood"``) or a dict of settings to range
        specs (see :data:`TRAIN_RANGES`); keys missing from a dict take the ``train`` ranges.
    seed : int or numpy Generator

    Returns
    -------
    dict
        Plain Python values (JSON-serialisable).
    """
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(0, 2 ** 63))
    ranges = _resolve_ranges(ranges)
    out = {}
    for key in TRAIN_RANGES:
        # one stream per setting: fixing one setting leaves the draws of the others unchanged
        krng = np.random.default_rng([zlib.crc32(key.encode()), int(seed) & (2 ** 63 - 1)])
        out[key] = _draw(ranges.get(key, TRAIN_RANGES[key]), krng)
    rng = np.random.default_rng([0x00D, int(seed) & (2 ** 63 - 1)])
    shifts = ranges.get("_ood")
    if shifts:
        keys = sorted(shifts)
        count = min(int(ranges.get("_ood_count", 2)), len(keys))
        chosen = [keys[i] for i in rng.choice(len(keys), size=count, replace=False)]
        for key in chosen:
            spec = shifts[key]
            group = spec["group"] if isinstance(spec, dict) and "group" in spec else {key: spec}
            for k, s in group.items():
                out[k] = _draw(s, rng)
        out["ood_keys"] = chosen
    return out


def _resolve_ranges(ranges):
    if ranges is None:
        return dict(TRAIN_RANGES)
    if isinstance(ranges, str):
        if ranges not in PRESETS:
            raise ValueError(f"unknown preset {ranges!r} (known: {', '.join(PRESETS)})")
        return dict(PRESETS[ranges])
    unknown = [k for k in ranges if not k.startswith("_") and k not in TRAIN_RANGES]
    if unknown:
        raise KeyError(f"unknown synthesis setting(s): {', '.join(sorted(unknown))} "
                       f"(known: {', '.join(TRAIN_RANGES)})")
    return {**TRAIN_RANGES, **ranges}


def parse_setting(text):
    """Parse ``--set key=value``: ``3`` fixed, ``2:5`` uniform, ``2~5`` log-uniform, ``a|b|c`` choice,
    ``true``/``false``.  Returns ``(key, spec)``."""
    if "=" not in text:
        raise ValueError(f"expected key=value, got {text!r}")
    key, value = (s.strip() for s in text.split("=", 1))
    if key not in TRAIN_RANGES:
        raise KeyError(f"unknown synthesis setting {key!r} (known: {', '.join(TRAIN_RANGES)})")

    def scalar(s):
        s = s.strip()
        if s.lower() in ("true", "false"):
            return s.lower() == "true"
        try:
            return int(s)
        except ValueError:
            pass
        try:
            return float(s)
        except ValueError:
            return s

    if "|" in value:
        return key, {"choice": [scalar(v) for v in value.split("|")]}
    for sep, kind in ((":", "uniform"), ("~", "loguniform")):
        if sep in value:
            lo, hi = (float(v) for v in value.split(sep))
            if hi < lo or (kind == "loguniform" and lo <= 0):
                raise ValueError(f"{key}: bad range {value!r}")
            if kind == "uniform" and isinstance(_draw(TRAIN_RANGES[key], np.random.default_rng(0)), int) \
                    and not isinstance(_draw(TRAIN_RANGES[key], np.random.default_rng(0)), bool):
                return key, {"int": [int(lo), int(hi)]}
            return key, {kind: [lo, hi]}
    return key, scalar(value)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------

def smooth_noise(shape, spacing, correlation_um, rng, *, count=1, dtype=np.float32):
    """Smooth Gaussian random fields (zero mean, unit standard deviation).

    A coarse grid of white noise with nodes ``correlation_um`` apart is interpolated to the voxel
    centres with Gaussian kernels, one axis at a time (separable, so the cost is a few
    multiplications per voxel).

    Parameters
    ----------
    shape : tuple of 3 ints
        (Z, Y, X) voxels.
    spacing : tuple of 3 floats
        (z, y, x) voxel size in um.
    correlation_um : float or tuple of 3 floats
        Correlation length (node distance) in um, per axis or for all.
    rng : numpy Generator
    count : int
        Number of independent fields.

    Returns
    -------
    ndarray (count, Z, Y, X) or (Z, Y, X) when count == 1
    """
    shape = tuple(int(s) for s in shape)
    corr = np.broadcast_to(np.asarray(correlation_um, float), (3,))
    mats = []
    for n, s, c in zip(shape, spacing, corr):
        c = max(float(c), 1e-6)
        x = (np.arange(n) + 0.5) * s
        nodes = np.arange(-2 * c, n * s + 2 * c + 1e-9, c)
        m = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / c) ** 2)
        mats.append(m.astype(np.float32))
    out = np.empty((count,) + shape, dtype=dtype)
    for i in range(count):
        g = rng.standard_normal((mats[0].shape[1], mats[1].shape[1], mats[2].shape[1])).astype(np.float32)
        g = np.tensordot(g, mats[2], axes=([2], [1]))          # (cz, cy, X)
        g = np.tensordot(g, mats[1], axes=([1], [1]))          # (cz, X, Y)
        g = np.tensordot(mats[0], g, axes=([1], [0]))          # (Z, X, Y)
        g = g.transpose(0, 2, 1)
        g -= g.mean()
        sd = g.std()
        out[i] = g / sd if sd > 0 else g
    return out[0] if count == 1 else out


def _coords(shape, spacing):
    return [((np.arange(n) + 0.5) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def _tissue_phi(p, shape, spacing, rng, D):
    """Implicit tissue function (um, positive inside) and a description of the outline."""
    z, y, x = _coords(shape, spacing)
    E = np.asarray(shape) * np.asarray(spacing)
    Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]
    kind = p["tissue"]
    info = {}
    if kind == "full":
        return None, {"kind": "full"}

    def ellipsoid(c, r):
        u = np.sqrt(((Z - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((X - c[2]) / r[2]) ** 2)
        return ((1.0 - u) * float(np.mean(r))).astype(np.float32)

    if kind == "dome":
        ryx = rng.uniform(0.45, 1.2) * max(E[1], E[2])
        r = np.array([ryx * rng.uniform(0.7, 1.6), ryx * rng.uniform(0.85, 1.15), ryx * rng.uniform(0.85, 1.15)])
        apex = rng.uniform(0.05, 0.45) * E[0]
        r[0] = max(r[0], rng.uniform(0.8, 1.2) * E[0] - apex)     # the base is cut by the volume
        c = np.array([apex + r[0], rng.uniform(0.3, 0.7) * E[1], rng.uniform(0.3, 0.7) * E[2]])
        if p.get("dome_flip"):
            c[0] = E[0] - c[0]
        phi = ellipsoid(c, r)
        info = {"kind": "dome", "centre_um": c.tolist(), "radii_um": r.tolist(), "flipped": bool(p.get("dome_flip"))}
    elif kind == "slab":
        top0 = rng.uniform(0.05, 0.45) * E[0]
        thick = rng.uniform(0.4, 1.3) * E[0]
        tilt = rng.uniform(-0.25, 0.25, size=2)
        wave = smooth_noise((1,) + tuple(shape[1:]), (1.0,) + tuple(spacing[1:]),
                            rng.uniform(1.5, 4.0) * D, rng, count=2)[:, 0]
        amp = rng.uniform(0.0, 0.6) * D
        top = top0 + tilt[0] * (Y - E[1] / 2) + tilt[1] * (X - E[2] / 2) + amp * wave[0][None]
        bottom = top + thick + 0.5 * amp * wave[1][None]
        phi = np.minimum(Z - top, bottom - Z).astype(np.float32)
        if rng.random() < 0.2:
            phi = -phi - 0.0  # rarely: the tissue is outside a gap (two sheets with a cleft)
            phi = np.where(np.abs(Z - (top + bottom) / 2) > thick / 2, np.abs(phi), -np.abs(phi)).astype(np.float32)
        info = {"kind": "slab", "top_um": float(top0), "thickness_um": float(thick)}
    elif kind == "ovoid":
        r = np.array([rng.uniform(0.3, 0.5) * E[0], rng.uniform(0.3, 0.5) * E[1], rng.uniform(0.3, 0.5) * E[2]])
        r = np.maximum(r, 1.5 * D)
        c = np.array([rng.uniform(0.4, 0.6) * e for e in E])
        phi = ellipsoid(c, r)
        info = {"kind": "ovoid", "centre_um": c.tolist(), "radii_um": r.tolist()}
    elif kind == "irregular":
        n = int(rng.integers(2, 5))
        phi = None
        lobes = []
        for _ in range(n):
            r = np.array([rng.uniform(0.2, 0.45) * e for e in E])
            r = np.maximum(r, 1.5 * D)
            c = np.array([rng.uniform(0.25, 0.75) * e for e in E])
            f = ellipsoid(c, r)
            phi = f if phi is None else np.maximum(phi, f)
            lobes.append({"centre_um": c.tolist(), "radii_um": r.tolist()})
        amp = rng.uniform(0.1, 0.3) * float(np.mean(E))
        phi = phi + amp * smooth_noise(shape, spacing, rng.uniform(0.3, 0.6) * float(np.mean(E)), rng)
        info = {"kind": "irregular", "lobes": lobes}
    else:
        raise ValueError(f"unknown tissue kind {kind!r}")
    rough = float(p.get("surface_roughness", 0.0)) * D
    if rough > 0:
        phi = phi + rough * smooth_noise(shape, spacing, rng.uniform(1.0, 2.5) * D, rng)
    return phi.astype(np.float32), info


def _depth_from_phi(phi, spacing):
    """Signed distance estimate phi/|grad phi| (um) and the unit normal (3, Z, Y, X) pointing inwards."""
    g = np.gradient(phi, *spacing)
    g = np.stack([gi.astype(np.float32) for gi in g])
    norm = np.sqrt((g * g).sum(0))
    norm = np.maximum(norm, 1e-3)
    depth = phi / norm
    normal = g / norm
    return depth.astype(np.float32), normal


def _stretch_matrix(factor, direction):
    u = np.asarray(direction, float)
    u = u / np.linalg.norm(u)
    A = np.eye(3) + (1.0 / factor - 1.0) * np.outer(u, u)
    return A * factor ** (1.0 / 3.0)   # det = 1


def _power_nearest(tree, seeds, weights, pts, k):
    d, idx = tree.query(pts, k=k, workers=_KD_WORKERS)
    if k == 1:
        d, idx = d[:, None], idx[:, None]
    pw = d * d - weights[idx]
    ia = np.argmin(pw, axis=1)
    return d, idx, pw, ia


def _relax(seeds, weights, pts, iterations, k):
    """Lloyd iterations for a power diagram on sample points ``pts`` (N, 3)."""
    n = len(seeds)
    if n < 2 or iterations <= 0:
        return seeds
    k = min(k, n)
    for _ in range(iterations):
        tree = cKDTree(seeds)
        _, idx, _, ia = _power_nearest(tree, seeds, weights, pts, k)
        owner = idx[np.arange(len(pts)), ia]
        cnt = np.bincount(owner, minlength=n)
        has = cnt > 0
        new = seeds.copy()
        for a in range(3):
            s = np.bincount(owner, weights=pts[:, a], minlength=n)
            new[has, a] = s[has] / cnt[has]
        seeds = new
    return seeds


def _walls(tree, seeds, weights, pts, At, k, chunk=131072):
    """Owner seed and the two nearest walls (bisector planes) of every point.

    Parameters
    ----------
    pts : (N, 3) transformed coordinates x' = A (x + u)
    At : (3, 3) A transposed; a plane of unit normal n' in x' is at real distance d' / |A^T n'|
         with real normal A^T n' / |A^T n'|

    Returns
    -------
    owner : (N,) int64 seed index
    dist : (N, 2) float32 real distance (um) to the two nearest walls (inf if none)
    normal : (N, 2, 3) float32 real unit normals
    other : (N, 2) int64 seed index on the other side of each wall
    """
    N = len(pts)
    n = len(seeds)
    k = min(k, n)
    owner = np.empty(N, np.int64)
    dist = np.full((N, 2), np.inf, np.float32)
    normal = np.zeros((N, 2, 3), np.float32)
    other = np.full((N, 2), -1, np.int64)
    if n == 1:
        owner[:] = 0
        return owner, dist, normal, other
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        q = pts[s:e]
        _, idx, pw, ia = _power_nearest(tree, seeds, weights, q, k)
        r = np.arange(e - s)
        a = idx[r, ia]
        owner[s:e] = a
        diff = (seeds[idx] - seeds[a][:, None, :]).astype(np.float32)   # (m, k, 3)
        L = np.sqrt((diff * diff).sum(-1))
        L[L == 0] = np.inf
        dprime = (pw - pw[r, ia][:, None]).astype(np.float32) / (2.0 * L)
        v = diff @ At.T.astype(np.float32) / L[..., None]            # A^T n'  (m, k, 3)
        vn = np.sqrt((v * v).sum(-1))
        dreal = dprime / np.maximum(vn, 1e-6)
        dreal[r, ia] = np.inf
        dreal[~np.isfinite(L)] = np.inf
        if k > 2:
            sel = np.argpartition(dreal, 1, axis=1)[:, :2]
        else:
            sel = np.argsort(dreal, axis=1)[:, :2]
        for j in range(min(2, k)):
            c = sel[:, j] if k > 1 else np.zeros(e - s, int)
            dist[s:e, j] = dreal[r, c]
            normal[s:e, j] = v[r, c] / np.maximum(vn[r, c], 1e-6)[:, None]
            other[s:e, j] = idx[r, c]
    return owner, dist, normal, other


def _hash_uniform(a, b, salt=0):
    """Deterministic uniform [0, 1) numbers from unordered integer pairs (vectorised splitmix64)."""
    lo = np.minimum(a, b).astype(np.uint64)
    hi = np.maximum(a, b).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = lo * np.uint64(0x9E3779B97F4A7C15) + hi * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(salt)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _profile(d, normal, var_axes, const_var, sigma_ref):
    """Blurred thin-wall cross-section at distance ``d`` for walls of the given normals."""
    var = (normal * normal) @ var_axes + const_var
    return (sigma_ref / np.sqrt(var)) * np.exp(-0.5 * d * d / var)


def _sample_seeds(region_pts, density, n, rng):
    """``n`` seeds among region points with probability proportional to ``density``, jittered."""
    n = max(1, min(int(n), len(region_pts)))
    p = density / density.sum()
    pick = rng.choice(len(region_pts), size=n, replace=False, p=p)
    return region_pts[pick].astype(np.float64)


# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------

def make_sample(config_or_ranges=None, seed=0, *, shape=DEFAULT_SHAPE):
    """One synthetic membrane-stained tissue volume and its cell labels.

    Parameters
    ----------
    config_or_ranges : dict or str, optional
        A preset name (``"train"``, ``"validation"``, ``"ood"``) or a dict mapping settings of
        :data:`TRAIN_RANGES` to fixed values or range specs; missing settings are drawn from the
        ``train`` ranges.  Default: ``"train"``.
    seed : int
        Random seed; the same seed and settings give the same sample.
    shape : tuple of 3 ints
        (Z, Y, X) voxels of the output, on the final anisotropic grid.

    Returns
    -------
    image : ndarray (Z, Y, X) float32
        Membrane image in camera counts (photons + offset, noisy, >= 0).
    labels : ndarray (Z, Y, X) uint16
        0 background, 1..N cells (connected).
    spacing : tuple of 3 floats
        (z, y, x) voxel size in um.
    params : dict
        Every drawn setting plus derived figures (``n_cells``, ``median_diameter_um`` of the
        interior cells, ``tissue_fraction``, ``seconds``).
    """
    t0 = time.perf_counter()
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes >= 4, got {shape}")
    rng = np.random.default_rng(seed)
    p = draw_params(config_or_ranges if config_or_ranges is not None else "train", seed)
    sx = float(p["spacing_xy"])
    # resolvable cells: at least ``min_z_slices`` z-slices per typical cell diameter
    limit = float(p["cell_diameter_vox"]) / float(p["min_z_slices"])
    if float(p["anisotropy"]) > limit:
        p["anisotropy_drawn"] = p["anisotropy"]
        p["anisotropy"] = max(1.0, limit)
    sz = sx * float(p["anisotropy"])
    spacing = (sz, sx, sx)
    E = np.asarray(shape) * np.asarray(spacing)
    D = float(p["cell_diameter_vox"]) * sx           # typical cell diameter, um

    # -- 1. tissue ---------------------------------------------------------------------------
    for _attempt in range(8):
        phi, tissue_info = _tissue_phi(p, shape, spacing, rng, D)
        if phi is None:
            break
        frac = float((phi > 0).mean())
        if frac > 0.08:
            break
    if phi is None:
        depth = np.full(shape, np.float32(1e6))
        snormal = None
    else:
        depth, snormal = _depth_from_phi(phi, spacing)
        del phi
    inside = depth > 0
    if not inside.any():       # pathological outline: fall back to full tissue
        depth = np.full(shape, np.float32(1e6))
        snormal = None
        inside = depth > 0
        tissue_info = {"kind": "full", "fallback": True}

    # -- 2. regions: epidermis layers and inner tissue ----------------------------------------
    n_layers = int(p["epidermis_layers"]) if snormal is not None else 0
    t_layer = float(p["layer_thickness"]) * D
    bounds = [t_layer * (i + 1) for i in range(n_layers)]
    # blur at most ``max_blur`` x the cell diameter (laterally; 2.5x that axially)
    sig_xy = min(float(p["psf_sigma_xy_vox"]) * sx, float(p["max_blur"]) * D)
    sig_z = max(float(p["psf_z_ratio"]) * sig_xy, float(p["psf_z_min_step"]) * sz)
    sig_z = max(min(sig_z, 2.5 * float(p["max_blur"]) * D), sig_xy)
    thick = float(p["wall_thickness_vox"]) * sx
    var_axes = np.array([sig_z ** 2, sig_xy ** 2 + sx ** 2 / 12, sig_xy ** 2 + sx ** 2 / 12], np.float32)
    const_var = np.float32(thick ** 2 / 12)
    sigma_ref = float(np.sqrt(var_axes[2] + const_var))
    margin = 3.0 * float(np.sqrt(var_axes.max() + const_var))
    region = np.full(shape, -1, np.int8)
    near = depth > -margin
    region[near] = n_layers                       # inner tissue
    for i in range(n_layers - 1, -1, -1):
        region[near & (depth < bounds[i])] = i

    # -- 3. deformation ------------------------------------------------------------------------
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    p["stretch_direction"] = [float(v) for v in direction]
    A_inner = _stretch_matrix(float(p["stretch"]), direction)
    amp = float(p["wall_curvature"]) * D
    corr = rng.uniform(1.0, 2.0) * D
    disp = smooth_noise(shape, spacing, corr, rng, count=3) * np.float32(amp / 1.7) if amp > 0 else None
    sizefield_dir = rng.standard_normal(3)
    sizefield_dir /= np.linalg.norm(sizefield_dir)
    zc, yc, xc = _coords(shape, spacing)

    # -- 4. cells per region ------------------------------------------------------------------
    labels_gid = np.zeros(shape, np.int64)          # global seed id + 1 (0: none)
    wall_d = np.full((2,) + shape, np.inf, np.float32)
    wall_n = np.zeros((2, 3) + shape, np.float32)
    wall_f = np.zeros((2,) + shape, np.float32)
    n_total = 0
    gid_offset = 0
    seeds_per_region = []
    size_cv = float(p["size_cv"])
    for r in range(n_layers + 1):
        vox = np.nonzero(region == r)
        if len(vox[0]) == 0:
            continue
        x = np.stack([zc[vox[0]], yc[vox[1]], xc[vox[2]]], axis=1).astype(np.float64)
        if disp is not None:
            x += np.stack([disp[a][vox] for a in range(3)], axis=1)
        A = A_inner if r == n_layers else np.eye(3)
        xp = x @ A.T
        # local scale factor: gradient along a direction plus smooth variation
        proj = ((x - E / 2) @ sizefield_dir) / max(float(E @ np.abs(sizefield_dir)), 1e-6)
        logscale = float(p["size_gradient"]) * proj          # proj in [-0.5, 0.5]
        scale = np.exp(logscale)
        dv = float(np.prod(spacing))
        if r < n_layers:
            W = float(p["layer_cell_width"]) * D
            cell_vol = t_layer * (math.pi / 4) * (W * scale) ** 2
            mid = (depth[vox] > (r + 0.3) * t_layer) & (depth[vox] < (r + 0.7) * t_layer)
            dens = (1.0 / cell_vol) * (0.02 + mid)
            radius = 0.5 * W * scale
        else:
            cell_vol = (math.pi / 6) * (D * scale) ** 3
            dens = 1.0 / cell_vol
            radius = 0.5 * D * scale
        dens = np.broadcast_to(dens, (len(xp),)).astype(np.float64)
        n_seeds = int(round(float(np.sum(dv / cell_vol)) if np.ndim(cell_vol) else len(xp) * dv / cell_vol))
        n_seeds = max(1, n_seeds)
        seeds = _sample_seeds(xp, dens, n_seeds, rng)
        seeds += rng.uniform(-0.5, 0.5, seeds.shape) * sx
        # per-seed power weights: log-normal radii around the local scale
        tree0 = cKDTree(xp[:: max(1, len(xp) // 200000)])
        _, near_i = tree0.query(seeds, k=1)
        rad = np.broadcast_to(radius, (len(xp),))[:: max(1, len(xp) // 200000)][near_i]
        rad = rad * np.exp(size_cv * rng.standard_normal(len(seeds)))
        weights = rad ** 2 if size_cv > 0 or float(p["size_gradient"]) > 0 else np.zeros(len(seeds))
        weights = weights - weights.mean()
        # Lloyd relaxation on a subsample of the region
        m = min(len(xp), max(25 * len(seeds), 20000), 150000)
        sub = xp[rng.choice(len(xp), size=m, replace=False)] if m < len(xp) else xp
        seeds = _relax(seeds, weights, sub, int(p["lloyd_iterations"]), k=4)
        tree = cKDTree(seeds)
        owner, dist, normal, other = _walls(tree, seeds, weights, xp, A.T, k=6)
        gid = owner + gid_offset
        labels_gid[vox] = gid + 1
        for j in range(2):
            wall_d[j][vox] = dist[:, j]
            for a in range(3):
                wall_n[j, a][vox] = normal[:, j, a]
            ok = other[:, j] >= 0
            fj = np.zeros(len(owner), np.float32)
            fj[ok] = _hash_uniform(gid[ok], other[ok, j] + gid_offset, salt=int(seed) & 0xFFFFFFFF)
            wall_f[j][vox] = fj
        seeds_per_region.append(int(len(seeds)))
        gid_offset += len(seeds)
    n_seeds_total = gid_offset

    # -- 5. labels ------------------------------------------------------------------------------
    cell_vox = (math.pi / 6) * D ** 3 / float(np.prod(spacing))
    labels = _finish_labels(np.where(inside, labels_gid, 0), cell_vox)
    del labels_gid
    inside = labels > 0
    n_cells = int(labels.max())

    # -- 6. membrane image ----------------------------------------------------------------------
    # per-wall brightness from the pair hash: faint walls, log-normal contrast
    u = wall_f
    faint = float(p["faint_wall_fraction"])
    cv = float(p["wall_contrast_cv"])
    from scipy.special import ndtr, ndtri
    z = ndtri(np.clip(((u - faint) / max(1 - faint, 1e-6)), 1e-6, 1 - 1e-6)).astype(np.float32)
    bright = np.where(u < faint, (u / max(faint, 1e-9)) * 0.15, np.exp(cv * z - 0.5 * cv * cv)).astype(np.float32)
    membrane = np.zeros(shape, np.float32)
    for j in range(2):
        dj = wall_d[j]
        ok = np.isfinite(dj)
        nj = np.moveaxis(wall_n[:, :][j], 0, -1)[ok]            # (M, 3)
        membrane[ok] += bright[j][ok] * _profile(dj[ok], nj, var_axes, const_var, sigma_ref)
    del wall_d, wall_n, wall_f, bright, u, z
    if snormal is not None:
        sn = np.moveaxis(snormal, 0, -1)
        # cell walls end at the tissue surface: outside it only their blur is seen
        band = depth < margin
        var_s = (sn[band] ** 2) @ var_axes + const_var
        membrane[band] *= ndtr(depth[band] / np.sqrt(var_s)).astype(np.float32)
        band = np.abs(depth) < margin
        membrane[band] += float(p["outer_wall_gain"]) * _profile(depth[band], sn[band], var_axes, const_var, sigma_ref)
        lg = float(p["layer_wall_gain"])
        for b in bounds:
            band = np.abs(depth - b) < margin
            membrane[band] += lg * _profile(depth[band] - b, sn[band], var_axes, const_var, sigma_ref)
        del sn
    tex = float(p["wall_texture"])
    if tex > 0:
        membrane *= np.clip(1.0 + tex * smooth_noise(shape, spacing, rng.uniform(0.25, 0.6) * D, rng), 0.0, None)
    # cytoplasmic haze: per cell level, smooth variation
    signal = membrane
    haze = float(p["haze"])
    if haze > 0:
        level = np.exp(0.4 * rng.standard_normal(n_cells + 1)).astype(np.float32)
        level[0] = 0
        field = np.clip(1.0 + 0.3 * smooth_noise(shape, spacing, rng.uniform(0.5, 1.5) * D, rng), 0.2, None)
        signal += haze * level[labels] * field
    bg = float(p["background"])
    if bg > 0:
        signal += np.where(inside, 0, bg).astype(np.float32)
    # bright specks, blurred by the PSF
    n_specks = int(rng.poisson(float(p["speck_density"]) * max(n_cells, 1)))
    if n_specks > 0:
        sp = np.zeros(shape, np.float32)
        n_in = int(round(0.75 * n_specks))
        tissue_vox = np.flatnonzero(inside)
        flat = np.concatenate([rng.choice(tissue_vox, size=n_in) if len(tissue_vox) else np.zeros(0, np.int64),
                               rng.integers(0, inside.size, n_specks - n_in)]).astype(np.int64)
        pos = np.unravel_index(flat, shape)
        amp_s = float(p["speck_brightness"]) * np.exp(0.5 * rng.standard_normal(n_specks))
        np.add.at(sp, pos, amp_s.astype(np.float32))
        sig_vox = (sig_z / sz, sig_xy / sx, sig_xy / sx)
        sig_vox = tuple(max(s, 0.5) for s in sig_vox)
        sp = ndimage.gaussian_filter(sp, sig_vox, truncate=3.0)
        sp *= np.float32((2 * np.pi) ** 1.5 * np.prod(sig_vox))
        signal += sp
        del sp
    # depth attenuation along z (light crosses the tissue above each voxel) and illumination
    decay = float(p["depth_decay"])
    if decay > 0:
        traversed = np.cumsum(inside, axis=0, dtype=np.float32) * np.float32(sz)
        signal *= np.exp(-np.float32(decay / E[0]) * traversed)
    ill = float(p["illumination"])
    if ill > 0:
        f = smooth_noise(shape, spacing, rng.uniform(0.4, 1.0) * float(E.max()), rng)
        signal *= np.clip(1.0 + ill * f, 0.15, None)
    # camera: Poisson shot noise, Gaussian read noise, offset
    photons = float(p["photons"])
    counts = rng.poisson(np.clip(signal, 0, None) * np.float32(photons)).astype(np.float32)
    read = float(p["read_noise"])
    if read > 0:
        counts += rng.standard_normal(shape, dtype=np.float32) * np.float32(read)
    counts += np.float32(p["offset"])
    image = np.clip(counts, 0, None).astype(np.float32)

    # -- 7. record ------------------------------------------------------------------------------
    p["epidermis_layers"] = n_layers                 # as used (none without a tissue surface)
    p["shape"] = list(shape)
    p["spacing_um"] = [float(s) for s in spacing]
    p["cell_diameter_um"] = D
    p["psf_sigma_um"] = [float(sig_z), float(sig_xy), float(sig_xy)]
    p["tissue_info"] = tissue_info
    p["n_seeds"] = int(n_seeds_total)
    p["seeds_per_region"] = seeds_per_region
    p["n_cells"] = n_cells
    p["tissue_fraction"] = float(inside.mean())
    p["median_diameter_um"] = median_cell_diameter(labels, spacing)
    p["seed"] = int(seed) if not isinstance(seed, np.random.Generator) else None
    p["seconds"] = round(time.perf_counter() - t0, 3)
    return image, labels, spacing, p


def _finish_labels(gid_labels, cell_voxels, *, fragment_fraction=0.15, rounds=4):
    """Connected, consecutive labels from per-voxel seed ids.

    A seed's region can fall apart when it is clipped by the tissue outline or the voxel grid
    (26-connected pieces are kept together).  The largest piece of every seed keeps the cell; other
    pieces larger than ``fragment_fraction`` x ``cell_voxels`` become cells of their own (they are
    separated by walls); smaller ones join the neighbouring cell (max label among the 6 neighbours,
    a few rounds) or, failing that, the background.  Tissue islands smaller than that are dropped.
    """
    from skimage.measure import label as cc_label

    cc = cc_label(gid_labels, connectivity=3, background=0)
    n = int(cc.max())
    if n == 0:
        return cc.astype(np.uint16)
    flat_cc = cc.ravel()
    sizes = np.bincount(flat_cc, minlength=n + 1)
    orig = np.zeros(n + 1, np.int64)
    orig[flat_cc] = gid_labels.ravel()
    # largest piece per seed id
    order = np.lexsort((-sizes[1:], orig[1:])) + 1
    first = np.ones(len(order), bool)
    first[1:] = orig[order[1:]] != orig[order[:-1]]
    largest = np.zeros(n + 1, bool)
    largest[order[first]] = True
    small = (~largest) & (sizes < fragment_fraction * cell_voxels)
    small[0] = False
    islands_min = fragment_fraction * cell_voxels
    small |= largest & (sizes < islands_min) & _isolated(cc, n)
    if small.any():
        frag = small[cc]
        padded = np.pad(np.where(frag, 0, cc), 1)
        sh = padded.shape
        idx = np.flatnonzero(np.pad(frag, 1))
        pf = padded.ravel()
        offs = (1, -1, sh[2], -sh[2], sh[1] * sh[2], -sh[1] * sh[2])
        for _ in range(rounds):
            if len(idx) == 0:
                break
            best = np.zeros(len(idx), pf.dtype)
            for o in offs:
                np.maximum(best, pf[idx + o], out=best)
            done = best > 0
            pf[idx[done]] = best[done]
            idx = idx[~done]
        cc = padded[1:-1, 1:-1, 1:-1]
    # consecutive relabelling
    present = np.zeros(n + 1, bool)
    present[cc.ravel()] = True
    present[0] = False
    lut = np.zeros(n + 1, np.int64)
    lut[present] = np.arange(1, int(present.sum()) + 1)
    m = int(present.sum())
    return lut[cc].astype(np.uint16 if m <= 65535 else np.uint32)


def _isolated(cc, n):
    """Per component id: True when it touches no other component (6-neighbourhood)."""
    touching = np.zeros(n + 1, bool)
    for ax in range(3):
        a = np.moveaxis(cc, ax, 0)
        lo, hi = a[:-1], a[1:]
        m = (lo != hi) & (lo > 0) & (hi > 0)
        touching[lo[m]] = True
        touching[hi[m]] = True
    return ~touching


def cell_diameters(labels, spacing=(1.0, 1.0, 1.0), *, exclude_border=False):
    """Equivalent-sphere diameters (um) of the cells of a label image.

    Parameters
    ----------
    labels : ndarray (Z, Y, X) of int
    spacing : tuple of 3 floats (um)
    exclude_border : bool
        Leave out cells touching a face of the volume.

    Returns
    -------
    ndarray (n,) float64, one per present label (increasing label order).
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel().astype(np.int64))
    present = counts > 0
    present[0] = False
    if exclude_border:
        border = np.zeros_like(present)
        for ax in range(labels.ndim):
            for sl in (0, -1):
                idx = [slice(None)] * labels.ndim
                idx[ax] = sl
                border[np.unique(labels[tuple(idx)])] = True
        present &= ~border
    vol = counts[present] * float(np.prod(spacing))
    return (6.0 * vol / np.pi) ** (1.0 / 3.0)


def median_cell_diameter(labels, spacing=(1.0, 1.0, 1.0), *, min_interior=5):
    """Median equivalent-sphere diameter (um) of the interior cells (all cells when fewer than
    ``min_interior`` cells avoid the volume border); NaN for an empty image."""
    d = cell_diameters(labels, spacing, exclude_border=True)
    if len(d) < min_interior:
        d = cell_diameters(labels, spacing, exclude_border=False)
    return float(np.median(d)) if len(d) else float("nan")


# ---------------------------------------------------------------------------------------------
# files, preview and the command line
# ---------------------------------------------------------------------------------------------

def write_pair(folder, name, image, labels, spacing):
    """Write ``images/NAME.tif`` (uint16 counts) and ``labels/NAME.tif`` (uint16/uint32) as
    ImageJ TIFFs with the spacing.  Returns the two paths."""
    from .image import Image
    from .io import write_image

    img_path = os.path.join(folder, "images", name + ".tif")
    lab_path = os.path.join(folder, "labels", name + ".tif")
    counts = np.clip(np.rint(image), 0, 65535).astype(np.uint16)
    write_image(img_path, Image(counts, spacing, {"is_label": False}))
    write_image(lab_path, Image(labels, spacing, {"is_label": True}), label=True)
    return img_path, lab_path


def save_preview(path, image, labels, spacing, *, title=None):
    """A PNG of the three orthogonal central slices (xy, xz, yz) with label outlines over them.

    Needs matplotlib (``pip install c3dseg[plot]``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the preview needs matplotlib: pip install 'c3dseg[plot]'") from None
    from skimage.segmentation import find_boundaries

    Z, Y, X = image.shape
    sz, sy, sx = spacing
    lo, hi = np.percentile(image, [1, 99.7])
    views = [
        ("xy (z=%d)" % (Z // 2), image[Z // 2], labels[Z // 2], (0, X * sx, Y * sy, 0)),
        ("xz (y=%d)" % (Y // 2), image[:, Y // 2], labels[:, Y // 2], (0, X * sx, Z * sz, 0)),
        ("yz (x=%d)" % (X // 2), image[:, :, X // 2], labels[:, :, X // 2], (0, Y * sy, Z * sz, 0)),
    ]
    widths = [X * sx, X * sx, Y * sy]
    heights = [Y * sy, Z * sz, Z * sz]
    fig, axes = plt.subplots(2, 3, figsize=(15, 10 * max(heights) / max(widths) + 1.0),
                             gridspec_kw={"width_ratios": widths})
    for col, (name, im, lab, ext) in enumerate(views):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
            if row == 1:
                b = find_boundaries(lab, mode="inner") & (lab > 0)
                over = np.zeros(b.shape + (4,), np.float32)
                over[b] = (1.0, 0.25, 0.1, 0.8)
                ax.imshow(over, extent=ext, interpolation="nearest")
            ax.set_title(name + (" + labels" if row else ""), fontsize=9)
            ax.set_xlabel("um", fontsize=8)
            ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--shape: expected Z,Y,X integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"--shape: expected 3 sizes >= 8 (Z,Y,X), got {text!r}")
    return shape


def main(argv=None):
    """``c3d-synth``: write synthetic image / label pairs drawn from the preset's ranges."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="c3d-synth",
        description="Synthetic membrane-stained tissue: ImageJ TIFF image/label pairs, params.json.",
        epilog="Seeds: sample i uses seed S + i (+10**6 for --preset validation, +2*10**6 for ood). "
               "--set key=value fixes a setting; key=a:b draws it uniformly, key=a~b log-uniformly, "
               "key=x|y|z from a list.  --list-settings shows every setting with its range.")
    ap.add_argument("-o", "--output", help="output folder (images/, labels/, params.json)")
    ap.add_argument("-n", "--count", type=int, default=1, help="number of samples (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)),
                    help="Z,Y,X voxels (default %(default)s)")
    ap.add_argument("--preset", default="train", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting (repeatable)")
    ap.add_argument("--preview", action="store_true", help="also write previews/NAME.png")
    ap.add_argument("--prefix", default=None, help="file name prefix (default: the preset)")
    ap.add_argument("--skip-existing", action="store_true",
                    help="do not remake samples already in the folder (resume an interrupted run)")
    ap.add_argument("-j", "--jobs", type=int, default=1,
                    help="worker processes (default 1; each sample is made by one process)")
    ap.add_argument("--list-settings", action="store_true", help="print the settings and exit")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if args.list_settings:
        ranges = PRESETS[args.preset]
        for k in TRAIN_RANGES:
            print(f"{k:22s} {json.dumps(ranges[k])}")
        if "_ood" in ranges:
            print(f"\nood: {ranges['_ood_count']} of these per sample, outside the training ranges:")
            for k, v in ranges["_ood"].items():
                print(f"  {k:20s} {json.dumps(v)}")
        return 0
    if not args.output:
        return fail("-o/--output is required")
    if args.count < 1:
        return fail(f"-n: expected a count >= 1, got {args.count}")
    try:
        shape = _parse_shape(args.shape)
        ranges = dict(PRESETS[args.preset])
        for s in args.set:
            key, spec = parse_setting(s)
            ranges[key] = spec
            if "_ood" in ranges and key in ranges["_ood"]:
                ranges["_ood"] = {k: v for k, v in ranges["_ood"].items() if k != key}
    except (ValueError, KeyError) as e:
        return fail(str(e).strip("'\""))
    prefix = args.prefix or args.preset
    offset = PRESET_SEED_OFFSET[args.preset]
    os.makedirs(args.output, exist_ok=True)
    params_path = os.path.join(args.output, "params.json")
    record = {}
    if os.path.exists(params_path):
        try:
            with open(params_path) as f:
                record = json.load(f).get("samples", {})
        except (OSError, ValueError):
            record = {}
    progress = None
    if not args.quiet and sys.stderr.isatty():
        try:
            from tqdm import tqdm
            progress = tqdm(total=args.count, unit="sample", desc="c3d-synth")  # (resumed: fewer)
        except ImportError:
            progress = None
    if args.preview:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return fail("the preview needs matplotlib: pip install 'c3dseg[plot]'")
    if args.jobs < 1:
        return fail(f"-j: expected a count >= 1, got {args.jobs}")
    t0 = time.perf_counter()
    tasks = [(ranges, args.seed + i + offset, shape, args.output, f"{prefix}_{args.seed + i + offset:07d}",
              args.preview) for i in range(args.count)]
    if args.skip_existing:
        tasks = [t for t in tasks if not (t[4] in record and all(
            os.path.exists(os.path.join(args.output, sub, t[4] + ".tif")) for sub in ("images", "labels")))]
    from .io_atomic import atomic_write_bytes

    def save_params():
        doc = {"generator": "c3dseg.synthesis", "preset": args.preset, "shape": list(shape),
               "overrides": args.set, "seed_offset": offset, "samples": record}
        atomic_write_bytes(params_path, json.dumps(doc, indent=1, default=_json_default).encode())
    if args.jobs > 1 and args.count > 1:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(min(args.jobs, args.count), initializer=_init_worker)
        results = pool.imap(_make_and_write, tasks)
    else:
        pool = None
        results = map(_make_and_write, tasks)
    for done, (name, params) in enumerate(results, start=1):
        record[name] = params
        if done % 20 == 0:
            save_params()       # an interrupted run keeps what it made (see --skip-existing)
        if progress is not None:
            progress.update(1)
        elif not args.quiet:
            print(f"{name}: {params['tissue']}, {params['n_cells']} cells, "
                  f"{params['seconds']:.1f} s", flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    if progress is not None:
        progress.close()
    save_params()
    if not args.quiet:
        print(f"wrote {len(tasks)} sample(s) to {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


def _init_worker():
    global _KD_WORKERS
    _KD_WORKERS = 1


def _make_and_write(task):
    ranges, seed, shape, folder, name, preview = task
    image, labels, spacing, params = make_sample(ranges, seed, shape=shape)
    write_pair(folder, name, image, labels, spacing)
    if preview:
        os.makedirs(os.path.join(folder, "previews"), exist_ok=True)
        save_preview(os.path.join(folder, "previews", name + ".png"), image, labels, spacing,
                     title=f"{name}: {params['tissue']}, {params['n_cells']} cells, median diameter "
                     f"{params['median_diameter_um']:.1f} um, spacing {tuple(round(s, 3) for s in spacing)} um")
    return name, params


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")

"""Synthetic tissue: label volumes and membrane images for tests, benchmarks and training data.

The first function here, :func:`voronoi_labels`, is the common test volume (dense Voronoi tissue).
"""

from __future__ import annotations

import numpy as np
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

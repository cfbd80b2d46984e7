"""Connected regions of label images: component labelling, volume-based rejection and region
properties.  Vectorised with ``bincount`` and ``ndimage.find_objects``; the only Python loop runs
over z slices (bounded memory), never over regions.

Arrays are ``(Z, Y, X)``; spacing is (z, y, x) in micrometres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["label_components", "compact_labels", "filter_by_volume", "region_properties",
           "REGION_COLUMNS"]

#: columns of :func:`region_properties` (x, y, z in columns 3-5, as XPIWIT's keypoint tables)
REGION_COLUMNS = (
    "label", "volume", "centroid_x", "centroid_y", "centroid_z",
    "volume_um3", "centroid_x_um", "centroid_y_um", "centroid_z_um",
    "bbox_x_min", "bbox_y_min", "bbox_z_min", "bbox_x_max", "bbox_y_max", "bbox_z_max",
)

_DENSE_MAX = 1 << 24  # label values up to this use dense bincount tables


def label_components(mask: np.ndarray, fully_connected: bool = True) -> tuple[np.ndarray, int]:
    """Connected components of the nonzero voxels.

    Parameters
    ----------
    mask : ndarray ``(Z, Y, X)``, any dtype (nonzero = foreground)
    fully_connected : bool
        26-neighbourhood (True, ITK's FullyConnected=1) or 6-neighbourhood.

    Returns
    -------
    labels : int32 ndarray, 0 background, 1..n
    n : int
    """
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim if fully_connected else 1)
    labels, n = ndimage.label(mask != 0, structure=structure, output=np.int32)
    return labels, int(n)


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary non-negative label values onto 0..n.

    Returns
    -------
    compact : ndarray (int32, or int64 past 2**31 - 1 regions) of the same shape, 0 kept as 0
    ids : ndarray of the original label value of each compact label (``ids[0] == 0``)
    """
    if labels.size == 0:
        return labels.astype(np.int32), np.zeros(1, dtype=np.int64)
    hi = int(labels.max())
    if hi <= _DENSE_MAX:
        present = np.bincount(labels.ravel(), minlength=hi + 1) > 0
        present[0] = True
        ids = np.flatnonzero(present)
        lut = np.zeros(hi + 1, dtype=np.int64)
        lut[ids] = np.arange(ids.size)
        dtype = np.int32 if ids.size < 2 ** 31 else np.int64
        return lut.astype(dtype)[labels], ids
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.int32), ids


def _check_labels(labels: np.ndarray) -> None:
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind == "f" and labels.size and np.array_equal(labels, np.round(labels)):
            return
        raise ValueError(f"expected a label image (non-negative integers), got {labels.dtype} values")
    if labels.size and labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError("expected a label image (non-negative integers), got negative values")


def filter_by_volume(labels: np.ndarray, min_volume: int | None = None,
                     max_volume: int | None = None, *, relabel: bool = True) -> np.ndarray:
    """Remove regions whose voxel count is below ``min_volume`` or above ``max_volume``.

    Parameters
    ----------
    labels : ndarray ``(Z, Y, X)`` of non-negative integers
    min_volume, max_volume : int, optional
        Inclusive bounds in voxels; None (or < 0) means no bound.
    relabel : bool
        Renumber the kept regions 1..n in the order of their old values (default); else keep
        their values.

    Returns
    -------
    ndarray: int32 when relabelled, else the input's dtype; removed regions are 0.
    """
    _check_labels(labels)
    lab = labels.astype(np.int64) if labels.dtype.kind in "bf" else labels
    compact, ids = compact_labels(lab)
    counts = np.bincount(compact.ravel(), minlength=ids.size)
    keep = np.ones(ids.size, dtype=bool)
    if min_volume is not None and min_volume >= 0:
        keep &= counts >= min_volume
    if max_volume is not None and max_volume >= 0:
        keep &= counts <= max_volume
    keep[0] = False
    if relabel:
        lut = np.zeros(ids.size, dtype=np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    else:
        lut = np.where(keep, ids, 0).astype(labels.dtype if labels.dtype.kind in "iu" else np.int64)
    return lut[compact]


def region_properties(labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> dict[str, np.ndarray]:
    """Volume, centroid and bounding box of every region of a label image.

    Parameters
    ----------
    labels : ndarray ``(Z, Y, X)`` of non-negative integers (0 = background)
    spacing : 3 floats (z, y, x) in um

    Returns
    -------
    dict of 1D arrays, one entry per region in increasing label order, keyed by
    :data:`REGION_COLUMNS`: ``label``; ``volume`` (voxels) and ``volume_um3``; centroids in voxel
    coordinates (``centroid_x`` = mean axis-2 index, ...) and in um (index * spacing); inclusive
    bounding boxes in voxel indices.
    """
    _check_labels(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label image, got shape {labels.shape}")
    lab = labels.astype(np.int64) if labels.dtype.kind in "bf" else labels
    compact, ids = compact_labels(lab)
    n = ids.size
    nz, ny, nx = compact.shape
    counts = np.zeros(n, dtype=np.int64)
    sz = np.zeros(n)
    sy = np.zeros(n)
    sx = np.zeros(n)
    yy = np.broadcast_to(np.arange(ny, dtype=np.float64)[:, None], (ny, nx)).ravel()
    xx = np.broadcast_to(np.arange(nx, dtype=np.float64)[None, :], (ny, nx)).ravel()
    for z in range(nz):  # slices, not regions: bounded memory
        flat = compact[z].ravel()
        c = np.bincount(flat, minlength=n)
        counts += c
        sz += z * c
        sy += np.bincount(flat, weights=yy, minlength=n)
        sx += np.bincount(flat, weights=xx, minlength=n)
    sel = np.flatnonzero(counts[1:] > 0) + 1
    vol = counts[sel]
    spz, spy, spx = (float(s) for s in spacing)
    cz, cy, cx = sz[sel] / vol, sy[sel] / vol, sx[sel] / vol
    objs = ndimage.find_objects(compact)
    box = np.array([[s.start for s in objs[i - 1]] + [s.stop - 1 for s in objs[i - 1]] for i in sel],
                   dtype=np.int64).reshape(-1, 6)
    return {
        "label": ids[sel].astype(np.int64),
        "volume": vol,
        "centroid_x": cx, "centroid_y": cy, "centroid_z": cz,
        "volume_um3": vol * (spz * spy * spx),
        "centroid_x_um": cx * spx, "centroid_y_um": cy * spy, "centroid_z_um": cz * spz,
        "bbox_x_min": box[:, 2], "bbox_y_min": box[:, 1], "bbox_z_min": box[:, 0],
        "bbox_x_max": box[:, 5], "bbox_y_max": box[:, 4], "bbox_z_max": box[:, 3],
    }

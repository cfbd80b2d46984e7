"""Connected regions of label images: component labelling, volume-based rejection and region
properties.  Vectorised with ``bincount`` and ``ndimage.find_objects``; the only Python loop runs
over z slices (bounded memory), never over regions.

Arrays are ``(Z, Y, X)``; spacing is (z, y, x) in micrometres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["label_components", "compact_labels", "filter_by_volume", "region_properties",
           "region_sums", "merge_region_sums", "properties_from_sums", "region_table", "REGION_COLUMNS"]

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


def region_sums(labels: np.ndarray, origin=(0, 0, 0)) -> dict[str, np.ndarray]:
    """Additive per-region sums of a label image, or of one block of a larger one.

    Parameters
    ----------
    labels : ndarray ``(Z, Y, X)`` of non-negative integers (0 = background)
    origin : 3 ints
        Index (z, y, x) of ``labels[0, 0, 0]`` in the whole volume: sums and boxes are in the
        whole volume's coordinates, so the sums of its blocks combine with
        :func:`merge_region_sums` into the sums of the whole volume, exactly (integers).

    Returns
    -------
    dict: ``label`` (increasing), ``volume`` (voxels), ``sum`` (3, n) int64 sums of the z, y, x
    indices, ``lo`` / ``hi`` (3, n) inclusive bounding boxes.
    """
    _check_labels(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label image, got shape {labels.shape}")
    org = np.asarray(origin, np.int64).reshape(3)
    lab = labels.astype(np.int64) if labels.dtype.kind in "bf" else labels
    compact, ids = compact_labels(lab)
    n = ids.size
    nz, ny, nx = compact.shape
    counts = np.zeros(n, dtype=np.int64)
    sums = np.zeros((3, n), dtype=np.int64)
    # whole-number weights: the float64 sums of one slice are exact integers
    yy = np.broadcast_to(np.arange(ny, dtype=np.float64)[:, None], (ny, nx)).ravel()
    xx = np.broadcast_to(np.arange(nx, dtype=np.float64)[None, :], (ny, nx)).ravel()
    for z in range(nz):  # slices, not regions: bounded memory
        flat = compact[z].ravel()
        c = np.bincount(flat, minlength=n)
        counts += c
        sums[0] += z * c
        sums[1] += np.bincount(flat, weights=yy, minlength=n).astype(np.int64)
        sums[2] += np.bincount(flat, weights=xx, minlength=n).astype(np.int64)
    sel = np.flatnonzero(counts[1:] > 0) + 1
    vol = counts[sel]
    sums = sums[:, sel] + org[:, None] * vol[None]
    objs = ndimage.find_objects(compact)
    box = np.array([[s.start for s in objs[i - 1]] + [s.stop - 1 for s in objs[i - 1]] for i in sel],
                   dtype=np.int64).reshape(-1, 6).T
    return {"label": ids[sel].astype(np.int64), "volume": vol, "sum": sums,
            "lo": box[:3] + org[:, None], "hi": box[3:] + org[:, None]}


def merge_region_sums(parts) -> dict[str, np.ndarray]:
    """The sums of a whole volume from those of its blocks (:func:`region_sums` with origins)."""
    parts = [p for p in parts if len(p["label"])]
    if not parts:
        return {"label": np.zeros(0, np.int64), "volume": np.zeros(0, np.int64),
                "sum": np.zeros((3, 0), np.int64), "lo": np.zeros((3, 0), np.int64),
                "hi": np.zeros((3, 0), np.int64)}
    ids = np.unique(np.concatenate([p["label"] for p in parts]))
    n = len(ids)
    vol = np.zeros(n, np.int64)
    sums = np.zeros((3, n), np.int64)
    lo = np.full((3, n), np.iinfo(np.int64).max, np.int64)
    hi = np.full((3, n), -1, np.int64)
    for p in parts:
        pos = np.searchsorted(ids, p["label"])
        np.add.at(vol, pos, p["volume"])
        for a in range(3):
            np.add.at(sums[a], pos, p["sum"][a])
            np.minimum.at(lo[a], pos, p["lo"][a])
            np.maximum.at(hi[a], pos, p["hi"][a])
    return {"label": ids, "volume": vol, "sum": sums, "lo": lo, "hi": hi}


def properties_from_sums(sums: dict, spacing=(1.0, 1.0, 1.0)) -> dict[str, np.ndarray]:
    """The columns of :func:`region_properties` from (merged) :func:`region_sums`."""
    vol = sums["volume"]
    cz, cy, cx = (sums["sum"][a] / vol for a in range(3))
    spz, spy, spx = (float(s) for s in spacing)
    lo, hi = sums["lo"], sums["hi"]
    return {
        "label": sums["label"].astype(np.int64),
        "volume": vol,
        "centroid_x": cx, "centroid_y": cy, "centroid_z": cz,
        "volume_um3": vol * (spz * spy * spx),
        "centroid_x_um": cx * spx, "centroid_y_um": cy * spy, "centroid_z_um": cz * spz,
        "bbox_x_min": lo[2], "bbox_y_min": lo[1], "bbox_z_min": lo[0],
        "bbox_x_max": hi[2], "bbox_y_max": hi[1], "bbox_z_max": hi[0],
    }


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
    bounding boxes in voxel indices.  Blockwise: :func:`region_sums` per block,
    :func:`merge_region_sums`, :func:`properties_from_sums` give the same numbers.
    """
    return properties_from_sums(region_sums(labels), spacing)


def region_table(props: dict, meta: dict | None = None):
    """:func:`region_properties` as a :class:`~c3dseg.image.MetaTable` (one row per region,
    :data:`REGION_COLUMNS`; label, volume and boxes as integers)."""
    from .image import MetaTable

    int_cols = {"label", "volume"} | {c for c in REGION_COLUMNS if c.startswith("bbox")}
    rows = np.column_stack([props[c].astype(np.float64) for c in REGION_COLUMNS]) \
        if len(props["label"]) else np.zeros((0, len(REGION_COLUMNS)))
    table_rows = [[int(v) if c in int_cols else float(v) for c, v in zip(REGION_COLUMNS, r)] for r in rows]
    return MetaTable(list(REGION_COLUMNS), table_rows, meta=dict(meta or {}))

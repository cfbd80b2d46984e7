"""Label-image utilities shared by flows, reconstruction and metrics.

A label image is an integer ``(Z, Y, X)`` array: 0 is background, positive values are cell ids.
Output label images are ``uint16`` when their largest id fits (<= 65535), else ``uint32`` with a
warning: ids never wrap silently.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from .errors import InputError

log = logging.getLogger("c3dseg")

#: Largest label id that still fits a uint16 image.
UINT16_MAX_LABEL = 65535

# Above this label value, lookup tables (one entry per possible id) give way to np.unique.
_LUT_LIMIT = 1 << 25


def check_labels(labels, name: str = "labels", *, ndim: int | None = 3) -> np.ndarray:
    """Validate a label image and return it as an integer array (no copy when already fine).

    Parameters
    ----------
    labels : array_like of int
        The label image; boolean arrays are accepted (one cell, id 1).  Float arrays are
        accepted when every value is a whole number.
    name : str
        What the array is called in error messages.
    ndim : int or None
        Required number of dimensions (None: any).

    Returns
    -------
    ndarray of an integer type
        The same values.

    Raises
    ------
    InputError
        Non-integer values, negative ids or the wrong number of dimensions.
    """
    a = np.asarray(labels)
    if ndim is not None and a.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}D label image, got shape {a.shape}")
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating):
            raise InputError(f"{name}: labels must be integers, got dtype {a.dtype}")
        if a.size and (not np.all(np.isfinite(a)) or np.any(a != np.round(a))):
            raise InputError(f"{name}: labels must be integers, got non-integer values "
                             f"(dtype {a.dtype})")
        if a.size and a.max() >= 2 ** 31:
            raise InputError(f"{name}: label value {a.max()} too large")
        a = a.astype(np.int64)
    if np.issubdtype(a.dtype, np.signedinteger) and a.size and a.min() < 0:
        raise InputError(f"{name}: labels must be >= 0, found {a.min()}")
    return a


def label_sums(labels, n: int | None = None, weights=None, *, chunk: int = 1 << 20) -> np.ndarray:
    """Per-label voxel counts, or sums of ``weights``, in bounded memory.

    ``np.bincount`` converts its input to int64 (and weights to float64): on a whole volume that
    is 8-16 bytes per voxel of temporaries.  This works through the flattened array in chunks.

    Parameters
    ----------
    labels : ndarray of non-negative int (any shape)
    n : int, optional
        Largest label (default: ``labels.max()``).
    weights : ndarray of the labels' shape, or a callable ``(start, stop) -> array`` giving the
        weights of the flat range ``[start, stop)``; None counts voxels.
    chunk : int
        Voxels per chunk.

    Returns
    -------
    ndarray (n + 1,): int64 counts, or float64 sums.
    """
    flat = np.asarray(labels).reshape(-1)
    if n is None:
        n = int(flat.max()) if flat.size else 0
    acc = np.zeros(n + 1, np.int64 if weights is None else np.float64)
    wflat = None if weights is None or callable(weights) else np.asarray(weights).reshape(-1)
    for i in range(0, flat.size, chunk):
        j = min(flat.size, i + chunk)
        if weights is None:
            w = None
        elif callable(weights):
            w = np.asarray(weights(i, j), np.float64).reshape(-1)
        else:
            w = wflat[i:j]
        acc += np.bincount(flat[i:j], weights=w, minlength=n + 1)[: n + 1]
    return acc


def label_dtype(n_labels: int, *, warn: bool = True) -> type:
    """``uint16`` when ``n_labels`` <= 65535, else ``uint32`` (with a warning)."""
    if n_labels <= UINT16_MAX_LABEL:
        return np.uint16
    if warn:
        msg = f"{n_labels} labels exceed 65535: writing uint32 labels"
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
    return np.uint32


def compress_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map the ids present in ``labels`` to 1..N.

    Parameters
    ----------
    labels : ndarray of non-negative int
        Already validated (see :func:`check_labels`).

    Returns
    -------
    ids : ndarray (N,) int64
        The original ids, increasing; ``ids[k - 1]`` is the id mapped to ``k``.
    index : ndarray, same shape as ``labels``, uint32
        0 for background, 1..N for cells.
    sizes : ndarray (N,) int64
        Voxel count of each id.
    """
    flat = labels.reshape(-1)
    top = int(flat.max()) if flat.size else 0
    if top < _LUT_LIMIT:
        counts = label_sums(flat, top)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lut = np.zeros(top + 1, dtype=np.uint32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
        return ids.astype(np.int64), lut[labels], counts[ids].astype(np.int64)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] == 0:
        ids, counts = ids[1:], counts[1:]
        inverse = inverse.astype(np.uint32)
    else:
        inverse = (inverse + 1).astype(np.uint32)
    return ids.astype(np.int64), inverse.reshape(labels.shape), counts.astype(np.int64)


def relabel_consecutive(labels, *, return_ids: bool = False):
    """Relabel a label image to 1..N in order of increasing original id.

    Parameters
    ----------
    labels : ndarray (Z, Y, X) of non-negative int
    return_ids : bool
        Also return the original id of each new label.

    Returns
    -------
    out : ndarray, uint16 (N <= 65535) or uint32 (with a warning)
    ids : ndarray (N,) int64, only with ``return_ids``; ``ids[k - 1]`` became ``k``.
    """
    labels = check_labels(labels, ndim=None)
    ids, index, _ = compress_labels(labels)
    out = index.astype(label_dtype(len(ids)), copy=False)
    return (out, ids) if return_ids else out

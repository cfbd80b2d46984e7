"""Flow targets from label images: hyperbolic-tangent flows, heat-diffusion flows, foreground.

All functions take a ``(Z, Y, X)`` integer label image (0 background) and work on the whole
volume at once: per-cell quantities (centroids, extents, medians, diffusion sources) come from
single-pass tables, and every per-voxel step is a vectorised expression over the volume.

Conventions (``design.md``): flows are float32 ``(3, Z, Y, X)`` with channels along axes
0, 1, 2 (z, y, x), **pointing away from the cell centre** (positive where a voxel lies above the
centre along that axis), 0 in the background.  Reconstruction moves a voxel ``p`` to
``p - step * flow(p)``.

Two flow types:

``tanh`` (the paper's simplified formulation)
    Per cell and axis, ``F_a(p) = tanh((p_a - c_a) / s_a)`` with ``c`` the cell's centroid.
    ``scale="adaptive"`` (default) scales each cell by its own size (one divisor per cell from
    its equivalent-sphere radius); ``"axis"`` is the authors' later per-axis variant; a number is
    a fixed divisor (the reference code's is 5 voxels).  See :func:`tanh_flows`.
``heat`` (Cellpose's formulation, in true 3D)
    Heat from a source voxel in each cell (the in-cell voxel nearest the cell's per-axis median)
    spreads over the cell's voxels (7-point stencil, neighbours in other cells or the background
    count 0); the flow is the negated, unit-length central-difference gradient.  Instead of
    Cellpose's hundreds of explicit averaging sweeps, the steady state of that same iteration
    (a sparse symmetric positive-definite system) is solved for all cells at once by conjugate
    gradients (float32, refined once with a float64 residual so that the far corners of
    elongated cells, where the heat is orders of magnitude below its peak, still point the
    right way), which needs far fewer sweeps over the volume.
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import ParameterError
from .labels import check_labels, compress_labels, label_sums

log = logging.getLogger("c3dseg")

__all__ = ["tanh_flows", "iter_tanh_flows", "tanh_scales", "tanh_tables", "iter_tanh_box", "heat_flows", "foreground_target",
           "labels_to_prediction", "cell_statistics", "FLOW_TYPES", "FOREGROUND_MODES"]

FLOW_TYPES = ("tanh", "heat")
FOREGROUND_MODES = ("union", "hull")

#: tanh argument reached at a cell's equivalent-sphere radius with ``scale="adaptive"``.  Lower
#: values keep the flow more linear (straighter paths, better round trips on clean flows),
#: higher ones raise it above noise; 1.25 was the best compromise in the round-trip tests.
ADAPTIVE_SATURATION = 1.25
#: Smallest adaptive divisor (voxels).  With a divisor below half the tracking step, the flow's
#: linear core would throw points across the centre (p - 4 (p - c) / s overshoots for s < 2);
#: 2.5 keeps the paper's step of 4 contracting.
ADAPTIVE_MIN_SCALE = 2.5
#: The reference implementation's fixed divisor (voxels).
REFERENCE_SCALE = 5.0


# ---------------------------------------------------------------------------------------------
# per-cell tables
# ---------------------------------------------------------------------------------------------

def _cell_index(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """An index image whose values address per-cell tables of length ``n + 1`` (0 = background).

    The labels themselves when their ids are dense enough, else a compressed copy."""
    top = int(labels.max()) if labels.size else 0
    if top <= 4 * 65536 or top <= 4 * labels.size // 64:
        return labels, top
    _, index, _ = compress_labels(labels)
    return index, int(index.max())


def cell_statistics(index: np.ndarray, n: int, *, median: bool = False) -> dict:
    """Per-cell voxel counts, centroids, bounding boxes and (optionally) per-axis medians.

    One bincount per slice along each axis; memory O(n), no per-cell loop.

    Parameters
    ----------
    index : ndarray (Z, Y, X) of int
        Cell ids 0..n (0 background).
    n : int
        Largest id.
    median : bool
        Also compute per-axis median coordinates.

    Returns
    -------
    dict with arrays of length ``n + 1`` (entry 0 = background, unused):
        ``size`` (int64), ``centroid`` (3, n+1) float64, ``lo``/``hi`` (3, n+1) int64 first and
        last voxel coordinate along each axis (-1 where absent), ``median`` (3, n+1) float64.
    """
    size = label_sums(index, n)
    cen = np.zeros((3, n + 1))
    lo = np.full((3, n + 1), -1, np.int64)
    hi = np.full((3, n + 1), -1, np.int64)
    med = np.zeros((3, n + 1)) if median else None
    half = (size + 1) // 2  # the median is the first coordinate where the running count >= half
    for a in range(3):
        running = np.zeros(n + 1, np.int64)
        total = np.zeros(n + 1, np.float64)
        first = lo[a]
        last = hi[a]
        med_a = np.full(n + 1, -1.0) if median else None
        for i in range(index.shape[a]):
            sl = np.take(index, i, axis=a)
            cnt = np.bincount(sl.reshape(-1), minlength=n + 1)
            present = cnt > 0
            first[(first < 0) & present] = i
            last[present] = i
            total += i * cnt
            if median:
                before = running
                running = running + cnt
                hit = (before < half) & (running >= half)
                med_a[hit] = i
            else:
                running += cnt
        with np.errstate(invalid="ignore", divide="ignore"):
            cen[a] = np.where(size > 0, total / np.maximum(size, 1), 0.0)
        if median:
            med[a] = med_a
    out = {"size": size, "centroid": cen, "lo": lo, "hi": hi}
    if median:
        out["median"] = med
    return out


def _grid(shape, axis, origin: int = 0):
    """Coordinates along ``axis`` broadcastable to ``shape`` (no full-size array), starting at
    ``origin`` (the box's first index in a larger volume)."""
    s = [1, 1, 1]
    s[axis] = shape[axis]
    return np.arange(origin, origin + shape[axis], dtype=np.float32).reshape(s)


def _check_spacing(spacing):
    if spacing is None:
        return None
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise ParameterError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}", key="spacing")
    return sp


# ---------------------------------------------------------------------------------------------
# tanh flows
# ---------------------------------------------------------------------------------------------

TANH_SCALES = ("adaptive", "axis")


def _parse_scale(scale):
    if isinstance(scale, str):
        for name in TANH_SCALES:
            if scale.strip().lower() == name:
                return name
        try:
            scale = float(scale)
        except ValueError:
            scale = None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise ParameterError(f"expected adaptive, axis or a positive number, got {scale!r}", key="scale")
    return value


def tanh_scales(index: np.ndarray, n: int, scale="adaptive", spacing=None, stats=None) -> np.ndarray:
    """The divisors ``s`` of :func:`tanh_flows`: (3, n + 1) float64, per cell id and axis.

    ``index`` holds ids 0..n; ``stats`` is :func:`cell_statistics` of it (computed if None).
    """
    mode = _parse_scale(scale)
    sp = _check_spacing(spacing)
    st = cell_statistics(index, n) if stats is None else stats
    if mode == "adaptive":
        r_eq = np.cbrt(3.0 * st["size"] / (4.0 * np.pi))
        s = np.maximum(ADAPTIVE_MIN_SCALE, r_eq / ADAPTIVE_SATURATION)
        return np.broadcast_to(s, (3, n + 1)).copy()
    if mode == "axis":
        cen = st["centroid"]
        h = np.minimum(np.abs(cen - st["lo"]), np.abs(cen - (st["hi"] + 1)))
        return np.maximum(1.0, h / 3.0)
    out = np.empty((3, n + 1))
    for a in range(3):
        out[a] = mode / (sp[a] if sp is not None else 1.0)
    return out


def tanh_flows(labels, scale="adaptive", spacing=None, *, out=None) -> np.ndarray:
    """Hyperbolic-tangent flow targets (the paper's formulation).

    ``F_a(p) = tanh((p_a - c_a) / s_a)`` for every voxel ``p`` of a cell with centroid ``c``.

    Parameters
    ----------
    labels : ndarray (Z, Y, X) of non-negative int
        0 background; ids need not be consecutive.
    scale : "adaptive", "axis" or float
        The divisors ``s_a``:

        - ``"adaptive"`` (default): one divisor per cell, from its size:
          ``s = max(ADAPTIVE_MIN_SCALE, r / ADAPTIVE_SATURATION)`` with ``r`` the radius of the
          sphere of the cell's volume (voxels), the same along every axis.  The flow then
          reaches ``tanh(1.25) = 0.85`` at that radius for cells of every size, and, being the
          same along every axis, points nearly straight at the centroid, so tracking stays
          inside convex (even elongated, oblique) cells.
        - ``"axis"``: per cell and axis, the authors' later per-extent variant:
          ``s_a = max(1, min(|c_a - lo_a|, |c_a - hi_a|) / 3)`` (``lo``/``hi`` the bounding box,
          ``hi`` exclusive).
        - a positive number: a fixed divisor, in voxels, or in micrometres when ``spacing`` is
          given (the reference implementation uses 5 voxels).
    spacing : tuple of 3 floats, optional
        Voxel size (z, y, x) in micrometres; only used with a numeric ``scale``.
    out : ndarray (3, Z, Y, X) float32, optional
        Where to write the result.

    Returns
    -------
    flows : ndarray (3, Z, Y, X) float32
        Components along z, y, x in (-1, 1), pointing away from each cell's centroid; 0 in the
        background.
    """
    labels = check_labels(labels)
    shape = labels.shape
    if out is None:
        out = np.empty((3,) + shape, np.float32)
    for a, f in iter_tanh_flows(labels, scale, spacing, out=out):
        pass
    return out


def iter_tanh_flows(labels, scale="adaptive", spacing=None, *, out=None):
    """The channels of :func:`tanh_flows` one at a time: yields ``(axis, flow (Z, Y, X))``.

    Each channel is computed when it is asked for, so a caller that uses one channel at a time
    (e.g. the flow-error filter) never holds all three.  With ``out`` ((3, Z, Y, X) float32) the
    channels are written into it; otherwise each yielded array is new.
    """
    tables = tanh_flow_tables(labels, scale, spacing)   # checks the labels, scale and spacing
    if tables is None:
        for a in range(3):
            f = out[a] if out is not None else np.empty(np.shape(labels), np.float32)
            f[...] = 0
            yield a, f
        return
    yield from iter_tanh_box(*tables, out=out)


def tanh_flow_tables(labels, scale="adaptive", spacing=None):
    """``(index, centroid, inv)`` for :func:`tanh_channel` over a whole label image (checked as
    :func:`iter_tanh_flows` does); None when it holds no cell."""
    labels = check_labels(labels)
    _parse_scale(scale)
    _check_spacing(spacing)
    index, n = _cell_index(labels)
    if n == 0:
        return None
    return (index,) + tanh_tables(cell_statistics(index, n), scale, spacing)


def tanh_tables(stats: dict, scale="adaptive", spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell tables of :func:`tanh_flows`: centroids and inverse divisors, (3, n + 1) float32
    each (entry 0 and absent cells: inverse 0, so their flow is 0).

    ``stats``: :func:`cell_statistics` of the whole label image (``size``, ``centroid``, ``lo``,
    ``hi``), or the same tables summed across the blocks of a larger one."""
    s = tanh_scales(None, len(stats["size"]) - 1, scale, spacing, stats=stats)
    present = stats["size"] > 0
    present[0] = False
    inv = np.where(present[None], 1.0 / s, 0.0).astype(np.float32)
    return np.asarray(stats["centroid"]).astype(np.float32), inv


def iter_tanh_box(index, centroid, inv, origin=(0, 0, 0), *, out=None):
    """The tanh flow channels of a box of a label volume, given its per-cell tables
    (:func:`tanh_tables`): yields ``(axis, flow)``.

    ``index`` addresses the tables (0 = background); ``origin`` is the box's first voxel in the
    volume: the flows are those of the whole volume over that box, to the last bit."""
    for a in range(3):
        yield a, tanh_channel(index, centroid, inv, a, origin, out=None if out is None else out[a])


def tanh_channel(index, centroid, inv, a, origin=(0, 0, 0), *, out=None):
    """Channel ``a`` of :func:`iter_tanh_box` alone (float32, into ``out`` when given)."""
    shape = index.shape
    f = out if out is not None else np.empty(shape, np.float32)
    np.subtract(_grid(shape, a, int(origin[a])), centroid[a][index], out=f)  # p_a - c_a
    np.multiply(f, inv[a][index], out=f)
    np.tanh(f, out=f)
    return f


# ---------------------------------------------------------------------------------------------
# heat-diffusion flows
# ---------------------------------------------------------------------------------------------

def _sources(index: np.ndarray, n: int) -> np.ndarray:
    """Linear index of each cell's source voxel: the in-cell voxel nearest the per-axis median
    (the lower median, a voxel position; ties: the lowest linear index).  Returns (k,) for the
    k cells present, in increasing id order."""
    st = cell_statistics(index, n, median=True)
    ids = np.flatnonzero(st["size"] > 0)
    ids = ids[ids > 0]
    med = st["median"][:, ids].astype(np.int64)
    src = np.ravel_multi_index(tuple(med), index.shape)
    # usually the median voxel lies in its cell; search the others' voxels
    out_ids = index.reshape(-1)[src] != ids
    if out_ids.any():
        lost = np.zeros(n + 1, bool)
        lost[ids[out_ids]] = True
        vox = np.flatnonzero(lost[index.reshape(-1)])
        lab = index.reshape(-1)[vox]
        medf = st["median"].astype(np.float64)
        d2 = np.zeros(len(vox))
        for a in range(3):
            c = np.unravel_index(vox, index.shape)[a]
            d2 += (c - medf[a][lab]) ** 2
        order = np.lexsort((vox, d2, lab))  # by cell, then distance, then linear index
        lab_sorted = lab[order]
        first = np.ones(len(order), bool)
        first[1:] = lab_sorted[1:] != lab_sorted[:-1]
        best = np.zeros(n + 1, np.int64)
        best[lab_sorted[first]] = vox[order[first]]
        src[out_ids] = best[ids[out_ids]]
    return src


def _edge_weights(index):
    """For each axis, True where a voxel and its successor along the axis belong to the same
    cell (bool, shape reduced by 1 along that axis)."""
    w = []
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a] = slice(None, -1)
        hi[a] = slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        w.append((index[lo] == index[hi]) & (index[lo] > 0))
    return w


def _scratch(shape, dtype=np.float32, budget=1 << 20):
    """A small scratch buffer for slab-wise work: ``k`` whole z-slices, about ``budget`` values."""
    plane = max(1, shape[1] * shape[2])
    budget = min(budget, max(plane, shape[0] * plane // 16))
    k = max(1, min(shape[0], budget // plane))
    return np.empty((k,) + tuple(shape[1:]), dtype)


def _neighbour_terms(x, w, out, scratch, sign=-1.0):
    """``out[p] += sign * x[q]`` for every same-cell pair (p, q) of face neighbours, in both
    directions, slab by slab (``scratch`` from :func:`_scratch`; no full-size temporaries)."""
    Z = x.shape[0]
    k = scratch.shape[0]
    op = np.subtract if sign < 0 else np.add
    for z0 in range(0, Z, k):
        z1 = min(Z, z0 + k)
        n = z1 - z0
        xs, os_ = x[z0:z1], out[z0:z1]
        for a in (1, 2):
            lo, hi = _pair_slices(a)
            ws = w[a][z0:z1]
            t = scratch[:n, : ws.shape[1], : ws.shape[2]]
            np.multiply(ws, xs[hi], out=t)
            op(os_[lo], t, out=os_[lo])
            np.multiply(ws, xs[lo], out=t)
            op(os_[hi], t, out=os_[hi])
        # z edges z -> z + 1 for z in [z0, min(z1, Z - 1))
        e1 = min(z1, Z - 1)
        if e1 > z0:
            m = e1 - z0
            ws = w[0][z0:e1]
            t = scratch[:m]
            np.multiply(ws, x[z0 + 1:e1 + 1], out=t)
            op(out[z0:e1], t, out=out[z0:e1])
            np.multiply(ws, x[z0:e1], out=t)
            op(out[z0 + 1:e1 + 1], t, out=out[z0 + 1:e1 + 1])
    return out


def _apply_operator(x, w, out, scratch):
    """out = 6 x - sum of same-cell neighbours (the steady state of Cellpose's averaging)."""
    np.multiply(x, x.dtype.type(6.0), out=out)
    return _neighbour_terms(x, w, out, scratch, -1.0)


def _pair_slices(a):
    """Slices selecting each voxel (lo) and its successor along axis ``a`` (hi)."""
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[a] = slice(None, -1)
    hi[a] = slice(1, None)
    return tuple(lo), tuple(hi)


def _dot(a, b):
    # einsum: single-threaded SIMD, steadier than a BLAS dot on a busy machine
    return float(np.einsum("i,i->", a.reshape(-1), b.reshape(-1)))


def _cg_solve(w, b, tol, n_iter):
    """float32 conjugate gradients for A x = b (A: :func:`_apply_operator`); ``b`` is
    overwritten (it becomes the residual); four more volumes.  Returns (x, sweeps)."""
    shape = b.shape
    x = np.zeros(shape, np.float32)
    r = b
    bb = _dot(r, r)
    if bb == 0:
        return x, 0
    p = r.copy()
    Ap = np.empty_like(r)
    tmp = _scratch(shape)
    rr = bb
    stop = (tol ** 2) * bb
    it = 0
    for it in range(1, n_iter + 1):
        _apply_operator(p, w, Ap, tmp)
        pAp = _dot(p, Ap)
        if pAp <= 0:
            break
        alpha = np.float32(rr / pAp)
        # in place, no scratch: r -= alpha Ap; x += alpha p (p is kept scaled by alpha)
        Ap *= alpha
        r -= Ap
        p *= alpha
        x += p
        rr_new = _dot(r, r)
        if rr_new <= stop:
            break
        p *= np.float32(rr_new / rr / alpha)  # beta p_old, from the scaled p
        p += r
        rr = rr_new
    return x, it


def heat_flows(labels, n_iter=None, *, tol=1e-5, refine=1, return_heat=False):
    """Heat-diffusion flow targets (Cellpose's formulation, in true 3D).

    Parameters
    ----------
    labels : ndarray (Z, Y, X) of non-negative int
    n_iter : int, optional
        Maximum number of conjugate-gradient sweeps over the volume.  Default: 4 x the largest
        cell extent (sum of its bounding-box sides), at least 50; the solver usually stops
        earlier on ``tol``.
    tol : float
        Stop each solve when the residual norm falls below ``tol`` times its right-hand side's.
    refine : int
        Refinement rounds after the first solve (float64 residual, float32 correction); each
        gains about as many digits as ``tol`` has.  1 (default) resolves the flow directions in
        the far corners of elongated cells; 0 is enough where only rough flows are needed.
    return_heat : bool
        Also return the heat map (float32 (Z, Y, X)).

    Returns
    -------
    flows : ndarray (3, Z, Y, X) float32
        Unit vectors pointing away from each cell's source (down the heat gradient); 0 in the
        background and where the gradient vanishes (single-voxel cells).
    """
    labels = check_labels(labels)
    shape = labels.shape
    index, n = _cell_index(labels)
    if n == 0:
        flows = np.zeros((3,) + shape, np.float32)
        return (flows, np.zeros(shape, np.float32)) if return_heat else flows
    src = _sources(index, n)
    if n_iter is None:
        st_ext = 0
        from scipy import ndimage as ndi

        for sl in ndi.find_objects(index):
            if sl is not None:
                st_ext = max(st_ext, sum(s.stop - s.start for s in sl))
        n_iter = max(50, 4 * st_ext)
    n_iter = int(n_iter)
    if n_iter < 1:
        raise ParameterError(f"expected an integer >= 1, got {n_iter}", key="n_iter")
    w = _edge_weights(index)
    # A T = b with b = 1 at every source: A is symmetric positive definite and block-diagonal by
    # cell, so one conjugate-gradient solve covers all cells.  Far from its source (corners,
    # the arms of elongated cells) T is many orders of magnitude below its peak, under the
    # absolute error of a float32 solve: each refinement round computes the residual in float64
    # and solves for the correction in float32 again.
    b = np.zeros(shape, np.float32)
    b.reshape(-1)[src] = 1.0
    T, its = _cg_solve(w, b, tol, n_iter)
    del b
    total = its
    if refine > 0:
        T64 = T.astype(np.float64)
        del T
        for _ in range(int(refine)):
            res = np.zeros(shape, np.float64)
            res.reshape(-1)[src] = 1.0
            res -= _apply_operator(T64, w, np.empty(shape, np.float64), _scratch(shape, np.float64))
            d, its = _cg_solve(w, res.astype(np.float32), tol, n_iter)
            total += its
            del res
            T64 += d
            del d
        T = T64.astype(np.float32)
        del T64
    log.debug("heat_flows: %d CG sweeps in %d solves", total, 1 + max(0, int(refine)))
    flows = np.zeros((3,) + shape, np.float32)
    # central differences inside the cell (out-of-cell neighbours count 0), negated so that
    # they point down the gradient, away from the source: F_a(p) = T(p - e_a) - T(p + e_a)
    tmp = _scratch(shape)
    for a in range(3):
        lo, hi = _pair_slices(a)
        g = flows[a]
        Z = shape[0]
        k = tmp.shape[0]
        for z0 in range(0, Z, k):
            z1 = min(Z, z0 + k)
            if a == 0:
                z1 = min(z1, Z - 1)
                if z1 <= z0:
                    break
                ws = w[0][z0:z1]
                t = tmp[: z1 - z0]
                np.multiply(ws, T[z0 + 1:z1 + 1], out=t)
                np.subtract(g[z0:z1], t, out=g[z0:z1])
                np.multiply(ws, T[z0:z1], out=t)
                np.add(g[z0 + 1:z1 + 1], t, out=g[z0 + 1:z1 + 1])
            else:
                ws = w[a][z0:z1]
                Ts, gs = T[z0:z1], g[z0:z1]
                t = tmp[: z1 - z0, : ws.shape[1], : ws.shape[2]]
                np.multiply(ws, Ts[hi], out=t)
                np.subtract(gs[lo], t, out=gs[lo])
                np.multiply(ws, Ts[lo], out=t)
                np.add(gs[hi], t, out=gs[hi])
    del w, tmp
    if not return_heat:
        del T
    # unit length, slab by slab (no full-size temporaries); zero gradients stay zero
    k = _scratch(shape).shape[0]
    for z0 in range(0, shape[0], k):
        f = flows[:, z0:z0 + k]
        norm = np.sqrt(np.einsum("c...,c...->...", f, f))
        np.divide(f, norm, out=f, where=norm > 0)
        f[:, index[z0:z0 + k] == 0] = 0
    return (flows, T) if return_heat else flows


# ---------------------------------------------------------------------------------------------
# foreground and the 4-channel prediction
# ---------------------------------------------------------------------------------------------

def foreground_target(labels, mode: str = "union") -> np.ndarray:
    """Foreground target of a label image.

    Parameters
    ----------
    labels : ndarray (Z, Y, X) of non-negative int
    mode : {"union", "hull"}
        ``"union"``: the cells (labels > 0).  ``"hull"``: every voxel whose centre lies in the
        convex hull of all cell voxel centres (the reference code's target, computed exactly
        instead of at 4x subsampling); falls back to the union when the cells are flat.

    Returns
    -------
    ndarray (Z, Y, X) bool
    """
    labels = check_labels(labels)
    if mode not in FOREGROUND_MODES:
        raise ParameterError(f"expected one of {'|'.join(FOREGROUND_MODES)}, got {mode!r}", key="mode")
    fg = labels > 0
    if mode == "union" or not fg.any():
        return fg
    return _convex_hull_mask(fg)


def _convex_hull_mask(fg: np.ndarray) -> np.ndarray:
    from scipy.spatial import ConvexHull, QhullError

    Z, Y, X = fg.shape
    any_x = fg.any(axis=2)
    zz, yy = np.nonzero(any_x)
    xmin = np.argmax(fg, axis=2)[zz, yy]
    xmax = X - 1 - np.argmax(fg[:, :, ::-1], axis=2)[zz, yy]
    pts = np.concatenate([np.stack([zz, yy, xmin], 1), np.stack([zz, yy, xmax], 1)]).astype(np.float64)
    pts = np.unique(pts, axis=0)
    try:
        hull = ConvexHull(pts)
    except (QhullError, ValueError):
        log.warning("foreground_target: cells are flat, the convex hull is their union")
        return fg
    eq = hull.equations  # n . p + d <= 0 inside
    eps = 1e-7 * max(fg.shape)
    z = np.arange(Z, dtype=np.float64)[:, None]
    y = np.arange(Y, dtype=np.float64)[None, :]
    lo = np.full((Z, Y), -np.inf)
    hi = np.full((Z, Y), np.inf)
    ok = np.ones((Z, Y), bool)
    for nz, ny, nx, d in eq:
        rhs = -(d + nz * z + ny * y) + eps
        if nx > 1e-12:
            hi = np.minimum(hi, rhs / nx)
        elif nx < -1e-12:
            lo = np.maximum(lo, rhs / nx)
        else:
            ok &= rhs >= 0
    lo = np.ceil(lo - 1e-9)
    hi = np.floor(hi + 1e-9)
    xs = np.arange(X)[None, None, :]
    return ok[..., None] & (xs >= lo[..., None]) & (xs <= hi[..., None])


def labels_to_prediction(labels, flow_type: str = "tanh", *, foreground: str = "union",
                         scale="adaptive", spacing=None, n_iter=None) -> np.ndarray:
    """The 4-channel network target of a label image: foreground, flow z, flow y, flow x.

    Parameters
    ----------
    labels : ndarray (Z, Y, X) of non-negative int
    flow_type : {"tanh", "heat"}
    foreground : {"union", "hull"}
        See :func:`foreground_target`.
    scale, spacing :
        Passed to :func:`tanh_flows`.
    n_iter :
        Passed to :func:`heat_flows`.

    Returns
    -------
    ndarray (4, Z, Y, X) float32
    """
    labels = check_labels(labels)
    if flow_type not in FLOW_TYPES:
        raise ParameterError(f"expected one of {'|'.join(FLOW_TYPES)}, got {flow_type!r}", key="flow_type")
    out = np.empty((4,) + labels.shape, np.float32)
    out[0] = foreground_target(labels, foreground)
    if flow_type == "tanh":
        tanh_flows(labels, scale, spacing, out=out[1:])
    else:
        out[1:] = heat_flows(labels, n_iter)
    return out


def flows_for(labels, flow_type: str = "tanh", *, scale="adaptive", spacing=None, n_iter=None,
              tol=1e-5, refine=1):
    """Flows of ``labels`` of the given type (used to recompute flows of reconstructed cells)."""
    if flow_type == "tanh":
        return tanh_flows(labels, scale, spacing)
    if flow_type == "heat":
        return heat_flows(labels, n_iter, tol=tol, refine=refine)
    raise ParameterError(f"expected one of {'|'.join(FLOW_TYPES)}, got {flow_type!r}", key="flow_type")

"""Cell instances from predicted flows and foreground (the paper's section 2).

The chain, each stage a separate function so that pipelines (and the blockwise runner) can
rearrange or replace it:

1. :func:`smooth_flows` (Gaussian per channel) and :func:`foreground_mask` (threshold);
2. :func:`track`: every foreground voxel moves along the flow field, ``p -> p - step * F(p)``,
   for at most ``n_iter`` iterations, clamped to the volume, stopping when nothing moves;
3. :func:`cluster_sinks`: the occupancy map of the end points is closed with a ball of radius
   ``closing_radius`` (default 1, see :data:`CLOSING_RADIUS_NOTE`); its connected components are
   the cells; every voxel takes the label of its end point;
4. instance filters, each separate: :func:`filter_by_size`, :func:`filter_by_foreground_overlap`,
   :func:`filter_by_flow_error`, :func:`filter_by_axis_ratio`; then :func:`relabel_consecutive`.

:func:`reconstruct` runs the whole chain with the paper's parameters as defaults.

Tracking
--------
``interpolation="nearest"`` (default) samples the flow at the voxel a point occupies and snaps
the point to the nearest voxel after each step, so one step is a fixed map from voxels to voxels.
``n_iter`` steps of that map are then computed exactly by pointer doubling: about
``2 log2 n_iter`` gathers over the foreground instead of ``n_iter`` sweeps, stopping as soon as
every voxel sits at a fixed point (nothing moves any more).  Details of the voxel-grid version:

- a move that would leave the foreground mask is refused (the point stays), so end points
  always lie on foreground voxels;
- a move shorter than half a voxel is stretched to one voxel along its largest component
  (otherwise points stop dead wherever the flow is weak, e.g. on smoothed cell boundaries);
- the first step uses the unsmoothed flows (``unsmoothed_first_step``): smoothing steadies the
  way to the sinks, but blurs the flows across cell boundaries;
- after the ``n_iter`` steps, 16 unit steps settle the points at the bottom of their sinks
  (with a 4-voxel step they keep circling around it).

``interpolation="linear"`` keeps float positions and samples the flow trilinearly; points
whose step falls below 1e-3 voxels stop; it is slower (one sweep per iteration).

Sinks
-----
The end voxels are marked as balls of radius 1 and the map is closed with a ball of radius
``closing_radius``: nearest-voxel tracking ends on a few isolated voxels per cell (fixed points,
short cycles), which a closing alone never joins.

Arrays are ZYX; flows are ``(3, Z, Y, X)`` float32 with channels along z, y, x, pointing away
from the cell centres (``design.md``).  Labels are uint16 (uint32 with a warning past 65535).
All lengths are in voxels unless a name says otherwise.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError, ParameterError
from .flows import FLOW_TYPES, flows_for, tanh_channel, tanh_flow_tables
from .labels import check_labels, label_dtype, label_sums, relabel_consecutive
from .parallel import run_jobs, z_slabs

log = logging.getLogger("c3dseg")

__all__ = [
    "smooth_flows", "foreground_mask", "track", "track_voxels", "cluster_sinks", "sink_labels",
    "closed_end_map", "sink_map_reach",
    "filter_by_size", "filter_by_foreground_overlap", "filter_by_flow_error",
    "filter_by_axis_ratio", "relabel_consecutive", "reconstruct", "sphere_volume",
    "INTERPOLATIONS",
]

INTERPOLATIONS = ("nearest", "linear")

#: Why the default closing radius is 1 and not the paper's 3.
CLOSING_RADIUS_NOTE = """\
The paper closes the cloud of float end positions with a ball of radius 3.  Here the end points
are voxels marked as unit balls, and a closing of radius r then joins sinks up to about
2 sqrt(2 r + 1) voxels apart: 3.5 for r = 1, 5 for r = 3.  In the round-trip tests r = 1 keeps
every cell (also with noisy flows, and among 2000 cells in 160^3), while r = 3 merges
neighbouring small cells whose centres lie under 5 voxels apart (AP@0.5 0.99 instead of 1.0)."""

# Conjugate-gradient tolerance of the heat flows recomputed by the flow-error filter (mean
# absolute flow error about 0.03 against converged flows; the filter's threshold is 0.8).
_FLOW_ERROR_HEAT_TOL = 3e-3

# End voxels are marked as balls of this radius before the closing.  Nearest-voxel tracking
# ends on a few isolated voxels per cell (fixed points and short cycles), and a closing never
# joins isolated points however large its ball; marked as small balls, attractors up to about
# 2 sqrt(2 r + 1) voxels apart fuse (5 for r = 3).
_MARK_RADIUS = 1
# After the n_iter steps, this many unit steps (the largest axis step scaled to one voxel)
# settle every point near the bottom of its sink (pointer doubling: 4 gathers).
_SETTLE_STEPS = 16

# Flows below this magnitude (per unit step) count as zero in nearest-voxel tracking.
_MIN_FLOW = 1e-4


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _check_flows(flows, name="flows") -> np.ndarray:
    f = np.asarray(flows)
    if f.ndim != 4 or f.shape[0] != 3:
        raise InputError(f"{name}: expected shape (3, Z, Y, X), got {f.shape}")
    if not np.issubdtype(f.dtype, np.floating) and not np.issubdtype(f.dtype, np.integer):
        raise InputError(f"{name}: expected numbers, got dtype {f.dtype}")
    if f.dtype != np.float32:
        f = f.astype(np.float32)
    if not np.all(np.isfinite(f)):
        bad = int(np.count_nonzero(~np.isfinite(f)))
        raise InputError(f"{name}: {bad} non-finite values (NaN or inf)")
    return f


def _check_mask(mask, shape, name="mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise InputError(f"{name}: shape {m.shape} differs from the flows' {tuple(shape)}")
    if m.dtype == bool:
        return m
    if m.dtype == np.uint8 and m.size and m.max() <= 1:
        return m.view(bool)  # a 0/1 mask (as FlowSmoothingFilter writes it): no copy
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise InputError(f"{name}: expected a binary mask, got dtype {m.dtype}")
    nz = m != 0
    vals = m[nz]
    if vals.size and np.any(vals != vals[0]):
        other = np.unique(vals)[:4]
        raise InputError(f"{name}: not binary (non-zero values {', '.join(str(v) for v in other)} ...); "
                         "threshold it first")
    return nz


def _check_positive(value, key, *, integer=False, allow_zero=False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"expected a number, got {value!r}", key=key) from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero) or (integer and v != int(v)):
        kind = "an integer" if integer else "a number"
        raise ParameterError(f"expected {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}", key=key)
    return int(v) if integer else v


# ---------------------------------------------------------------------------------------------
# 1. smoothing and threshold
# ---------------------------------------------------------------------------------------------

def smooth_flows(flows, sigma: float = 1.0, *, out=None, threads: int = 1) -> np.ndarray:
    """Gaussian smoothing of each flow channel (not across channels).

    Parameters
    ----------
    flows : ndarray (3, Z, Y, X)
    sigma : float
        Standard deviation in voxels (scalar or one per axis z, y, x); 0 copies.
    out : ndarray (3, Z, Y, X) float32, optional
        Destination; may be ``flows`` itself (in place).
    threads : int
        Channels smoothed at the same time (SciPy's filters release the GIL); the result does not
        depend on it.

    Returns
    -------
    ndarray (3, Z, Y, X) float32
    """
    flows = _check_flows(flows)
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (3,))
    if np.any(~np.isfinite(sig)) or np.any(sig < 0):
        raise ParameterError(f"expected sigma >= 0, got {sigma!r}", key="sigma")
    if out is None:
        out = np.empty_like(flows)
    if np.all(sig == 0):
        if out is not flows:
            out[...] = flows
        return out
    # one channel per job (a job reads and writes only its channel, so out may be flows); z-slab
    # jobs balance two threads better but their scratch slabs cost more than they save (measured)
    run_jobs(lambda c: ndi.gaussian_filter(flows[c], sig, output=out[c], mode="nearest"), range(3), threads)
    return out


def foreground_mask(foreground, threshold: float = 0.5) -> np.ndarray:
    """``foreground > threshold`` as a bool mask (Z, Y, X)."""
    fg = np.asarray(foreground)
    if fg.ndim != 3:
        raise InputError(f"foreground: expected a 3D image, got shape {fg.shape}")
    if np.issubdtype(fg.dtype, np.floating) and not np.all(np.isfinite(fg)):
        raise InputError("foreground: non-finite values (NaN or inf)")
    return fg > threshold


# ---------------------------------------------------------------------------------------------
# 2. tracking
# ---------------------------------------------------------------------------------------------

def _lin_dtype(size):
    return np.int32 if size < 2 ** 31 - 1 else np.int64


def _axis_coord(lin, shape, a):
    """Coordinate along axis ``a`` of linear indices ``lin`` (C order)."""
    stride = int(np.prod(shape[a + 1:], dtype=np.int64))
    c = lin // stride
    if a:
        np.remainder(c, shape[a], out=c)
    return c


def track_voxels(flows, mask, *, step: float = 4.0, n_iter: int = 100,
                 interpolation: str = "nearest", sigma: float = 0.0,
                 unsmoothed_first_step: bool = True, first_step_flows=None, spacing=None,
                 threads: int = 1):
    """Track the voxels of ``mask`` along ``flows``; the compact form of :func:`track`.

    Parameters
    ----------
    flows : ndarray (3, Z, Y, X) float
        Flows along z, y, x, pointing away from the centres.
    mask : ndarray (Z, Y, X) bool
        The voxels to move (the foreground); points never move outside it (see module docstring).
    step : float
        Step scale ``s``: a point moves by ``-s * F(p)`` voxels per iteration (paper: 4).
    n_iter : int
        Maximum number of iterations (paper: 100).
    interpolation : {"nearest", "linear"}
    sigma : float
        Gaussian smoothing of each flow channel before tracking (voxels, 0 = none).  Done one
        channel at a time inside the tracker, which keeps memory low; equivalent to calling
        :func:`smooth_flows` first.
    unsmoothed_first_step : bool
        With ``sigma > 0``, take the first step on the unsmoothed flows (default).  Smoothing
        steadies the way to the sinks but blurs the flows across cell boundaries, where it
        sends voxels into the neighbouring cell; a voxel's own flow decides its side.
    first_step_flows : ndarray (3, Z, Y, X), optional
        Flows for the first step when ``flows`` were smoothed elsewhere (e.g. by a separate
        filter): pass the unsmoothed ones here.
    spacing : tuple of 3 floats, optional
        Voxel size (z, y, x).  When given, the step along axis ``a`` is
        ``step * min(spacing) / spacing[a]``: the step is measured in the finest voxel size, so
        points do not jump across cells that are only a few coarse slices thick.
    threads : int
        Threads for nearest-voxel tracking (at most 3 are used); the result does not depend on it.

    Returns
    -------
    start : ndarray (M,) int
        Linear (C-order) indices of the tracked voxels, increasing.
    end : ndarray (M,) or (3, M)
        With ``"nearest"``: linear indices of the end voxels.  With ``"linear"``: float32 end
        coordinates (z, y, x).
    """
    start, mask, res = _track_checked(flows, mask, step, n_iter, interpolation, sigma,
                                      unsmoothed_first_step, first_step_flows, spacing, threads)
    if interpolation == "nearest":
        idx, _ = res
        return start, (start.copy() if idx is None else start.take(idx, mode="clip"))
    return start, res


def _track_checked(flows, mask, step, n_iter, interpolation, sigma, unsmoothed_first_step,
                   first_step_flows, spacing, threads):
    """:func:`track_voxels` after its checks: ``(start, mask, result)``, the result being
    ``(index, coords)`` of :func:`_track_nearest_index` (``"nearest"``) or the linear tracker's
    end coordinates."""
    flows = _check_flows(flows)
    shape = flows.shape[1:]
    mask = _check_mask(mask, shape)
    step = _check_positive(step, "step")
    steps = _axis_steps(step, spacing)
    n_iter = _check_positive(n_iter, "n_iter", integer=True, allow_zero=True)
    if interpolation not in INTERPOLATIONS:
        raise ParameterError(f"expected one of {'|'.join(INTERPOLATIONS)}, got {interpolation!r}",
                             key="interpolation")
    sigma = _check_positive(sigma, "sigma", allow_zero=True)
    ldt = _lin_dtype(mask.size)
    start = np.flatnonzero(mask).astype(ldt)
    if first_step_flows is not None:
        first_step_flows = _check_flows(first_step_flows, "first-step flows")
        if first_step_flows.shape != flows.shape:
            raise InputError(f"first-step flows: shape {first_step_flows.shape[1:]} differs from "
                             f"the flows' {shape}")
    elif sigma > 0 and unsmoothed_first_step:
        first_step_flows = flows
    if interpolation == "nearest":
        return start, mask, _track_nearest_index(flows, mask, start, steps, n_iter, sigma,
                                                 first_step_flows, threads)
    return start, mask, _track_linear(flows, mask, start, steps, n_iter, sigma, first_step_flows)


def _axis_steps(step, spacing):
    if spacing is None:
        return (float(step),) * 3
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape != (3,) or np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise ParameterError(f"expected 3 positive voxel sizes (z, y, x), got {spacing!r}", key="spacing")
    return tuple(float(step) * sp.min() / sp)


def _channel(flows, c, sigma):
    if sigma > 0:
        return ndi.gaussian_filter(flows[c], sigma, mode="nearest", output=np.float32)
    return flows[c]


def _coords(lin, shape):
    """(3, M) z, y, x coordinates of linear indices ``lin``, in the smallest fitting integer type
    (computed once per tracking and shared by its step maps)."""
    cdt = np.int16 if max(shape) < 2 ** 15 else (np.int32 if max(shape) < 2 ** 31 else np.int64)
    out = np.empty((3, len(lin)), cdt)
    for a in range(3):
        out[a] = _axis_coord(lin, shape, a)
    return out


def _index_lut(start, shape):
    """Voxel -> foreground index (-1 outside the foreground), one entry per voxel."""
    ldt = start.dtype
    lut = np.full(int(np.prod(shape, dtype=np.int64)), -1, dtype=ldt)
    lut[start] = np.arange(len(start), dtype=ldt)
    return lut


def _step_map(flows, sigma, start, shape, step, *, coords=None, lut=None, mask=None):
    """Foreground index of the voxel each foreground voxel moves to in one step.

    ``coords`` (:func:`_coords` of ``start``) and ``lut`` (:func:`_index_lut`) may be passed in
    when several step maps of the same foreground are made; ``mask`` (the foreground, whose
    voxels are ``start``) makes the gathers faster."""
    M = len(start)
    ldt = start.dtype
    if coords is None:
        coords = _coords(start, shape)
    # the displacement -step * F of every foreground voxel
    disp = np.empty((3, M), np.float32)
    for a in range(3):
        ch = _channel(flows, a, sigma)
        # a boolean gather is about twice as fast as an index gather
        disp[a] = ch[mask] if mask is not None else ch.reshape(-1)[start]
        del ch
        disp[a] *= np.float32(-step[a])
    # a move shorter than half a voxel would round to no move and pin the point (e.g. on the
    # ridges between cells where smoothing cancels the flows): such moves are stretched so the
    # largest component is one voxel.  Only (near-)zero flows stay put.
    big = np.abs(disp[0])
    np.maximum(big, np.abs(disp[1]), out=big)
    np.maximum(big, np.abs(disp[2]), out=big)
    small = big < 0.5
    small &= big > _MIN_FLOW * max(step)
    if small.any():
        # a scale per point (1 for most): far cheaper than gathering and scattering the points
        scale = np.ones(M, np.float32)
        np.divide(np.float32(1), big, out=scale, where=small)
        disp *= scale
        del scale
    del big, small
    # the move in whole voxels (coordinates are integers: rounding the move rounds the
    # position), kept inside the volume; the target's linear index is the start's plus the moves
    np.rint(disp, out=disp)
    target = start.copy()
    # coordinate + move fits the coordinates' type for moves up to the volume's size
    off = np.empty(M, coords.dtype if max(shape) < 2 ** 14 else np.int64)
    for a in range(3):
        np.clip(disp[a], -shape[a], shape[a], out=disp[a])
        off[...] = disp[a]
        off += coords[a]
        np.clip(off, 0, shape[a] - 1, out=off)
        off -= coords[a]
        stride = int(np.prod(shape[a + 1:], dtype=np.int64))
        if stride == 1:
            target += off
        else:
            target += off.astype(ldt) * ldt.type(stride)
    del disp, off
    # voxel -> foreground index; refused moves (target outside the mask) stay put
    if lut is None:
        lut = _index_lut(start, shape)
    nxt = lut.take(target, mode="clip")
    del target
    own = np.flatnonzero(nxt < 0)
    nxt[own] = own.astype(ldt)
    return nxt


def _power(nxt, n):
    """``nxt`` applied ``n`` times (an index array), by pointer doubling: about 2 log2(n)
    gathers; stops early once every point sits at a fixed point.  None for n = 0.

    The indices are valid by construction, so the gathers use ``mode="clip"``: NumPy's default
    ``"raise"`` checks through a buffer and is about 3x slower on large arrays."""
    result = None
    power = nxt
    fixed = None
    while n > 0:
        if n & 1:
            result = power.copy() if result is None else power.take(result, mode="clip")
        n >>= 1
        if n == 0:
            break
        if fixed is None:
            fixed = nxt == np.arange(len(nxt), dtype=nxt.dtype)
        # nothing moves any more after this many steps when every point sits at a fixed point
        # of nxt (a sample first: mostly that already says no)
        if fixed.take(power[::64], mode="clip").all() and fixed.take(power, mode="clip").all():
            result = power if result is None else power.take(result, mode="clip")
            break
        power = power.take(power, mode="clip")
    return result


def _track_nearest_index(flows, mask, start, step, n_iter, sigma, first_flows, threads=1):
    """Nearest-voxel tracking: the foreground index of every point's end voxel (None: nobody
    moved) and the coordinates of ``start`` (None when not computed).

    The walk is up to three maps applied in turn, each a step map raised to a power: the first
    step on ``first_flows`` (once), the step on ``flows`` (``n_iter`` times, one fewer after a
    first step), the unit step (``_SETTLE_STEPS`` times).  They do not depend on each other, so
    with ``threads`` > 1 they are made side by side (NumPy releases the GIL); the result does
    not depend on ``threads``."""
    shape = mask.shape
    M = len(start)
    if M == 0 or n_iter == 0:
        return None, None
    coords = _coords(start, shape)
    lut = _index_lut(start, shape)
    kw = dict(coords=coords, lut=lut, mask=mask)
    jobs = []   # (flows, sigma, step, power), applied in this order
    if first_flows is not None:
        jobs.append((first_flows, 0.0, step, 1))
        n_iter -= 1
    jobs.append((flows, sigma, step, n_iter))
    if _SETTLE_STEPS and max(step) > 1:
        jobs.append((flows, sigma, tuple(s / max(step) for s in step), _SETTLE_STEPS))

    def walk(job):
        f, sg, st, n = job
        if n == 0:
            return None
        return _power(_step_map(f, sg, start, shape, st, **kw), n)

    maps = run_jobs(walk, jobs, threads)
    result = None
    for p in maps:
        if p is not None:
            result = p if result is None else p.take(result, mode="clip")
    return result, coords


def _sample_linear(chans, pos, shape):
    """Trilinear samples of each channel at float positions (3, K) (clamped)."""
    K = pos.shape[1]
    base = np.zeros(K, np.int64)
    frac = []
    strides = [shape[1] * shape[2], shape[2], 1]
    for a in range(3):
        p = np.clip(pos[a], 0, shape[a] - 1)
        i0 = np.minimum(np.floor(p).astype(np.int64), max(shape[a] - 2, 0))
        frac.append((p - i0).astype(np.float32))
        base += i0 * strides[a]
    out = [np.zeros(K, np.float32) for _ in chans]
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                if (dz and shape[0] == 1) or (dy and shape[1] == 1) or (dx and shape[2] == 1):
                    continue
                w = (frac[0] if dz else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1]) * \
                    (frac[2] if dx else 1 - frac[2])
                idx = base + (dz * strides[0] + dy * strides[1] + dx * strides[2])
                for o, ch in zip(out, chans):
                    o += w * ch[idx]
    return out


def _track_linear(flows, mask, start, step, n_iter, sigma, first_flows):
    shape = mask.shape
    # flows outside the mask are 0 so points stop at its edge
    outside = ~mask.reshape(-1)

    def channels(src, sig):
        ch = [_channel(src, c, sig).reshape(-1) for c in range(3)]
        return [np.where(outside, np.float32(0), c) for c in ch] if outside.any() else ch

    chans = channels(flows, sigma)
    raw = channels(first_flows, 0.0) if first_flows is not None else None
    pos = np.stack([_axis_coord(start, shape, a).astype(np.float32) for a in range(3)])
    active = np.arange(len(start))
    hi = np.asarray(shape, np.float32)[:, None] - 1
    for it in range(n_iter):
        if len(active) == 0:
            break
        p = pos[:, active]
        f = _sample_linear(raw if (it == 0 and raw is not None) else chans, p, shape)
        d = np.stack(f) * (-np.asarray(step, np.float32)[:, None])
        new = np.clip(p + d, 0, hi)
        moved = np.max(np.abs(new - p), axis=0) > 1e-3
        pos[:, active] = new
        active = active[moved]
    return pos


def track(flows, mask, *, step: float = 4.0, n_iter: int = 100, interpolation: str = "nearest",
          sigma: float = 0.0, unsmoothed_first_step: bool = True,
          first_step_flows=None, spacing=None, threads: int = 1) -> np.ndarray:
    """Move every voxel of ``mask`` along the flow field and return where each one ends.

    Parameters
    ----------
    flows : ndarray (3, Z, Y, X) float
        Flows along z, y, x pointing away from the cell centres.
    mask : ndarray (Z, Y, X) bool
        Foreground: the voxels that move.
    step, n_iter, interpolation, sigma, unsmoothed_first_step, first_step_flows, spacing, threads :
        See :func:`track_voxels` (paper: step 4, 100 iterations).

    Returns
    -------
    ends : ndarray (3, Z, Y, X) float32
        End position (z, y, x, in voxels) of every tracked voxel; NaN outside the mask.  This is
        what the tracking filter passes to the closing filter.
    """
    start, mask, res = _track_checked(flows, mask, step, n_iter, interpolation, sigma,
                                      unsmoothed_first_step, first_step_flows, spacing, threads)
    ends = np.full((3,) + mask.shape, np.nan, np.float32)
    if interpolation == "nearest":
        idx, coords = res
        if coords is None:
            coords = _coords(start, mask.shape)
        for a in range(3):
            # the end voxel's coordinates: those of the start voxel it is (boolean scatter: C order)
            ends[a][mask] = coords[a] if idx is None else coords[a].take(idx, mode="clip")
    else:
        for a in range(3):
            ends[a][mask] = res[a]
    return ends


# ---------------------------------------------------------------------------------------------
# 3. sinks
# ---------------------------------------------------------------------------------------------

def _ball_dilation(occ, radius: int, threads: int = 1) -> np.ndarray:
    """``occ`` dilated by the ball of ``radius`` (every voxel within that Euclidean distance of a
    set voxel; outside the array nothing is set): the squared distance to the nearest set voxel,
    capped at radius^2 + 1, as three 1D minimum passes over small integers (exact, and far
    cheaper than a 3D structuring element).  With ``threads`` > 1, z-slabs read with ``radius``
    planes around them are dilated side by side (the same result)."""
    R = int(radius)
    Z = occ.shape[0]
    if threads > 1 and R > 0 and Z > 4 * R:
        def slab(zz):
            z0, z1 = zz
            a, b = max(0, z0 - R), min(Z, z1 + R)
            return _ball_dilation(occ[a:b], R)[z0 - a:z1 - a]

        return np.concatenate(run_jobs(slab, z_slabs(Z, threads), threads))
    cap = R * R + 1
    dt = np.uint8 if 2 * cap < 256 else np.int32
    g = np.where(occ, dt(0), dt(cap))
    if R == 0:
        return g == 0
    tmp = np.empty_like(g)
    for ax in (2, 1, 0):
        n = g.shape[ax]
        out = g.copy()
        for d in range(1, min(R, n - 1) + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax] = slice(0, n - d)
            hi[ax] = slice(d, n)
            lo, hi = tuple(lo), tuple(hi)
            t = tmp[lo]
            np.add(g[hi], dt(d * d), out=t)            # a set voxel d ahead
            np.minimum(out[lo], t, out=out[lo])
            np.add(g[lo], dt(d * d), out=t)            # a set voxel d behind
            np.minimum(out[hi], t, out=out[hi])
        np.minimum(out, dt(cap), out=out)
        g = out
    return g <= R * R


def sink_map_reach(closing_radius: int) -> int:
    """How far (voxels, along every axis) one end voxel can change the closed map of
    :func:`closed_end_map`: ``2 * closing_radius`` plus the marking radius (0 without closing).

    The map over a box is exact when every end voxel within this distance of the box is given
    (the blockwise sinks rely on it)."""
    r = int(closing_radius)
    return 2 * r + _MARK_RADIUS if r > 0 else 0


def closed_end_map(points, shape, closing_radius: int = 1, *, lo=None, hi=None,
                   threads: int = 1) -> np.ndarray:
    """The closed occupancy map of end voxels, whose connected components are the sinks.

    Every end voxel marks a ball of radius 1 (see the module docstring); the map is closed with a
    ball of radius ``closing_radius``, the outside of the volume counting as occupied for the
    erosion (points near the faces are not eroded away); the end voxels themselves always stay
    set (the closing is extensive).  ``closing_radius`` 0: just the end voxels.

    Parameters
    ----------
    points : ndarray (3, K) of int
        End voxels (z, y, x) in volume coordinates, inside ``shape``; duplicates allowed.
    shape : tuple of 3 ints
        The volume's shape.
    closing_radius : int
    lo, hi : 3 ints, optional
        The box ``lo:hi`` of the volume to compute (default: the whole volume).  The result
        equals that box of the whole volume's map when ``points`` holds every end voxel within
        :func:`sink_map_reach` of the box (others are ignored); the work is done on the box grown
        by ``closing_radius``.
    threads : int
        Threads for the dilations (the same result).

    Returns
    -------
    ndarray of bool, shape ``hi - lo``
    """
    shape = tuple(int(s) for s in shape)
    lo = np.zeros(3, np.int64) if lo is None else np.asarray(lo, np.int64)
    hi = np.asarray(shape if hi is None else hi, np.int64)
    r = int(closing_radius)
    pts = np.asarray(points, np.int64).reshape(3, -1)
    # the erosion at a voxel of the box reads the dilated map up to r voxels away
    glo = np.maximum(lo - r, 0)
    ghi = np.minimum(hi + r, np.asarray(shape))
    gshape = tuple(int(x) for x in ghi - glo)
    loc = pts - glo[:, None]
    if r > 0:
        # the end voxels marked as balls of radius r + 1 (a dilation), from the points within
        # that distance of the grown box; then the erosion with the outside counting as occupied
        R = r + _MARK_RADIUS
        plo = np.maximum(glo - R, 0)
        phi = np.minimum(ghi + R, np.asarray(shape))
        near = np.all((pts >= plo[:, None]) & (pts < phi[:, None]), axis=0)
        marks = np.zeros(tuple(int(x) for x in phi - plo), bool)
        marks[tuple(pts[:, near] - plo[:, None])] = True
        dil = _ball_dilation(marks, R, threads)
        del marks
        dil = dil[tuple(slice(int(a), int(a + n)) for a, n in zip(glo - plo, gshape))]
        np.logical_not(dil, out=dil)
        occ = _ball_dilation(dil, r, threads)
        del dil
        np.logical_not(occ, out=occ)
    else:
        occ = np.zeros(gshape, bool)
    inside = np.all((pts >= lo[:, None]) & (pts < hi[:, None]), axis=0)
    occ[tuple(loc[:, inside])] = True
    crop = tuple(slice(int(a), int(a + n)) for a, n in zip(lo - glo, hi - lo))
    return occ[crop]


def _box_linear(lin, shape, lo, hi):
    """Linear indices into ``shape`` (all inside the box ``lo:hi``) as linear indices into the box."""
    Z, Y, X = (int(n) for n in shape)
    if lo[1] == 0 and lo[2] == 0 and hi[1] == Y and hi[2] == X:
        return lin - int(lo[0]) * Y * X if lo[0] else lin
    z, y, x = np.unravel_index(lin, shape)
    by, bx = int(hi[1] - lo[1]), int(hi[2] - lo[2])
    return ((z - int(lo[0])) * by + (y - int(lo[1]))) * bx + (x - int(lo[2]))


def sink_labels(end_points, shape, *, closing_radius: int = 1, fully_connected: bool = True,
                threads: int = 1):
    """Cluster end points into sinks.

    Every point marks a ball of radius 1 (see the module docstring); the map is closed with a
    ball of radius ``closing_radius`` (points near the volume faces are not eroded away: the
    outside counts as occupied for the erosion); its connected components are the sinks.
    Points up to about ``2 sqrt(2 r + 1)`` voxels apart join (5 for r = 3; 3.5 for r = 1).

    Parameters
    ----------
    end_points : ndarray (3, K) of int, or (K,) linear indices
        End voxels (z, y, x) inside ``shape``; duplicates allowed.  The points may come from many
        blocks of a larger volume (global coordinates).
    shape : tuple of 3 ints
    closing_radius : int
        Ball radius in voxels; 0 = no closing and no marking (the components of the end voxels
        themselves).  Default 1, not the paper's 3: see :data:`CLOSING_RADIUS_NOTE`.
    fully_connected : bool
        26-connected components (else 6-connected).
    threads : int
        Threads for the closing (the same result).

    Returns
    -------
    point_labels : ndarray (K,) int32 (int64 past 2^31 sinks)
        Sink label 1..N of every point (numbered in C order of the components).
    n : int
    """
    shape = tuple(int(s) for s in shape)
    r = _check_positive(closing_radius, "closing_radius", integer=True, allow_zero=True)
    pts = np.asarray(end_points)
    if pts.ndim == 1:
        lin = pts if np.issubdtype(pts.dtype, np.integer) else pts.astype(np.int64)
        if lin.size and (lin.min() < 0 or lin.max() >= int(np.prod(shape, dtype=np.int64))):
            raise InputError(f"end points: linear indices outside the volume {shape}")
    else:
        if pts.shape[0] != 3:
            raise InputError(f"end points: expected shape (3, K), got {pts.shape}")
        pts = np.rint(pts).astype(np.int64)
        for a in range(3):
            if pts.shape[1] and (pts[a].min() < 0 or pts[a].max() >= shape[a]):
                raise InputError(f"end points: coordinates outside the volume {shape}")
        lin = np.ravel_multi_index(tuple(pts), shape)
    if lin.size == 0:
        return np.zeros(0, np.int64), 0
    occ = np.zeros(shape, bool)
    occ.reshape(-1)[lin] = True
    if r > 0:
        # the distinct end voxels (from the map: no sort of the K points), marked and closed over
        # their bounding box grown by the map's reach (outside it the map is empty); components
        # keep their C order, so the labels equal those of the whole volume's map
        uc = np.stack(np.unravel_index(np.flatnonzero(occ), shape)).astype(np.int64)
        del occ
        reach = sink_map_reach(r)
        lo = np.maximum(uc.min(axis=1) - reach, 0)
        hi = np.minimum(uc.max(axis=1) + reach + 1, np.asarray(shape))
        occ = closed_end_map(uc, shape, r, lo=lo, hi=hi, threads=threads)
        del uc
        lin = _box_linear(lin, shape, lo, hi)
    structure = np.ones((3, 3, 3), bool) if fully_connected else ndi.generate_binary_structure(3, 1)
    comp, _ = ndi.label(occ, structure)
    del occ
    lab = comp.reshape(-1)[lin]
    del comp
    # consecutive over the components that received points
    used = label_sums(lab)
    used[0] = 0
    present = np.flatnonzero(used)
    lut = np.zeros(len(used), np.int32 if len(present) < 2 ** 31 - 1 else np.int64)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[lab], len(present)


def cluster_sinks(ends, mask=None, *, closing_radius: int = 1, fully_connected: bool = True,
                  start=None, shape=None, threads: int = 1) -> np.ndarray:
    """Labels from end points: close the occupancy map, label it, give each voxel its sink.

    Parameters
    ----------
    ends : ndarray (3, Z, Y, X) float
        End positions from :func:`track` (NaN = not tracked).  Alternatively, with ``start`` and
        ``shape``, the compact ``end`` of :func:`track_voxels`.
    mask : ndarray (Z, Y, X) bool, optional
        Voxels to label (default: where ``ends`` is finite).
    closing_radius : int
        Ball radius in voxels (default 1; paper: 3, see :data:`CLOSING_RADIUS_NOTE`).
    fully_connected : bool
        26- (True) or 6-connected components.
    start, shape :
        The compact form: ``start`` linear indices and ``ends`` (M,) linear indices or (3, M)
        coordinates.
    threads : int
        Threads for the closing (the same result).

    Returns
    -------
    labels : ndarray (Z, Y, X) uint16 (uint32 with a warning past 65535 cells)
    """
    if start is None:
        e = np.asarray(ends)
        if e.ndim != 4 or e.shape[0] != 3:
            raise InputError(f"end points: expected shape (3, Z, Y, X), got {e.shape}")
        shape = e.shape[1:]
        valid = np.isfinite(e[0])
        valid &= np.isfinite(e[1])
        valid &= np.isfinite(e[2])
        if mask is not None:
            valid &= _check_mask(mask, shape)
        start = np.flatnonzero(valid)
        pts = np.stack([e[a][valid] for a in range(3)])
        for a in range(3):
            np.clip(pts[a], 0, shape[a] - 1, out=pts[a])
    else:
        pts = ends
        if shape is None:
            raise InputError("cluster_sinks: shape is required with start")
    shape = tuple(shape)
    if len(start) == 0:
        _warn_empty()
        return np.zeros(shape, np.uint16)
    point_labels, n = sink_labels(pts, shape, closing_radius=closing_radius,
                                  fully_connected=fully_connected, threads=threads)
    out = np.zeros(shape, label_dtype(n))
    out.reshape(-1)[start] = point_labels
    return out


def _warn_empty():
    msg = "empty foreground: no cells"
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)


# ---------------------------------------------------------------------------------------------
# 4. instance filters (single-pass tables; each returns a new label image, removed cells = 0)
# ---------------------------------------------------------------------------------------------

def sphere_volume(radius: float) -> float:
    """Volume of a sphere: (4/3) pi r^3."""
    return 4.0 / 3.0 * math.pi * float(radius) ** 3


def _index_and_tables(labels):
    labels = check_labels(labels)
    top = int(labels.max()) if labels.size else 0
    return labels, top


def _apply_keep(labels, keep):
    """Set every label with keep[label] False to 0 (keep indexed by label value)."""
    keep = np.asarray(keep, bool).copy()
    keep[0] = True
    if keep.all():
        return labels.copy()
    lut = np.arange(len(keep), dtype=labels.dtype)
    lut[~keep] = 0
    return lut[labels]


def filter_by_size(labels, *, min_volume_voxels: float = 0.0, max_volume_voxels: float = math.inf,
                   return_removed: bool = False):
    """Remove cells whose voxel count is outside ``[min_volume_voxels, max_volume_voxels]``.

    Radii (the paper's (r_min, r_max) = (5, 100) voxels) convert with :func:`sphere_volume`;
    micrometre radii with ``sphere_volume(r_um) / prod(spacing)``.

    Returns
    -------
    labels : ndarray, same dtype  [, removed : ndarray of removed ids]
    """
    labels, top = _index_and_tables(labels)
    size = label_sums(labels, top)
    keep = (size >= min_volume_voxels) & (size <= max_volume_voxels)
    keep |= size == 0
    out = _apply_keep(labels, keep)
    return (out, np.flatnonzero(~keep[1:]) + 1) if return_removed else out


def filter_by_foreground_overlap(labels, foreground, *, min_overlap: float = 0.2):
    """Remove cells of which less than ``min_overlap`` (fraction of voxels) lies in the
    foreground mask (paper: p_overlap = 0.2)."""
    labels, top = _index_and_tables(labels)
    fg = _check_mask(foreground, labels.shape, "foreground")
    size = label_sums(labels, top)
    inside = label_sums(labels, top, fg)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(size > 0, inside / np.maximum(size, 1), 1.0)
    return _apply_keep(labels, frac >= min_overlap)


def _label_sums(labels, n, weights=None):
    """Per-label sums (see :func:`c3dseg.labels.label_sums`); a callable ``weights`` gets the
    z-slab ``(z0, z1)`` of a 3D label image."""
    if not callable(weights):
        return label_sums(labels, n, weights).astype(np.float64)
    plane = int(np.prod(labels.shape[1:]))
    dz = max(1, (1 << 20) // max(1, plane))
    acc = np.zeros(n + 1)
    for z0 in range(0, labels.shape[0], dz):
        z1 = min(labels.shape[0], z0 + dz)
        acc += label_sums(labels[z0:z1], n, np.asarray(weights(z0, z1), np.float64), chunk=1 << 30)
    return acc


def flow_error_per_cell(labels, flows, *, flow_type: str = "tanh", flow_scale="adaptive",
                        spacing=None, threads: int = 1):
    """Mean absolute error per cell between ``flows`` and the flows recomputed from ``labels``.

    Per voxel, ``e = (|F_z - R_z| + |F_y - R_y| + |F_x - R_x|) / 3``; averaged over each cell's
    voxels.  tanh flows are recomputed one channel at a time, in z-slabs on ``threads`` threads
    (each holds one channel of its slab).

    Returns
    -------
    error : ndarray (top+1,) float64, indexed by label value (0 for absent labels)
    size : ndarray (top+1,) int64
    """
    labels, top = _index_and_tables(labels)
    flows = _check_flows(flows)
    if flows.shape[1:] != labels.shape:
        raise InputError(f"flows: shape {flows.shape[1:]} differs from the labels' {labels.shape}")
    if flow_type not in FLOW_TYPES:
        raise ParameterError(f"expected one of {'|'.join(FLOW_TYPES)}, got {flow_type!r}", key="flow_type")
    size = _label_sums(labels, top).astype(np.int64)
    if flow_type == "tanh":
        tables = tanh_flow_tables(labels, flow_scale, spacing)

        def slab_sums(j):
            # |F_a - R_a| over a z-slab, summed per cell (R_a = 0 without cells)
            a, (z0, z1) = j
            lab = labels[z0:z1]
            if tables is None:
                ref = np.zeros(lab.shape, np.float32)
            else:
                ref = tanh_channel(tables[0][z0:z1], tables[1], tables[2], a, (z0, 0, 0))
            np.subtract(flows[a, z0:z1], ref, out=ref)
            np.abs(ref, out=ref)
            return label_sums(lab, top, ref)

        jobs = [(a, zz) for a in range(3) for zz in z_slabs(labels.shape[0], threads)]
        total = np.sum(run_jobs(slab_sums, jobs, threads), axis=0) / 3.0
    else:
        # a loose tolerance: directions within a few degrees are plenty for a 0.8 threshold
        ref = flows_for(labels, flow_type, tol=_FLOW_ERROR_HEAT_TOL, refine=0)
        for a in range(3):
            np.subtract(flows[a], ref[a], out=ref[a])
            np.abs(ref[a], out=ref[a])
        ref[0] += ref[1]
        ref[0] += ref[2]
        total = _label_sums(labels, top, ref[0]) / 3.0
        del ref
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(size > 0, total / np.maximum(size, 1), 0.0)
    return mean, size


def filter_by_flow_error(labels, flows, *, max_error: float = 0.8, flow_type: str = "tanh",
                         flow_scale="adaptive", spacing=None, threads: int = 1):
    """Remove cells whose flows, recomputed from the cell with the same flow type, differ from
    the predicted ``flows`` by a mean absolute error above ``max_error`` (paper: 0.8)."""
    labels = check_labels(labels)
    err, _ = flow_error_per_cell(labels, flows, flow_type=flow_type, flow_scale=flow_scale,
                                 spacing=spacing, threads=threads)
    return _apply_keep(labels, err <= max_error)


def _moment_sums(labels, top, threads: int = 1):
    """Per-label voxel counts and coordinate sums up to second order, one z-slice at a time
    (z-slabs on ``threads`` threads): ``(10, top + 1)`` float64 rows n, z, y, x, zz, yy, xx, zy,
    zx, yx.  Every sum is an integer (below 2^53), so it is exact whatever the order of
    summation."""
    Z, Y, X = labels.shape
    g = np.indices((Y, X), dtype=np.float64).reshape(2, -1)
    w = (g[0], g[1], g[0] * g[0], g[1] * g[1], g[0] * g[1])          # y, x, yy, xx, yx

    def slab(zz):
        S = np.zeros((10, top + 1))
        for z in range(*zz):
            lab = labels[z].reshape(-1).astype(np.intp)
            c = np.bincount(lab, minlength=top + 1)
            by, bx, byy, bxx, byx = (np.bincount(lab, wk, minlength=top + 1) for wk in w)
            S[0] += c
            S[1] += z * c
            S[4] += z * z * c
            S[2] += by
            S[3] += bx
            S[5] += byy
            S[6] += bxx
            S[9] += byx
            S[7] += z * by
            S[8] += z * bx
        return S

    return np.sum(run_jobs(slab, z_slabs(Z, threads), threads), axis=0)


def axis_ratio_per_cell(labels, threads: int = 1):
    """Minor / major axis length of every cell from its second moments (voxels as unit cubes).

    Returns ``(ratio (top+1,), size (top+1,))`` indexed by label value; 1 for absent labels."""
    labels, top = _index_and_tables(labels)
    S = _moment_sums(labels, top, threads)
    size = S[0]
    n = np.maximum(size, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(size > 0, S[1:4] / n, 0.0)
    cov = np.zeros((top + 1, 3, 3))
    row = {(0, 0): 4, (1, 1): 5, (2, 2): 6, (0, 1): 7, (0, 2): 8, (1, 2): 9}
    for (a, b), k in row.items():
        m = S[k] / n
        cov[:, a, b] = cov[:, b, a] = m - mean[a] * mean[b]
    cov[:, [0, 1, 2], [0, 1, 2]] += 1.0 / 12.0
    ev = np.linalg.eigvalsh(cov)
    ratio = np.sqrt(np.clip(ev[:, 0], 0, None) / np.maximum(ev[:, 2], 1e-12))
    ratio[size == 0] = 1.0
    return ratio, size.astype(np.int64)


def filter_by_axis_ratio(labels, *, min_ratio: float = 0.1, threads: int = 1):
    """Remove cells whose minor / major axis ratio is below ``min_ratio`` (reference code: 0.1)."""
    labels = check_labels(labels)
    ratio, _ = axis_ratio_per_cell(labels, threads)
    return _apply_keep(labels, ratio >= min_ratio)


# ---------------------------------------------------------------------------------------------
# the whole chain
# ---------------------------------------------------------------------------------------------

def reconstruct(foreground, flows, *, flow_type: str = "tanh", fg_threshold: float = 0.5,
                smoothing_sigma: float = 1.0, step: float = 4.0, n_iter: int = 100,
                closing_radius: int = 1, interpolation: str = "nearest",
                fully_connected: bool = True, min_radius_voxels: float = 5.0,
                max_radius_voxels: float = 100.0, min_overlap: float = 0.2,
                max_flow_error: float | None = 0.8, min_axis_ratio: float | None = 0.1,
                flow_scale="adaptive", spacing=None, flow_scale_um: bool = False,
                unsmoothed_first_step: bool = True) -> np.ndarray:
    """Cell instances from a foreground map and flows: the paper's full chain.

    Parameters
    ----------
    foreground : ndarray (Z, Y, X) float
        Foreground probability (network channel 0).
    flows : ndarray (3, Z, Y, X) float
        Flows along z, y, x (channels 1-3), pointing away from the centres.
    flow_type : {"tanh", "heat"}
        Flow formulation, for the flow-error filter.
    fg_threshold : float
        Voxels with foreground > this are tracked (0.5).
    smoothing_sigma : float
        Gaussian sigma of the flow smoothing in voxels (1; 0 = none).
    step, n_iter : float, int
        Tracking step scale s_recon and iterations N_recon (paper: 4, 100).
    closing_radius : int
        r_closing in voxels (default 1; paper: 3, see :data:`CLOSING_RADIUS_NOTE`).
    interpolation : {"nearest", "linear"}
    fully_connected : bool
        26-connected sinks (else 6).
    min_radius_voxels, max_radius_voxels : float
        Size range as radii of the volume-equivalent sphere, in voxels (paper: 5, 100).  0 /
        inf disables a bound.
    min_overlap : float
        p_overlap: least fraction of a cell inside the thresholded foreground (paper: 0.2).
    max_flow_error : float or None
        err_gradient (paper: 0.8): mean absolute error between the (unsmoothed) flows and the
        flows recomputed from each cell with ``flow_type``; None skips the filter.
    min_axis_ratio : float or None
        Reference code's minor/major axis filter (0.1); None skips it.
    flow_scale : "adaptive", "axis" or float
        The tanh scale the flows were made with (to recompute them in the flow-error filter).
    spacing : tuple of 3 floats, optional
        Voxel size (z, y, x) in micrometres: the tracking step is then measured in the finest
        voxel size along every axis (see :func:`track_voxels`).  None: voxel units.
    flow_scale_um : bool
        A numeric ``flow_scale`` is in micrometres (needs ``spacing``).
    unsmoothed_first_step : bool
        Take the first tracking step on the unsmoothed flows (see :func:`track_voxels`).

    Returns
    -------
    labels : ndarray (Z, Y, X) uint16 (uint32 with a warning past 65535 cells), 1..N consecutive
    """
    flows = _check_flows(flows)
    shape = flows.shape[1:]
    fg = np.asarray(foreground)
    if fg.shape != shape:
        raise InputError(f"foreground: shape {fg.shape} differs from the flows' {shape}")
    mask = foreground_mask(fg, fg_threshold)
    if not mask.any():
        _warn_empty()
        return np.zeros(shape, np.uint16)
    start, end = track_voxels(flows, mask, step=step, n_iter=n_iter, interpolation=interpolation,
                              sigma=smoothing_sigma, unsmoothed_first_step=unsmoothed_first_step,
                              spacing=spacing)
    labels = cluster_sinks(end, start=start, shape=shape, closing_radius=closing_radius,
                           fully_connected=fully_connected)
    del start, end
    lo = sphere_volume(min_radius_voxels) if min_radius_voxels else 0.0
    hi = sphere_volume(max_radius_voxels) if max_radius_voxels and math.isfinite(max_radius_voxels) else math.inf
    labels = filter_by_size(labels, min_volume_voxels=lo, max_volume_voxels=hi)
    if min_overlap:
        labels = filter_by_foreground_overlap(labels, mask, min_overlap=min_overlap)
    if max_flow_error is not None:
        labels = filter_by_flow_error(labels, flows, max_error=max_flow_error, flow_type=flow_type,
                                      flow_scale=flow_scale,
                                      spacing=spacing if flow_scale_um else None)
    if min_axis_ratio:
        labels = filter_by_axis_ratio(labels, min_ratio=min_axis_ratio)
    return relabel_consecutive(labels)

"""Exact blockwise reconstruction: flow tracking, sinks and instance filters across blocks.

The whole-volume chain (:mod:`c3dseg.reconstruction`) is cut so that the labels are *identical*
to the whole-volume run, not approximately equal:

1. **Tracking** (one pass).  Nearest-voxel tracking is a fixed map ``voxel -> voxel`` applied
   ``n_iter`` times; a voxel's step depends only on the (smoothed) flow at the voxel and on the
   mask at its target.  Each block computes that map for the foreground voxels of its core grown
   by a halo (the *reach*, plus the smoothing radius), in **global coordinates** (the rounding of
   ``p - s F(p)`` depends on the absolute position), marks every voxel whose step is not known
   inside the grown block as an *escape*, and composes the map by pointer doubling.  A core voxel
   whose path meets an escape would have left the halo: the block is redone with twice the reach
   (so the result never depends on a guessed bound; the reach starts at the filter's declared
   halo, ``step * n_iter`` bounded by the largest cell).  Each block stores the end voxel of each
   of its foreground voxels and returns the distinct end voxels.
2. **Sinks** (two passes + a join).  The occupancy map of all end voxels is closed (dilation then
   erosion with a ball, outside counted as occupied) block by block on the core grown by the
   closing radius, from the end voxels that fall within twice the radius; its connected
   components across blocks are exact (:mod:`c3dseg.blockwise.components`) and are numbered in
   the order ``ndimage.label`` numbers them on the whole volume.  Only binary masks are joined
   across block faces, never cells.
3. **Labels** (one pass).  Each voxel takes the global id of the component holding its end voxel
   (read from the core grown by the block's reach).  The same pass returns per-cell tables
   (voxel count, voxels inside the foreground, first voxel, bounding box) summed across blocks.
4. **Instance filters**.  Size and foreground overlap come from the summed tables.  Flow error and
   axis ratio need the whole cell: each cell is handled by the block that holds its first voxel,
   on that block's core grown by the largest cell extent (known from the bounding boxes), by the
   whole-volume functions of :mod:`c3dseg.reconstruction` themselves.
5. **Relabel**: kept ids -> 1..N in increasing order, a lookup applied block by block on output.

Per-cell means (flow error, axis ratio) are computed in block coordinates: they can differ from the
whole-volume numbers by floating-point rounding (about 1e-12), which matters only for a cell whose
value lies exactly on a threshold.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ExecutionError, InputError, PipelineError
from .components import global_labels, label_components_blockwise, load_table, save_table
from .grid import Region
from .values import Derived, RegionLeaf, Stored, evaluate, is_cheap

log = logging.getLogger("c3dseg")



# ---------------------------------------------------------------------------------------------
# 1. tracking
# ---------------------------------------------------------------------------------------------

def smoothing_radius(sigma: float) -> int:
    """Support of ``ndimage.gaussian_filter`` (truncate 4): int(4 sigma + 0.5), 0 without smoothing."""
    return int(4.0 * float(sigma) + 0.5) if sigma and sigma > 0 else 0


def _read_flows(flow_values, region: Region, shape) -> np.ndarray:
    out = np.empty((3,) + tuple(region.shape), np.float32)
    for a, v in enumerate(flow_values):
        out[a] = evaluate([v], region.lo, region.hi, shape)[0]
    return out


def _read_mask(mask_value, region: Region, shape) -> np.ndarray:
    m = evaluate([mask_value], region.lo, region.hi, shape)[0]
    return np.asarray(m) != 0


def even_region(block, halo, shape) -> Region:
    """The core grown by ``halo``, its origin moved down to even coordinates: the rounding of
    ``p - s F(p)`` (half-way cases to even) then gives the same step in region and volume
    coordinates."""
    r = block.region(halo, shape)
    lo = tuple(a - (a % 2) for a in r.lo)
    return Region(lo, r.hi, r.start, r.stop)


def track_block(block, flows, mask, first_flows, shape, params: dict, out_dir: str):
    """Dask task: end voxels of the block core's foreground (see the module docstring).

    Runs :func:`c3dseg.reconstruction.track_voxels` itself on the core grown by the reach.  The
    flows of a band along the grown block's artificial faces (as wide as the smoothing support
    plus the largest step) are set to 0 after smoothing, so no voxel in the rest steps outside
    the grown block or reads a flow that differs from the whole volume's; a voxel whose path
    enters the band stops there, and a core voxel ending in the band means the reach was too
    small: the block is redone with twice the reach.

    Writes ``<out_dir>/<block>.npy`` (end voxel, global linear index, of every tracked core voxel in
    C order) and ``<block>.uniq.npy`` (the distinct end voxels); returns the box holding the ends."""
    from .. import reconstruction as rec

    kw = dict(params["track"])
    step = float(kw["step"])
    sigma = float(params.get("sigma", 0.0))
    reach = max(1, int(params["reach"]))
    srad = smoothing_radius(sigma)
    band = srad + int(math.ceil(1.5 * step)) + 2       # enough for |flow| <= 1.5; widened when not
    while True:
        halo = [min(s, reach + band) for s in shape]
        region = even_region(block, halo, shape)
        rshape = region.shape
        m = _read_mask(mask, region, shape)
        crop = region.crop
        core = np.zeros(rshape, bool)
        core[crop] = True
        core &= m
        if not core.any() or int(kw.get("n_iter", 1)) == 0:
            ends_core = _to_global(np.flatnonzero(core), region, shape)
            break
        f = _read_flows(flows, region, shape)
        if first_flows is None:
            raw = None
        elif list(first_flows) == list(flows):
            raw = f.copy()                   # the first step on the unsmoothed flows themselves
        else:
            raw = _read_flows(first_flows, region, shape)
        fmax = float(np.abs(f).max()) if f.size else 0.0
        if raw is not None and raw.size:
            fmax = max(fmax, float(np.abs(raw).max()))
        # the band must hold the smoothing support plus the largest step; when the flows are larger
        # than assumed it widens inside the region already read (less reach: escapes say so)
        band = max(band, srad + int(math.ceil(step * fmax)) + 2)
        if sigma > 0:
            f = rec.smooth_flows(f, sigma, out=f)
        art = np.zeros(rshape, bool)          # the band along the artificial faces
        for a in range(3):
            sl = [slice(None)] * 3
            if region.lo[a] > 0:
                sl[a] = slice(0, band)
                art[tuple(sl)] = True
            if region.hi[a] < shape[a]:
                sl[a] = slice(max(0, rshape[a] - band), None)
                art[tuple(sl)] = True
        f[:, art] = 0
        if raw is not None:
            raw[:, art] = 0
        start, end = rec.track_voxels(f, m, sigma=0.0, unsmoothed_first_step=False, first_step_flows=raw,
                                      interpolation="nearest", **kw)
        del f, raw
        in_core = core.reshape(-1)[start]
        end_core = np.asarray(end)[in_core]
        escaped = int(np.count_nonzero(art.reshape(-1)[end_core]))
        if escaped == 0:
            ends_core = _to_global(end_core, region, shape)
            break
        if all(lo == 0 and hi == s for lo, hi, s in zip(region.lo, region.hi, shape)):
            raise ExecutionError(f"tracking of block {block.name} did not close (internal error)")
        log.debug("block %s: %d paths leave a reach of %d; retrying with %d", block.name, escaped, reach, 2 * reach)
        reach *= 2
    return save_ends(block, ends_core, shape, out_dir, reach=reach)


def save_ends(block, ends_core: np.ndarray, shape, out_dir: str, **extra) -> dict:
    """Write a block's end voxels (and the distinct ones); the record holds the box they span."""
    for suffix, arr in (("", ends_core), (".uniq", np.unique(ends_core))):
        path = os.path.join(out_dir, block.name + suffix + ".npy")
        tmp = path + ".tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
    box = None
    if len(ends_core):
        c = np.unravel_index(ends_core, shape)
        box = (tuple(int(x.min()) for x in c), tuple(int(x.max()) + 1 for x in c))
    return dict(extra, box=box, n=int(len(ends_core)))


def ends_image_block(block, ends_value, shape, out_dir: str):
    """Dask task: end voxels from an end-position image (3, Z, Y, X) (NaN = not tracked), rounded
    and clipped as :func:`c3dseg.reconstruction.cluster_sinks` does."""
    e = np.asarray(evaluate([ends_value], block.start, block.stop, shape)[0])
    if e.ndim != 4 or e.shape[0] != 3:
        raise InputError(f"end points: expected a 3-channel (3, Z, Y, X) image, got {e.shape}")
    valid = np.all(np.isfinite(e), axis=0)
    idx = np.flatnonzero(valid)
    pts = np.stack([e[a].reshape(-1)[idx] for a in range(3)])
    for a in range(3):
        np.clip(pts[a], 0, shape[a] - 1, out=pts[a])
    pts = np.rint(pts).astype(np.int64)
    lin = np.ravel_multi_index(tuple(pts), shape) if len(idx) else np.zeros(0, np.int64)
    return save_ends(block, lin.astype(np.int64), shape, out_dir)


def finite_mask(ends):
    """Voxels whose end position is known (all three coordinates finite)."""
    return np.all(np.isfinite(ends), axis=0)


def _to_global(lin_region, region: Region, shape) -> np.ndarray:
    if len(lin_region) == 0:
        return np.zeros(0, np.int64)
    c = np.unravel_index(lin_region, region.shape)
    return np.ravel_multi_index(tuple(ci.astype(np.int64) + lo for ci, lo in zip(c, region.lo)), shape)


# ---------------------------------------------------------------------------------------------
# 2. sinks
# ---------------------------------------------------------------------------------------------

@dataclass
class Ends:
    """Where a tracking (or an end-position image) left its end voxels: one .npy per block in
    ``out_dir``, the box spanned by each block's ends, and the mask of the tracked voxels."""

    out_dir: str
    boxes: dict            # block.index -> ((lo), (hi)) or None
    mask: object           # value: non-zero where a voxel was tracked
    n: int = 0


def _boxes_touching(boxes: dict, lo, hi) -> list:
    out = []
    for idx, box in boxes.items():
        if box is None:
            continue
        blo, bhi = box
        if all(a < d and c < b for a, b, c, d in zip(blo, bhi, lo, hi)):
            out.append(idx)
    return out


def sink_mask(block, ends: Ends, grid, radius: int):
    """Mask function (for the component labelling) of the closed occupancy map on a block's core,
    and the end voxels themselves (the flags: a component is a sink when it holds one).

    :func:`c3dseg.reconstruction.closed_end_map` on the core, from the end voxels within
    :func:`~c3dseg.reconstruction.sink_map_reach` of it: exact on the core."""
    from .. import reconstruction as rec

    shape = grid.shape
    ext = rec.sink_map_reach(radius)
    lo_e = [max(0, a - ext) for a in block.start]
    hi_e = [min(s, b + ext) for b, s in zip(block.stop, shape)]
    pts = []
    for idx in _boxes_touching(ends.boxes, lo_e, hi_e):
        pts.append(np.load(os.path.join(ends.out_dir, grid[idx].name + ".uniq.npy")))
    lin = np.concatenate(pts) if pts else np.zeros(0, np.int64)
    c = np.stack(np.unravel_index(lin, shape)).astype(np.int64) if len(lin) else np.zeros((3, 0), np.int64)
    keep = np.all((c >= np.asarray(lo_e)[:, None]) & (c < np.asarray(hi_e)[:, None]), axis=0)
    c = c[:, keep]
    pts_core = np.zeros(block.shape, bool)
    inc = np.all((c >= np.asarray(block.start)[:, None]) & (c < np.asarray(block.stop)[:, None]), axis=0)
    pts_core[tuple(c[:, inc] - np.asarray(block.start)[:, None])] = True
    closed = rec.closed_end_map(c, shape, int(radius), lo=block.start, hi=block.stop)
    return closed, pts_core


def label_block(block, comps, grid, ends: Ends, labels_path: str, overlap):
    """Dask task: every tracked voxel of the core takes the id of the sink holding its end voxel;
    returns the block's per-cell tables."""
    import zarr

    shape = grid.shape
    e = np.load(os.path.join(ends.out_dir, block.name + ".npy"))
    out = np.zeros(block.shape, np.uint32)
    box = ends.boxes.get(block.index)
    if len(e):
        region = Region(box[0], box[1], block.start, block.stop)
        ids = global_labels(region, comps, grid)
        c = np.unravel_index(e, shape)
        lab = ids[tuple(ci - lo for ci, lo in zip(c, region.lo))]
        if lab.min() <= 0:
            raise ExecutionError(f"block {block.name}: an end voxel has no sink (internal error)")
        if lab.max() >= 2 ** 32:
            raise ExecutionError("more than 2^32 - 1 sinks")
        m = np.asarray(evaluate([ends.mask], block.start, block.stop, shape)[0]) != 0
        if int(m.sum()) != len(e):
            raise ExecutionError(f"block {block.name}: {int(m.sum())} tracked voxels, {len(e)} end points "
                                 "(internal error)")
        out[m] = lab.astype(np.uint32)
    zarr.open_array(labels_path, mode="r+")[block.core] = out
    return cell_tables(out, block, shape, overlap)


def sinks_and_labels(env, name: str, ends: Ends, *, closing_radius: int = 3, fully_connected: bool = True,
                     overlap=None):
    """Close the end-point map, label it across blocks and label every tracked voxel.

    Returns ``(labels, n, tables)``: the stored uint32 labels (sink ids 1..n, numbered as
    :func:`c3dseg.reconstruction.sink_labels` numbers them), and dense per-cell tables."""
    from .components import create_block_array

    grid = env.grid
    comps = label_components_blockwise(
        env.rt, f"{name}-sinks", functools.partial(sink_mask, ends=ends, grid=grid, radius=int(closing_radius)),
        fully_connected=fully_connected, select=_has_points)
    labels0 = env.rt.path("arrays", f"{name}-labels.zarr")
    create_block_array(labels0, grid, np.uint32)
    parts = env.reduce(f"{name}-label", label_block, comps, grid, ends, labels0, overlap,
                       desc=f"{name}: labels")
    tables = merge_tables(parts.values(), comps.n)
    src = Stored(labels0, "array", grid.shape, "<u4", None, env.spacing, {"is_label": True})
    return src, comps.n, tables


def _has_points(size, flag):
    return flag


# ---------------------------------------------------------------------------------------------
# 3. per-cell tables
# ---------------------------------------------------------------------------------------------

def cell_tables(lab: np.ndarray, block, shape, overlap_value=None) -> dict:
    """Sparse per-cell tables of a block's labels: ids, count, count inside the overlap mask,
    first voxel (global linear index), bounding box (global lo/hi per axis, hi inclusive)."""
    flat = lab.reshape(-1)
    nz = np.flatnonzero(flat)
    vals = flat[nz]
    ids, first_pos, inv, cnt = np.unique(vals, return_index=True, return_inverse=True, return_counts=True)
    first = np.zeros(0, np.int64)
    if len(ids):
        fl = np.unravel_index(nz[first_pos], block.shape)
        first = np.ravel_multi_index(tuple(ci.astype(np.int64) + s for ci, s in zip(fl, block.start)), shape)
    coords = np.unravel_index(nz, block.shape)
    lo = np.zeros((3, len(ids)), np.int64)
    hi = np.zeros((3, len(ids)), np.int64)
    for a in range(3):
        ca = coords[a].astype(np.int64) + block.start[a]
        l_ = np.full(len(ids), np.iinfo(np.int64).max)
        h_ = np.full(len(ids), -1, np.int64)
        np.minimum.at(l_, inv, ca)
        np.maximum.at(h_, inv, ca)
        lo[a], hi[a] = l_, h_
    inside = cnt.astype(np.int64)
    if overlap_value is not None:
        fg = np.asarray(evaluate([overlap_value], block.start, block.stop, shape)[0]) != 0
        inside = np.bincount(inv, weights=fg.reshape(-1)[nz], minlength=len(ids)).astype(np.int64)
    return {"ids": ids.astype(np.int64), "count": cnt.astype(np.int64), "inside": inside,
            "first": np.asarray(first, np.int64), "lo": lo, "hi": hi}


def tables_task(block, labels_value, overlap_value, shape):
    """Dask task: the per-cell tables of a label image over a block's core."""
    from ..labels import check_labels

    lab = check_labels(np.asarray(evaluate([labels_value], block.start, block.stop, shape)[0]), "labels")
    return cell_tables(lab, block, shape, overlap_value)


def merge_tables(parts, n: int | None = None) -> dict:
    """Per-cell tables over the whole volume.  With ``n``: dense (index = cell id, 0..n); else
    sparse over the ids present (``"ids"`` increasing)."""
    parts = [t for t in parts if len(t["ids"])]
    if n is None:
        all_ids = np.unique(np.concatenate([t["ids"] for t in parts])) if parts else np.zeros(0, np.int64)
        size = len(all_ids)
        pos = [np.searchsorted(all_ids, t["ids"]) for t in parts]
    else:
        all_ids = None
        size = n + 1
        pos = [t["ids"] for t in parts]
    count = np.zeros(size, np.int64)
    inside = np.zeros(size, np.int64)
    first = np.full(size, np.iinfo(np.int64).max, np.int64)
    lo = np.full((3, size), np.iinfo(np.int64).max, np.int64)
    hi = np.full((3, size), -1, np.int64)
    for t, p in zip(parts, pos):
        np.add.at(count, p, t["count"])
        np.add.at(inside, p, t["inside"])
        np.minimum.at(first, p, t["first"])
        for a in range(3):
            np.minimum.at(lo[a], p, t["lo"][a])
            np.maximum.at(hi[a], p, t["hi"][a])
    out = {"count": count, "inside": inside, "first": first, "lo": lo, "hi": hi}
    if all_ids is not None:
        out["ids"] = all_ids
    return out


def label_tables(env, name: str, labels_value, overlap_value=None) -> dict:
    """Sparse per-cell tables of a (lazy) label image: one reduction pass."""
    parts = env.reduce(f"{name}-tables", tables_task, labels_value, overlap_value, env.shape,
                       desc=f"{name}: cell tables")
    return merge_tables(parts.values())


# ---------------------------------------------------------------------------------------------
# 4. whole-cell features by the owner block
# ---------------------------------------------------------------------------------------------

def features_block(block, labels_value, owned_path: str, flows, shape, params: dict):
    """Dask task: flow error and axis ratio of the cells whose first voxel lies in this block,
    computed by :mod:`c3dseg.reconstruction` itself on the bounding box of those cells.

    The cells go in groups whose joint bounding box holds at most ``params["budget"]`` voxels
    (a cell larger than that alone), so memory is bounded by the budget and the largest cell."""
    from .. import reconstruction as rec

    table = load_table(owned_path)          # rows: id, owner block, lo z/y/x, hi z/y/x (inclusive)
    mine = np.flatnonzero(table[1] == int(np.ravel_multi_index(block.index, tuple(params["counts"]))))
    out_ids, out_err, out_ratio = [], [], []
    for group in _groups(table[:, mine], int(params["budget"])):
        ids = group[0]
        lo = group[2:5].min(axis=1)
        hi = group[5:8].max(axis=1) + 1
        region = Region(tuple(int(x) for x in lo), tuple(int(x) for x in hi), tuple(int(x) for x in lo),
                        tuple(int(x) for x in hi))
        lab = np.asarray(evaluate([labels_value], region.lo, region.hi, shape)[0]).astype(np.int64)
        pos = np.clip(np.searchsorted(ids, lab), 0, len(ids) - 1)
        compact = np.where((ids[pos] == lab) & (lab > 0), pos + 1, 0)
        del lab, pos
        err = np.zeros(len(ids))
        ratio = np.ones(len(ids))
        if params.get("max_flow_error") is not None:
            f = _read_flows(flows, region, shape)
            e, _ = rec.flow_error_per_cell(compact, f, flow_type=params["flow_type"], flow_scale=params["flow_scale"],
                                           spacing=params.get("spacing"))
            err = np.asarray(e[1:len(ids) + 1], np.float64)
            del f, e
        if params.get("min_axis_ratio"):
            r, _ = rec.axis_ratio_per_cell(compact)
            ratio = np.asarray(r[1:len(ids) + 1], np.float64)
        del compact
        out_ids.append(ids)
        out_err.append(err)
        out_ratio.append(ratio)
    if not out_ids:
        return {"ids": np.zeros(0, np.int64), "error": np.zeros(0), "ratio": np.zeros(0)}
    return {"ids": np.concatenate(out_ids), "error": np.concatenate(out_err), "ratio": np.concatenate(out_ratio)}


def _groups(cells: np.ndarray, budget: int):
    """Split cells (columns: id, owner, lo z/y/x, hi z/y/x) into groups of increasing id whose joint
    bounding box stays within ``budget`` voxels (in C order of their boxes: neighbours together)."""
    if cells.shape[1] == 0:
        return
    order = np.lexsort((cells[4], cells[3], cells[2]))
    cells = cells[:, order]
    start = 0
    lo = cells[2:5, 0].copy()
    hi = cells[5:8, 0].copy()
    for k in range(1, cells.shape[1] + 1):
        if k < cells.shape[1]:
            nlo = np.minimum(lo, cells[2:5, k])
            nhi = np.maximum(hi, cells[5:8, k])
            if np.prod(nhi - nlo + 1) <= budget:
                lo, hi = nlo, nhi
                continue
        g = cells[:, start:k]
        yield g[:, np.argsort(g[0])]
        if k < cells.shape[1]:
            start = k
            lo = cells[2:5, k].copy()
            hi = cells[5:8, k].copy()


def cell_features(env, name: str, labels_value, ids, first, lo, hi, *, flows=None, max_flow_error=None,
                  min_axis_ratio=None, flow_type="tanh", flow_scale="adaptive", spacing=None) -> dict:
    """Flow error and/or axis ratio of the cells ``ids`` (with their first voxel and bounding box,
    ``hi`` inclusive), each computed by the block holding its first voxel.  Returns arrays
    ``ids`` (increasing), ``error``, ``ratio``."""
    grid = env.grid
    ids = np.asarray(ids, np.int64)
    if not len(ids):
        return {"ids": ids, "error": np.zeros(0), "ratio": np.zeros(0)}
    owners = grid.block_of(np.stack(np.unravel_index(first, grid.shape)))
    owned_path = env.rt.path("tables", f"{name}-owned.npy")
    save_table(owned_path, np.concatenate([ids[None], owners[None].astype(np.int64),
                                           np.asarray(lo, np.int64), np.asarray(hi, np.int64)]))
    if max_flow_error is not None:
        flows = [v if is_cheap(v) else env.materialise(v, f"{name}-flow{'zyx'[a]}") for a, v in enumerate(flows)]
    owner_set = set(int(x) for x in np.unique(owners))
    blocks = [b for b in grid if grid.flat(b.index) in owner_set]
    # a group of cells is read as one box of at most ~2 grown blocks
    budget = 2 * int(np.prod([b + 2 * 8 for b in grid.block]))
    params = {"max_flow_error": max_flow_error, "min_axis_ratio": min_axis_ratio, "flow_type": flow_type,
              "flow_scale": flow_scale, "spacing": spacing, "counts": grid.counts, "budget": budget}
    feats = env.reduce(f"{name}-features", features_block, labels_value, owned_path, flows, grid.shape, params,
                       blocks=blocks, desc=f"{name}: cell features")
    got_ids = np.concatenate([f["ids"] for f in feats.values()])
    err = np.concatenate([f["error"] for f in feats.values()])
    ratio = np.concatenate([f["ratio"] for f in feats.values()])
    o = np.argsort(got_ids)
    return {"ids": got_ids[o], "error": err[o], "ratio": ratio[o]}


# ---------------------------------------------------------------------------------------------
# 5. lookups
# ---------------------------------------------------------------------------------------------

def sparse_lut(data, ids_path, new_path, dtype):
    """Map label values through a sparse table (``ids`` increasing -> ``new``); others -> 0."""
    ids = load_table(ids_path)
    new = load_table(new_path)
    d = np.asarray(data).astype(np.int64, copy=False)
    out = np.zeros(d.shape, dtype)
    if len(ids):
        pos = np.clip(np.searchsorted(ids, d), 0, len(ids) - 1)
        hit = ids[pos] == d
        out[hit] = new[pos[hit]]
    return out


def relabel(env, name: str, value, ids, new, dtype, meta=None) -> Derived:
    """A lazy label image: ``value`` mapped through ``ids -> new`` (others -> 0), as ``dtype``."""
    ids = np.asarray(ids, np.int64)
    new = np.asarray(new, np.int64)
    ids_path = env.rt.path("tables", f"{name}-ids.npy")
    new_path = env.rt.path("tables", f"{name}-new.npy")
    save_table(ids_path, ids)
    save_table(new_path, new)
    dt = np.dtype(dtype)
    m = dict(value.meta) if value is not None else {}
    m.update(meta or {})
    m.update(is_label=True, dtype_fixed=dt.str, lead=())
    out, = env.node("func", [value], func=sparse_lut, kwargs={"ids_path": ids_path, "new_path": new_path,
                                                               "dtype": dt.str}, meta=m)
    return out


# ---------------------------------------------------------------------------------------------
# the chain
# ---------------------------------------------------------------------------------------------

def threshold_mask(data, threshold):
    return np.asarray(data) > threshold


def ones_like_mask(data):
    return np.ones(np.asarray(data).shape[-3:], bool)


def nonzero_mask(data):
    return np.asarray(data) != 0


def default_reach(step: float, n_iter: int, max_radius_voxels: float | None = None, cap: int = 16) -> int:
    """Starting tracking reach (voxels): ``step * n_iter`` bounded by the largest cell diameter (when
    known) and by ``cap``; blocks whose paths go farther redo themselves with a larger reach."""
    r = int(math.ceil(float(step) * int(n_iter))) + 1
    if max_radius_voxels and math.isfinite(max_radius_voxels):
        r = min(r, int(math.ceil(2 * max_radius_voxels)) + 1)
    return max(2, min(r, cap))


def _materialise_inputs(env, name, flows, first, mask):
    """Store the tracking inputs (read over grown blocks, several times) in one pass; a mask that is
    a cheap function of stored images stays lazy."""
    values = list(flows) + (list(first) if first is not None else [])
    names = [f"{name}-flow{'zyx'[a]}" for a in range(3)] + [f"{name}-rawflow{'zyx'[a]}" for a in range(len(values) - 3)]
    with_mask = not is_cheap(mask)
    if with_mask:
        values.append(mask)
        names.append(f"{name}-mask")
    # identical values (the same lazy image twice) are stored once
    uniq, seen = [], {}
    for v, n in zip(values, names):
        if id(v) not in seen:
            seen[id(v)] = len(uniq)
            uniq.append((v, n))
    stored = env.materialise_all([v for v, _ in uniq], [n for _, n in uniq])
    got = [stored[seen[id(v)]] for v in values]
    flows_s = got[:3]
    first_s = got[3:6] if first is not None else None
    mask_s = got[-1] if with_mask else mask
    return flows_s, first_s, mask_s


def track_values(env, name: str, flows, mask, *, step: float = 4.0, n_iter: int = 100, sigma: float = 0.0,
                 first_step_flows=None, reach: int | None = None, interpolation: str = "nearest",
                 **track_kwargs) -> Ends:
    """Blockwise :func:`c3dseg.reconstruction.track_voxels` (nearest): the end voxel of every
    voxel of ``mask``, exactly as the whole-volume tracking finds it.  ``first_step_flows``: the
    flows of the first step (as ``track_voxels`` takes them; pass the unsmoothed flows when
    ``sigma > 0`` and the first step is unsmoothed); other keywords go to ``track_voxels``."""
    if interpolation != "nearest":
        raise ExecutionError("blockwise tracking supports Interpolation=nearest only (linear tracking has no exact "
                             "cut yet); run without --blocks or use nearest", key="Interpolation")
    flows, first_step_flows, mask = _materialise_inputs(env, name, flows, first_step_flows, mask)
    out_dir = os.path.join(env.rt.work_dir, "ends", name)
    os.makedirs(out_dir, exist_ok=True)
    params = {"track": dict(track_kwargs, step=step, n_iter=n_iter), "sigma": sigma,
              "reach": reach or default_reach(step, n_iter)}
    tr = env.reduce(f"{name}-track", track_block, flows, mask, first_step_flows, env.shape, params, out_dir,
                    desc=f"{name}: track")
    retried = sum(1 for v in tr.values() if v.get("reach", 0) > params["reach"])
    if retried:
        log.info("%s: %d of %d blocks needed a reach beyond %d voxels", name, retried, len(tr), params["reach"])
    return Ends(out_dir, {k: v["box"] for k, v in tr.items()}, mask, sum(v["n"] for v in tr.values()))


def ends_from_image(env, name: str, ends_value) -> Ends:
    """End voxels from an end-position image (3, Z, Y, X) (FlowTrackingFilter's output)."""
    tracked = getattr(ends_value, "meta", {}).get("blockwise_ends")
    if tracked is not None:
        return tracked
    out_dir = os.path.join(env.rt.work_dir, "ends", name)
    os.makedirs(out_dir, exist_ok=True)
    res = env.reduce(f"{name}-ends", ends_image_block, ends_value, env.shape, out_dir, desc=f"{name}: end points")
    mask, = env.node("func", [ends_value], func=finite_mask, meta={"is_label": False})
    return Ends(out_dir, {k: v["box"] for k, v in res.items()}, mask, sum(v["n"] for v in res.values()))


def ends_image_region(region, *, ends: Ends, grid):
    """Node function: the end-position image (3, Z, Y, X) float32 (NaN = not tracked) over a region,
    from the stored end voxels (what FlowTrackingFilter outputs)."""
    shape = grid.shape
    out = np.full((3,) + region.shape, np.nan, np.float32)
    for b in grid.blocks_touching(region.lo, region.hi):
        e = np.load(os.path.join(ends.out_dir, b.name + ".npy"))
        if not len(e):
            continue
        m = np.asarray(evaluate([ends.mask], b.start, b.stop, shape)[0]) != 0
        full = np.full((3,) + b.shape, np.nan, np.float32)
        c = np.unravel_index(e, shape)
        for a in range(3):
            full[a][m] = c[a]
        lo = [max(r, s) for r, s in zip(region.lo, b.start)]
        hi = [min(r, s) for r, s in zip(region.hi, b.stop)]
        src = tuple(slice(l_ - s, h_ - s) for l_, h_, s in zip(lo, hi, b.start))
        dst = tuple(slice(l_ - r, h_ - r) for l_, h_, r in zip(lo, hi, region.lo))
        out[(slice(None),) + dst] = full[(slice(None),) + src]
    return out


def reconstruct_blockwise(env, name: str, foreground, flows, *, fg_threshold: float = 0.5,
                          mask=None, flow_type: str = "tanh", smoothing_sigma: float = 1.0, step: float = 4.0,
                          n_iter: int = 100, closing_radius: int = 3, interpolation: str = "nearest",
                          fully_connected: bool = True, min_radius_voxels: float = 5.0,
                          max_radius_voxels: float = 100.0, min_overlap: float = 0.2,
                          max_flow_error: float | None = 0.8, min_axis_ratio: float | None = 0.1,
                          flow_scale="adaptive", spacing=None, unsmoothed_first_step: bool = True,
                          reach: int | None = None) -> Derived:
    """:func:`c3dseg.reconstruction.reconstruct` on lazy values, block by block, with identical labels.

    Parameters
    ----------
    env : Env
    name : str
        Prefix of passes and work files.
    foreground : value (Z, Y, X)
        Tracked where ``> fg_threshold`` (unless ``mask`` is given).
    flows : list of 3 values
        Flows along z, y, x.
    reach : int, optional
        Starting tracking reach (default :func:`default_reach`).
    Others : as in :func:`c3dseg.reconstruction.reconstruct`.

    Returns
    -------
    Derived
        The labels (uint16, or uint32 past 65535 cells), 1..N consecutive, as a lazy value.
    """
    from ..labels import label_dtype
    from ..reconstruction import sphere_volume

    if mask is None:
        mask, = env.node("func", [foreground], func=threshold_mask, kwargs={"threshold": fg_threshold},
                         meta={"is_label": False})
    flows, _, mask = _materialise_inputs(env, name, flows, None, mask)
    first = flows if (smoothing_sigma > 0 and unsmoothed_first_step) else None
    ends = track_values(env, name, flows, mask, step=step, n_iter=n_iter, sigma=smoothing_sigma,
                        first_step_flows=first, interpolation=interpolation,
                        reach=reach or default_reach(step, n_iter, max_radius_voxels))
    labels0, n, t = sinks_and_labels(env, name, ends, closing_radius=closing_radius,
                                     fully_connected=fully_connected, overlap=mask)
    count = t["count"]
    keep = np.ones(n + 1, bool)
    lo = sphere_volume(min_radius_voxels) if min_radius_voxels else 0.0
    hi = sphere_volume(max_radius_voxels) if max_radius_voxels and math.isfinite(max_radius_voxels) else math.inf
    keep &= (count >= lo) & (count <= hi)
    if min_overlap:
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(count > 0, t["inside"] / np.maximum(count, 1), 1.0)
        keep &= frac >= min_overlap
    keep[0] = False
    if (max_flow_error is not None or min_axis_ratio) and keep.any():
        cand = np.flatnonzero(keep)
        f = cell_features(env, name, labels0, cand, t["first"][cand], t["lo"][:, cand], t["hi"][:, cand],
                          flows=flows, max_flow_error=max_flow_error, min_axis_ratio=min_axis_ratio,
                          flow_type=flow_type, flow_scale=flow_scale, spacing=spacing)
        ok = np.ones(len(f["ids"]), bool)
        if max_flow_error is not None:
            ok &= f["error"] <= max_flow_error
        if min_axis_ratio:
            ok &= f["ratio"] >= min_axis_ratio
        keep[f["ids"][~ok]] = False
    kept = np.flatnonzero(keep)
    if ends.n == 0:
        log.warning("empty foreground: no cells")
    log.info("%s: %d tracked voxels, %d sinks, %d cells kept", name, ends.n, n, len(kept))
    meta = dict(foreground.meta) if foreground is not None else {}
    return relabel(env, f"{name}-final", labels0, kept, np.arange(1, len(kept) + 1), label_dtype(len(kept)),
                   meta=meta)


# ---------------------------------------------------------------------------------------------
# the filters of c3dseg.filters.instances, blockwise
# ---------------------------------------------------------------------------------------------

from .globals import register_global  # noqa: E402


def _flow_scale(p):
    from ..filters.flows import parse_flow_scale

    return parse_flow_scale(p.get("FlowScale", "adaptive"))


def _input_dtype(env, value) -> np.dtype:
    (dt, _), = env.probe([value])
    if dt == bool:
        return np.dtype(np.uint8)
    if dt.kind == "f":
        return np.dtype(np.int64)
    return dt


def _keep_filter(env, step, labels, keep_fn, **tables_kw) -> tuple[list, list]:
    """A label filter that removes cells: tables -> keep(ids, tables) -> lookup (dtype kept)."""
    item = step.item.item_id
    t = label_tables(env, item, labels, **tables_kw)
    keep = np.asarray(keep_fn(t), bool)
    ids = t["ids"]
    dt = _input_dtype(env, labels)
    return [relabel(env, item, labels, ids[keep], ids[keep], dt)], []


@register_global("InstanceSizeFilter")
def _size_impl(env, step, images, metas):
    from ..filters.instances import _size_range

    lo, hi = _size_range(step.params, images[0].spacing)
    return _keep_filter(env, step, images[0], lambda t: (t["count"] >= lo) & (t["count"] <= hi))


@register_global("InstanceForegroundOverlapFilter")
def _overlap_impl(env, step, images, metas):
    mask, = env.node("func", [images[1]], func=nonzero_mask, meta={"is_label": False})
    m = step.params["MinOverlap"]

    def keep(t):
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(t["count"] > 0, t["inside"] / np.maximum(t["count"], 1), 1.0)
        return frac >= m

    return _keep_filter(env, step, images[0], keep, overlap_value=mask)


def _feature_filter(env, step, labels, *, flows=None, max_flow_error=None, min_axis_ratio=None, flow_type="tanh",
                    flow_scale="adaptive"):
    item = step.item.item_id
    t = label_tables(env, item, labels)
    f = cell_features(env, item, labels, t["ids"], t["first"], t["lo"], t["hi"], flows=flows,
                      max_flow_error=max_flow_error, min_axis_ratio=min_axis_ratio, flow_type=flow_type,
                      flow_scale=flow_scale)
    ok = np.ones(len(f["ids"]), bool)
    if max_flow_error is not None:
        ok &= f["error"] <= max_flow_error
    if min_axis_ratio is not None:
        ok &= f["ratio"] >= min_axis_ratio
    kept = f["ids"][ok]
    return [relabel(env, item, labels, kept, kept, _input_dtype(env, labels))], []


@register_global("InstanceFlowErrorFilter")
def _flow_error_impl(env, step, images, metas):
    p = step.params
    if p["MaxFlowError"] < 0:
        out, = env.node("func", [images[0]], func=_as_labels, meta={"is_label": True})
        return [out], []
    return _feature_filter(env, step, images[0], flows=list(images[1:4]), max_flow_error=p["MaxFlowError"],
                           flow_type=p["FlowType"], flow_scale=_flow_scale(p))


def _as_labels(data):
    from ..labels import check_labels

    return check_labels(np.asarray(data), "labels").copy()


@register_global("InstanceAxisRatioFilter")
def _axis_ratio_impl(env, step, images, metas):
    return _feature_filter(env, step, images[0], min_axis_ratio=step.params["MinAxisRatio"])


def region_sums_task(block, labels_value, shape):
    """Dask task: :func:`c3dseg.regions.region_sums` of a label image over a block's core."""
    from ..labels import check_labels
    from ..regions import region_sums

    lab = check_labels(np.asarray(evaluate([labels_value], block.start, block.stop, shape)[0]), "labels")
    return region_sums(lab, origin=block.start)


@register_global("RegionPropertiesFilter")
def _region_properties_impl(env, step, images, metas):
    """Region properties: integer sums per region from every block (one pass), merged and turned
    into the table by the whole-volume functions: the same numbers as a whole-volume run."""
    from ..regions import merge_region_sums, properties_from_sums, region_table

    item = step.item.item_id
    parts = env.reduce(f"{item}-regions", region_sums_task, images[0], env.shape, desc=f"{item}: region sums")
    props = properties_from_sums(merge_region_sums(parts.values()), images[0].spacing)
    meta = images[0].meta
    table = region_table(props, meta={"basename": meta.get("basename", "image"), "source": meta.get("source")})
    return [images[0]], [table]


@register_global("RelabelConsecutiveFilter")
def _relabel_impl(env, step, images, metas):
    from ..labels import label_dtype

    item = step.item.item_id
    t = label_tables(env, item, images[0])
    ids = t["ids"]
    return [relabel(env, item, images[0], ids, np.arange(1, len(ids) + 1), label_dtype(len(ids)))], []


def check_interpolation(params) -> None:
    """Refuse (at planning) tracking that has no exact cut: linear interpolation keeps float positions
    whose paths are not a fixed voxel-to-voxel map, so they cannot be composed block by block."""
    if params.get("Interpolation", "nearest") != "nearest":
        raise PipelineError("Interpolation=linear cannot be run blockwise (only nearest-voxel tracking has an "
                            "exact cut); use Interpolation=nearest or run without --blocks", key="Interpolation")


def tracking_halo(params, spacing=None):
    check_interpolation(params)
    r = default_reach(params.get("StepSize", 1.0), params.get("NumIterations", 25)) + \
        smoothing_radius(params.get("SmoothingSigma", 0.0)) + 1
    return (r, r, r)


def reconstruction_halo(params, spacing=None):
    check_interpolation(params)
    r = default_reach(params.get("StepSize", 4.0), params.get("NumIterations", 100)) + \
        smoothing_radius(params.get("SmoothingSigma", 0.0)) + 1
    return (r, r, r)


def sinks_halo(params, spacing=None):
    r = 2 * int(params.get("ClosingRadius", 3))
    return (r, r, r)


def _register_halos():
    from .globals import GLOBAL_HALOS

    GLOBAL_HALOS.update({"FlowTrackingFilter": tracking_halo, "GradientVectorFlowTrackingImageFilter": tracking_halo,
                         "FlowReconstructionFilter": reconstruction_halo, "SinkClusteringFilter": sinks_halo})


_register_halos()


@register_global("FlowTrackingFilter")
def _tracking_impl(env, step, images, metas):
    p = step.params
    item = step.item.item_id
    mask, = env.node("func", [images[0]], func=nonzero_mask, meta={"is_label": False})
    flows = list(images[1:4])
    raw = [im for im in images[4:7] if im is not None] if len(images) > 4 else []
    if raw and len(raw) != 3:
        raise InputError("unsmoothed flows: give all three of inputs 5-7 or none")
    sigma = float(p["SmoothingSigma"])
    first = raw if raw else (flows if sigma > 0 else None)
    ends = track_values(env, item, flows, mask, step=p["StepSize"], n_iter=p["NumIterations"], sigma=sigma,
                        first_step_flows=first, interpolation=p["Interpolation"],
                        reach=default_reach(p["StepSize"], p["NumIterations"]))
    out, = env.node("func", [RegionLeaf(env.shape, images[0].spacing)], func=ends_image_region,
                    kwargs={"ends": ends, "grid": env.grid}, item_id=item,
                    meta=dict(images[0].meta, is_label=False, blockwise_ends=ends, channel_names=["end_z", "end_y", "end_x"]))
    return [out], []


def _sinks_output(env, item, ends, p, meta):
    from ..labels import label_dtype

    labels0, n, _ = sinks_and_labels(env, item, ends, closing_radius=p["ClosingRadius"],
                                     fully_connected=p["FullyConnected"])
    if ends.n == 0:
        log.warning("empty foreground: no cells")
    ids = np.arange(1, n + 1)
    return relabel(env, item, labels0, ids, ids, label_dtype(n), meta=meta)


@register_global("SinkClusteringFilter")
def _sinks_impl(env, step, images, metas):
    item = step.item.item_id
    ends = ends_from_image(env, item, images[0])
    meta = {k: v for k, v in images[0].meta.items() if k not in ("blockwise_ends", "channel_names")}
    return [_sinks_output(env, item, ends, step.params, meta)], []


@register_global("GradientVectorFlowTrackingImageFilter")
def _gvf_impl(env, step, images, metas):
    p = step.params
    item = step.item.item_id
    flows = [images[2], images[1], images[0]]          # XPIWIT order: x, y, z
    if p["IgnoreBackground"]:
        mask, = env.node("func", [images[3]], func=nonzero_mask, meta={"is_label": False})
    else:
        mask, = env.node("func", [images[3]], func=ones_like_mask, meta={"is_label": False})
    ends = track_values(env, item, flows, mask, step=p["StepSize"], n_iter=p["NumIterations"], sigma=0.0,
                        reach=default_reach(p["StepSize"], p["NumIterations"]))
    return [_sinks_output(env, item, ends, p, dict(images[3].meta))], []


@register_global("FlowReconstructionFilter")
def _reconstruction_impl(env, step, images, metas):
    from ..filters.instances import _size_range

    p = step.params
    lo, hi = _size_range(p, images[0].spacing)
    out = reconstruct_blockwise(
        env, step.item.item_id, images[0], list(images[1:4]), flow_type=p["FlowType"],
        fg_threshold=p["ForegroundThreshold"], smoothing_sigma=p["SmoothingSigma"], step=p["StepSize"],
        n_iter=p["NumIterations"], closing_radius=p["ClosingRadius"], interpolation=p["Interpolation"],
        fully_connected=p["FullyConnected"], min_radius_voxels=(3 * lo / (4 * math.pi)) ** (1 / 3),
        max_radius_voxels=(3 * hi / (4 * math.pi)) ** (1 / 3) if math.isfinite(hi) else math.inf,
        min_overlap=p["MinOverlap"], max_flow_error=None if p["MaxFlowError"] < 0 else p["MaxFlowError"],
        min_axis_ratio=p["MinAxisRatio"] or None, flow_scale=_flow_scale(p))
    return [out], []


from . import targets as _targets  # noqa: E402,F401  (registers LabelsToFlows)

"""Blockwise forms of the steps that change the voxel grid, and of the cell-diameter estimate.

``ResampleToModelScale`` and ``ResampleImageFilter`` declare ``blockwise = "resample"``.  Their
output grid (shape and spacing) is worked out in the client from the parameters and metadata,
exactly as the whole-image filters do (for ``ResampleToModelScale`` by the filter's own
:meth:`~c3dseg.filters.scale.ResampleToModelScale.target_grid`: diameter, warnings, MaxUpsampling
check, the stand-in without cells; the reference input's grid or the spacing/factors for
``ResampleImageFilter``).  The output is then written, block by block *of the output grid*, into
a zarr array in the run's work folder: each output block reads only the input box its voxels map
to (plus the interpolation neighbour: one voxel for linear, none for nearest), through
:func:`c3dseg.resampling.source_box` and :func:`c3dseg.resampling.resample_box`, the very code
the whole-volume :func:`c3dseg.resampling.resample` runs, so both give identical voxel values.
Steps downstream run on the new grid, cut into blocks of the same ``--blocks`` size (a block of
the later grid holds as many voxels as one of the input grid: worker memory stays set by the
block size whatever the zoom; an output block whose input box would be much larger, when
downsampling, is computed in z-slabs of about one block of input each).

``EstimateCellDiameter`` measures a central box of at most ``MaxVoxels`` voxels anyway: its
blockwise form reads that box (one task) and runs the same estimate on it, then passes its input
on with meta ``cell_diameter_um``, which ``ResampleToModelScale`` (and filters run per block) read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import numpy as np

from ..image import MetaTable
from ..resampling import _out_dtype, output_shape, output_spacing, resample_box, source_box
from .globals import register_global
from .values import Derived, Stored, evaluate, leaves

log = logging.getLogger("c3dseg")


def shape_of(value) -> tuple[int, int, int]:
    """(Z, Y, X) of the grid a lazy value lives on."""
    return tuple(leaves(value)[0].shape3d)


def with_meta(value, **updates):
    """The same lazy value with its metadata updated (no new computation)."""
    meta = dict(value.meta)
    meta.update(updates)
    if isinstance(value, Derived):
        return Derived(value.node, value.output, value.spacing, meta)
    return dataclasses.replace(value, meta=meta)


# ---------------------------------------------------------------------------------------------
# cell diameter
# ---------------------------------------------------------------------------------------------

def central_box(shape, max_voxels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box ``[lo, hi)`` :func:`c3dseg.diameter.estimate_cell_diameter` measures in a volume of
    ``shape`` (its own choice of the central block, applied to index arrays that cost no memory)."""
    from ..diameter import central_block

    shape = tuple(int(s) for s in shape)
    lo, hi = [], []
    for a in range(3):
        idx = np.arange(shape[a]).reshape([-1 if k == a else 1 for k in range(3)])
        view = central_block(np.broadcast_to(idx, shape), int(max_voxels))
        line = np.asarray(view[tuple(slice(None) if k == a else 0 for k in range(3))])
        lo.append(int(line[0]))
        hi.append(int(line[-1]) + 1)
    return tuple(lo), tuple(hi)


def _diameter_task(value, lo, hi, shape, channel, spacing, max_voxels, model=None, fit=None):
    """Worker side: the estimate on the central box (the very array the whole-image filter measures);
    ``fit``: the correction's coefficients (None: the packaged fit)."""
    from ..diameter import estimate_cell_diameter

    from ..filters.segmentation import channel_of

    data = channel_of(evaluate([value], lo, hi, shape)[0], channel)
    d, info = estimate_cell_diameter(data, spacing, max_voxels=max_voxels, model=model or None,
                                     fit=None if fit is None else {"coefficients": list(fit)},
                                     return_details=True)
    regions = info["regions"]
    return float(d), int(regions), [int(n) for n in info["block_shape"]]


def estimate_diameter(env, value, *, channel: int = 0, max_voxels: int | None = None, name: str = "diameter",
                      model: str = "", correction: str = ""):
    """``(diameter_um, regions, block_shape)`` of :func:`c3dseg.diameter.estimate_cell_diameter` on
    the whole image, computed from its central box only (kept in the work folder for a resumed run);
    ``correction``: EstimateCellDiameter's CorrectionFile (empty: the packaged fit)."""
    from ..diameter import estimate_cell_diameter

    if max_voxels is None:
        max_voxels = (estimate_cell_diameter.__kwdefaults__ or {}).get("max_voxels", 4_000_000)
    shape = shape_of(value)
    lo, hi = central_box(shape, max_voxels)
    record = env.rt.path("tables", f"{name}.json")
    if os.path.isfile(record):
        with open(record) as f:
            d, regions, block_shape = json.load(f)
        return (float("nan") if d is None else float(d)), int(regions), tuple(block_shape)
    fit = None
    if correction:
        from ..filters.segmentation import correction as load_correction

        fit = tuple(load_correction(correction)["coefficients"])
    d, regions, block_shape = env.rt.gather_small(_diameter_task, value, lo, hi, shape, int(channel),
                                                  tuple(value.spacing), int(max_voxels), model or None, fit)
    with open(record, "w") as f:
        json.dump([d if math.isfinite(d) else None, regions, block_shape], f)
    return d, regions, tuple(block_shape)


@register_global("EstimateCellDiameter")
def _estimate_cell_diameter(env, step, images, metas):
    v = images[0]
    p = step.params
    item = step.item.item_id
    name = v.meta.get("basename", item)
    from ..filters.base import resolve_relative

    model = resolve_relative(p.get("ModelPath", ""), env.base_dir) if p.get("ModelPath") else ""
    fit = resolve_relative(p["CorrectionFile"], env.base_dir) if p.get("CorrectionFile") else ""
    d, regions, block_shape = estimate_diameter(env, v, channel=p["Channel"], max_voxels=p["MaxVoxels"],
                                                name=f"{item}-diameter", model=model, correction=fit)
    empty = not math.isfinite(d)
    env.no_cells = env.no_cells or empty
    if empty:
        log.warning("%s: no cells found (no tissue: constant or noise-only image); the segmentation "
                    "will be empty", name)
    else:
        log.info("%s: estimated median cell diameter %.3g um (%d regions)", name, d, regions)
    table = MetaTable(["cell_diameter_um", "regions", "block_voxels"],
                      [[float(d), int(regions), int(np.prod(block_shape))]])
    return [with_meta(v, cell_diameter_um=float(d), no_cells=empty)], [table]


# ---------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------

def resample_block(block, value, in_shape, out_shape, order: int, path: str, dtype: str, cast, budget: int):
    """Dask task: the block (of the output grid) of resampling ``value``, written into ``path``.

    The input box the block maps to is read (evaluated) in z-slabs of about ``budget`` voxels."""
    import zarr

    lo, hi = block.start, block.stop
    (_, ya, xa), (_, yb, xb) = source_box(in_shape, out_shape, lo, hi, order)
    plane = max(1, (yb - ya) * (xb - xa))
    per_out_plane = plane * max(1.0, in_shape[0] / out_shape[0])
    k = max(1, int(budget // per_out_plane))
    parts = []
    for z0 in range(lo[0], hi[0], k):
        z1 = min(hi[0], z0 + k)
        olo, ohi = (z0, lo[1], lo[2]), (z1, hi[1], hi[2])
        slo, shi = source_box(in_shape, out_shape, olo, ohi, order)
        src = evaluate([value], slo, shi, in_shape)[0]
        if cast is not None:
            src = np.asarray(src, dtype=cast)
        parts.append(resample_box(src, slo, in_shape, out_shape, olo, ohi, order))
        del src
    data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-3)
    arr = zarr.open_array(path, mode="r+")
    key = block.core if data.ndim == 3 else (slice(None),) + block.core
    arr[key] = data.astype(dtype, copy=False)
    return None


def resample_value(env, value, out_shape, order: int, spacing, meta: dict, item_id: str, *, cast=None):
    """A stored copy of ``value`` resampled onto ``out_shape`` voxels (same extent) with
    interpolation ``order`` (0 nearest, 1 linear), on the output grid; ``env`` is left on that grid.

    ``cast``: dtype the input is converted to first (as the whole-image filter does)."""
    from .components import create_block_array

    in_shape = shape_of(value)
    (dt, lead), = env.probe([value])
    out_dt = _out_dtype(np.dtype(cast) if cast is not None else dt)
    channels = lead[0] if lead else None
    budget = int(np.prod(env.block))
    env.enter_grid(tuple(out_shape), spacing, item_id)
    name = f"{item_id}-resample"
    path = env.rt.path("arrays", f"{name}.zarr")
    create_block_array(path, env.grid, out_dt, channels)
    log.info("%s: resampling %s -> %s voxels (%s) blockwise", item_id, in_shape, tuple(out_shape),
             "nearest" if order == 0 else "linear")
    env.rt.run_pass(name, resample_block, value, tuple(in_shape), tuple(out_shape), int(order), path, out_dt.str,
                    None if cast is None else np.dtype(cast).str, budget, collect=False,
                    desc=f"{item_id}: resample")
    meta = {k: v for k, v in meta.items() if k not in ("dtype_fixed", "lead")}
    return Stored(path, "array", tuple(out_shape), out_dt.str, channels, tuple(spacing), meta)


@register_global("ResampleToModelScale")
def _to_model_scale(env, step, images, metas):
    """The grid :meth:`~c3dseg.filters.scale.ResampleToModelScale.target_grid` decides (the same
    function as the whole-image filter; an estimate made here reads the central box lazily), then
    linear resampling of the float32 input block by block, or the stand-in without cells."""
    from ..filters.base import Context

    v = images[0]
    item = step.item.item_id
    flt = step.cls(step.params, Context(item_id=item, base_dir=env.base_dir))
    in_shape = shape_of(v)

    def estimate():
        return estimate_diameter(env, v, channel=0, name=f"{item}-diameter")[0]

    grid = flt.target_grid(in_shape, v.spacing, v.meta, v.meta.get("basename", item), estimate)
    if grid.no_cells:
        env.no_cells = True
        return [_placeholder(env, v, item, grid)], []
    meta = dict(v.meta, cell_diameter_um=grid.diameter_um, input_shape=in_shape, input_spacing=tuple(v.spacing))
    out = resample_value(env, v, grid.shape, 1, grid.spacing, meta, item, cast=np.float32)
    return [out], []


def _placeholder(env, v, item_id: str, grid):
    """ResampleToModelScale's all-zero stand-in for an image without cells (on ``grid``, decided by
    ``target_grid``: same extent, meta ``no_cells``), as a stored array on its own grid."""
    from .components import create_block_array

    in_shape = shape_of(v)
    (_, lead), = env.probe([v])
    env.enter_grid(grid.shape, grid.spacing, item_id)
    path = env.rt.path("arrays", f"{item_id}-placeholder.zarr")
    channels = lead[0] if lead else None
    create_block_array(path, env.grid, np.float32, channels)          # zeros (the fill value)
    env.placeholder_shapes = getattr(env, "placeholder_shapes", set()) | {grid.shape}
    meta = {k: x for k, x in v.meta.items() if k not in ("dtype_fixed", "lead")}
    meta.update(cell_diameter_um=float("nan"), no_cells=True, input_shape=in_shape, input_spacing=tuple(v.spacing))
    return Stored(path, "array", grid.shape, "<f4", channels, grid.spacing, meta)


@register_global("ResampleImageFilter")
def _resample_image(env, step, images, metas):
    """The grid of :class:`~c3dseg.filters.morphology.ResampleImageFilter` (the reference input's,
    or from the spacing/factors), then nearest or linear resampling block by block."""
    img = images[0]
    ref = images[1] if len(images) > 1 else None
    p = step.params
    in_shape = shape_of(img)
    if ref is not None:
        shape = shape_of(ref)
    else:
        spacing = (p["SpacingZ"], p["SpacingY"], p["SpacingX"])
        factors = (p["FactorZ"], p["FactorY"], p["FactorX"])
        if any(f > 0 for f in factors):
            shape = output_shape(in_shape, img.spacing, factors=factors)
        else:
            shape = output_shape(in_shape, img.spacing, new_spacing=spacing)
    mode = p["Interpolation"]
    (dt, _), = env.probe([img])
    if mode == "auto":
        mode = "nearest" if (img.meta.get("is_label") or dt.kind in "iub") else "linear"
    if in_shape in getattr(env, "placeholder_shapes", ()) and (img.meta.get("is_label") or dt.kind in "iu"):
        # labels made on ResampleToModelScale's stand-in for an image without cells: none (as the
        # whole-image label filters return)
        img = env.node("func", [img], func=np.zeros_like, item_id=step.item.item_id, meta=dict(img.meta))[0]
    spacing = tuple(ref.spacing) if ref is not None else output_spacing(img.spacing, in_shape, shape)
    out = resample_value(env, img, shape, 0 if mode == "nearest" else 1, spacing, dict(img.meta),
                         step.item.item_id)
    return [out], []


# ---------------------------------------------------------------------------------------------
# tissue mask
# ---------------------------------------------------------------------------------------------

def _tissue_noise_task(value, lo, hi, shape, channel, spacing, diameter, smoothing):
    """Worker side: :func:`c3dseg.tissue.tissue_noise` of the central box (the whole-image filter's)."""
    from ..filters.segmentation import channel_of
    from ..tissue import tissue_noise

    return tissue_noise(channel_of(evaluate([value], lo, hi, shape)[0], channel), spacing, diameter, smoothing)


def _tissue_block(data, *, channel, spacing, diameter, noise, smoothing, wall_contrast, reach, min_density):
    """One block (with its halo) of the tissue mask, the noise level fixed."""
    from ..filters.segmentation import channel_of
    from ..tissue import tissue_density

    d = tissue_density(channel_of(data, channel), spacing, diameter, noise, smoothing=smoothing,
                       wall_contrast=wall_contrast, reach=reach)
    return (d > min_density).astype(np.uint8)


def _all_tissue(data):
    return np.ones(np.shape(data)[-3:], np.uint8)


def _count_task(block, value):
    from .globals import read_core

    d = read_core(block, value)
    return int(np.count_nonzero(d)), int(d.size)


@register_global("TissueMask")
def _tissue_mask(env, step, images, metas):
    """The whole-image mask block by block: the noise level from the same central box, each block
    with the context the smoothing and the two boxes read (:func:`c3dseg.tissue.tissue_halo`),
    then the tissue fraction (a count over the blocks) for the MinTissueFraction rule."""
    from ..filters.segmentation import mask_diameter, warn_everything
    from ..tissue import tissue_halo

    v = images[0]
    p = step.params
    item = step.item.item_id
    d = mask_diameter(p, v.meta, lambda: estimate_diameter(env, v, channel=p["Channel"], max_voxels=p["MaxVoxels"],
                                                           name=f"{item}-diameter")[0])
    meta = {"is_label": False}
    if not (math.isfinite(d) and d > 0):
        ones, = env.node("func", [v], func=_all_tissue, meta=meta)
        return [ones], []
    shape = shape_of(v)
    lo, hi = central_box(shape, p["MaxVoxels"])
    spacing = tuple(float(s) for s in v.spacing)
    noise = env.rt.gather_small(_tissue_noise_task, v, lo, hi, shape, int(p["Channel"]), spacing, d,
                                float(p["Smoothing"]))
    kw = {"channel": int(p["Channel"]), "spacing": spacing, "diameter": d, "noise": float(noise),
          "smoothing": float(p["Smoothing"]), "wall_contrast": float(p["WallContrast"]),
          "reach": float(p["Reach"]), "min_density": float(p["MinDensity"])}
    mask, = env.node("func", [v], func=_tissue_block, kwargs=kw, meta=meta,
                     halo=tissue_halo(spacing, d, p["Smoothing"], p["Reach"]))
    mask = env.materialise(mask, f"{item}-tissue")
    counts = env.reduce(f"{item}-tissue-count", _count_task, mask)
    n = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    frac = n / total if total else 1.0
    if frac < p["MinTissueFraction"]:
        warn_everything("TissueMask", v.meta.get("basename", item), frac)
        ones, = env.node("func", [v], func=_all_tissue, meta=meta)
        return [ones], []
    log.info("%s: %.1f %% of the image is tissue", item, 100.0 * frac)
    return [mask], []

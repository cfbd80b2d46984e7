"""Blockwise implementations of the filters that need a reduction across blocks.

Each implementation has the signature ``impl(env, step, images, metas) -> (images, metas)``:
``env`` is the run's :class:`~c3dseg.blockwise.executor.Env` (passes over blocks, materialisation),
``step`` the runner's step (``step.params`` parsed, ``step.item``), ``images`` the lazy input values.
It returns lazy (:class:`~c3dseg.blockwise.values.Derived`) or stored values.  Reductions are
passes whose per-block results are combined in the client; the pointwise remainder is a node that
runs the ordinary filter (or algorithm) on each block with the global numbers fixed.

===================================  ======================================================
filter                               blockwise form
===================================  ======================================================
RescaleIntensityImageFilter          extrema (reduction) -> linear map (pointwise); exact
PercentileNormalization              the same regular subsample as the whole-image code,
                                     gathered from the blocks -> percentiles -> map; exact
TorchModel / OnnxModel               input percentiles as above -> the whole volume's tiles,
                                     each predicted once (by the block holding its first
                                     voxel) -> blended per block; exact
VolumeBasedRegionRejectionFilter     connected components across blocks (exact, numbered as
                                     ``ndimage.label``) or label volumes -> keep table; exact
flow tracking / instance filters     :mod:`c3dseg.blockwise.reconstruction`
EstimateCellDiameter                 the same estimate on the same central box, read lazily
ResampleToModelScale /               ``blockwise = "resample"``: output grid from parameters and
ResampleImageFilter                  metadata, written block by block on it
                                     (:mod:`c3dseg.blockwise.resample`); exact
===================================  ======================================================
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

from ..errors import ExecutionError, ParameterError
from ..intensity import rescale_intensity
from .values import Derived, RegionLeaf, Stored, apply_lut, evaluate

log = logging.getLogger("c3dseg")

GLOBAL_IMPLS: dict = {}
#: context (z, y, x) the block passes of a global filter read at least, for filters whose class does
#: not say (``name -> fn(params, spacing)``); used for the smallest valid block size
GLOBAL_HALOS: dict = {}


def register_global(*names):
    def deco(fn):
        for n in names:
            GLOBAL_IMPLS[n] = fn
        return fn
    return deco


# ---------------------------------------------------------------------------------------------
# helpers (worker tasks are top-level functions)
# ---------------------------------------------------------------------------------------------

def read_core(block, value) -> np.ndarray:
    """The value over the block's core (evaluating lazy chains)."""
    return evaluate([value], block.start, block.stop, _shape_of(value))[0]


def _shape_of(value):
    from .values import leaves

    return leaves(value)[0].shape3d


def _extrema_task(block, value):
    d = read_core(block, value)
    if d.dtype.kind not in "iub":
        d = d.astype(np.float64, copy=False)
    if d.ndim == 4:
        return [(d[c].min(), d[c].max()) for c in range(d.shape[0])]
    return [(d.min(), d.max())]


def _combine_extrema(res: dict):
    per = list(res.values())
    n = len(per[0])
    return [min(r[c][0] for r in per) for c in range(n)], [max(r[c][1] for r in per) for c in range(n)]


def subsample_step(n: int, ndim: int, max_samples: int) -> int:
    """The stride of :func:`c3dseg.normalisation._subsample` (1 when no subsampling)."""
    if n <= max_samples:
        return 1
    return int(math.ceil((n / max_samples) ** (1.0 / ndim)))


def _sample_task(block, value, step: int, with_channels: bool):
    """Values at global positions that are multiples of ``step`` (all axes, channels included when
    ``with_channels``): the whole-image regular subsample, restricted to this block."""
    d = read_core(block, value)
    sl = tuple(slice((-s) % step, None, step) for s in block.start)
    if d.ndim == 4:
        lead = slice(None, None, step) if with_channels else slice(None)
        return np.ascontiguousarray(d[(lead,) + sl], dtype=np.float32)
    return np.ascontiguousarray(d[sl], dtype=np.float32)


def gather_sample(env, name, value, *, per_channel: bool, max_samples: int = 1 << 22):
    """The regular subsample ``c3dseg.normalisation.percentile_range`` would take of the whole
    image: one float32 array, or one per channel with ``per_channel``."""
    (dt, lead), = env.probe([value])
    nvox = int(np.prod(env.shape))
    channels = lead[0] if lead else None
    if channels is None:
        step = subsample_step(nvox, 3, max_samples)
        res = env.reduce(name, _sample_task, value, step, False, desc=f"{name}: sample")
        return np.concatenate([r.ravel() for r in res.values()])
    if per_channel:
        step = subsample_step(nvox, 3, max_samples)
        res = env.reduce(name, _sample_task, value, step, False, desc=f"{name}: sample")
        return [np.concatenate([r[c].ravel() for r in res.values()]) for c in range(channels)]
    step = subsample_step(nvox * channels, 4, max_samples)
    res = env.reduce(name, _sample_task, value, step, True, desc=f"{name}: sample")
    return np.concatenate([r.ravel() for r in res.values()])


# ---------------------------------------------------------------------------------------------
# intensity
# ---------------------------------------------------------------------------------------------

def rescale_with(data: np.ndarray, lo, hi) -> np.ndarray:
    """:func:`c3dseg.intensity.rescale_intensity` with given extrema (per channel for CZYX)."""
    if data.ndim == 4:
        return np.stack([rescale_with(c, l_, h_) for c, l_, h_ in zip(data, lo, hi)])
    return rescale_intensity(data, (lo, hi))


@register_global("RescaleIntensityImageFilter")
def _rescale(env, step, images, metas):
    v = images[0]
    res = env.reduce(f"{step.item.item_id}-extrema", _extrema_task, v, desc=f"{step.item.item_id}: extrema")
    lo, hi = _combine_extrema(res)
    (dt, lead), = env.probe([v])
    if not lead:
        lo, hi = lo[0], hi[0]
    if dt.kind not in "iu":
        # the whole-image code takes the extrema of the float32 copy
        lo = np.float32(lo) if np.ndim(lo) == 0 else [np.float32(x) for x in lo]
        hi = np.float32(hi) if np.ndim(hi) == 0 else [np.float32(x) for x in hi]
    out = env.node("func", [v], func=rescale_with, kwargs={"lo": lo, "hi": hi}, item_id=step.item.item_id,
                   meta={"is_label": False})
    return out, []


def _apply_range_channels(data, ranges, clip):
    from ..normalisation import apply_range

    if data.ndim == 4 and isinstance(ranges, list):
        return np.stack([apply_range(c, lo, hi, clip=clip) for c, (lo, hi) in zip(data, ranges)])
    lo, hi = ranges
    return apply_range(data, lo, hi, clip=clip)


@register_global("PercentileNormalization")
def _percentile_normalisation(env, step, images, metas):
    from ..normalisation import percentile_range

    v = images[0]
    p = step.params
    sample = gather_sample(env, f"{step.item.item_id}-sample", v, per_channel=True)
    lo, hi = p["LowerPercentile"], p["UpperPercentile"]
    if isinstance(sample, list):
        ranges = [percentile_range(s, lo, hi) for s in sample]
    else:
        ranges = percentile_range(sample, lo, hi)
    out = env.node("func", [v], func=_apply_range_channels, kwargs={"ranges": ranges, "clip": bool(p["Clip"])},
                   item_id=step.item.item_id, meta={"is_label": False})
    return out, []


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------

def _is_torchscript(path: str) -> bool:
    return path.lower().endswith((".pt", ".pth", ".torchscript"))


@functools.lru_cache(maxsize=4)
def _load_network(path: str, use_gpu: bool, in_channels):
    """The model, loaded once per worker process."""
    if _is_torchscript(path):
        from ..filters.network import _TorchScriptNetwork

        net = _TorchScriptNetwork(path, use_gpu=use_gpu, threads=1)
    else:
        from ..predict import OnnxNetwork

        net = OnnxNetwork(path, use_gpu=use_gpu, threads=1)
    if getattr(net, "in_channels", None) is None and in_channels is not None:
        net.in_channels = int(in_channels)
    return net


def tile_number(plan, index) -> int:
    """Position of the tile at grid ``index`` in the plan's (z-major) order."""
    gz, gy, gx = plan.grid
    return (int(index[0]) * gy + int(index[1])) * gx + int(index[2])


def owned_tiles(plan, block) -> list:
    """The tiles a block predicts: those whose first voxel inside the volume lies in its core (every
    tile has exactly one owner)."""
    out = []
    for t in plan.tiles():
        if all(b0 <= v.start < b1 for v, b0, b1 in zip(t.volume_slices, block.start, block.stop)):
            out.append(t)
    return out


def create_tile_array(path: str, plan, channels: int):
    """The work zarr array of raw tile predictions ``(n_tiles, C, Tz, Ty, Tx)``, one chunk per tile;
    reused when it exists with the same layout (a resumed run)."""
    import os

    import zarr

    shape = (plan.n_tiles, int(channels)) + tuple(plan.tile)
    chunks = (1, int(channels)) + tuple(plan.tile)
    if os.path.exists(os.path.join(path, "zarr.json")):
        try:
            a = zarr.open_array(path, mode="r+")
            if tuple(a.shape) == shape and tuple(a.chunks) == chunks and a.dtype == np.float32:
                return a
        except Exception:
            pass
    return zarr.create_array(path, shape=shape, chunks=chunks, dtype=np.float32, fill_value=0, overwrite=True,
                             zarr_format=3)


def predict_tiles_task(block, *, source, plan, transform, model: str, use_gpu: bool, in_channels, batch_size: int,
                       tiles_path: str, channels: int = 4, flip_axes=()) -> int:
    """Dask task: predict the tiles ``block`` owns (:func:`owned_tiles`), each exactly once, and store
    them raw in the tile array.  Each tile is cut from the input as :func:`c3dseg.tiling.extract_tile`
    cuts it from the whole volume (read per tile, reflect-padded where it leaves the volume) and
    normalised with the whole-volume range; ``flip_axes``: test-time augmentation
    (:class:`~c3dseg.predict.FlipAveraged`).  Memory: one batch of tiles.  Returns the tile count."""
    import zarr

    tiles = owned_tiles(plan, block)
    if not tiles:
        return 0
    net = _load_network(model, use_gpu, in_channels)
    if flip_axes:
        from ..predict import FlipAveraged

        net = FlipAveraged(net, flip_axes)
    arr = zarr.open_array(tiles_path, mode="r+")
    batch, idx = [], []

    def flush():
        preds = np.asarray(net(np.stack(batch)), np.float32)
        for t, p in zip(idx, preds):
            arr[tile_number(plan, t.index)] = p[:channels]
        batch.clear()
        idx.clear()

    for t in tiles:
        part = evaluate([source], [v.start for v in t.volume_slices], [v.stop for v in t.volume_slices],
                        plan.shape)[0]
        part = np.asarray(part)
        if part.ndim == 3:
            part = part[None]
        pads = [(0, 0)] + [(v.start - st, st + n - v.stop) for v, st, n in zip(t.volume_slices, t.start, plan.tile)]
        if any(p != (0, 0) for p in pads):
            part = np.pad(part, pads, mode="reflect")
        batch.append(np.asarray(transform(part) if transform is not None else part, dtype=np.float32))
        idx.append(t)
        if len(batch) == max(1, int(batch_size)):
            flush()
    if batch:
        flush()
    return len(tiles)


def blend_tiles_task(block, *, plan, blending: str, tiles_path: str, out_paths, channels: int = 4) -> None:
    """Dask task: the blended prediction over the block's core from the stored tiles that meet it,
    added in the plan's order with the plan's weights: every voxel gets the very sum the
    whole-volume :class:`~c3dseg.tiling.TileAccumulator` computes.  Memory: the block and the part
    of one tile inside it."""
    import zarr

    weights = _plan_weights(plan, blending)
    tiles = zarr.open_array(tiles_path, mode="r")
    out = np.zeros((channels,) + block.shape, np.float32)
    for t in plan.tiles():
        lo = [max(v.start, b) for v, b in zip(t.volume_slices, block.start)]
        hi = [min(v.stop, b) for v, b in zip(t.volume_slices, block.stop)]
        if any(h <= l_ for l_, h in zip(lo, hi)):
            continue
        src = tuple(slice(l_ - st, h_ - st) for l_, h_, st in zip(lo, hi, t.start))
        dst = tuple(slice(l_ - b, h_ - b) for l_, h_, b in zip(lo, hi, block.start))
        p = np.asarray(tiles[(tile_number(plan, t.index), slice(0, channels)) + src])
        wz, wy, wx = (weights[a][t.index[a]][src[a]] for a in range(3))
        w = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
        out[(slice(None),) + dst] += p * w
    if len(out_paths) == 1:
        zarr.open_array(out_paths[0], mode="r+")[(slice(None),) + block.core] = out
    else:
        for c, path in enumerate(out_paths):
            zarr.open_array(path, mode="r+")[block.core] = out[c]
    return None


_WEIGHTS: dict = {}


def _plan_weights(plan, blending):
    key = (plan, blending)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        _WEIGHTS[key] = plan.axis_weights(blending)
    return _WEIGHTS[key]


def _consumer_blending(env, item_id: str) -> str:
    """Blending of the TileMerger that blends an OnnxModel's tiles (cosine when none is found)."""
    plan = getattr(env, "plan", None)
    if plan is None:
        return "cosine"
    for s in plan.steps:
        if s.item.name == "TileMerger" and any(r.source == item_id for r in s.item.inputs):
            return s.params.get("Blending", "cosine")
    return "cosine"


@register_global("TorchModel", "OnnxModel")
def _network(env, step, images, metas):
    """Tiled prediction with the whole volume's tile plan, normalisation and blending, each tile
    predicted once: a pass where every block predicts the tiles it owns (:func:`owned_tiles`) into
    a tile array, then a pass where every block blends the stored tiles that meet it
    (:func:`blend_tiles_task`).  The stored result equals the whole-volume prediction; the tile
    array is removed once blended.  OnnxModel gives one 4-channel image (TileMerger splits it),
    TorchModel four images."""
    import shutil

    from ..filters.base import Context, resolve_relative
    from ..predict import AUGMENTATIONS, make_transform
    from .components import create_block_array

    p = dict(step.params)
    item = step.item.item_id
    v = next((i for i in images if i is not None), None)
    if v is None:
        raise ExecutionError("the network needs an input image")
    model = resolve_relative(p.get("ModelPath", ""), env.base_dir)
    if not model:
        raise ParameterError("no model given: set ModelPath", key="ModelPath")
    net = _load_network(model, False, p.get("NumInputChannels"))
    flt = step.cls(step.params, Context(item_id=item, base_dir=env.base_dir))
    plan = flt._plan(env.shape, net.size_divisor, getattr(net, "fixed_shape", (None, None, None)))
    mode = p.get("Normalization", "auto")
    settings = net.normalisation()
    eff = settings["mode"] if mode == "auto" else mode
    transform = None
    if eff not in ("none", ""):
        lo_p, hi_p = p.get("LowerPercentile", -1.0), p.get("UpperPercentile", -1.0)
        pct = (lo_p, hi_p) if lo_p is not None and hi_p is not None and lo_p >= 0 and hi_p >= 0 else None
        sample = gather_sample(env, f"{item}-sample", v, per_channel=False)
        transform = make_transform(net if not _is_torchscript(model) else None, sample, mode=mode, percentiles=pct)
    blending = p.get("Blending") or _consumer_blending(env, item)
    channels = 4
    meta = dict(v.meta, is_label=False, model_path=model, model_metadata=dict(getattr(net, "metadata", {}) or {}))
    meta = {k: x for k, x in meta.items() if k not in ("dtype_fixed", "lead")}
    if step.cls.name == "OnnxModel":
        out_paths = [env.rt.path("arrays", f"{item}-net.zarr")]
        create_block_array(out_paths[0], env.grid, np.float32, channels)
    else:
        out_paths = [env.rt.path("arrays", f"{item}-net{c + 1}.zarr") for c in range(channels)]
        for path in out_paths:
            create_block_array(path, env.grid, np.float32)
    tiles_path = env.rt.path("arrays", f"{item}-tiles.zarr")
    blend = f"{item}-blend"
    if not all(env.rt.done(blend, b) for b in env.grid):
        create_tile_array(tiles_path, plan, channels)
        res = env.rt.run_pass(f"{item}-tiles", predict_tiles_task, source=v, plan=plan, transform=transform,
                              model=model, use_gpu=bool(p.get("UseGPU", False)),
                              in_channels=p.get("NumInputChannels"), batch_size=int(p.get("BatchSize", 1)),
                              tiles_path=tiles_path, channels=channels,
                              flip_axes=AUGMENTATIONS[p.get("TestTimeAugmentation", "none") or "none"],
                              desc=f"{item}: predict {plan.n_tiles} tile(s)")
        env.rt.stats[f"{item}-tiles"]["tiles"] = int(sum(res.values()))
        env.rt.run_pass(blend, blend_tiles_task, plan=plan, blending=blending, tiles_path=tiles_path,
                        out_paths=out_paths, channels=channels, collect=False, desc=f"{item}: blend tiles")
    shutil.rmtree(tiles_path, ignore_errors=True)
    log.info("%s: %d tile(s) of %s (grid %s), each predicted once, blended into %d block(s)", item, plan.n_tiles,
             "x".join(map(str, plan.tile)), "x".join(map(str, plan.grid)), len(env.grid))
    if len(out_paths) == 1:
        return [Stored(out_paths[0], "array", tuple(env.shape), "<f4", channels, tuple(v.spacing), meta)], []
    return [Stored(path, "array", tuple(env.shape), "<f4", None, tuple(v.spacing), dict(meta)) for path in out_paths], []



# ---------------------------------------------------------------------------------------------
# region rejection (connected components)
# ---------------------------------------------------------------------------------------------

def _nonzero_core(block, value):
    d = read_core(block, value)
    if d.ndim != 3:
        raise ExecutionError(f"expects a single-channel (Z, Y, X) image, got channels {d.shape[:-3]}")
    return d != 0


def _label_counts_task(block, value):
    d = read_core(block, value)
    if d.dtype.kind == "f":
        if d.size and (not np.isfinite(d).all() or d.min() < 0 or not np.array_equal(d, np.round(d))):
            raise ExecutionError("expects a label image (non-negative integers)")
        d = d.astype(np.int64)
    elif d.dtype.kind == "i" and d.size and d.min() < 0:
        raise ExecutionError("expects a label image (non-negative integers), got negative values")
    ids, counts = np.unique(d, return_counts=True)
    return ids.astype(np.int64), counts.astype(np.int64)


def merge_counts(res: dict) -> tuple[np.ndarray, np.ndarray]:
    """Sum sparse per-block (ids, counts) tables: (ids increasing, counts)."""
    ids = np.concatenate([r[0] for r in res.values()])
    cnt = np.concatenate([r[1] for r in res.values()])
    u, inv = np.unique(ids, return_inverse=True)
    return u, np.bincount(inv, weights=cnt, minlength=len(u)).astype(np.int64)


def _lut_sparse(data, ids_path, new_path, dtype):
    """Map label values through a sparse table (ids increasing -> new values; others -> 0)."""
    from .components import load_table

    ids = load_table(ids_path)
    new = load_table(new_path)
    d = np.asarray(data).astype(np.int64, copy=False)
    pos = np.searchsorted(ids, d)
    pos = np.clip(pos, 0, max(0, len(ids) - 1))
    out = np.zeros(d.shape, dtype)
    if len(ids):
        hit = ids[pos] == d
        out[hit] = new[pos[hit]]
    return out


@register_global("VolumeBasedRegionRejectionFilter")
def _region_rejection(env, step, images, metas):
    from ..labels import label_dtype
    from .components import label_components_blockwise, save_table

    p = step.params
    item = step.item.item_id
    v = images[0]
    lo, hi = p["MinimumVolume"], p["MaximumVolume"]

    def ok(size):
        keep = np.ones(len(size), bool)
        if lo is not None and lo >= 0:
            keep &= size >= lo
        if hi is not None and hi >= 0:
            keep &= size <= hi
        return keep

    if p["BinaryInput"]:
        comps = label_components_blockwise(env.rt, f"{item}-cc", functools.partial(_nonzero_core, value=v),
                                           fully_connected=bool(p["FullyConnected"]),
                                           select=lambda size, flag: ok(size))
        n = comps.n
        dt = np.dtype(label_dtype(n, warn=bool(p["LabelOutput"]))) if p["LabelOutput"] else np.dtype(np.uint8)
        out = env.node("func", [RegionLeaf(env.shape, v.spacing)], func=_cc_region,
                       kwargs={"comps": comps, "grid": env.grid, "dtype": dt.str, "labels": bool(p["LabelOutput"])},
                       item_id=item, meta=dict(v.meta, is_label=bool(p["LabelOutput"]), dtype_fixed=dt.str, lead=()))
        return out, []
    res = env.reduce(f"{item}-counts", _label_counts_task, v, desc=f"{item}: label volumes")
    ids, counts = merge_counts(res)
    keep = ok(counts) & (ids > 0)
    new = np.zeros(len(ids), np.int64)
    new[keep] = np.arange(1, int(keep.sum()) + 1)
    n = int(keep.sum())
    if not p["LabelOutput"]:
        new = (new > 0).astype(np.int64)
    ids_path = env.rt.path("tables", f"{item}-ids.npy")
    new_path = env.rt.path("tables", f"{item}-new.npy")
    save_table(ids_path, ids)
    save_table(new_path, new)
    dt = np.dtype(label_dtype(n)) if p["LabelOutput"] else np.dtype(np.uint8)
    out = env.node("func", [v], func=_lut_sparse, kwargs={"ids_path": ids_path, "new_path": new_path,
                                                          "dtype": dt.str},
                   item_id=item, meta={"is_label": bool(p["LabelOutput"]), "dtype_fixed": dt.str, "lead": ()})
    return out, []


def _cc_region(region, *, comps, grid, dtype, labels):
    """Node function: global component ids (or a 0/1 mask of them) over the evaluated region."""
    from .components import global_labels

    ids = global_labels(region, comps, grid)
    if labels:
        return ids.astype(dtype)
    return (ids > 0).astype(dtype)


from . import reconstruction as _reconstruction  # noqa: E402,F401  (registers the tracking filters)
from . import resample as _resample  # noqa: E402,F401  (registers the grid-changing filters)

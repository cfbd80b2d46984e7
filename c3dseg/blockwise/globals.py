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
TorchModel / OnnxModel               input percentiles as above -> the model with
                                     Normalization=none on each block grown by its halo
VolumeBasedRegionRejectionFilter     connected components across blocks (exact, numbered as
                                     ``ndimage.label``) or label volumes -> keep table; exact
flow tracking / instance filters     :mod:`c3dseg.blockwise.reconstruction`
===================================  ======================================================
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..errors import ExecutionError, ParameterError
from .values import Derived, RegionLeaf, Stored, apply_lut, evaluate

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
    lo, hi = float(lo), float(hi)
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        out_lo, out_hi, out_dtype = float(info.min), float(info.max), data.dtype
    else:
        out_lo, out_hi, out_dtype = 0.0, 1.0, np.float32
    work = np.array(data, dtype=np.float64 if data.dtype.itemsize > 2 and data.dtype.kind in "iu"
                    else np.float32, copy=True)
    if hi <= lo:
        return np.full(data.shape, out_lo, dtype=out_dtype)
    work -= lo
    work *= (out_hi - out_lo) / (hi - lo)
    work += out_lo
    if np.dtype(out_dtype).kind in "iu":
        np.rint(work, out=work)
        np.clip(work, out_lo, out_hi, out=work)
    return work.astype(out_dtype)


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

def network_halo(params: dict, size_divisor: int = 8) -> tuple[int, int, int]:
    """Context of a tiled network on a block: the tile overlap per axis (at least 16 voxels,
    rounded up to the network's size divisor), so that the core's voxels are predicted away from
    the block's artificial edges, as far from tile borders as in the whole-image run."""
    from ..tiling import stride_to_overlap

    tile = (params.get("PatchDepth", -1), params.get("PatchHeight", -1), params.get("PatchWidth", -1))
    stride = float(params.get("PatchStride", 0) or 0)
    out = []
    for t in tile:
        if stride > 0 and t and t > 0:
            ov = stride_to_overlap(int(t), stride)
        else:
            ov = int(params.get("PatchOverlap", 16))
        ov = max(16, ov)
        out.append(int(math.ceil(ov / size_divisor) * size_divisor))
    return tuple(out)


@register_global("TorchModel", "OnnxModel")
def _network(env, step, images, metas):
    from ..predict import make_transform

    p = dict(step.params)
    item = step.item.item_id
    v = next((i for i in images if i is not None), None)
    if v is None:
        raise ExecutionError("the network needs an input image")
    mode = p.get("Normalization", "auto")
    transform = None
    path = p.get("ModelPath", "")
    from ..filters.base import resolve_relative

    full = resolve_relative(path, env.base_dir)
    if not full.lower().endswith((".pt", ".pth", ".torchscript")) or mode not in ("auto", "none"):
        net = None
        if not full.lower().endswith((".pt", ".pth", ".torchscript")):
            from ..predict import OnnxNetwork

            net = OnnxNetwork(full, use_gpu=False, threads=1)
        lo_p, hi_p = p.get("LowerPercentile", -1.0), p.get("UpperPercentile", -1.0)
        pct = (lo_p, hi_p) if lo_p is not None and hi_p is not None and lo_p >= 0 and hi_p >= 0 else None
        settings = net.normalisation() if net is not None else {"mode": "none"}
        eff = settings["mode"] if mode == "auto" else mode
        if eff not in ("none", ""):
            sample = gather_sample(env, f"{item}-sample", v, per_channel=False)
            transform = make_transform(net, sample, mode=mode, percentiles=pct)
    inputs = [v]
    if transform is not None:
        inputs = env.node("func", [v], func=transform, item_id=item, meta={"is_label": False})
    p["Normalization"] = "none"
    cls = step.cls
    halo = tuple(step.cls(step.params).halo(env.spacing))
    if not any(halo):
        halo = network_halo(p)
    n_out = len(cls.ports("output", "image"))
    # TorchModel has 4 optional image inputs wired to the same image: give it the one
    outs = env.node("filter", list(inputs), halo=halo, filter_name=cls.name, params=p, item_id=item,
                    meta={"is_label": False}, n_outputs=n_out)
    return outs, []


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
    from .components import label_components_blockwise

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
    np.save(ids_path, ids)
    np.save(new_path, new)
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

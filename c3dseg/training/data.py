"""Training data: pairs of image and label stacks, their targets, and patch sampling.

Pairs come from two folders matched by name (or, when the names differ, by sorted order) or from a
CSV list (``image;label`` or ``image,label`` per line, optional header, paths relative to the CSV,
optional third column: spacing ``z x y`` as ``"2.0 0.5 0.5"``).  Images are read with
:func:`c3dseg.io.read_image` (TIFF, OME-TIFF, NRRD, NIfTI, MHA/MHD), with their spacing.

Each volume is loaded once into a :class:`Volume`: the image normalised exactly as the predictor
will normalise it (:mod:`c3dseg.normalisation`, per image), the labels, and the whole-volume targets
``(4, Z, Y, X)`` (foreground, flow z, y, x) from :func:`c3dseg.flows.labels_to_prediction`.  Patches
are then sampled by :class:`PatchSampler` with the augmentations of :mod:`c3dseg.training.augment`;
targets of geometrically resampled patches are recomputed from the resampled labels, so flows are
never corrupted by augmentation.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import InputError, ParameterError
from ..normalisation import apply_range, percentile_range

log = logging.getLogger("c3dseg")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def read_volume(path: str, spacing: Sequence[float] | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read one 3D stack: ``(data, spacing_zyx_um)`` (the one place files are read)."""
    from ..io import read_image

    img = read_image(path, spacing=spacing)
    data = img.data
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise InputError(f"expected a single-channel 3D stack, got shape {data.shape}", file=path)
        data = data[0]
    return data, tuple(img.spacing)


def _image_files(folder: str) -> list[str]:
    from ..io import is_image_file

    if not os.path.isdir(folder):
        raise InputError(f"folder not found: {folder}")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if not f.startswith(".") and is_image_file(os.path.join(folder, f)))
    if not files:
        raise InputError(f"no image files in {folder}")
    return files


def _stem(path: str) -> str:
    from ..io import strip_image_extension

    return strip_image_extension(os.path.basename(path))


def find_pairs(images: str, labels: str) -> list[tuple[str, str]]:
    """Image/label pairs from two folders.

    Files are matched by name without extension; when the two folders do not hold the same names
    (e.g. ``img_01.tif`` / ``mask_01.tif``) they are paired in sorted order, which needs equal
    counts.
    """
    imgs, labs = _image_files(images), _image_files(labels)
    by_stem = {_stem(p): p for p in labs}
    if all(_stem(p) in by_stem for p in imgs):
        return [(p, by_stem[_stem(p)]) for p in imgs]
    if len(imgs) != len(labs):
        raise InputError(f"{len(imgs)} images in {images} but {len(labs)} label files in {labels}, and the "
                         f"names do not match")
    log.info("pairing %d images with labels in sorted order (names differ)", len(imgs))
    return list(zip(imgs, labs))


def read_pair_list(csv_path: str) -> list[tuple[str, str, tuple[float, float, float] | None]]:
    """``(image, label, spacing or None)`` rows from a CSV list (``;`` or ``,`` separated)."""
    if not os.path.isfile(csv_path):
        raise InputError(f"pair list not found: {csv_path}")
    base = os.path.dirname(os.path.abspath(csv_path))
    rows = []
    with open(csv_path, newline="") as fh:
        text = fh.read()
    delim = ";" if ";" in text else ","
    for k, row in enumerate(csv.reader(text.splitlines(), delimiter=delim), 1):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if len(row) < 2:
            raise InputError(f"line {k}: expected 'image{delim}label', got {row}", file=csv_path)
        if k == 1 and row[0].lower() in ("image", "images", "img", "raw"):
            continue  # header
        sp = None
        if len(row) > 2 and row[2]:
            try:
                sp = tuple(float(v) for v in row[2].replace(",", " ").split())
            except ValueError:
                raise InputError(f"line {k}: spacing must be 3 numbers 'z y x', got {row[2]!r}",
                                 file=csv_path) from None
            if len(sp) != 3:
                raise InputError(f"line {k}: spacing must be 3 numbers 'z y x', got {row[2]!r}", file=csv_path)
        img, lab = (p if os.path.isabs(p) else os.path.join(base, p) for p in row[:2])
        rows.append((img, lab, sp))
    if not rows:
        raise InputError("the pair list is empty", file=csv_path)
    return rows


def list_pairs(source: dict, base_dir: str = ".") -> list[tuple[str, str, tuple | None]]:
    """Pairs from a config entry ``{"images": DIR, "labels": DIR}`` or ``{"csv": FILE}``."""
    def res(p):
        p = os.path.expanduser(str(p))
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    if source.get("csv"):
        return read_pair_list(res(source["csv"]))
    if source.get("images") and source.get("labels"):
        return [(i, l, None) for i, l in find_pairs(res(source["images"]), res(source["labels"]))]
    raise InputError("a data source needs 'images' and 'labels' folders or a 'csv' list")


# ---------------------------------------------------------------------------------------------
# volumes
# ---------------------------------------------------------------------------------------------

@dataclass
class Volume:
    """One training volume, ready for sampling.

    Attributes
    ----------
    image : float32 (Z, Y, X), normalised
    labels : uint16 (int32 past 65535 cells) (Z, Y, X)
    targets : float16 (4, Z, Y, X): foreground, flow z, y, x (compact; patches are float32)
    spacing : (z, y, x) um
    fg_points : int32 (K, 3) a random sample of foreground voxel coordinates
    name : str
    cell_diameters_um : the cells of ``labels`` (as cropped: cells cut by the crop count smaller)
    median_diameter_um : the volume's median cell diameter before any crop, as
        :func:`volume_median_diameter` measures it (what ``EstimateCellDiameter`` estimates)
    """

    image: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    spacing: tuple[float, float, float]
    fg_points: np.ndarray
    name: str = ""
    cell_diameters_um: np.ndarray = field(default_factory=lambda: np.zeros(0))
    median_diameter_um: float = float("nan")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)


def equivalent_diameters(labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Volume-equivalent sphere diameter (um) of every cell."""
    counts = np.bincount(labels.ravel().astype(np.int64))[1:]
    counts = counts[counts > 0]
    vox = float(np.prod(spacing))
    return (6.0 * counts * vox / np.pi) ** (1.0 / 3.0)


def volume_median_diameter(labels: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """A volume's median cell diameter (um) as the diameter estimate's target defines it: the
    median equivalent-sphere diameter of the cells that touch no face of the volume
    (:func:`c3dseg.synthesis.median_cell_diameter`)."""
    from ..synthesis import median_cell_diameter

    return median_cell_diameter(labels, spacing)


def model_scale_spacing(labels: np.ndarray, spacing, resample_to) -> float:
    """The isotropic spacing (um) ``resample_to = {"cell_diameter_voxels": D}`` brings a volume to:
    its median cell, face-cut cells included, D voxels across; NaN without cells."""
    diam = equivalent_diameters(labels, spacing)
    if not diam.size:
        return float("nan")
    return float(np.median(diam)) / float(resample_to["cell_diameter_voxels"])


def model_scale_diameter(labels: np.ndarray, spacing, resample_to) -> tuple[float, float]:
    """``(iso, d)``: :func:`model_scale_spacing` and the volume's median diameter
    (:func:`volume_median_diameter`) in voxels of that grid; NaNs without cells."""
    iso = model_scale_spacing(labels, spacing, resample_to)
    if not np.isfinite(iso):
        return iso, float("nan")
    return iso, volume_median_diameter(labels, spacing) / iso


def make_targets(labels: np.ndarray, targets_cfg: dict, spacing=None) -> np.ndarray:
    """``(4, Z, Y, X)`` float32 targets of a label image (one place for the flow settings)."""
    from ..flows import labels_to_prediction

    scale = targets_cfg.get("flow_scale", "adaptive")
    # a numeric scale is in voxels, or in micrometres with flow_scale_um
    use_spacing = bool(targets_cfg.get("flow_scale_um")) and not isinstance(scale, str)
    return labels_to_prediction(labels, targets_cfg.get("flow_type", "tanh"),
                                foreground=targets_cfg.get("foreground", "union"), scale=scale,
                                spacing=spacing if use_spacing else None)


def normalise_image(data: np.ndarray, norm_cfg: dict) -> np.ndarray:
    """Normalise an image exactly as the exported model's metadata tells the predictor to."""
    mode = norm_cfg.get("mode", "percentile")
    if mode == "none":
        return np.asarray(data, dtype=np.float32)
    if mode == "minmax":
        lo, hi = percentile_range(data, 0.0, 100.0)
    elif mode == "percentile":
        lo, hi = percentile_range(data, float(norm_cfg.get("lower", 1.0)), float(norm_cfg.get("upper", 99.8)))
    else:
        raise ValueError(f"unknown normalisation mode {mode!r} (percentile, minmax, none)")
    return apply_range(data, lo, hi, clip=bool(norm_cfg.get("clip", False)))


def _resample(data: np.ndarray, factors, order: int) -> np.ndarray:
    from scipy import ndimage as ndi

    if all(abs(f - 1.0) < 1e-6 for f in factors):
        return data
    return ndi.zoom(data, factors, order=order, mode="nearest", grid_mode=True)


CROP_MODES = ("centre", "random")


def _crop_centre(lab: np.ndarray, mode: str, seed: int) -> list[float]:
    """Where a ``max_shape`` crop is centred: the labelled cells' bounding box (``centre``), or a
    labelled voxel drawn with ``seed`` (``random``: the crop keeps tissue, and where that voxel
    lies near the tissue's edge, the background around it, which the network must learn too)."""
    idx = np.nonzero(lab)
    if not idx[0].size:
        return [n / 2 for n in lab.shape]
    if mode == "random":
        k = int(np.random.default_rng([seed, 7919]).integers(idx[0].size))
        return [float(i[k]) for i in idx]
    return [(int(i.min()) + int(i.max())) // 2 for i in idx]


def _crop_slices(shape, max_shape, centre) -> tuple[slice, ...]:
    """The box of at most ``max_shape`` centred on ``centre`` (kept inside ``shape``)."""
    sl = []
    for c, n, m in zip(centre, shape, max_shape):
        m = min(int(m), n)
        start = min(max(0, int(round(c)) - m // 2), n - m)
        sl.append(slice(start, start + m))
    return tuple(sl)


def _crop_around_cells(img: np.ndarray, lab: np.ndarray, max_shape, centre=None) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_shape``, centred on ``centre`` (default: the labelled cells' bounding box)."""
    if all(n <= m for n, m in zip(lab.shape, max_shape)):
        return img, lab
    sl = _crop_slices(lab.shape, max_shape, _crop_centre(lab, "centre", 0) if centre is None else centre)
    return img[sl], lab[sl]


_CACHE_VERSION = 1


def _cache_file(cache_dir: str | None, label_path: str, spacing, targets_cfg, resample_to) -> str | None:
    """Where the targets of a label file are cached (None: no cache).  The key covers the file's
    path, size and modification time and every setting the targets depend on."""
    if not cache_dir:
        return None
    import hashlib
    import json

    st = os.stat(label_path)
    key = json.dumps([_CACHE_VERSION, os.path.abspath(label_path), st.st_size, st.st_mtime_ns,
                      None if spacing is None else [float(v) for v in spacing],
                      {k: v for k, v in sorted(targets_cfg.items())},
                      resample_to], default=str, sort_keys=True)
    h = hashlib.sha1(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{_stem(label_path)}-{h}.npy")


def _cached_targets(path, labels, targets_cfg, spacing):
    if path and os.path.isfile(path):
        try:
            t = np.load(path)
            if t.shape == (4, *labels.shape):
                return t
        except (OSError, ValueError):
            pass  # unreadable cache entry: recompute
    t = make_targets(labels, targets_cfg, spacing).astype(np.float16)
    if path:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}.npy"
            np.save(tmp, t)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot cache targets in %s: %s", os.path.dirname(path), e)
    return t


def load_volume(image_path: str, label_path: str, *, spacing=None, norm_cfg: dict | None = None,
                targets_cfg: dict | None = None, resample_to=None, max_fg_points: int = 200_000,
                seed: int = 0, cache_dir: str | None = None) -> Volume:
    """Read, check, (optionally) resample, normalise and compute targets for one pair.

    ``cache_dir``: keep the (costly, for heat flows) targets there as ``.npy`` files, reused when
    the label file and the settings are unchanged (e.g. on ``--resume``)."""
    norm_cfg = norm_cfg or {}
    targets_cfg = targets_cfg or {}
    img, sp_img = read_volume(image_path, spacing)
    lab, sp_lab = read_volume(label_path, spacing)
    if img.shape != lab.shape:
        raise InputError(f"image {os.path.basename(image_path)} has shape {img.shape} but its labels "
                         f"{os.path.basename(label_path)} have {lab.shape}", file=label_path)
    if lab.dtype.kind == "f":
        if np.any(lab != np.round(lab)):
            raise InputError("labels must be integers", file=label_path)
    if lab.dtype.kind not in "iub" and lab.dtype.kind != "f":
        raise InputError(f"labels must be integers, got {lab.dtype}", file=label_path)
    if lab.size and lab.min() < 0:
        raise InputError("labels must not be negative", file=label_path)
    lab = lab.astype(np.uint16 if (lab.size and lab.max() <= 65535) else np.int32)  # compact in memory
    spacing_used = sp_img
    resample_cfg = resample_to  # as configured (the cache key)
    max_shape = None
    median_um = volume_median_diameter(lab, sp_img) if lab.any() else float("nan")
    if isinstance(resample_to, dict):  # {"cell_diameter_voxels": D}: isotropic, median cell D voxels across
        max_shape = resample_to.get("max_shape")
        crop = resample_to.get("crop", "centre")
        if crop not in CROP_MODES:
            raise ParameterError(f"expected one of {'|'.join(CROP_MODES)}, got {crop!r}", key="data.resample_to.crop")
        iso = model_scale_spacing(lab, sp_img, resample_to)
        resample_to = (iso, iso, iso) if np.isfinite(iso) else None
    if resample_to is not None:
        factors = [s / t for s, t in zip(sp_img, resample_to)]
        centre = None
        if max_shape is not None:  # crop before resampling so that memory stays bounded
            centre = _crop_centre(lab, crop, seed)
            first = [int(np.ceil(m / f)) + 2 for m, f in zip(max_shape, factors)]
            box = _crop_slices(lab.shape, first, centre)
            img, lab = img[box], lab[box]
            centre = [(c - b.start + 0.5) * f - 0.5 for c, b, f in zip(centre, box, factors)]
        img = _resample(np.asarray(img, np.float32), factors, 1)
        lab = _resample(lab, factors, 0)
        if max_shape is not None:
            img, lab = _crop_around_cells(img, lab, max_shape, centre if crop == "random" else None)
        spacing_used = tuple(float(t) for t in resample_to)
    image = normalise_image(img, norm_cfg)
    # float16 in memory (half the size; flows in (-1, 1) keep ~1e-3 precision); patches are float32
    cache = _cache_file(cache_dir, label_path, spacing, targets_cfg, resample_cfg)
    targets = _cached_targets(cache, lab, targets_cfg, spacing_used)
    fg = np.flatnonzero(lab.ravel() > 0)
    rng = np.random.default_rng(seed)
    if fg.size > max_fg_points:
        fg = rng.choice(fg, max_fg_points, replace=False)
    pts = np.stack(np.unravel_index(fg, lab.shape), axis=1).astype(np.int32) if fg.size else np.zeros((0, 3), np.int32)
    if not fg.size:
        log.warning("%s: no labelled cell", os.path.basename(label_path))
    return Volume(image=image, labels=lab, targets=targets, spacing=tuple(spacing_used), fg_points=pts,
                  name=os.path.basename(image_path), cell_diameters_um=equivalent_diameters(lab, spacing_used),
                  median_diameter_um=median_um)


def load_volumes(pairs, *, spacing=None, norm_cfg=None, targets_cfg=None, resample_to=None,
                 progress: bool = False, cache_dir: str | None = None) -> list[Volume]:
    vols = []
    it = pairs
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(pairs, desc="loading", unit="vol", leave=False)
        except ImportError:  # pragma: no cover
            pass
    for k, (img, lab, sp) in enumerate(it):
        vols.append(load_volume(img, lab, spacing=sp or spacing, norm_cfg=norm_cfg, targets_cfg=targets_cfg,
                                cache_dir=cache_dir,
                                resample_to=resample_to, seed=k))
    return vols


def data_summary(volumes: Sequence[Volume]) -> dict[str, Any]:
    """Spacing and median cell diameter of a training set (for the model's metadata).

    ``median_cell_diameter_voxels`` (the scale ``ResampleToModelScale`` brings inputs to) is the
    median over the volumes of each volume's median diameter in voxels of its training grid,
    measured as the diameter estimate's target (interior cells, before any crop), so that an input
    whose estimate is right reaches the scale the network was trained at.
    ``pooled_cell_diameter_voxels``: the median over all training cells as cropped (cells cut by
    the crop count, so it is lower; before 2026-12-01 this was stored as the scale)."""
    sp = np.median(np.array([v.spacing for v in volumes], dtype=np.float64), axis=0)
    d = np.concatenate([v.cell_diameters_um for v in volumes]) if volumes else np.zeros(0)
    vox = np.concatenate([v.cell_diameters_um / np.cbrt(np.prod(v.spacing)) for v in volumes]) if volumes \
        else np.zeros(0)
    per_volume = np.array([v.median_diameter_um / np.cbrt(np.prod(v.spacing)) for v in volumes], np.float64)
    per_volume = per_volume[np.isfinite(per_volume)]
    return {"spacing_um": [float(s) for s in sp],
            "median_cell_diameter_um": float(np.median(d)) if d.size else float("nan"),
            "median_cell_diameter_voxels": float(np.median(per_volume)) if per_volume.size else float("nan"),
            "pooled_cell_diameter_voxels": float(np.median(vox)) if vox.size else float("nan"),
            "n_volumes": len(volumes), "n_cells": int(d.size)}


def rescan_scale(label_paths: Sequence[str], resample_to: dict, spacing=None) -> dict[str, Any]:
    """``median_cell_diameter_voxels`` of :func:`data_summary` from the training label files alone
    (``c3d-export --rescan-labels``: correct the scale of a model trained before the fix)."""
    vals = []
    for path in label_paths:
        lab, sp = read_volume(path, spacing)
        iso, d = model_scale_diameter(np.asarray(lab), sp, resample_to)
        if np.isfinite(d):
            vals.append(d)
    if not vals:
        raise InputError("no labelled cell in the label files given", key="--rescan-labels")
    return {"median_cell_diameter_voxels": float(np.median(vals)), "rescanned_volumes": len(vals)}


# ---------------------------------------------------------------------------------------------
# patch sampling
# ---------------------------------------------------------------------------------------------

def crop_padded(arr: np.ndarray, start: Sequence[int], size: Sequence[int], *, mode: str = "constant",
                ) -> np.ndarray:
    """``arr[..., start:start+size]`` over the last 3 axes, padded where it leaves the array."""
    from ..tiling import extract_tile

    return extract_tile(arr, start, size, mode=mode)


class PatchSampler:
    """Draws training patches ``(image (1, P...), targets (4, P...), valid (P...))``.

    Parameters
    ----------
    volumes : list of Volume
    patch_size : 3 ints
    augmenter : c3dseg.training.augment.Augmenter, optional
    foreground_bias : float
        Probability that a patch is centred (with jitter) on a random foreground voxel rather
        than drawn uniformly (0.8).
    targets_cfg : dict
        Flow settings for targets recomputed after geometric augmentation.
    context : int
        Margin (voxels) around a resampled patch used when its targets are recomputed, so cells
        cut by the patch border keep their true centre (24).
    seed : int
        Base seed: patch ``k`` uses ``default_rng([seed, k])``, so a resumed run draws the same
        patches whatever was prefetched.
    """

    def __init__(self, volumes: Sequence[Volume], patch_size, *, augmenter=None, foreground_bias: float = 0.8,
                 targets_cfg: dict | None = None, context: int = 24, seed: int = 0):
        if not volumes:
            raise InputError("no training volumes")
        self.volumes = list(volumes)
        self.patch = tuple(int(p) for p in patch_size)
        self.augmenter = augmenter
        self.fg_bias = float(foreground_bias)
        self.targets_cfg = dict(targets_cfg or {})
        self.context = int(context)
        self.seed = int(seed)
        sizes = np.array([np.prod(v.shape) for v in self.volumes], dtype=np.float64)
        self.weights = sizes / sizes.sum()  # bigger volumes are drawn more often

    def _start(self, rng, vol: Volume, window) -> list[int]:
        shape = vol.shape
        if len(vol.fg_points) and rng.random() < self.fg_bias:
            centre = vol.fg_points[rng.integers(len(vol.fg_points))]
            jitter = [rng.integers(-w // 4, w // 4 + 1) for w in window]
            start = [int(c) + j - w // 2 for c, j, w in zip(centre, jitter, window)]
        else:
            start = [int(rng.integers(0, max(1, s - w + 1))) for s, w in zip(shape, window)]
        # keep the window inside the volume where it fits; centre it where it does not
        out = []
        for s, w, st in zip(shape, window, start):
            out.append(min(max(st, 0), s - w) if s >= w else -((w - s) // 2))
        return out

    def sample(self, k: int):
        """Patch number ``k``: ``(image (1, P...), targets (4, P...), valid (P...) bool)``."""
        rng = np.random.default_rng([self.seed, int(k)])
        vol = self.volumes[int(rng.choice(len(self.volumes), p=self.weights))]
        aug = self.augmenter
        geo = aug.draw_geometry(rng, vol.spacing) if aug is not None else None
        if geo is None:
            start = self._start(rng, vol, self.patch)
            image = crop_padded(vol.image, start, self.patch, mode="reflect")
            targets = crop_padded(vol.targets, start, self.patch)
            labels = crop_padded(vol.labels, start, self.patch)
            valid = crop_padded(np.ones(vol.shape, bool), start, self.patch)
        else:
            c = self.context
            outer = tuple(p + 2 * c for p in self.patch)
            src_window = geo.source_window(outer)
            start = self._start(rng, vol, src_window)
            image, labels, valid = geo.resample(vol.image, vol.labels, start, src_window, outer)
            targets = make_targets(labels, self.targets_cfg, vol.spacing)
            inner = (slice(c, c + self.patch[0]), slice(c, c + self.patch[1]), slice(c, c + self.patch[2]))
            image, labels, valid = image[inner], labels[inner], valid[inner]
            targets = targets[(slice(None), *inner)]
        image = np.array(image, dtype=np.float32)
        targets = np.array(targets, dtype=np.float32)
        valid = np.array(valid, dtype=bool)
        if aug is not None:
            image, targets, labels, valid = aug.flip_permute(rng, image, targets, labels, valid, vol.spacing)
            image = aug.intensity(rng, image, labels)
        return image[None], np.ascontiguousarray(targets), np.ascontiguousarray(valid)

    def batch(self, k: int, batch_size: int):
        """Batch ``k``: patches ``k * batch_size ...``, stacked."""
        items = [self.sample(k * batch_size + i) for i in range(batch_size)]
        return tuple(np.stack(x) for x in zip(*items))

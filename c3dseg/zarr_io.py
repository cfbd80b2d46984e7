"""OME-Zarr and large-TIFF I/O for volumes larger than memory.

Reading is lazy: :func:`open_volume` returns a :class:`Volume` that reads only the region asked
for (``Volume.read``), so a block of a terabyte stack costs the block's memory.  Writing is either
whole (:func:`write_zarr`, an in-memory :class:`~c3dseg.image.Image`) or blockwise
(:func:`create_zarr` returns a zarr array that workers fill chunk by chunk, then
:func:`finish_zarr` adds the downsampled levels).

Formats
-------
``.ome.zarr`` / ``.zarr`` (a folder)
    OME-NGFF images: zarr **v3 with NGFF 0.5** (attributes under ``"ome"``) and zarr **v2 with
    NGFF 0.4** (``"multiscales"`` in ``.zattrs``), read and written.  Axes ``[t][c]zyx``; the
    voxel spacing is the ``scale`` coordinate transformation of the chosen level, converted to
    micrometres from the axes' ``unit`` (micrometer when missing); a ``translation`` is kept in
    ``meta["origin_um"]``.  A plain zarr array (no OME metadata) reads with spacing (1, 1, 1).
    Written stores carry ``"c3dseg"`` attributes (``is_label``, ``status``) besides the NGFF ones.
``.tif`` / ``.tiff`` / ``.ome.tif``
    Read lazily through tifffile's zarr interface (``aszarr``): pages, strips and tiles are
    decoded on demand, memory-mapped reads for uncompressed files; calibration as
    :func:`c3dseg.io.read_image` finds it (ImageJ, OME, resolution tags).
anything else
    :func:`c3dseg.io.read_image` reads it into memory (NRRD, NIfTI, MHA: no lazy access there).

Arrays are ``(Z, Y, X)`` or ``(C, Z, Y, X)`` (design.md); spacing (z, y, x) in micrometres.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import InputError, ExecutionError
from .image import Image

log = logging.getLogger("c3dseg.zarr")

__all__ = ["ZARR_EXTS", "is_zarr_path", "open_volume", "read_zarr", "write_zarr", "create_zarr",
           "finish_zarr", "zarr_status", "Volume", "ngff_multiscales", "remove_store"]

ZARR_EXTS = (".ome.zarr", ".zarr")
NGFF_V2 = "0.4"
NGFF_V3 = "0.5"

# NGFF (UDUNITS) space units -> micrometres
_UNITS_UM = {
    "angstrom": 1e-4, "attometer": 1e-12, "centimeter": 1e4, "decimeter": 1e5, "exameter": 1e24,
    "femtometer": 1e-9, "foot": 304800.0, "gigameter": 1e15, "hectometer": 1e8, "inch": 25400.0,
    "kilometer": 1e9, "megameter": 1e12, "meter": 1e6, "micrometer": 1.0, "mile": 1.609344e9,
    "millimeter": 1e3, "nanometer": 1e-3, "parsec": 3.0857e22, "petameter": 1e21, "picometer": 1e-6,
    "terameter": 1e18, "yard": 914400.0, "yoctometer": 1e-18, "yottameter": 1e30,
    "zeptometer": 1e-15, "zettameter": 1e27,
    # common non-UDUNITS spellings
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "mm": 1e3, "m": 1e6,
}


def is_zarr_path(path: str | os.PathLike) -> bool:
    """True for a path ending in ``.zarr`` / ``.ome.zarr`` or a folder holding zarr metadata."""
    p = os.fspath(path).rstrip("/\\")
    if p.lower().endswith(ZARR_EXTS):
        return True
    return os.path.isdir(p) and any(os.path.exists(os.path.join(p, f))
                                    for f in ("zarr.json", ".zgroup", ".zarray"))


def strip_zarr_ext(name: str) -> str:
    base = os.path.basename(os.fspath(name).rstrip("/\\"))
    low = base.lower()
    for ext in ZARR_EXTS:
        if low.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    return base


# ---------------------------------------------------------------------------------------------
# Lazy volumes
# ---------------------------------------------------------------------------------------------

@dataclass
class Volume:
    """A lazily read 3D (``(Z, Y, X)``) or multi-channel (``(C, Z, Y, X)``) image.

    ``array`` is anything indexable with a tuple of slices/ints in the *source* axis order
    (a zarr array, a numpy memmap or array); ``axes`` names those source axes (upper case letters
    ``TCZYX...``); ``index`` maps each source axis to an int (dropped axis) or None (kept);
    ``order`` transposes the kept axes into ``(C,) Z, Y, X``.
    """

    array: Any
    axes: str
    index: tuple
    order: tuple[int, ...]
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    dtype: np.dtype = None
    channel: int | None = None       # a channel picked from a C axis (then C is dropped)

    @property
    def shape3d(self) -> tuple[int, int, int]:
        return tuple(self.shape[-3:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_multichannel(self) -> bool:
        return len(self.shape) == 4

    @property
    def chunks(self) -> tuple[int, ...] | None:
        ch = getattr(self.array, "chunks", None)
        if ch is None or isinstance(ch[0], tuple):
            return None
        kept = [c for c, i in zip(ch, self.index) if i is None]
        return tuple(kept[k] for k in self.order)

    def read(self, region: Sequence[slice] | None = None) -> np.ndarray:
        """The data of ``region`` (3 slices along z, y, x; all channels), as a numpy array."""
        region = tuple(region) if region is not None else (slice(None),) * 3
        if len(region) != 3:
            raise ValueError(f"region needs 3 slices (z, y, x), got {region}")
        kept_names = [a for a, i in zip(self.axes, self.index) if i is None]
        target = [kept_names[k] for k in self.order]        # e.g. ["C", "Z", "Y", "X"]
        sel = dict(zip(target[-3:], region))
        idx = []
        for a, i in zip(self.axes, self.index):
            if i is not None:
                idx.append(i)
            else:
                idx.append(sel.get(a, slice(None)))
        try:
            data = np.asarray(self.array[tuple(idx)])
        except MemoryError:
            raise InputError("not enough memory to read the region", file=self.meta.get("source"))
        except Exception as e:
            raise InputError(f"cannot read {_fmt_region(region)}: {type(e).__name__}: {e}",
                             file=self.meta.get("source")) from None
        if list(self.order) != list(range(len(self.order))):
            data = np.ascontiguousarray(np.transpose(data, self.order))
        return data

    def to_image(self) -> Image:
        """The whole volume in memory."""
        return Image(self.read(), self.spacing, dict(self.meta))

    def to_dask(self, chunks=None):
        """A dask array of the volume (chunks: the storage chunks, or ``chunks``)."""
        import dask.array as da

        ch = chunks or self.chunks or "auto"
        return da.from_array(_Region(self), chunks=ch, asarray=True, fancy=False)


class _Region:
    """numpy-like view of a :class:`Volume` for ``dask.array.from_array``."""

    def __init__(self, vol: Volume):
        self.vol = vol
        self.shape = vol.shape
        self.dtype = vol.dtype
        self.ndim = len(vol.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        data = self.vol.read(key[-3:])
        if self.ndim == 4:
            data = data[key[0]]
        return data


def _fmt_region(region) -> str:
    return "[" + ", ".join(f"{s.start or 0}:{'' if s.stop is None else s.stop}" for s in region) + "]"


def _axis_plan(axes: str, shape: Sequence[int], channel: int | None, path: str):
    """(index, order, out_shape, has_c) turning source axes into (C,)ZYX (rules of c3dseg.io)."""
    axes = axes.upper()
    if len(axes) != len(shape):
        raise InputError(f"axes {axes!r} do not match the data shape {tuple(shape)}", file=path)
    sizes = dict(zip(axes, shape))
    if len(sizes) != len(axes):
        raise InputError(f"repeated axis in {axes!r}", file=path)
    depth = "Z" if sizes.get("Z", 1) > 1 else None
    stacky = [a for a in "TIQ" if sizes.get(a, 1) > 1]
    if depth is None and stacky:
        depth, stacky = stacky[0], stacky[1:]
    if stacky:
        raise InputError(f"the image has more than one stack axis ({axes} {tuple(shape)}): time series "
                         "and 5D data are not supported", file=path)
    chan = [a for a in "CS" if sizes.get(a, 1) > 1]
    if len(chan) > 1:
        raise InputError(f"the image has both channels and samples ({axes} {tuple(shape)})", file=path)
    if "Y" not in sizes or "X" not in sizes:
        raise InputError(f"the image has no Y/X plane (axes {axes})", file=path)
    if depth is None:
        raise InputError(f"the image is 2D ({axes} {tuple(shape)}); a 3D stack is needed", file=path)
    keep = ([chan[0]] if chan else []) + [depth, "Y", "X"]
    other = [a for a in axes if a not in keep and sizes[a] > 1]
    if other:
        raise InputError(f"unsupported axis {other[0]!r} of size {sizes[other[0]]} (axes {axes})", file=path)
    has_c = bool(chan)
    if has_c and channel is not None:
        n = sizes[chan[0]]
        if not 0 <= channel < n:
            raise InputError(f"channel {channel} does not exist: the image has {n} channels (0-based)", file=path)
        keep = keep[1:]
    index = []
    for a in axes:
        if a in keep:
            index.append(None)
        elif has_c and channel is not None and a == chan[0]:
            index.append(int(channel))
        else:
            index.append(0)
    remaining = [a for a in axes if a in keep]
    order = tuple(remaining.index(a) for a in keep)
    out_shape = tuple(sizes[a] for a in keep)
    if channel is not None and not has_c and channel > 0:
        raise InputError(f"channel {channel} does not exist: the image has 1 channel", file=path)
    return tuple(index), order, out_shape, has_c and channel is None


def open_volume(path: str | os.PathLike, *, level: int = 0, channel: int | None = None) -> Volume:
    """Open an image for lazy, region-wise reading.

    Parameters
    ----------
    path : str
        ``.ome.zarr`` / ``.zarr`` (lazy), ``.tif`` / ``.tiff`` (lazy through tifffile), or any
        other format :func:`c3dseg.io.read_image` reads (read into memory).
    level : int
        Multiscale level of an OME-Zarr image (0 = full resolution).
    channel : int, optional
        0-based channel of a multi-channel image; None keeps all (a ``(C, Z, Y, X)`` volume).

    Raises
    ------
    InputError
        Missing or unreadable file, unsupported layout, 2D data, a missing level or channel.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError("file not found", file=path)
    if is_zarr_path(path):
        return _open_zarr(path, level, channel)
    low = path.lower()
    if low.endswith((".tif", ".tiff")):
        return _open_tiff(path, channel)
    from .io import read_image

    img = read_image(path, channel=channel)
    data = img.data
    axes = "CZYX" if data.ndim == 4 else "ZYX"
    return Volume(data, axes, (None,) * data.ndim, tuple(range(data.ndim)), img.spacing, dict(img.meta),
                  tuple(data.shape), data.dtype, channel)


# -- zarr ------------------------------------------------------------------------------------

def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - the 'dask' extra
        raise InputError("OME-Zarr needs the zarr package: pip install 'c3dseg[dask]'") from None
    return zarr


def ngff_multiscales(attrs: dict) -> tuple[list[dict] | None, str | None]:
    """The ``multiscales`` list and the NGFF version from a group's attributes (0.4 or 0.5)."""
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        ome = attrs["ome"]
        return ome.get("multiscales"), str(ome.get("version", NGFF_V3))
    ms = attrs.get("multiscales")
    if ms:
        return ms, str(ms[0].get("version", NGFF_V2)) if isinstance(ms[0], dict) else None
    return None, None


def zarr_status(path: str) -> dict | None:
    """The ``c3dseg`` attributes of a store we wrote (``status``: ``"running"``/``"complete"``...),
    or None for a store that is not ours or not a zarr group."""
    for name in ("zarr.json", ".zattrs"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                with open(f) as fh:
                    doc = json.load(fh)
            except (OSError, ValueError):
                return None
            attrs = doc.get("attributes", {}) if name == "zarr.json" else doc
            c = attrs.get("c3dseg") if isinstance(attrs, dict) else None
            return c if isinstance(c, dict) else None
    return None


def _open_zarr(path: str, level: int, channel: int | None) -> Volume:
    zarr = _zarr()
    try:
        node = zarr.open(path, mode="r")
    except Exception as e:
        raise InputError(f"cannot open the zarr store: {type(e).__name__}: {e}", file=path) from None
    spacing = (1.0, 1.0, 1.0)
    meta: dict[str, Any] = {"source": os.path.abspath(path), "basename": strip_zarr_ext(path), "format": "zarr",
                            "unit": "um", "spacing_from_file": False, "is_label": False}
    if isinstance(node, zarr.Array):
        arr = node
        axes = {5: "TCZYX", 4: "CZYX", 3: "ZYX"}.get(arr.ndim)
        if axes is None:
            raise InputError(f"a plain zarr array of {arr.ndim} dimensions; expected 3 (ZYX) or 4 (CZYX)", file=path)
        meta["zarr_format"] = arr.metadata.zarr_format
    else:
        attrs = dict(node.attrs)
        ours = attrs.get("c3dseg") or {}
        if ours.get("status") not in (None, "complete"):
            raise InputError(f"the store holds an unfinished c3dseg run (status {ours.get('status')!r}); "
                             "finish it (rerun the same command) or remove it", file=path)
        ms, version = ngff_multiscales(attrs)
        meta["zarr_format"] = node.metadata.zarr_format
        if not ms:
            names = sorted(k for k, v in node.arrays())
            if len(names) == 1:
                arr = node[names[0]]
                axes = {4: "CZYX", 3: "ZYX"}.get(arr.ndim)
                if axes is None:
                    raise InputError(f"array {names[0]!r} has {arr.ndim} dimensions", file=path)
            else:
                raise InputError("not an OME-Zarr image: no 'multiscales' metadata "
                                 f"(arrays: {', '.join(names) or 'none'})", file=path)
        else:
            m = ms[0]
            datasets = m.get("datasets") or []
            if not 0 <= level < len(datasets):
                raise InputError(f"level {level} does not exist: the image has {len(datasets)} level(s)", file=path)
            ds = datasets[level]
            try:
                arr = node[ds["path"]]
            except KeyError:
                raise InputError(f"multiscale level {level} (path {ds.get('path')!r}) is missing", file=path) from None
            ax = m.get("axes") or []
            if ax and isinstance(ax[0], dict):
                names = [str(a.get("name", "?")) for a in ax]
                units = [a.get("unit") for a in ax]
            elif ax:
                names, units = [str(a) for a in ax], [None] * len(ax)
            else:
                names = list({5: "tczyx", 4: "czyx", 3: "zyx"}.get(arr.ndim, ""))
                units = [None] * len(names)
            if len(names) != arr.ndim:
                raise InputError(f"{len(names)} axes in the metadata for a {arr.ndim}-d array", file=path)
            axes = "".join(n.upper()[:1] for n in names)
            scale = _scale_of(m, ds, arr.ndim)
            trans = _translation_of(m, ds, arr.ndim)
            sp, origin = [], []
            file_units = set()
            for a in "ZYX":
                if a not in axes:
                    raise InputError(f"no {a.lower()} axis in {names}", file=path)
                i = axes.index(a)
                u = units[i]
                f = 1.0
                if u:
                    file_units.add(u)
                    f = _UNITS_UM.get(str(u).lower())
                    if f is None:
                        raise InputError(f"unknown unit {u!r} of axis {names[i]!r}", file=path)
                sp.append(float(scale[i]) * f)
                origin.append(float(trans[i]) * f)
            spacing = tuple(sp)
            meta.update(spacing_from_file=not all(abs(s - 1.0) < 1e-12 for s in spacing),
                        ngff_version=version, level=level, n_levels=len(datasets), origin_um=tuple(origin),
                        file_unit=(file_units.pop() if len(file_units) == 1 else None))
            if m.get("name"):
                meta["name"] = m["name"]
        if ours.get("is_label"):
            meta["is_label"] = True
        if "image-label" in attrs or ("ome" in attrs and "image-label" in attrs.get("ome", {})):
            meta["is_label"] = True
        if ours.get("channel_names"):
            meta["channel_names"] = list(ours["channel_names"])
        omero = attrs.get("omero") or (attrs.get("ome") or {}).get("omero")
        if omero and not meta.get("channel_names"):
            labels = [c.get("label") for c in omero.get("channels", [])]
            if labels and all(labels):
                meta["channel_names"] = labels
    index, order, out_shape, has_c = _axis_plan(axes, arr.shape, channel, path)
    if any(s == 0 for s in out_shape):
        raise InputError(f"the image is empty (shape {out_shape})", file=path)
    if not has_c:
        meta["channel_names"] = None if channel is None else meta.get("channel_names")
    meta["dtype"] = str(arr.dtype)
    meta["channel"] = channel
    return Volume(arr, axes, index, order, spacing, meta, out_shape, np.dtype(arr.dtype), channel)


def _transforms(m: dict, ds: dict) -> tuple[list, list]:
    return list(m.get("coordinateTransformations") or []), list(ds.get("coordinateTransformations") or [])


def _scale_of(m: dict, ds: dict, ndim: int) -> list[float]:
    scale = [1.0] * ndim
    glob, own = _transforms(m, ds)
    for t in own + glob:   # dataset scale, then the multiscale-wide one multiplies it
        if t.get("type") == "scale" and "scale" in t:
            s = list(t["scale"])
            if len(s) == ndim:
                scale = [a * float(b) for a, b in zip(scale, s)]
    return scale


def _translation_of(m: dict, ds: dict, ndim: int) -> list[float]:
    tr = [0.0] * ndim
    glob, own = _transforms(m, ds)
    for t in own + glob:
        if t.get("type") == "translation" and "translation" in t:
            s = list(t["translation"])
            if len(s) == ndim:
                tr = [a + float(b) for a, b in zip(tr, s)]
    return tr


# -- TIFF ------------------------------------------------------------------------------------

def _open_tiff(path: str, channel: int | None) -> Volume:
    import tifffile

    zarr = _zarr()
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError("the TIFF holds no image data", file=path)
            series = tif.series[0]
            axes = series.axes
            shape = series.shape
            sp, unit, names, kind = _tiff_calibration(tif)
        store = tifffile.imread(path, aszarr=True)
        arr = zarr.open(store, mode="r")
        if isinstance(arr, zarr.Group):      # pyramidal TIFF: level 0
            arr = arr[sorted(k for k, _ in arr.arrays())[0]]
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read the image: {type(e).__name__}: {e}", file=path) from None
    if tuple(arr.shape) != tuple(shape):
        raise InputError(f"unexpected TIFF layout (series {tuple(shape)}, store {tuple(arr.shape)})", file=path)
    index, order, out_shape, has_c = _axis_plan(axes, shape, channel, path)
    from .io import strip_image_extension

    file_spacing = tuple(float(s) if (s is not None and s > 0) else 1.0 for s in sp)
    calibrated = any(s is not None and s > 0 for s in sp) and not all(abs(s - 1) < 1e-12 for s in file_spacing)
    if names is not None and (not has_c or len(names) != out_shape[0]):
        names = None
    meta = {"source": os.path.abspath(path), "basename": strip_image_extension(path), "dtype": str(arr.dtype),
            "unit": "um", "file_unit": unit, "spacing_from_file": bool(calibrated), "file_spacing": file_spacing,
            "format": kind, "channel_names": names, "channel": channel, "is_label": False}
    return Volume(arr, axes, index, order, file_spacing, meta, out_shape, np.dtype(arr.dtype), channel)


def _tiff_calibration(tif):
    """(spacing list (z, y, x) um or None entries, unit, channel names, kind) without reading pixels."""
    from .io import tiff_calibration

    return tiff_calibration(tif)


def read_zarr(path: str | os.PathLike, *, level: int = 0, channel: int | None = None,
              lazy: bool = False) -> Image:
    """Read an OME-Zarr image (zarr v2/NGFF 0.4 or v3/NGFF 0.5) as an :class:`Image`.

    ``lazy=True`` gives ``data`` as a dask array (chunks as stored) instead of numpy.
    """
    vol = open_volume(path, level=level, channel=channel)
    data = vol.to_dask() if lazy else vol.read()
    return Image(data, vol.spacing, dict(vol.meta))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _axes_meta(ndim: int, names: Sequence[str] | None = None) -> list[dict]:
    ax = [{"name": "z", "type": "space", "unit": "micrometer"},
          {"name": "y", "type": "space", "unit": "micrometer"},
          {"name": "x", "type": "space", "unit": "micrometer"}]
    if ndim == 4:
        ax.insert(0, {"name": "c", "type": "channel"})
    return ax


def _level_factors(spacing, n_levels: int) -> list[tuple[int, int, int]]:
    """Per-level downsampling factors (cumulative): 2 along an axis unless its spacing already
    exceeds twice the finest one (keeps anisotropic stacks from collapsing in z)."""
    out = [(1, 1, 1)]
    sp = list(spacing)
    fine = min(sp)
    for _ in range(1, n_levels):
        f = tuple(1 if s > 2 * fine * 1.0001 else 2 for s in sp)
        prev = out[-1]
        out.append(tuple(a * b for a, b in zip(prev, f)))
        sp = [s * k for s, k in zip(sp, f)]
        fine = min(sp)
    return out


def _multiscales(spacing, factors, ndim, name, version) -> list[dict]:
    datasets = []
    for k, f in enumerate(factors):
        scale = [float(s) * ff for s, ff in zip(spacing, f)]
        if ndim == 4:
            scale = [1.0] + scale
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    m = {"axes": _axes_meta(ndim), "datasets": datasets, "name": name or "image"}
    if version == NGFF_V2:
        m = {"version": NGFF_V2, **m}
        m["type"] = "mean"
    return [m]


def _group_attrs(spacing, factors, ndim, name, zarr_format, is_label, status, channel_names, extra):
    version = NGFF_V3 if zarr_format == 3 else NGFF_V2
    ms = _multiscales(spacing, factors, ndim, name, version)
    ours = {"is_label": bool(is_label), "status": status}
    if channel_names:
        ours["channel_names"] = list(channel_names)
    if extra:
        ours.update(extra)
    if zarr_format == 3:
        return {"ome": {"version": NGFF_V3, "multiscales": ms}, "c3dseg": ours}
    return {"multiscales": ms, "c3dseg": ours}


def _chunk_shape(shape, chunks) -> tuple[int, ...]:
    ndim = len(shape)
    if chunks is None:
        chunks = (64, 256, 256)
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) == 3 and ndim == 4:
        chunks = (1,) + chunks
    if len(chunks) != ndim:
        raise ValueError(f"chunks {chunks} do not fit shape {shape}")
    return tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))


def create_zarr(path: str | os.PathLike, shape: Sequence[int], dtype, *, spacing=(1.0, 1.0, 1.0),
                chunks: Sequence[int] | None = None, zarr_format: int = 3, n_levels: int = 1,
                is_label: bool = False, channel_names: Sequence[str] | None = None, name: str | None = None,
                compression: bool = True, status: str = "complete", extra_attrs: dict | None = None,
                overwrite: bool = False):
    """Create an OME-Zarr image group with an empty full-resolution array ``"0"`` and return it.

    Parameters
    ----------
    shape : (Z, Y, X) or (C, Z, Y, X)
    dtype : numpy dtype
    spacing : (z, y, x) micrometres
    chunks : 3 or 4 ints
        Storage chunks (z, y, x) (channels: 1 per chunk); default (64, 256, 256) clipped to the shape.
        Workers writing whole, chunk-aligned blocks never touch the same chunk.
    zarr_format : 2 or 3
        v3 writes NGFF 0.5 metadata, v2 NGFF 0.4 (``/`` chunk keys).
    n_levels : int
        Levels declared in the multiscale metadata; the lower ones are written by :func:`finish_zarr`.
    status : str
        ``c3dseg.status`` attribute: ``"running"`` while a blockwise run fills the store.

    Returns
    -------
    zarr.Array
        The level-0 array (fill value 0).
    """
    zarr = _zarr()
    path = os.fspath(path)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"shape must be (Z, Y, X) or (C, Z, Y, X), got {shape}")
    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format}")
    if os.path.exists(path):
        if not overwrite:
            raise ExecutionError(f"{path} exists", file=path)
        remove_store(path)
    g = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    kw: dict[str, Any] = {}
    if zarr_format == 2:
        kw["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    if not compression:
        kw["compressors"] = None
    if shape and len(shape) == 4:
        kw["dimension_names"] = ["c", "z", "y", "x"] if zarr_format == 3 else None
    elif zarr_format == 3:
        kw["dimension_names"] = ["z", "y", "x"]
    if kw.get("dimension_names") is None:
        kw.pop("dimension_names", None)
    arr = g.create_array("0", shape=shape, chunks=_chunk_shape(shape, chunks), dtype=np.dtype(dtype),
                         fill_value=0, **kw)
    factors = _level_factors(spacing, max(1, n_levels))
    g.attrs.update(_group_attrs(spacing, factors, len(shape), name, zarr_format, is_label, status,
                                channel_names, extra_attrs))
    return arr


def set_status(path: str, status: str, **extra) -> None:
    """Update the ``c3dseg`` attributes (``status`` and others) of a store we wrote."""
    zarr = _zarr()
    g = zarr.open_group(os.fspath(path), mode="r+")
    ours = dict(g.attrs.get("c3dseg") or {})
    ours["status"] = status
    ours.update(extra)
    g.attrs["c3dseg"] = ours


def finish_zarr(path: str | os.PathLike, n_levels: int = 1, *, block: Sequence[int] | None = None,
                status: str = "complete") -> None:
    """Write the downsampled levels 1..n_levels-1 of a store made by :func:`create_zarr` (from the
    level before, one output chunk region at a time: memory bounded by a chunk) and set its status.

    Labels are subsampled (every k-th voxel: ids stay ids); intensities are averaged over the
    k-voxel boxes.
    """
    zarr = _zarr()
    path = os.fspath(path)
    g = zarr.open_group(path, mode="r+")
    attrs = dict(g.attrs)
    ours = dict(attrs.get("c3dseg") or {})
    ms, version = ngff_multiscales(attrs)
    base = g["0"]
    ndim = base.ndim
    zf = g.metadata.zarr_format
    scale0 = _scale_of(ms[0], ms[0]["datasets"][0], ndim)[-3:]
    factors = _level_factors(scale0, max(1, n_levels))
    is_label = bool(ours.get("is_label"))
    prev = base
    for k in range(1, len(factors)):
        f = tuple(a // b for a, b in zip(factors[k], factors[k - 1]))
        shp3 = tuple(-(-s // ff) for s, ff in zip(prev.shape[-3:], f))
        shape = (prev.shape[0],) + shp3 if ndim == 4 else shp3
        ch = tuple(min(c, s) for c, s in zip(base.chunks[-3:], shp3))
        kw: dict[str, Any] = {}
        if zf == 2:
            kw["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        lvl = g.create_array(str(k), shape=shape, chunks=((1,) + ch) if ndim == 4 else ch,
                             dtype=prev.dtype, fill_value=0, overwrite=True, **kw)
        for region in _iter_regions(shp3, ch):
            src = tuple(slice(r.start * ff, min(r.stop * ff, s)) for r, ff, s in zip(region, f, prev.shape[-3:]))
            data = np.asarray(prev[(slice(None),) + src] if ndim == 4 else prev[src])
            out = _downsample(data, f, is_label)
            lvl[((slice(None),) + region) if ndim == 4 else region] = out
        prev = lvl
    spacing = tuple(scale0)
    name = ms[0].get("name")
    new = _group_attrs(spacing, factors, ndim, name, zf, is_label, status, ours.get("channel_names"),
                       {k: v for k, v in ours.items() if k not in ("is_label", "status", "channel_names")})
    g.attrs.update(new)


def _iter_regions(shape, chunks):
    import itertools

    ranges = [range(0, s, c) for s, c in zip(shape, chunks)]
    for starts in itertools.product(*ranges):
        yield tuple(slice(a, min(a + c, s)) for a, c, s in zip(starts, chunks, shape))


def _downsample(data: np.ndarray, f, is_label: bool) -> np.ndarray:
    lead = data.ndim - 3
    if is_label:
        return np.ascontiguousarray(data[(Ellipsis,) + tuple(slice(None, None, ff) for ff in f)])
    shp = data.shape[-3:]
    pad = [(0, 0)] * lead + [(0, (-s) % ff) for s, ff in zip(shp, f)]
    work = np.pad(data.astype(np.float64), pad, mode="edge") if any(p[1] for p in pad[lead:]) else data.astype(np.float64)
    new = data.shape[:lead]
    for s, ff in zip(work.shape[-3:], f):
        new = new + (s // ff, ff)
    work = work.reshape(new).mean(axis=tuple(lead + 1 + 2 * i for i in range(3)))
    if data.dtype.kind in "iu":
        work = np.rint(work)
    return work.astype(data.dtype)


def write_zarr(path: str | os.PathLike, image: Image, *, chunks: Sequence[int] | None = None,
               zarr_format: int = 3, n_levels: int = 1, compression: bool = True, overwrite: bool = True,
               label: bool | None = None, protect: Sequence[str] = ()) -> str:
    """Write an in-memory image as OME-Zarr, atomically (built beside the target, then renamed).

    Labels (``label`` True, or None and ``image.meta["is_label"]``) are stored uint16, or uint32
    with a warning past 65535.  Returns the path written.
    """
    path = os.fspath(path).rstrip("/\\")
    for p in protect:
        if os.path.realpath(p) == os.path.realpath(path):
            raise ExecutionError("refusing to overwrite an input of this run", file=path)
    if os.path.exists(path) and not overwrite:
        raise ExecutionError("output exists (overwrite not allowed)", file=path)
    data = np.asarray(image.data)
    is_label = bool(image.meta.get("is_label")) if label is None else bool(label)
    if is_label:
        from .labels import label_dtype

        top = int(data.max()) if data.size else 0
        if data.dtype.kind == "f" or (data.size and data.min() < 0):
            raise ExecutionError("label images must hold non-negative integers", file=path)
        data = data.astype(label_dtype(top), copy=False)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.part")
    try:
        arr = create_zarr(tmp, data.shape, data.dtype, spacing=image.spacing, chunks=chunks,
                          zarr_format=zarr_format, n_levels=n_levels, is_label=is_label,
                          channel_names=image.meta.get("channel_names") if data.ndim == 4 else None,
                          name=image.meta.get("basename"), compression=compression, status="writing")
        arr[...] = data
        finish_zarr(tmp, n_levels)
        if os.path.exists(path):
            remove_store(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_store(path: str) -> None:
    """Remove a zarr folder (or a file) entirely."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# c3dseg.io's entry points for OME-Zarr (read_image / write_image dispatch here)
# ---------------------------------------------------------------------------------------------

def read_zarr_image(path: str, *, channel: int | None = None, spacing=None, check_finite: bool = True) -> Image:
    """:func:`c3dseg.io.read_image` for an OME-Zarr folder (whole image into memory, level 0),
    with the same metadata keys."""
    path = os.fspath(path).rstrip("/\\")
    if not os.path.exists(path):
        raise InputError("file not found", file=path)
    vol = open_volume(path, channel=channel if (channel is not None and channel >= 0) else None)
    try:
        data = vol.read()
    except MemoryError:
        raise InputError("not enough memory to read the image (use --blocks for blockwise runs)",
                         file=path) from None
    if data.dtype.kind in "cV":
        raise InputError(f"unsupported data type {data.dtype}", file=path)
    if check_finite and data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InputError(f"the image contains {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf)",
                             file=path)
    out_spacing = list(vol.spacing)
    if spacing is not None:
        for i, s in enumerate(tuple(spacing)):
            if s is not None and s > 0:
                out_spacing[i] = float(s)
    meta = dict(vol.meta)
    meta.update(unit="um", file_spacing=tuple(vol.spacing), format="ome-zarr", dtype=str(data.dtype),
                channel_names=meta.get("channel_names") if data.ndim == 4 else None)
    meta.setdefault("file_unit", None)
    return Image(data, tuple(out_spacing), meta)


def write_zarr_image(path: str, image: Image, *, compression: bool = True, dtype=None, overwrite: bool = True,
                     protect=(), label: bool | None = None) -> str:
    """:func:`c3dseg.io.write_image` for an OME-Zarr target (zarr v3, NGFF 0.5)."""
    data = np.asarray(image.data)
    if data.ndim not in (3, 4):
        raise ExecutionError(f"expected a (Z, Y, X) or (C, Z, Y, X) image, got shape {data.shape}", file=path)
    if dtype is not None:
        data = data.astype(dtype)
    if label is None:
        label = bool(image.meta.get("is_label", False))
    return write_zarr(path, image.derive(data), compression=compression, overwrite=overwrite,
                      label=label, protect=tuple(protect))

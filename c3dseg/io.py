"""Reading and writing 3D images and meta tables.

Pure functions, no filters (the ``ImageReader`` / ``ImageWriter`` filters in
:mod:`c3dseg.filters.io` are thin adapters over them).

Formats
-------
========================  ==========  ===================================================
extension                 library     spacing (z, y, x) in micrometres comes from
========================  ==========  ===================================================
``.tif`` ``.tiff``        tifffile    ImageJ: ``spacing=`` (z) in the description and
                                      XResolution / YResolution (pixels per ``unit``);
                                      plain TIFF: resolution tags with a centimetre unit
``.ome.tif`` ``.ome.tiff``  tifffile  OME ``PhysicalSizeX/Y/Z`` (and their units)
``.nrrd`` ``.nhdr``       SimpleITK   ``GetSpacing()`` reversed
``.nii`` ``.nii.gz``      SimpleITK   ``GetSpacing()`` reversed (micron-unit headers are
                                      converted back from ITK's millimetres)
``.mha`` ``.mhd``         SimpleITK   ``GetSpacing()`` reversed
========================  ==========  ===================================================

Arrays are ``(Z, Y, X)`` for a single-channel file and ``(C, Z, Y, X)`` for a multi-channel one.
Spacing numbers read from SimpleITK formats are taken as micrometres (the microscopy convention:
ITK calls them millimetres, and c3dseg writes micrometre values there).  A file whose spacing is
missing or exactly (1, 1, 1) is *uncalibrated*: ``meta["spacing_from_file"]`` is False, and
``meta["spacing_known"]`` says per axis (z, y, x) whether the file gave a value (an ImageJ file
without ``spacing=`` has an unknown z).

Writing is atomic: the file is written into a hidden temporary folder beside the target and moved
into place with :func:`os.replace` once complete, so a failure (disk full included) never leaves a
partial file.  ``.tif`` is written as an ImageJ hyperstack with micrometre calibration (what Fiji
and MorphoGraphX read); zlib compression is used when asked: ImageJ 1.x opens deflate-compressed
TIFFs (compression code 8, no predictor, strips not tiles) and reads their pages one by one.  The
ImageJ format has no 32-bit integer type: label images with more than 65535 labels are written as
uint32 TIFF pages with an ImageJ description (Fiji opens them as a 32-bit stack with calibration;
MorphoGraphX needs uint16), with a warning.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from typing import Iterable, Sequence

import numpy as np

from .errors import C3DError, ExecutionError, InputError
from .image import Image, MetaTable

log = logging.getLogger("c3dseg.io")

__all__ = [
    "read_image", "read_series", "write_image", "write_table", "image_extensions", "is_image_file",
    "strip_image_extension", "image_format", "to_precision", "series_files",
]

# extension -> format name; longest extensions first so that ".ome.tif" wins over ".tif"
_FORMATS = (
    (".ome.zarr", "zarr"), (".zarr", "zarr"),  # OME-Zarr folders: c3dseg.zarr_io
    (".ome.tiff", "ome"), (".ome.tif", "ome"), (".nii.gz", "nifti"),
    (".tiff", "tiff"), (".tif", "tiff"), (".nrrd", "nrrd"), (".nhdr", "nrrd"), (".nii", "nifti"),
    (".mha", "mha"), (".mhd", "mhd"),
)
_WRITABLE = ("ome", "tiff", "nifti", "nrrd", "mha", "mhd")

# length units -> micrometres
_UNITS_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "micrometers": 1.0, "micrometres": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "nanometers": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "millimeters": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6, "meters": 1e6,
    "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6, "inch": 25400.0, "in": 25400.0,
}

_TMP_PREFIX = ".c3dseg-tmp-"


# ---------------------------------------------------------------------------------------------
# Names and formats
# ---------------------------------------------------------------------------------------------

def image_extensions() -> tuple[str, ...]:
    """The file extensions c3dseg reads (lower case, with the dot; ``.ome.tif`` included)."""
    return tuple(ext for ext, _ in _FORMATS)


def image_format(path: str | os.PathLike) -> str | None:
    """The format name of a path from its extension (``"tiff"``, ``"ome"``, ``"nrrd"``,
    ``"nifti"``, ``"mha"``, ``"mhd"``), or None when it is not an image extension."""
    name = os.path.basename(os.fspath(path)).lower()
    for ext, fmt in _FORMATS:
        if name.endswith(ext) and len(name) > len(ext):
            return fmt
    return None


def is_image_file(path: str | os.PathLike) -> bool:
    """True for an existing regular file with an image extension (hidden files and our own
    temporary files excluded).  Used by the runner to list the images of an input folder."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if name.startswith(".") or image_format(name) is None:
        return False
    return os.path.isfile(path)


def strip_image_extension(name: str | os.PathLike) -> str:
    """A file name without its folder and without all its image extensions
    (``a.ome.tif`` -> ``a``, ``b.nii.gz`` -> ``b``, ``c.txt`` -> ``c``)."""
    base = os.path.basename(os.fspath(name))
    while True:
        low = base.lower()
        for ext, _ in _FORMATS:
            if low.endswith(ext) and len(base) > len(ext):
                base = base[: -len(ext)]
                break
        else:
            break
    if base == os.path.basename(os.fspath(name)):
        stem, ext = os.path.splitext(base)
        base = stem or base
    return base


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike, *, channel: int | None = None,
               spacing: Sequence[float] | None = None, allow_2d: bool = False,
               check_finite: bool = True) -> Image:
    """Read a 3D (or multi-channel 3D) image with its voxel spacing.

    Parameters
    ----------
    path : str or path-like
        A ``.tif``/``.tiff`` (plain, ImageJ hyperstack, OME-TIFF), ``.nrrd``/``.nhdr``,
        ``.nii``/``.nii.gz`` or ``.mha``/``.mhd`` file.
    channel : int, optional
        0-based channel to return from a multi-channel file (then the result is ``(Z, Y, X)``).
        None (default): a single-channel file gives ``(Z, Y, X)``, a multi-channel one
        ``(C, Z, Y, X)``.
    spacing : 3 floats (z, y, x) in um, optional
        Overrides the file's spacing; entries that are None or <= 0 keep the file's value.
    allow_2d : bool
        Accept a 2D image, returned as ``(1, Y, X)`` (default False: a 2D file is an error).
    check_finite : bool
        Reject float images holding NaN or inf (default True).

    Returns
    -------
    Image
        ``data`` as stored in the file (dtype unchanged), ``spacing`` (z, y, x) in um, and
        ``meta`` with ``source`` (absolute path), ``basename`` (name without image extensions),
        ``dtype``, ``unit`` (``"um"``), ``file_unit`` (as found in the file, or None),
        ``spacing_from_file`` (False when the file is uncalibrated), ``spacing_known`` (per axis
        z, y, x), ``file_spacing``, ``format``,
        ``channel_names`` (list or None) and ``channel`` (the channel picked, or None).

    Raises
    ------
    InputError
        The file is missing, unreadable or corrupt, 2D (unless ``allow_2d``), empty, has an
        unsupported axis (e.g. a time series), non-finite values, or the channel does not exist.
    """
    path = os.fspath(path)
    if image_format(path.rstrip("/\\")) == "zarr":  # OME-Zarr: c3dseg.zarr_io
        from .zarr_io import read_zarr_image

        return read_zarr_image(path, channel=channel, spacing=spacing, check_finite=check_finite)
    _check_readable(path)
    fmt = image_format(path)
    try:
        if fmt in ("tiff", "ome") or (fmt is None and _looks_like_tiff(path)):
            data, axes, sp, unit, names, kind = _read_tiff(path)
        elif fmt is not None:
            data, axes, sp, unit, names, kind = _read_sitk(path)
        else:
            raise InputError(f"unknown image format (readable: {', '.join(image_extensions())})",
                             file=path)
    except InputError:
        raise
    except MemoryError:
        raise InputError("not enough memory to read the image", file=path) from None
    except Exception as e:  # tifffile / SimpleITK errors for corrupt or truncated files
        raise InputError(f"cannot read the image: {_one_line(e)}", file=path) from None

    data, has_c = _normalise_axes(data, axes, path)
    if any(s == 0 for s in data.shape):
        raise InputError(f"the image is empty (shape {tuple(data.shape)})", file=path)
    is_2d = data.ndim - (1 if has_c else 0) == 2
    if is_2d:
        if not allow_2d:
            shape = "(C, Y, X) " if has_c else "(Y, X) "
            raise InputError(f"the image is 2D {shape}{tuple(data.shape)}; a 3D stack is needed",
                             file=path)
        data = data[:, None] if has_c else data[None]
    if data.dtype.kind == "c":
        raise InputError(f"complex data ({data.dtype}) is not supported", file=path)
    if data.dtype.kind == "V" or data.dtype.names:
        raise InputError(f"structured data ({data.dtype}) is not supported", file=path)

    n_channels = data.shape[0] if has_c else 1
    if names is not None and len(names) != n_channels:
        names = None
    if channel is not None and channel >= 0:
        if channel >= n_channels:
            raise InputError(f"channel {channel} does not exist: the image has {n_channels} "
                             f"channel{'s' if n_channels != 1 else ''} (0-based)", file=path)
        if has_c:
            data = data[channel]
            if names is not None:
                names = [names[channel]]
            has_c = False

    if check_finite:
        bad = count_nonfinite(data)
        if bad:
            raise InputError(f"the image contains {bad} non-finite value{'s' if bad > 1 else ''} "
                             "(NaN or inf)", file=path)

    sp = list(sp) if sp is not None else [None] * 3
    file_spacing = tuple(float(s) if (s is not None and s > 0) else 1.0 for s in sp)
    known = [s is not None and s > 0 for s in sp]
    if all(abs(s - 1.0) < 1e-12 for s in file_spacing):
        known = [False] * 3  # 1/1/1 is every writer's default: treat as uncalibrated
    out_spacing = list(file_spacing)
    if spacing is not None:
        spacing = tuple(spacing)
        if len(spacing) != 3:
            raise InputError(f"spacing must have 3 values (z, y, x), got {spacing}", file=path)
        for i, s in enumerate(spacing):
            if s is not None and s > 0:
                out_spacing[i] = float(s)
    meta = {
        "source": os.path.abspath(path),
        "basename": strip_image_extension(path),
        "dtype": str(data.dtype),
        "unit": "um",
        "file_unit": unit,
        "spacing_from_file": any(known),
        "spacing_known": tuple(known),
        "file_spacing": file_spacing,
        "format": kind,
        "channel_names": list(names) if (names is not None and has_c) else None,
        "channel": channel if (channel is not None and channel >= 0) else None,
        "is_label": False,
    }
    return Image(data, tuple(out_spacing), meta)


def count_nonfinite(data: np.ndarray) -> int:
    """Number of NaN / inf values in a float array (0 for other dtypes); one streaming pass."""
    if data.dtype.kind not in "fc":
        return 0
    # a float64 sum of float32 values cannot overflow: it is finite iff every value is
    if np.isfinite(np.add.reduce(data, axis=None, dtype=np.float64)):
        return 0
    flat = data.reshape(-1)
    step = 1 << 22
    return int(sum(np.count_nonzero(~np.isfinite(flat[i:i + step])) for i in range(0, flat.size, step)))


def series_files(pattern: str, first: int, last: int, increment: int = 1) -> list[str]:
    """The file names of an XPIWIT series: ``pattern`` holds one ``%0nd`` (or ``%d``) index."""
    matches = list(re.finditer(r"%0?\d*d", pattern))
    if len(matches) != 1:
        raise InputError("a series needs a file name with one %0nd index pattern "
                         "(e.g. slice_%03d.tif)", file=pattern)
    if increment < 1:
        raise InputError(f"the series increment must be >= 1, got {increment}", file=pattern)
    if last < first:
        raise InputError(f"the series maximum index {last} is below the minimum index {first}",
                         file=pattern)
    m = matches[0]
    return [pattern[:m.start()] + (m.group(0) % i) + pattern[m.end():]
            for i in range(first, last + 1, increment)]


def read_series(pattern: str, first: int = 0, last: int = 499, increment: int = 1, *,
                spacing: Sequence[float] | None = None, channel: int | None = None,
                check_finite: bool = True) -> Image:
    """XPIWIT's series reader: stack 2D files ``pattern % i`` (i = first, first+increment, ...,
    <= last) along z.

    Files missing at the end of the range are skipped (XPIWIT's default range 0..499 is meant
    as "up to"), with an info message; a missing file before the last existing one is an error.
    x/y spacing comes from the first file, z spacing is 1 um unless ``spacing`` gives it.

    Returns
    -------
    Image
        ``(Z, Y, X)`` or ``(C, Z, Y, X)``; ``meta["basename"]`` is the pattern's name with the
        index and its trailing separators removed (``cells_t%03d.tif`` -> ``cells_t``).
    """
    names = series_files(pattern, first, last, increment)
    exists = [os.path.isfile(n) for n in names]
    if not any(exists):
        raise InputError(f"no file of the series exists (first: {names[0]})", file=pattern)
    n_last = max(i for i, e in enumerate(exists) if e)
    missing = [names[i] for i in range(n_last + 1) if not exists[i]]
    if missing:
        raise InputError(f"{len(missing)} file{'s' if len(missing) > 1 else ''} of the series "
                         f"missing, first: {missing[0]}", file=pattern)
    names = names[: n_last + 1]
    if n_last + 1 < len(exists):
        log.info("series %s: %d files found (indices %d..%d)", pattern, len(names), first,
                 first + n_last * increment)
    stack = None
    first_img = None
    for k, name in enumerate(names):
        img = read_image(name, channel=channel, allow_2d=True, check_finite=check_finite)
        if img.shape3d[0] != 1:
            raise InputError(f"series files must be 2D, this one has {img.shape3d[0]} slices",
                             file=name)
        plane = img.data[:, 0] if img.is_multichannel else img.data[0]
        if stack is None:
            first_img = img
            shape = (plane.shape[0], len(names)) + plane.shape[1:] if img.is_multichannel \
                else (len(names),) + plane.shape
            stack = np.empty(shape, dtype=plane.dtype)
        elif plane.shape != (stack[:, 0] if first_img.is_multichannel else stack[0]).shape \
                or plane.dtype != stack.dtype:
            raise InputError(f"series file has shape {plane.shape} and type {plane.dtype}, the "
                             f"first file {(stack[:, 0] if first_img.is_multichannel else stack[0]).shape} "
                             f"and {stack.dtype}", file=name)
        if first_img.is_multichannel:
            stack[:, k] = plane
        else:
            stack[k] = plane
    sp = [1.0, first_img.spacing[1], first_img.spacing[2]]
    if spacing is not None:
        for i, s in enumerate(spacing):
            if s is not None and s > 0:
                sp[i] = float(s)
    m = re.search(r"%0?\d*d", os.path.basename(pattern))
    base = os.path.basename(pattern)
    base = strip_image_extension(base[: m.start()] + base[m.end():]) if m else strip_image_extension(base)
    base = base.rstrip("_-. ") or "series"
    meta = dict(first_img.meta)
    known = (False,) + tuple(first_img.meta.get("spacing_known", (False,) * 3)[1:])
    meta.update(source=os.path.abspath(pattern), basename=base, series_files=len(names),
                spacing_known=known, spacing_from_file=any(known))
    return Image(stack, tuple(sp), meta)


def _check_readable(path: str) -> None:
    if not path:
        raise InputError("no input file given")
    if not os.path.exists(path):
        raise InputError("file not found", file=path)
    if os.path.isdir(path):
        raise InputError("is a folder, not an image file", file=path)
    if not os.access(path, os.R_OK):
        raise InputError("permission denied (not readable)", file=path)
    if os.path.getsize(path) == 0:
        raise InputError("the file is empty (0 bytes)", file=path)


def _looks_like_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] in (b"II", b"MM")


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # SimpleITK messages carry a C++ file/line preamble; keep the most telling line
    for ln in lines:
        if "itk::ERROR" in ln or "Could not create IO object" in ln or "Unable to" in ln:
            return ln
    return lines[-1] if lines else type(e).__name__


def _unit_factor(unit) -> float | None:
    if unit is None:
        return None
    u = str(unit).strip().lower()
    return _UNITS_UM.get(u)


def _read_tiff(path: str):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError("the TIFF holds no image data", file=path)
        series = tif.series[0]
        axes = series.axes
        data = series.asarray()
        sp, unit, names, kind = tiff_calibration(tif)
    return data, axes, sp, unit, names, kind


def tiff_calibration(tif):
    """(spacing list (z, y, x) in um with None where unknown, unit, channel names, kind) of an open
    ``tifffile.TiffFile``, without reading pixels: OME PhysicalSize, ImageJ calibration, or a plain
    TIFF's centimetre resolution."""
    page = tif.pages[0]
    sp: list[float | None] = [None, None, None]
    unit, names = None, None
    if tif.is_ome and tif.ome_metadata:
        sp, unit, names = _ome_calibration(tif.ome_metadata)
        return sp, unit, names, "ome-tiff"
    xr, yr = _resolution(page)
    if tif.is_imagej:
        ij = tif.imagej_metadata or {}
        unit = ij.get("unit")
        f = _unit_factor(unit)
        if f is not None:
            if xr:
                sp[2] = f / xr
            if yr:
                sp[1] = f / yr
            if ij.get("spacing"):
                sp[0] = float(ij["spacing"]) * f
        return sp, unit, names, "imagej-tiff"
    runit = _tag_value(page, "ResolutionUnit")
    if runit is not None and int(runit) == 3 and xr and yr:  # centimetre
        sp[2], sp[1] = 1e4 / xr, 1e4 / yr
        unit = "cm"
    return sp, unit, names, "tiff"


def _tag_value(page, name):
    tag = page.tags.get(name)
    return None if tag is None else tag.value


def _resolution(page) -> tuple[float | None, float | None]:
    def rational(v):
        if v is None:
            return None
        try:
            num, den = v
            r = float(num) / float(den) if den else 0.0
        except (TypeError, ValueError):
            r = float(v)
        return r if r > 0 and math.isfinite(r) else None

    return rational(_tag_value(page, "XResolution")), rational(_tag_value(page, "YResolution"))


def _ome_calibration(xml: str):
    sp: list[float | None] = [None, None, None]
    unit = None
    names = None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return sp, unit, names
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return sp, unit, names
    for i, ax in enumerate("ZYX"):
        v = pixels.get(f"PhysicalSize{ax}")
        if v is None:
            continue
        u = pixels.get(f"PhysicalSize{ax}Unit", "µm")
        unit = unit or u
        f = _unit_factor(u)
        try:
            if f is not None:
                sp[i] = float(v) * f
        except ValueError:
            pass
    chans = [el for el in pixels if el.tag.rsplit("}", 1)[-1] == "Channel"]
    if chans and all(c.get("Name") for c in chans):
        names = [c.get("Name") for c in chans]
    return sp, unit, names


def _read_sitk(path: str):
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    dim = img.GetDimension()
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)
    spacing = list(img.GetSpacing())[::-1]  # (.., z, y, x)
    fmt = image_format(path)
    if fmt == "nifti" and "xyzt_units" in img.GetMetaDataKeys():
        try:
            space_unit = int(img.GetMetaData("xyzt_units")) & 7
        except ValueError:
            space_unit = 0
        # ITK scales micron (3) and metre (1) headers to millimetres; undo it so that the header
        # numbers are micrometres for micron files (metre files: x 1e6 um)
        if space_unit == 3:
            spacing = [s * 1e3 for s in spacing]
        elif space_unit == 1:
            spacing = [s * 1e3 for s in spacing]
    axes = {2: "YX", 3: "ZYX", 4: "CZYX"}.get(dim)
    if axes is None:
        raise InputError(f"{dim}D images are not supported", file=path)
    if ncomp > 1:
        axes += "S"
    sp = [None, None, None]
    tail = spacing[-3:] if dim >= 3 else [None] + spacing[-2:]
    for i, s in enumerate(tail):
        sp[i] = float(s) if s is not None else None
    kind = {"nrrd": "nrrd", "nifti": "nifti", "mha": "mha", "mhd": "mhd"}[fmt]
    return arr, axes, sp, "um", None, kind


def _normalise_axes(data: np.ndarray, axes: str, path: str) -> tuple[np.ndarray, bool]:
    """Bring an array with tifffile/ITK axis letters into (Z, Y, X) or (C, Z, Y, X)."""
    axes = axes.upper()
    if len(axes) != data.ndim:
        raise InputError(f"axes {axes!r} do not match the data shape {data.shape}", file=path)
    sizes = dict()
    for a, n in zip(axes, data.shape):
        if a in sizes:
            raise InputError(f"repeated axis {a!r} in {axes!r}", file=path)
        sizes[a] = n
    # the depth axis: Z, else a stack-like axis (plain multi-page TIFFs: I/Q; misplaced frames: T)
    depth = "Z" if sizes.get("Z", 1) > 1 else None
    stacky = [a for a in "TIQ" if sizes.get(a, 1) > 1]
    if depth is None and stacky:
        depth = stacky[0]
        stacky = stacky[1:]
    if stacky:
        raise InputError(f"the image has more than one stack axis ({axes} {data.shape}): "
                         "time series and 5D data are not supported", file=path)
    chan = [a for a in "CS" if sizes.get(a, 1) > 1]
    if len(chan) > 1:
        raise InputError(f"the image has both channels and samples ({axes} {data.shape})", file=path)
    keep = [a for a in ((chan[0],) if chan else ()) + ((depth,) if depth else ()) + ("Y", "X")]
    if "Y" not in sizes or "X" not in sizes:
        raise InputError(f"the image has no Y/X plane (axes {axes})", file=path)
    other = [a for a in axes if a not in keep and sizes[a] > 1]
    if other:
        raise InputError(f"unsupported axis {other[0]!r} of size {sizes[other[0]]} (axes {axes}, "
                         f"shape {data.shape})", file=path)
    # drop the singleton axes, then transpose
    index = tuple(slice(None) if a in keep else 0 for a in axes)
    data = data[index]
    remaining = [a for a in axes if a in keep]
    order = [remaining.index(a) for a in keep]
    if order != list(range(len(order))):
        data = np.ascontiguousarray(np.transpose(data, order))
    return data, bool(chan)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_image(path: str | os.PathLike, image: Image, *, compression: bool = True,
                dtype=None, ome: bool = False, overwrite: bool = True,
                protect: Iterable[str | os.PathLike] = (), label: bool | None = None) -> str:
    """Write an image atomically, the format chosen by the extension.

    Parameters
    ----------
    path : str or path-like
        ``.tif``/``.tiff`` (ImageJ hyperstack with micrometre calibration: XResolution /
        YResolution in pixels per um, ``spacing`` and ``unit=um`` in the description),
        ``.ome.tif``/``.ome.tiff`` (OME-TIFF with PhysicalSize*), ``.nrrd``, ``.nii``,
        ``.nii.gz``, ``.mha``, ``.mhd`` (SimpleITK, with spacing).  Missing folders are created.
    image : Image
        ``(Z, Y, X)`` or ``(C, Z, Y, X)``; spacing (z, y, x) in um.
    compression : bool
        zlib/deflate compression (TIFF, OME-TIFF, NRRD, MHA/MHD; NIfTI compresses by ``.nii.gz``).
    dtype : numpy dtype, optional
        Store this type.  Integer targets are range-checked: values never wrap.
    ome : bool
        Write ``.tif`` as OME-TIFF.
    overwrite : bool
        Replace an existing file (default True).  Never applies to ``protect``.
    protect : paths
        Files that must never be overwritten (the run's inputs).
    label : bool, optional
        Whether the image is a label image.  None (default): ``image.meta["is_label"]``, or an
        integer type other than uint8/uint16/int16.

    Stored types (when ``dtype`` is None): labels as uint16, or as uint32 with a warning past
    65535 (never wrapped); bool as uint8; float64 and float16 as float32; other types as they
    are (ImageJ TIFF: other integer types as the smallest of uint16/int16/uint32 that holds the
    values).

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ExecutionError
        Unknown extension, protected or existing path, unwritable folder, a write failure
        (nothing is left behind), or values that do not fit the stored type.
    """
    path = os.fspath(path)
    fmt = image_format(path)
    if fmt == "zarr":  # OME-Zarr: c3dseg.zarr_io
        from .zarr_io import write_zarr_image

        return write_zarr_image(path, image, compression=compression, dtype=dtype, overwrite=overwrite,
                                protect=protect, label=label)
    if ome and fmt == "tiff":
        fmt = "ome"
    if fmt not in _WRITABLE or path.lower().endswith(".nhdr"):
        raise ExecutionError("unknown output format (use .tif, .ome.tif, .nrrd, .nii, .nii.gz, "
                             ".mha or .mhd)", file=path)
    _check_protected(path, protect, fmt)
    if os.path.isdir(path):
        raise ExecutionError("the output path is a folder", file=path)
    if os.path.exists(path) and not overwrite:
        raise ExecutionError("the output file exists (overwrite disabled)", file=path)
    folder = _ensure_folder(path)

    data = np.asarray(image.data)
    if data.ndim not in (3, 4):
        raise ExecutionError(f"expected a (Z, Y, X) or (C, Z, Y, X) image, got shape {data.shape}",
                             file=path)
    if label is None:
        is_label = bool(image.meta.get("is_label", False)) or (
            data.dtype.kind in "iu" and data.dtype not in (np.uint8, np.uint16, np.int16))
    else:
        is_label = bool(label)
    data = _storage_array(data, path, dtype=dtype, is_label=is_label)

    spacing = tuple(float(s) for s in image.spacing)
    names = image.meta.get("channel_names")
    tmpdir = _make_tmpdir(folder, path)
    try:
        target = os.path.join(tmpdir, os.path.basename(path))
        if fmt == "tiff":
            _write_imagej(target, data, spacing, compression)
        elif fmt == "ome":
            _write_ome(target, data, spacing, compression, names)
        else:
            _write_sitk(target, data, spacing, compression)
        _commit(tmpdir, folder, os.path.basename(path))
    except C3DError:
        raise
    except (OSError, RuntimeError, ValueError, MemoryError) as e:
        raise ExecutionError(f"could not write the image: {_one_line(e)}", file=path) from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def write_table(path: str | os.PathLike, table: MetaTable, *, overwrite: bool = True,
                protect: Iterable[str | os.PathLike] = ()) -> str:
    """Write a :class:`MetaTable` as semicolon-separated CSV with one header line, atomically."""
    path = os.fspath(path)
    _check_protected(path, protect, None)
    if os.path.exists(path) and not overwrite:
        raise ExecutionError("the output file exists (overwrite disabled)", file=path)
    folder = _ensure_folder(path)
    tmpdir = _make_tmpdir(folder, path)
    try:
        target = os.path.join(tmpdir, os.path.basename(path))
        with open(target, "w", encoding="utf-8", newline="") as f:
            f.write(table.to_csv())
        _commit(tmpdir, folder, os.path.basename(path))
    except OSError as e:
        raise ExecutionError(f"could not write the table: {_one_line(e)}", file=path) from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _same_file(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _check_protected(path: str, protect, fmt) -> None:
    targets = [path]
    if fmt == "mhd":
        stem = path[: -len(".mhd")]
        targets += [stem + ".raw", stem + ".zraw"]
    for p in protect or ():
        if p is None:
            continue
        p = os.fspath(p)
        for t in targets:
            if _same_file(t, p):
                raise ExecutionError("refusing to overwrite an input file of this run", file=t)


def _ensure_folder(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ExecutionError(f"cannot create the output folder: {e.strerror or e}",
                                 file=folder) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExecutionError("the output folder is not writable", file=folder)
    return folder


def _make_tmpdir(folder: str, path: str) -> str:
    try:
        return tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=folder)
    except OSError as e:
        raise ExecutionError(f"cannot write in the output folder: {e.strerror or e}",
                             file=path) from None


def _commit(tmpdir: str, folder: str, main_name: str) -> None:
    """Move the finished files into place, the main file (a header, for .mhd) last."""
    names = sorted(os.listdir(tmpdir), key=lambda n: n == main_name)
    if main_name not in names:
        raise OSError(errno.EIO, f"the writer produced no {main_name}")
    for n in names:
        os.replace(os.path.join(tmpdir, n), os.path.join(folder, n))


def _storage_array(data: np.ndarray, path: str, *, dtype=None, is_label: bool) -> np.ndarray:
    if dtype is not None:
        return _safe_cast(data, np.dtype(dtype), path)
    kind = data.dtype.kind
    if is_label:
        return label_array(data, path=path)
    if kind == "b":
        return data.astype(np.uint8)
    if kind == "f" and data.dtype != np.float32:
        return data.astype(np.float32)
    if kind not in "iuf":
        raise ExecutionError(f"cannot write data of type {data.dtype}", file=path)
    return data


def label_array(data: np.ndarray, *, path: str | None = None) -> np.ndarray:
    """A label image as uint16, or uint32 with a warning past 65535; values never wrap.

    Raises :class:`ExecutionError` for negative or non-integer labels, or labels past 2**32-1.
    """
    if data.dtype == np.bool_:
        return data.astype(np.uint16)
    if data.size == 0:
        return data.astype(np.uint16)
    lo, hi = data.min(), data.max()
    if data.dtype.kind == "f":
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ExecutionError("label image holds non-finite values", file=path)
        if not np.array_equal(data, np.round(data)):
            raise ExecutionError("label image holds non-integer values", file=path)
    if lo < 0:
        raise ExecutionError(f"label image holds negative values (minimum {lo})", file=path)
    if hi <= 65535:
        return data if data.dtype == np.uint16 else data.astype(np.uint16)
    if hi <= np.iinfo(np.uint32).max:
        log.warning("%s: label values up to %d exceed 65535: writing uint32 labels "
                    "(uint16 readers such as MorphoGraphX cannot take them)",
                    path or "label image", int(hi))
        return data if data.dtype == np.uint32 else data.astype(np.uint32)
    raise ExecutionError(f"label values up to {int(hi)} do not fit uint32", file=path)


def _safe_cast(data: np.ndarray, dt: np.dtype, path: str) -> np.ndarray:
    if dt.kind in "iu" and data.size:
        info = np.iinfo(dt)
        lo, hi = data.min(), data.max()
        if data.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
            raise ExecutionError(f"cannot store non-finite values as {dt}", file=path)
        if lo < info.min or hi > info.max:
            raise ExecutionError(f"values in [{lo}, {hi}] do not fit {dt} (they would wrap)",
                                 file=path)
        if data.dtype.kind == "f":
            return np.rint(data).astype(dt)
    return data.astype(dt, copy=False)


def _write_imagej(target: str, data: np.ndarray, spacing, compression: bool) -> None:
    import tifffile

    sz, sy, sx = spacing
    multi = data.ndim == 4
    if data.dtype.kind in "iu" and data.dtype not in (np.uint8, np.uint16, np.int16, np.uint32):
        # the ImageJ format stores uint8, uint16, int16 and float32 (and uint32 pages, below)
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            data = data.astype(np.uint16)
        elif lo >= -32768 and hi <= 32767:
            data = data.astype(np.int16)
        elif lo >= 0 and hi <= np.iinfo(np.uint32).max:
            data = data.astype(np.uint32)
        elif max(abs(lo), abs(hi)) < 2 ** 24:
            log.warning("%s: the ImageJ format has no 32-bit integer type: writing float32",
                        os.path.basename(target))
            data = data.astype(np.float32)
        else:
            raise ValueError(f"values in [{lo}, {hi}] do not fit an ImageJ TIFF; "
                             "write .ome.tif or .nrrd")
    if multi:  # ImageJ plane order: z outer, channel inner (TZCYXS)
        data = np.ascontiguousarray(np.moveaxis(data, 0, 1))
    axes = "ZCYX" if multi else "ZYX"
    kw = dict(photometric="minisblack", resolution=(1.0 / sx, 1.0 / sy))
    if compression:
        kw.update(compression="zlib", predictor=False)
    if data.dtype in (np.uint8, np.uint16, np.int16, np.float32):
        tifffile.imwrite(target, data, imagej=True,
                         metadata={"spacing": sz, "unit": "um", "axes": axes}, **kw)
        return
    if data.dtype != np.uint32:
        raise ValueError(f"cannot write {data.dtype} as an ImageJ TIFF")
    # uint32 labels: ImageJ-described pages (not a hyperstack type ImageJ writes itself)
    desc = tifffile.imagej_description(data.shape, axes=axes, spacing=sz, unit="um")
    tifffile.imwrite(target, data, description=desc, metadata=None, resolutionunit=1,
                     contiguous=not compression, **kw)


def _write_ome(target: str, data: np.ndarray, spacing, compression: bool, names) -> None:
    import tifffile

    sz, sy, sx = spacing
    multi = data.ndim == 4
    meta = {"axes": "CZYX" if multi else "ZYX",
            "PhysicalSizeX": sx, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": sy, "PhysicalSizeYUnit": "µm",
            "PhysicalSizeZ": sz, "PhysicalSizeZUnit": "µm"}
    if multi and names and len(names) == data.shape[0]:
        meta["Channel"] = {"Name": [str(n) for n in names]}
    kw = dict(photometric="minisblack")
    if compression:
        kw.update(compression="zlib", predictor=False)
    tifffile.imwrite(target, data, ome=True, metadata=meta, **kw)


def _write_sitk(target: str, data: np.ndarray, spacing, compression: bool) -> None:
    import SimpleITK as sitk

    if data.ndim == 4:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(data, 0, -1)), isVector=True)
    else:
        img = sitk.GetImageFromArray(data)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, target, useCompression=bool(compression))


# ---------------------------------------------------------------------------------------------
# Precision (XPIWIT's Precision parameter for written results)
# ---------------------------------------------------------------------------------------------

def to_precision(image: Image, precision: int) -> Image:
    """Convert an image to XPIWIT's result ``Precision``: 8 -> uint8, 16 -> uint16, 32 -> float32.

    - Label images (``meta["is_label"]``, and non-negative integer images wider than 16 bits,
      the types label images come in) keep their values whatever the precision: uint16, or
      uint32 with a warning past 65535 (never wrapped, never rescaled).
    - Other integer (and bool) images keep their values when they fit the target type; when they
      do not (e.g. uint16 values above 255 at precision 8, or negative values) they are min-max
      rescaled onto the target range.  Precision 32 stores them as float32.
    - Float images: precision 32 gives float32.  For 8/16, values in [0, 1] scale to the full
      integer range (``round(v * 255)`` / ``round(v * 65535)``); any other range is min-max
      rescaled onto it.  NaN becomes 0.

    Parameters
    ----------
    image : Image
    precision : {8, 16, 32}

    Returns
    -------
    Image
        A new image on the same grid; ``meta["precision"]`` records the precision.
    """
    if precision not in (8, 16, 32):
        raise ValueError(f"precision must be 8, 16 or 32, got {precision!r}")
    data = np.asarray(image.data)
    wide_int = data.dtype.kind in "iu" and data.dtype.itemsize > 2 and data.size \
        and data.min() >= 0
    if image.meta.get("is_label", False) or wide_int:
        return image.derive(label_array(data, path=image.meta.get("source")), precision=precision)
    if precision == 32:
        return image.derive(data.astype(np.float32, copy=False), precision=precision)
    target = np.uint8 if precision == 8 else np.uint16
    top = float(np.iinfo(target).max)
    if data.dtype.kind in "biu":
        if data.size == 0:
            return image.derive(data.astype(target), precision=precision)
        lo, hi = int(data.min()), int(data.max())
        if lo >= 0 and hi <= top:
            return image.derive(data.astype(target, copy=False), precision=precision)
        out = _rescale_to(data.astype(np.float32), float(lo), float(hi), top)
        return image.derive(out.astype(target), precision=precision)
    work = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(work)
    if not finite.all():
        work = np.where(finite, work, np.float32(0))
    if work.size == 0:
        return image.derive(work.astype(target), precision=precision)
    lo, hi = float(work.min()), float(work.max())
    if lo >= 0.0 and hi <= 1.0:
        out = np.rint(work * np.float32(top))
    else:
        out = _rescale_to(work, lo, hi, top)
    return image.derive(out.astype(target), precision=precision)


def _rescale_to(work: np.ndarray, lo: float, hi: float, top: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(work)
    out = (work - np.float32(lo)) * np.float32(top / (hi - lo))
    np.rint(out, out=out)
    np.clip(out, 0, top, out=out)
    return out

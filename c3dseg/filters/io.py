"""The reader and writer filters: ``ImageReader`` (XPIWIT's, with its parameters) and
``ImageWriter`` (writes an image to a file of the pipeline's choosing).

Both are thin adapters over :mod:`c3dseg.io`.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ExecutionError, InputError, ParameterError
from ..image import Image
from ..io import (image_format, read_image, read_series, strip_image_extension, to_precision,
                  write_image)
from ..schemas.params import Param
from .base import Filter, Port, register

#: ImageWriter ``Format`` choices -> extension
_FORMAT_EXT = {"tif": ".tif", "ome.tif": ".ome.tif", "nrrd": ".nrrd", "nii": ".nii",
               "nii.gz": ".nii.gz", "mha": ".mha", "mhd": ".mhd"}


@register
class ImageReader(Filter):
    """XPIWIT's ImageReader.

    Spacing: SpacingX/Y/Z <= 0 (the default -1) take the file's spacing.  A value > 0 is used
    for an axis the file does not calibrate (no spacing, a file at exactly 1/1/1, z of an ImageJ
    file without ``spacing=``, z of a 2D series), or always with ``OverrideSpacing=1``.  So
    XPIWIT's pipelines, which carry ``Spacing*=1`` by default, never override a calibrated file.

    Intensities: XPIWIT maps [InputMinimumValue, InputMaximumValue] linearly onto [0, 1] and
    returns float32; -1 means "detect" (the image's minimum or maximum; per channel for a
    multi-channel image).  ``KeepDataType=1`` returns the data as stored instead (label images,
    raw intensities).
    """

    name = "ImageReader"
    description = "Reads image from disk"
    category = "Reader"
    is_reader = True
    inputs = (Port("image", "path", "Input file (the command-line path; a %0nd pattern for series)"),)
    outputs = (Port("image", "image", "The image (float32 in [0, 1] unless KeepDataType=1)"),)
    params = (
        Param("UseSeriesReader", "bool", False,
              "Combine separate 2D images to one 3D stack. Drag&drop first file of the series and "
              "substitute the series index by %0nd, with n being the number of digits."),
        Param("SeriesMinIndex", "int", 0, "Start index for the series reader", min=0),
        Param("SeriesMaxIndex", "int", 499,
              "End index for the series reader (files missing at the end of the range are skipped)",
              min=0),
        Param("SeriesIncrement", "int", 1, "Index increment for the series reader", min=1),
        Param("SpacingX", "double", -1.0,
              "Spacing along x (um); <= 0 takes the file's. A value > 0 applies when the file is "
              "uncalibrated or OverrideSpacing=1.", unit="um"),
        Param("SpacingY", "double", -1.0, "Spacing along y (um); see SpacingX.", unit="um"),
        Param("SpacingZ", "double", -1.0, "Spacing along z (um); see SpacingX.", unit="um"),
        Param("OverrideSpacing", "bool", False,
              "1: SpacingX/Y/Z values > 0 replace the file's spacing even when the file is calibrated."),
        Param("InputMinimumValue", "double", -1.0,
              "Minimum intensity value of the input image (maps to 0). Set to -1 for auto detection"),
        Param("InputMaximumValue", "double", -1.0,
              "Maximum intensity value of the input image (maps to 1). Set to -1 for auto detection"),
        Param("Channel", "int", -1,
              "0-based channel of a multi-channel file; -1 keeps all channels (a CZYX image).",
              min=0, allow=(-1,)),
        Param("KeepDataType", "bool", False,
              "1: return the data as stored (no mapping onto [0, 1]), e.g. for label images."),
        Param("DefaultInput", "string", "",
              "File read when the command line gives no input for this reader (c3dseg extension; relative to "
              "the pipeline's folder), e.g. the bundled sample stack.", path=True),
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        lo, hi = p.get("InputMinimumValue"), p.get("InputMaximumValue")
        if lo is not None and hi is not None and lo != -1 and hi != -1 and hi <= lo:
            raise ParameterError(f"must be greater than InputMinimumValue ({lo}), got {hi}",
                                 key="InputMaximumValue", filter=cls.name)
        if p.get("SeriesMaxIndex", 0) < p.get("SeriesMinIndex", 0):
            raise ParameterError(f"must be >= SeriesMinIndex ({p['SeriesMinIndex']}), got "
                                 f"{p['SeriesMaxIndex']}", key="SeriesMaxIndex", filter=cls.name)

    def run(self, images, metas):
        src = images[0] if images else None
        if isinstance(src, Image):
            img = src
        else:
            if src is None or (isinstance(src, str) and not src):
                raise InputError("no input file given", item=self.ctx.item_id or None,
                                 filter=self.name)
            path = os.fspath(src)
            channel = self.p["Channel"] if self.p["Channel"] >= 0 else None
            try:
                if self.p["UseSeriesReader"]:
                    img = read_series(path, self.p["SeriesMinIndex"], self.p["SeriesMaxIndex"],
                                      self.p["SeriesIncrement"], channel=channel)
                else:
                    img = read_image(path, channel=channel)
            except InputError as e:
                raise e.located(item=self.ctx.item_id or None, filter=self.name)
        img = Image(img.data, self._spacing(img), dict(img.meta))
        if not self.p["KeepDataType"]:
            img = img.derive(self._map_intensities(img.data))
            img.meta["dtype"] = str(img.data.dtype)
        return [img], []

    def _spacing(self, img: Image) -> tuple[float, float, float]:
        given = (self.p["SpacingZ"], self.p["SpacingY"], self.p["SpacingX"])
        known = img.meta.get("spacing_known")
        if known is None:
            known = (bool(img.meta.get("spacing_from_file", False)),) * 3
        override = self.p["OverrideSpacing"]
        return tuple(g if (g > 0 and (override or not k)) else s
                     for g, s, k in zip(given, img.spacing, known))

    def _map_intensities(self, data: np.ndarray) -> np.ndarray:
        lo, hi = self.p["InputMinimumValue"], self.p["InputMaximumValue"]
        return map_to_unit_range(data, None if lo == -1 else lo, None if hi == -1 else hi,
                                 per_channel=data.ndim == 4)


def map_to_unit_range(data: np.ndarray, lo: float | None = None, hi: float | None = None, *,
                      per_channel: bool = False) -> np.ndarray:
    """float32 ``(data - lo) / (hi - lo)``; lo/hi None: the data's min/max (per channel of a
    ``(C, Z, Y, X)`` array with ``per_channel``).  A constant image maps to 0.  No clipping."""
    if per_channel and (lo is None or hi is None):
        return np.stack([map_to_unit_range(c, lo, hi) for c in data])
    out = np.array(data, dtype=np.float32, copy=True)
    lo_v = float(out.min()) if lo is None else float(lo)
    hi_v = float(out.max()) if hi is None else float(hi)
    if hi_v <= lo_v:
        out.fill(0)
        return out
    out -= np.float32(lo_v)
    out *= np.float32(1.0 / (hi_v - lo_v))
    return out


@register
class ImageWriter(Filter):
    """Writes its image input to a file; the format comes from the extension (or ``Format``).

    ``FileName`` empty: the run's output path (``ctx.extra["output_path"]``; a folder gets
    ``<basename>.<ext>``).  Labels (``LabelImage=auto``: ``meta["is_label"]`` or an integer
    image) are stored uint16, or uint32 with a warning past 65535.  The run's input files
    (``ctx.extra["protected_paths"]``) are never overwritten.
    """

    name = "ImageWriter"
    description = "Writes an image to disk (ImageJ TIFF with um calibration, OME-TIFF, NRRD, NIfTI, MHA)"
    category = "Writer"
    is_writer = True
    inputs = (Port("image", "image", "Image to write"),)
    outputs = ()
    params = (
        Param("FileName", "string", "",
              "Output file; relative paths resolve against the pipeline's folder. Empty: the "
              "run's output path.", path=True),
        Param("Format", "string", "auto", "File format; auto: from the file name's extension.",
              choices=("auto",) + tuple(_FORMAT_EXT)),
        Param("LabelImage", "string", "auto",
              "1: a label image (uint16, uint32 past 65535); 0: not; auto: from the image.",
              choices=("auto", "1", "0")),
        Param("Precision", "int", -1,
              "-1 (default): keep the image's type; 8/16/32: convert as XPIWIT's Precision "
              "(uint8/uint16/float32; labels keep their values).", min=8, max=32, allow=(-1,)),
    )

    @classmethod
    def check_params(cls, p):
        if p.get("Precision") not in (-1, 8, 16, 32):
            raise ParameterError(f"expected -1, 8, 16 or 32, got {p.get('Precision')!r}",
                                 key="Precision", filter=cls.name)
        fname = p.get("FileName") or ""
        if fname and p.get("Format", "auto") == "auto" and image_format(fname) is None \
                and not fname.endswith(("/", os.sep)):
            raise ParameterError(f"{fname!r} has no image extension (.tif, .ome.tif, .nrrd, .nii, "
                                 ".nii.gz, .mha, .mhd); set Format", key="FileName", filter=cls.name)

    def output_path(self, img: Image) -> str:
        """The path this writer will write for an image."""
        fname = self.p["FileName"]
        if fname:
            path = self.resolve_path(fname)
        else:
            path = self.ctx.extra.get("output_path")
            if not path:
                raise ExecutionError("no FileName given and the run has no output path",
                                     item=self.ctx.item_id or None, filter=self.name,
                                     key="FileName")
            path = os.fspath(path)
        fmt = self.p["Format"]
        is_dir = path.endswith(("/", os.sep)) or os.path.isdir(path)
        if is_dir:
            ext = _FORMAT_EXT.get(fmt, ".tif")
            return os.path.join(path, img.basename + ext)
        if fmt != "auto":
            ext = _FORMAT_EXT[fmt]
            if not path.lower().endswith(ext):
                path = os.path.join(os.path.dirname(path), strip_image_extension(path) + ext)
        return path

    def run(self, images, metas):
        img = images[0]
        if not isinstance(img, Image):
            raise ExecutionError(f"expected an image, got {type(img).__name__}",
                                 item=self.ctx.item_id or None, filter=self.name)
        path = self.output_path(img)
        label = {"auto": None, "1": True, "0": False}[self.p["LabelImage"]]
        if self.p["Precision"] != -1:
            if label is not None:
                img = img.derive(img.data, is_label=label)
            img = to_precision(img, self.p["Precision"])
        try:
            written = write_image(path, img, compression=self.p["Compression"], label=label,
                                  protect=self.ctx.extra.get("protected_paths", ()))
        except ExecutionError as e:
            raise e.located(item=self.ctx.item_id or None, filter=self.name)
        self.ctx.extra.setdefault("written", []).append(written)
        return [], []

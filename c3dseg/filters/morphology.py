"""Region and geometry filters: volume-based region rejection, resampling, region properties.
Thin adapters over :mod:`c3dseg.regions` and :mod:`c3dseg.resampling`."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ExecutionError, ParameterError
from ..image import Image
from ..regions import REGION_COLUMNS, filter_by_volume, label_components, region_properties, region_table
from ..resampling import output_shape, resample
from ..schemas.params import Param
from .base import Filter, Port, register

log = logging.getLogger("c3dseg")


def _label_data(flt: Filter, img: Image) -> np.ndarray:
    """The integer label array of an image input, or a clear error."""
    data = img.data
    if data.ndim != 3:
        raise ExecutionError(f"expects a single-channel (Z, Y, X) image, got shape {data.shape}",
                             item=flt.ctx.item_id or None, filter=flt.name)
    if data.dtype.kind in "iub":
        if data.dtype.kind == "i" and data.size and data.min() < 0:
            raise ExecutionError("expects a label image, got negative values",
                                 item=flt.ctx.item_id or None, filter=flt.name)
        return data
    if data.size and np.isfinite(data).all() and data.min() >= 0 \
            and np.array_equal(data, np.round(data)):
        return data.astype(np.int64)
    raise ExecutionError("expects a label image (non-negative integers), got non-integer values; "
                         "read label files with KeepDataType=1", item=flt.ctx.item_id or None,
                         filter=flt.name)


@register
class VolumeBasedRegionRejectionFilter(Filter):
    """XPIWIT's VolumeBasedRegionRejectionFilter: removes regions (connected components of a
    binary input, or labels) whose voxel count is outside [MinimumVolume, MaximumVolume]."""

    name = "VolumeBasedRegionRejectionFilter"
    description = ("Removes regions whose volume (voxels) is below MinimumVolume or above "
                   "MaximumVolume; binary or label output.")
    category = "Other"
    blockwise = "global"  # connected components / volumes across blocks (c3dseg.blockwise.globals)
    inputs = (Port("image", "image", "Binary mask (BinaryInput=1) or label image"),)
    outputs = (Port("image", "image", "Mask of the kept regions (uint8 0/1), or their labels 1..n"),)
    params = (
        Param("BinaryInput", "bool", True,
              "If input is binary, a label image is generated before extracting the region properties."),
        Param("LabelOutput", "bool", False,
              "1: output the kept regions as labels 1..n (uint16/uint32); 0: a binary mask."),
        Param("FullyConnected", "bool", True,
              "Determines the connectivity model. Use FullyConnected = 1 for 8/26-neighborhood or "
              "to 0 for 4/6 neighborhood."),
        Param("MinimumVolume", "int", -1,
              "All regions with smaller volume (voxels) are suppressed; -1: no minimum.",
              min=0, allow=(-1,), unit="voxels"),
        Param("MaximumVolume", "int", -1,
              "All regions with larger volume (voxels) are suppressed; -1: no maximum.",
              min=0, allow=(-1,), unit="voxels"),
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        lo, hi = p["MinimumVolume"], p["MaximumVolume"]
        if lo >= 0 and hi >= 0 and hi < lo:
            raise ParameterError(f"must be >= MinimumVolume ({lo}), got {hi}", key="MaximumVolume",
                                 filter=cls.name)

    def run(self, images, metas):
        img = images[0]
        if self.p["BinaryInput"]:
            if img.data.ndim != 3:
                raise ExecutionError(f"expects a single-channel (Z, Y, X) image, got shape "
                                     f"{img.data.shape}", item=self.ctx.item_id or None, filter=self.name)
            labels, _ = label_components(img.data, self.p["FullyConnected"])
        else:
            labels = _label_data(self, img)
        kept = filter_by_volume(labels, self.p["MinimumVolume"], self.p["MaximumVolume"])
        if self.p["LabelOutput"]:
            n = int(kept.max()) if kept.size else 0
            out = kept.astype(np.uint16 if n <= 65535 else np.uint32)
            if n > 65535:
                log.warning("%s: %d regions exceed 65535: uint32 labels", self.name, n)
            return [img.derive(out, is_label=True)], []
        return [img.derive((kept > 0).view(np.uint8), is_label=False)], []


@register
class ResampleImageFilter(Filter):
    """Resamples to a spacing (SpacingX/Y/Z), by factors (FactorX/Y/Z) or, with a second input,
    onto that reference image's grid (its shape and spacing: how a pipeline returns to the input
    grid at the end).  The physical extent is kept (see :mod:`c3dseg.resampling`)."""

    name = "ResampleImageFilter"
    description = ("Resamples an image to a target spacing, by factors, or onto the grid of a "
                   "reference image (input 2); nearest neighbour for labels.")
    category = "ImageFilter"
    #: changes the voxel grid; blockwise form (output grid, then block by block): c3dseg.blockwise.resample
    blockwise = "resample"
    inputs = (Port("image", "image", "Image to resample"),
              Port("image", "reference", "Optional reference image: resample onto its grid",
                   optional=True))
    outputs = (Port("image", "image", "Resampled image"),)
    params = (
        Param("SpacingX", "double", -1.0, "Target spacing along x (um); -1: keep.", unit="um",
              min=1e-9, allow=(-1.0,)),
        Param("SpacingY", "double", -1.0, "Target spacing along y (um); -1: keep.", unit="um",
              min=1e-9, allow=(-1.0,)),
        Param("SpacingZ", "double", -1.0, "Target spacing along z (um); -1: keep.", unit="um",
              min=1e-9, allow=(-1.0,)),
        Param("FactorX", "double", -1.0,
              "Voxel-count factor along x (2: twice as many voxels, half the spacing); -1: keep.",
              min=1e-9, allow=(-1.0,)),
        Param("FactorY", "double", -1.0, "Voxel-count factor along y; -1: keep.", min=1e-9,
              allow=(-1.0,)),
        Param("FactorZ", "double", -1.0, "Voxel-count factor along z; -1: keep.", min=1e-9,
              allow=(-1.0,)),
        Param("Interpolation", "string", "auto",
              "linear, nearest, or auto (nearest for label and integer images, else linear).",
              choices=("auto", "linear", "nearest")),
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        sp = any(p[k] > 0 for k in ("SpacingX", "SpacingY", "SpacingZ"))
        fa = any(p[k] > 0 for k in ("FactorX", "FactorY", "FactorZ"))
        if sp and fa:
            raise ParameterError("give SpacingX/Y/Z or FactorX/Y/Z, not both", key="FactorX",
                                 filter=cls.name)

    def run(self, images, metas):
        img = images[0]
        ref = images[1] if len(images) > 1 else None
        if ref is not None:
            shape = tuple(ref.shape3d)
        else:
            spacing = (self.p["SpacingZ"], self.p["SpacingY"], self.p["SpacingX"])
            factors = (self.p["FactorZ"], self.p["FactorY"], self.p["FactorX"])
            if any(f > 0 for f in factors):
                shape = output_shape(img.shape3d, img.spacing, factors=factors)
            else:
                shape = output_shape(img.shape3d, img.spacing, new_spacing=spacing)
        mode = self.p["Interpolation"]
        if mode == "auto":
            mode = "nearest" if (img.meta.get("is_label") or img.data.dtype.kind in "iub") else "linear"
        out, new_spacing = resample(img.data, img.spacing, shape, order=0 if mode == "nearest" else 1,
                                    threads=self.threads())
        if ref is not None:
            new_spacing = tuple(ref.spacing)
        return [Image(out, new_spacing, dict(img.meta))], []


@register
class RegionPropertiesFilter(Filter):
    """Region properties of a label image as a meta table (``;``-CSV when written): label,
    volume (voxels), volume_um3, centroid x/y/z (voxels and um), inclusive bounding box."""

    name = "RegionPropertiesFilter"
    description = ("Extracts label, volume, centroid and bounding box of every region of a label "
                   "image into a table.")
    category = "Other"
    blockwise = "global"  # per-region sums across blocks: c3dseg.blockwise.reconstruction
    inputs = (Port("image", "labels", "Label image (0 = background)"),)
    outputs = (Port("image", "labels", "The label image, unchanged"),
               Port("meta", "properties", "One row per region: " + ", ".join(REGION_COLUMNS)))

    def run(self, images, metas):
        img = images[0]
        labels = _label_data(self, img)
        table = region_table(region_properties(labels, img.spacing),
                             meta={"basename": img.basename, "source": img.meta.get("source")})
        return [img], [table]

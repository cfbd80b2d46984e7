"""Classical segmentation filters: the cell-diameter estimate and the seeded-watershed baseline.
Thin adapters over :mod:`c3dseg.diameter` and :mod:`c3dseg.watershed`."""

from __future__ import annotations

import logging
import math

import numpy as np

from ..diameter import estimate_cell_diameter
from ..errors import InputError
from ..image import MetaTable
from ..schemas.params import Param
from ..watershed import seeded_watershed
from .base import Filter, Port, register

log = logging.getLogger("c3dseg")


def _channel(img, channel):
    data = img.data
    if data.ndim == 4:
        if not 0 <= channel < data.shape[0]:
            raise InputError(f"channel {channel} does not exist ({data.shape[0]} channels)", key="Channel")
        return data[channel]
    if data.ndim != 3:
        raise InputError(f"expected a 3D image, got shape {data.shape}")
    return data


@register
class EstimateCellDiameter(Filter):
    """:func:`c3dseg.diameter.estimate_cell_diameter` as a filter.  A stack without cells (constant or
    noise only) gets ``cell_diameter_um`` NaN, meta ``no_cells`` and one warning; ResampleToModelScale
    then passes a small all-zero stand-in and the label filters downstream return empty labels."""

    name = "EstimateCellDiameter"
    description = ("Estimates the median cell diameter (um) of a membrane-stained stack from the image alone "
                   "and passes the image on unchanged with meta 'cell_diameter_um' set (read by "
                   "ResampleToModelScale and SeededWatershed).")
    category = "ImageFilter"
    #: the same estimate on the same central box, read lazily: c3dseg.blockwise.resample
    blockwise = "global"
    inputs = (Port("image", "image", "Membrane image (ZYX, or CZYX with Channel)"),)
    outputs = (Port("image", "image", "The input image, unchanged, with meta cell_diameter_um"),
               Port("meta", "diameter", "One row: cell_diameter_um, regions, block voxels"))
    params = (
        Param("Channel", "int", 0, "Channel measured when the image has several (0-based).", min=0),
        Param("MaxVoxels", "int", 4_000_000,
              "Larger images are measured on a central block of about this many voxels.", min=32768),
        Param("ModelPath", "string", "",
              "The .onnx model file (relative paths: to the pipeline's folder); here it refines the classical estimate (segments a central crop of at most 64^3 voxels at "
              "the scale the estimate implies, twice; kept only when the network measures the cells rather "
              "than echoing the scale). Empty: the classical estimate only.", path=True, exists=True),
    )

    def run(self, images, metas):
        img = images[0]
        data = _channel(img, self.p["Channel"])
        model = self.resolve_path(self.p["ModelPath"]) if self.p["ModelPath"] else None
        d, info = estimate_cell_diameter(data, img.spacing, max_voxels=self.p["MaxVoxels"], model=model,
                                         return_details=True)
        regions = info["passes"][-1][2] if info["passes"] else 0
        empty = not math.isfinite(d)
        if empty:
            log.warning("%s: no cells found (no tissue: constant or noise-only image); the segmentation "
                        "will be empty", img.basename)
        else:
            log.info("%s: estimated median cell diameter %.3g um (%d regions)", img.basename, d, regions)
            if "refine" in info:
                log.info("%s: network refinement %s (classical %.3g um; passes %s, slope %.2f)", img.basename,
                         "kept" if info["refine"]["accepted"] else "rejected", info["classical"],
                         ", ".join(f"{a:.3g}->{b:.3g} um ({n} cells)" for a, b, n in info["refine"]["passes"]),
                         info["refine"]["slope"])
        table = MetaTable(["cell_diameter_um", "regions", "block_voxels"],
                          [[float(d), int(regions), int(np.prod(info["block_shape"]))]])
        return [img.derive(img.data, cell_diameter_um=float(d), no_cells=empty)], [table]


@register
class SeededWatershed(Filter):
    name = "SeededWatershed"
    description = ("Classical baseline: Gaussian smoothing of the membrane image, h-minima seeds above the "
                   "image's noise level, watershed, large dark regions as background.  uint16 labels.")
    category = "ImageFilter"
    inputs = (Port("image", "image", "Membrane image (bright walls)"),)
    outputs = (Port("image", "labels", "Cell labels (0 background, 1..N)"),)
    params = (
        Param("CellDiameterUm", "double", 0.0,
              "Typical cell diameter; 0: the upstream estimate (meta cell_diameter_um) or one made here.",
              min=0.0, unit="um"),
        Param("Smoothing", "double", 0.1, "Gaussian sigma as a fraction of the cell diameter.", min=0.0,
              max=1.0),
        Param("HFactor", "double", 2.0, "Seed basin depth in units of the noise left after smoothing.",
              min=0.0),
        Param("Background", "string", "auto",
              "auto: large dark regions are background; none: no background; threshold: normalised smoothed "
              "intensity below BackgroundThreshold.", choices=("auto", "none", "threshold")),
        Param("BackgroundThreshold", "double", 0.1,
              "Threshold (0..1, percentile-normalised smoothed image) for Background=threshold.", min=0.0,
              max=1.0),
        Param("Channel", "int", 0, "Channel segmented when the image has several (0-based).", min=0),
    )

    def run(self, images, metas):
        img = images[0]
        data = _channel(img, self.p["Channel"])
        d = self.p["CellDiameterUm"]
        if d <= 0:
            d = img.meta.get("cell_diameter_um")
            if d is None or not math.isfinite(float(d)):
                d = estimate_cell_diameter(data, img.spacing)
        d = float(d) if d is not None and math.isfinite(float(d)) and d > 0 else None
        bg = self.p["Background"]
        if bg == "threshold":
            bg = float(self.p["BackgroundThreshold"])
        labels = seeded_watershed(data, img.spacing, diameter_um=d, smoothing=self.p["Smoothing"],
                                  h_factor=self.p["HFactor"], background=bg)
        if labels.dtype == np.uint32:
            log.warning("%s: %d cells exceed 65535: uint32 labels", self.name, int(labels.max()))
        return [img.derive(labels, is_label=True)], []

"""Classical segmentation filters: the cell-diameter estimate, the seeded-watershed baseline and the
tissue mask.  Thin adapters over :mod:`c3dseg.diameter`, :mod:`c3dseg.watershed` and :mod:`c3dseg.tissue`."""

from __future__ import annotations

import logging
import math

import numpy as np

from ..diameter import estimate_cell_diameter, load_fit
from ..errors import InputError
from ..image import MetaTable
from ..schemas.params import Param
from ..watershed import seeded_watershed
from .base import Filter, Port, register

log = logging.getLogger("c3dseg")


def channel_of(data, channel):
    """Channel ``channel`` of a CZYX array; a ZYX array as it is (also for blockwise tasks)."""
    if data.ndim == 4:
        if not 0 <= channel < data.shape[0]:
            raise InputError(f"channel {channel} does not exist ({data.shape[0]} channels)", key="Channel")
        return data[channel]
    return data


def _channel(img, channel):
    data = channel_of(img.data, channel)
    if data.ndim != 3:
        raise InputError(f"expected a 3D image, got shape {data.shape}")
    return data


def correction(path):
    """:func:`c3dseg.diameter.load_fit` for EstimateCellDiameter's ``CorrectionFile`` (errors name
    the parameter)."""
    try:
        return load_fit(path)
    except InputError as e:
        raise InputError(e.message, key="CorrectionFile") from None


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
        Param("CorrectionFile", "string", "",
              "The estimate's correction (JSON written by c3d-fit-diameter from your own annotated stacks; "
              "relative paths: to the pipeline's folder). Empty: the packaged fit (synthetic tissue).",
              path=True, exists=True),
    )

    def run(self, images, metas):
        img = images[0]
        data = _channel(img, self.p["Channel"])
        model = self.resolve_path(self.p["ModelPath"]) if self.p["ModelPath"] else None
        fit = correction(self.resolve_path(self.p["CorrectionFile"])) if self.p["CorrectionFile"] else None
        d, info = estimate_cell_diameter(data, img.spacing, max_voxels=self.p["MaxVoxels"], model=model,
                                         fit=fit, return_details=True)
        regions = info["regions"]
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


def mask_diameter(p, meta, estimate):
    """The cell diameter (um) TissueMask uses: CellDiameterUm, else the upstream estimate (meta
    ``cell_diameter_um``), else ``estimate()`` (one made here; whole image or blockwise); NaN when
    the image holds no cells."""
    d = p["CellDiameterUm"]
    if d > 0:
        return float(d)
    d = meta.get("cell_diameter_um")
    return float(estimate() if d is None else d)


def warn_everything(name, basename, fraction):
    log.warning("%s: %s: only %.1f %% of the image lies near visible walls (walls too faint to tell tissue "
                "from surround); every voxel counts as tissue", name, basename, 100.0 * fraction)


@register
class TissueMask(Filter):
    """:func:`c3dseg.tissue.tissue_mask_image` as a filter."""

    name = "TissueMask"
    description = ("Tissue (1) versus empty surround (0) of a membrane image: voxels within Reach cell diameters of "
                   "walls brighter than their surroundings by WallContrast x the noise. With "
                   "InstanceForegroundOverlapFilter it removes cells found in the noisy background.")
    category = "ImageFilter"
    #: the same noise level (central box) and the mask block by block with its halo: c3dseg.blockwise.resample
    blockwise = "global"
    inputs = (Port("image", "image", "Membrane image (ZYX, or CZYX with Channel)"),)
    outputs = (Port("image", "mask", "uint8: 1 tissue, 0 surround"),)
    params = (
        Param("CellDiameterUm", "double", 0.0,
              "Typical cell diameter; 0: the upstream estimate (meta cell_diameter_um) or one made here.",
              min=0.0, unit="um"),
        Param("Smoothing", "double", 0.1, "Gaussian sigma as a fraction of the cell diameter (at least half a "
              "lateral voxel).", min=0.0, max=1.0),
        Param("WallContrast", "double", 2.5, "A wall voxel is brighter than the mean of a box one cell across "
              "by this many noise standard deviations (of the smoothed image).", min=0.0),
        Param("Reach", "double", 0.75, "Tissue lies within this many cell diameters of wall voxels.", min=0.05,
              max=10.0),
        Param("MinDensity", "double", 0.02, "Fraction of wall voxels within Reach that makes a voxel tissue.",
              min=0.0, max=1.0),
        Param("MinTissueFraction", "double", 0.05, "Below this fraction of tissue the walls are too faint to "
              "tell: every voxel counts as tissue (with a warning).", min=0.0, max=1.0),
        Param("MaxVoxels", "int", 4_000_000, "The noise level is measured on a central block of about this many "
              "voxels (the block EstimateCellDiameter reads).", min=32768),
        Param("Channel", "int", 0, "Channel measured when the image has several (0-based).", min=0),
    )

    def run(self, images, metas):
        from ..tissue import tissue_mask_image

        img = images[0]
        data = _channel(img, self.p["Channel"])
        d = mask_diameter(self.p, img.meta,
                          lambda: estimate_cell_diameter(data, img.spacing, max_voxels=self.p["MaxVoxels"]))
        if not (math.isfinite(d) and d > 0):     # no cells: nothing to tell apart
            return [img.derive(np.ones(data.shape, np.uint8), is_label=False)], []
        mask, info = tissue_mask_image(data, img.spacing, d, smoothing=self.p["Smoothing"],
                                       wall_contrast=self.p["WallContrast"], reach=self.p["Reach"],
                                       min_density=self.p["MinDensity"], min_fraction=self.p["MinTissueFraction"],
                                       max_voxels=self.p["MaxVoxels"], return_details=True)
        if info["everything"]:
            warn_everything(self.name, img.basename, info["fraction"])
        else:
            log.info("%s: %s: %.1f %% of the image is tissue", self.name, img.basename, 100.0 * info["fraction"])
        return [img.derive(mask.astype(np.uint8), is_label=False)], []

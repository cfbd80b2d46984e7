"""Bringing an input to the scale a network was trained at, and back.

The default models are trained on volumes resampled to an isotropic grid on which the median cell
is ``median_cell_diameter_voxels`` across (model metadata).  An input with spacing ``s`` (um) and
cells ``d`` um across is resampled to the isotropic spacing ``d / D``; the labels go back onto the
input grid with ``ResampleImageFilter`` (reference input = the reader's image, nearest neighbour).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..resampling import output_shape, output_spacing, resample
from ..schemas import Param
from .base import Filter, Port, register

log = logging.getLogger("c3dseg")

#: a cell-diameter estimate differing from the given CellDiameterUm by more than this factor warns
DISAGREEMENT = 2.0

#: edge (voxels) of the all-zero stand-in passed downstream for an image without cells
PLACEHOLDER_SIZE = 16


def model_cell_diameter_voxels(model_path: str, explicit: float = 0.0) -> float:
    """The cell diameter (voxels) a model was trained at: ``explicit`` when > 0, else its metadata."""
    if explicit and explicit > 0:
        return float(explicit)
    from ..predict import OnnxNetwork

    net = OnnxNetwork(model_path, threads=1)
    text = net.metadata.get("median_cell_diameter_voxels", "")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"model {model_path} has no median_cell_diameter_voxels metadata (not exported by "
                         "c3d-export?); set ModelCellDiameterVoxels to the cell diameter, in voxels, of its "
                         "training data", key="ModelCellDiameterVoxels")
    return value


def model_spacing(cell_diameter_um: float, model_diameter_vox: float) -> tuple[float, float, float]:
    """Isotropic spacing (um) on which cells ``cell_diameter_um`` across are ``model_diameter_vox`` voxels."""
    iso = float(cell_diameter_um) / float(model_diameter_vox)
    return (iso, iso, iso)


@dataclass(frozen=True)
class ModelGrid:
    """What :meth:`ResampleToModelScale.target_grid` decided: the output grid (``shape``, ``spacing``
    in um), the cell diameter used (um; NaN without cells), the model's training diameter (voxels;
    NaN without cells) and whether the image has no cells (the output is then the all-zero stand-in)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    diameter_um: float
    model_diameter_voxels: float
    no_cells: bool


@register
class ResampleToModelScale(Filter):
    """The cell diameter comes from ``CellDiameterUm`` (> 0), else the upstream estimate (meta
    ``cell_diameter_um``), else an estimate made here.  A given diameter is checked against an
    upstream estimate (warning past :data:`DISAGREEMENT`x); no estimate is made here for that.  An
    image without cells (meta ``no_cells`` from EstimateCellDiameter, or no estimate possible here)
    becomes a small all-zero stand-in (:data:`PLACEHOLDER_SIZE` voxels a side, meta ``no_cells``)
    whatever ``CellDiameterUm`` says: the network costs nothing and the labels come out empty."""

    name = "ResampleToModelScale"
    description = ("Resamples an image to the scale the network was trained at: isotropic, with cells of the "
                   "model's training diameter in voxels (from CellDiameterUm, or the estimate of an upstream "
                   "EstimateCellDiameter filter, or an estimate made here).")
    category = "ImageFilter"
    #: changes the voxel grid; blockwise form (output grid, then block by block): c3dseg.blockwise.resample
    blockwise = "resample"
    inputs = (Port("image", "image", "Input image (any spacing)"),)
    outputs = (Port("image", "resampled", "The image on the model's grid (float32)"),)
    params = (
        Param("ModelPath", "string", "", "The ONNX model (its metadata give the training cell diameter).",
              path=True, exists=True),
        Param("CellDiameterUm", "double", 0.0,
              "Median cell diameter of the input in micrometres; 0: take it from an upstream EstimateCellDiameter "
              "(or estimate it here).", min=0.0, unit="um"),
        Param("ModelCellDiameterVoxels", "double", 0.0,
              "Cell diameter in voxels the model was trained at; 0: from the model's metadata.", min=0.0,
              unit="voxels"),
        Param("Zoom", "double", 1.0,
              "Shows the cells this many times larger than the model's training diameter (1: exactly at it). "
              "Above 1 the model finds small cells better; the network's time grows with Zoom cubed.",
              min=0.5, max=3.0),
        Param("MaxUpsampling", "double", 12.0,
              "Largest zoom factor along any axis (guards against a wrong diameter blowing up memory; the z "
              "axis of a stack with z steps 2-4x its xy spacing and small cells legitimately needs 8-9x at "
              "the tanh model's scale of 20 voxels per cell).",
              min=1.0),
    )

    def target_grid(self, shape3d, spacing, meta: dict, name: str, estimate) -> "ModelGrid":
        """The decisions of this filter, shared by the whole-image run and the blockwise form
        (:mod:`c3dseg.blockwise.resample`): the cell diameter (``CellDiameterUm``, else the upstream
        estimate in ``meta``, else ``estimate()``, called only then), the warnings (no cells; a
        given diameter disagreeing with the estimate), the ``MaxUpsampling`` check and the output
        grid: the model's, or the :data:`PLACEHOLDER_SIZE` stand-in for an image without cells.

        Raises
        ------
        InputError
            No usable diameter, or a zoom past ``MaxUpsampling`` (naming ``CellDiameterUm``).
        """
        shape3d = tuple(int(n) for n in shape3d)
        spacing = tuple(float(s) for s in spacing)
        diameter = self.p["CellDiameterUm"]
        estimated = meta.get("cell_diameter_um")
        no_cells = bool(meta.get("no_cells"))
        if diameter <= 0 and estimated is None:
            estimated = float(estimate())
            no_cells = not math.isfinite(estimated)
            if no_cells:
                log.warning("%s: no cells found (no tissue: constant or noise-only image); the segmentation "
                            "will be empty", name)
            else:
                log.info("%s: estimated median cell diameter %.2f um", name, estimated)
        if no_cells:
            shape = tuple(min(n, PLACEHOLDER_SIZE) for n in shape3d)
            return ModelGrid(shape, output_spacing(spacing, shape3d, shape), float("nan"), float("nan"), True)
        if diameter <= 0:
            diameter = float(estimated)
        elif (estimated is not None and math.isfinite(float(estimated))
              and not (1 / DISAGREEMENT <= diameter / float(estimated) <= DISAGREEMENT)):
            log.warning("%s: CellDiameterUm=%.3g um disagrees with the estimate from the image (%.3g um) by more "
                        "than %gx; check the value and the image's spacing", name, diameter, float(estimated),
                        DISAGREEMENT)
        if not math.isfinite(diameter) or diameter <= 0:
            raise InputError(f"no usable cell diameter for {name}; set CellDiameterUm", key="CellDiameterUm")
        d_vox = model_cell_diameter_voxels(self.resolve_path(self.p["ModelPath"]), self.p["ModelCellDiameterVoxels"])
        d_vox *= float(self.p.get("Zoom", 1.0))
        target = model_spacing(diameter, d_vox)
        factors = [s / t for s, t in zip(spacing, target)]
        if max(factors) > self.p["MaxUpsampling"]:
            raise InputError(f"{name}: cells of {diameter:.3g} um at spacing {spacing} um need a zoom of "
                             f"{max(factors):.2f}x (> MaxUpsampling {self.p['MaxUpsampling']:g}); check CellDiameterUm "
                             "and the image's spacing", key="CellDiameterUm")
        shape = output_shape(shape3d, spacing, new_spacing=target)
        log.info("%s: %s at %s um -> %s at %.3g um (cells %.3g um = %.3g voxels)", name, shape3d,
                 tuple(round(s, 4) for s in spacing), shape, target[0], diameter, d_vox)
        return ModelGrid(tuple(shape), output_spacing(spacing, shape3d, shape), float(diameter), float(d_vox), False)

    def run(self, images, metas):
        img = images[0]

        def estimate():
            from ..diameter import estimate_cell_diameter

            return estimate_cell_diameter(img.data if img.data.ndim == 3 else img.data[0], img.spacing)

        grid = self.target_grid(img.shape3d, img.spacing, img.meta, img.basename, estimate)
        if grid.no_cells:
            return [self._placeholder(img, grid)], []
        data, spacing = resample(np.asarray(img.data, np.float32), img.spacing, grid.shape, order=1,
                                 threads=self.threads())
        out = img.derive(data, cell_diameter_um=grid.diameter_um, input_shape=img.shape3d, input_spacing=img.spacing)
        out.spacing = tuple(spacing)
        return [out], []

    @staticmethod
    def _placeholder(img, grid: "ModelGrid"):
        """For an image without cells: a small all-zero image over the same extent (meta ``no_cells``), so
        the network and reconstruction downstream cost next to nothing and the label filters return zeros."""
        data = np.zeros(img.data.shape[:-3] + grid.shape, np.float32)
        out = img.derive(data, cell_diameter_um=float("nan"), no_cells=True, input_shape=img.shape3d,
                         input_spacing=img.spacing)
        out.spacing = grid.spacing
        return out

"""Flow-target filters: ``LabelsToFlows`` (label image -> foreground and three flow channels).

Thin adapter over :mod:`c3dseg.flows`.
"""

from __future__ import annotations

import numpy as np

from ..errors import C3DError, InputError, ParameterError
from ..flows import FLOW_TYPES, FOREGROUND_MODES, TANH_SCALES, labels_to_prediction
from ..schemas.params import Param
from .base import Filter, Port, register


def parse_flow_scale(value: str, key: str = "FlowScale"):
    """``adaptive``, ``axis`` or a positive number (returned as float)."""
    v = str(value).strip().lower()
    if v in TANH_SCALES:
        return v
    try:
        f = float(v)
    except ValueError:
        f = float("nan")
    if not np.isfinite(f) or f <= 0:
        raise ParameterError(f"expected adaptive, axis or a positive number, got {value!r}", key=key)
    return f


def check_flow_scale(cls, p, key: str = "FlowScale") -> None:
    """For ``check_params``: the FlowScale parameter parses (error located at the filter)."""
    try:
        parse_flow_scale(p[key], key)
    except ParameterError as e:
        raise e.located(filter=cls.name)


def _labels_of(img, name, item, filt):
    data = img.data
    if data.ndim != 3:
        raise InputError(f"{name}: expected a 3D label image, got shape {data.shape}", item=item, filter=filt)
    return data


@register
class LabelsToFlows(Filter):
    """Training targets of a label image: foreground and the flows along z, y, x."""

    name = "LabelsToFlows"
    description = ("Computes the network targets of a label image: foreground (image1) and the flows "
                   "along z, y, x (image2..4), pointing away from each cell's centre.")
    category = "ImageFilter"
    #: per-cell centroids and divisors across blocks, then tanh flows per block:
    #: c3dseg.blockwise.targets (heat flows and the hull foreground are refused)
    blockwise = "global"
    inputs = (Port("image", "labels", "Label image (0 background; read with KeepDataType=1)"),)
    outputs = (
        Port("image", "foreground", "Foreground target (float32, 0/1)"),
        Port("image", "flow_z", "Flow along z (axis 0), float32"),
        Port("image", "flow_y", "Flow along y (axis 1), float32"),
        Port("image", "flow_x", "Flow along x (axis 2), float32"),
    )
    params = (
        Param("FlowType", "string", "tanh", "tanh: the paper's hyperbolic-tangent flows; heat: Cellpose's "
              "heat-diffusion flows (unit vectors).", choices=FLOW_TYPES),
        Param("FlowScale", "string", "adaptive",
              "tanh divisor: adaptive (one per cell, from its size), axis (per cell and axis, from its "
              "bounding box, as the authors' later code) or a number (fixed divisor in voxels; the "
              "reference code uses 5)."),
        Param("FlowScaleInMicrometres", "bool", False,
              "1: a numeric FlowScale is in micrometres (converted per axis with the image spacing)."),
        Param("ForegroundMode", "string", "union",
              "union: the cells; hull: the convex hull of all cells (the reference code's target).",
              choices=FOREGROUND_MODES),
        Param("HeatIterations", "int", -1,
              "Heat flows: maximum conjugate-gradient sweeps (-1: 4 x the largest cell extent).",
              min=1, allow=(-1,), unit="iterations"),
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        check_flow_scale(cls, p)

    def halo(self, spacing=(1.0, 1.0, 1.0)):
        """No context beyond the block; refuses the settings that cannot be cut into blocks."""
        from ..blockwise.targets import check_blockwise

        check_blockwise(self.p, self.ctx.item_id or None, self.name)
        return (0, 0, 0)

    def run(self, images, metas):
        img = images[0]
        item = self.ctx.item_id or None
        labels = _labels_of(img, "labels", item, self.name)
        scale = parse_flow_scale(self.p["FlowScale"])
        spacing = img.spacing if (self.p["FlowScaleInMicrometres"] and not isinstance(scale, str)) else None
        n_iter = None if self.p["HeatIterations"] == -1 else self.p["HeatIterations"]
        try:
            pred = labels_to_prediction(labels, self.p["FlowType"], foreground=self.p["ForegroundMode"],
                                        scale=scale, spacing=spacing, n_iter=n_iter)
        except C3DError as e:
            raise e.located(item=item, filter=self.name)
        names = ("foreground", "flow_z", "flow_y", "flow_x")
        outs = [img.derive(pred[k], is_label=False, channel_name=names[k], dtype="float32")
                for k in range(4)]
        return outs, []

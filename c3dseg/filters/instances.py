"""Instance reconstruction filters: one per stage, plus the whole chain and XPIWIT's tracking.

Thin adapters over :mod:`c3dseg.reconstruction`.  The stages pass ordinary images:

============================  ==========================================  ===========================
filter                        inputs                                      outputs
============================  ==========================================  ===========================
FlowSmoothingFilter           1 foreground, 2-4 flows z, y, x             1 mask, 2-4 smoothed flows
FlowTrackingFilter            1 mask, 2-4 flows z, y, x,                  1 end positions: (3, Z, Y, X)
                              5-7 unsmoothed flows (optional)               float32, z/y/x, NaN where
                                                                            not tracked
SinkClusteringFilter          1 end positions                             1 labels
InstanceSizeFilter            1 labels                                    1 labels
InstanceForegroundOverlap...  1 labels, 2 mask                            1 labels
InstanceFlowErrorFilter       1 labels, 2-4 flows z, y, x                 1 labels
InstanceAxisRatioFilter       1 labels                                    1 labels
RelabelConsecutiveFilter      1 labels                                    1 labels (1..N)
FlowReconstructionFilter      1 foreground, 2-4 flows z, y, x             1 labels (the whole chain)
GradientVectorFlowTracking... 1-3 flows x, y, z (XPIWIT order), 4 mask    1 labels
============================  ==========================================  ===========================

Labels are uint16 (uint32 with a warning past 65535 cells).  Lengths are in voxels unless a
parameter's name ends in ``Um``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import C3DError, InputError, ParameterError
from ..flows import FLOW_TYPES
from ..labels import check_labels
from ..reconstruction import (INTERPOLATIONS, cluster_sinks, filter_by_axis_ratio,
                              filter_by_flow_error, filter_by_foreground_overlap, filter_by_size,
                              foreground_mask, reconstruct, relabel_consecutive, smooth_flows,
                              sphere_volume, track)
from ..schemas.params import Param
from .base import Filter, Port, register
from .flows import check_flow_scale, parse_flow_scale

# -- shared parameter declarations ------------------------------------------------------------

P_STEP = Param("StepSize", "double", 4.0, "Tracking step scale: a voxel moves by StepSize x flow per "
               "iteration (paper: s_recon = 4).", min=1e-6, unit="voxels")
P_ITER = Param("NumIterations", "int", 100, "Maximum tracking iterations (paper: N_recon = 100); "
               "tracking stops earlier when nothing moves.", min=0, unit="iterations")
P_SPACING = Param("UseImageSpacing", "bool", False, "1: the step is measured in the finest voxel size along "
                  "every axis (StepSize x min(spacing) / spacing per axis), for anisotropic stacks.")
P_INTERP = Param("Interpolation", "string", "nearest", "Flow sampling during tracking: nearest (voxel "
                 "grid, fast) or linear (trilinear, float positions).", choices=INTERPOLATIONS)
P_CLOSING = Param("ClosingRadius", "int", 1, "Radius of the ball that closes the end-point map (end voxels "
                  "marked as unit balls) to fuse nearby sinks; 1 joins sinks up to ~3.5 voxels apart, 3 (the "
                  "paper's value for float end points) up to ~5.", min=0, unit="voxels")
P_FULLY = Param("FullyConnected", "bool", True, "1: sinks are 26-connected components; 0: 6-connected.")
P_FLOWTYPE = Param("FlowType", "string", "tanh", "Flow formulation of the prediction (tanh or heat), used "
                   "to recompute each cell's flows.", choices=FLOW_TYPES)
P_FLOWSCALE = Param("FlowScale", "string", "adaptive", "tanh scale the flows were made with: adaptive, "
                    "axis or a number of voxels.")
P_MINR = Param("MinRadiusVoxels", "double", 5.0, "Smallest cell kept, as the radius of the sphere of "
               "equal volume in voxels (paper: r_min = 5); 0 disables.", min=0.0, unit="voxels")
P_MAXR = Param("MaxRadiusVoxels", "double", 100.0, "Largest cell kept, as the radius of the sphere of "
               "equal volume in voxels (paper: r_max = 100); -1 disables.", min=0.0, allow=(-1.0,),
               unit="voxels")
P_MINR_UM = Param("MinRadiusUm", "double", -1.0, "Smallest cell kept as an equivalent-sphere radius in "
                  "micrometres (uses the image spacing); -1: use MinRadiusVoxels.", min=0.0, allow=(-1.0,),
                  unit="um")
P_MAXR_UM = Param("MaxRadiusUm", "double", -1.0, "Largest cell kept as an equivalent-sphere radius in "
                  "micrometres; -1: use MaxRadiusVoxels.", min=0.0, allow=(-1.0,), unit="um")
P_OVERLAP = Param("MinOverlap", "double", 0.2, "Smallest fraction of a cell inside the foreground mask "
                  "(paper: p_overlap = 0.2).", min=0.0, max=1.0)
P_FLOWERR = Param("MaxFlowError", "double", 0.8, "Largest mean absolute error between the predicted flows "
                  "and the flows recomputed from the cell (paper: err_gradient = 0.8); -1 disables.",
                  min=0.0, allow=(-1.0,))
P_AXIS = Param("MinAxisRatio", "double", 0.1, "Smallest minor/major axis ratio (reference code: 0.1); "
               "0 disables.", min=0.0, max=1.0)


def _flow_ports(text: str = "Flow along {}", prefix: str = "", **kw) -> tuple:
    """The three flow ports z, y, x (``text`` with the axis filled in)."""
    return tuple(Port("image", f"{prefix}flow_{a}", text.format(a), **kw) for a in "zyx")


def _halo_from(fn_name: str):
    """A ``halo`` method returning ``c3dseg.blockwise.reconstruction.<fn_name>(params)``."""
    def halo(self, spacing=(1.0, 1.0, 1.0)):
        """Context the blockwise passes read at least (see :mod:`c3dseg.blockwise.reconstruction`)."""
        from ..blockwise import reconstruction

        try:
            return getattr(reconstruction, fn_name)(self.p)
        except C3DError as e:
            raise _err(self, e)

    return halo


def _err(self, e: C3DError) -> C3DError:
    return e.located(item=self.ctx.item_id or None, filter=self.name)


def _vol(self, img, what):
    if img is None:
        raise InputError(f"{what}: input missing", item=self.ctx.item_id or None, filter=self.name)
    if img.data.ndim != 3:
        raise InputError(f"{what}: expected a 3D image, got shape {img.data.shape}",
                         item=self.ctx.item_id or None, filter=self.name)
    return img.data


def _flows(self, imgs, what="flows", *, copy=True):
    """The three flow channels as one (3, Z, Y, X) float32 array.  ``copy=False`` (for filters
    that only read them) returns a view when the channels are consecutive planes of one array,
    as TileMerger and FlowSmoothingFilter give them: no 3-channel copy per filter."""
    data = [_vol(self, im, f"{what} ({ax})") for im, ax in zip(imgs, "zyx")]
    shapes = {d.shape for d in data}
    if len(shapes) > 1:
        raise InputError(f"{what}: the three channels have different shapes {sorted(shapes)}",
                         item=self.ctx.item_id or None, filter=self.name)
    if not copy:
        view = _planes_view(data)
        if view is not None:
            return view
    return np.stack([np.asarray(d, np.float32) for d in data])


def _planes_view(data):
    """``base[i:i + 3]`` when ``data`` are the float32 planes ``base[i]``, ``base[i + 1]``,
    ``base[i + 2]`` of one 4D array; else None."""
    base = data[0].base
    if not isinstance(base, np.ndarray) or base.ndim != 4 or base.dtype != np.float32:
        return None
    for i in range(base.shape[0] - 2):
        view = base[i:i + 3]
        # same memory, shape, strides and type as the plane of the view
        if all(d.base is base and d.__array_interface__ == view[k].__array_interface__ for k, d in enumerate(data)):
            return view
    return None


def _labels_out(img, labels):
    if img.meta.get("no_cells"):
        # EstimateCellDiameter found no tissue upstream (ResampleToModelScale then passes a small
        # placeholder): whatever the network made of it, there are no cells
        labels = np.zeros_like(labels)
    return img.derive(labels, is_label=True, channel_name=None, dtype=str(labels.dtype))


def _size_range(p, spacing):
    vox = float(np.prod(spacing))
    lo = sphere_volume(p["MinRadiusUm"]) / vox if p["MinRadiusUm"] >= 0 else sphere_volume(p["MinRadiusVoxels"])
    if p["MaxRadiusUm"] >= 0:
        hi = sphere_volume(p["MaxRadiusUm"]) / vox
    else:
        hi = math.inf if p["MaxRadiusVoxels"] < 0 else sphere_volume(p["MaxRadiusVoxels"])
    return lo, hi


# -- the stages -------------------------------------------------------------------------------

@register
class FlowSmoothingFilter(Filter):
    """Stage 1: Gaussian smoothing of each flow channel and the foreground threshold."""

    name = "FlowSmoothingFilter"
    description = "Smooths the three flow channels (Gaussian) and thresholds the foreground into a mask."
    category = "ImageFilter"
    blockwise = "local"
    inputs = (
        Port("image", "foreground", "Foreground probability"),
        *_flow_ports(),
    )
    outputs = (
        Port("image", "mask", "Foreground mask (uint8 0/1)"),
        *_flow_ports("Smoothed flow along {}"),
    )
    params = (
        Param("Sigma", "double", 1.0, "Gaussian standard deviation in voxels (0: no smoothing).", min=0.0,
              unit="voxels"),
        Param("ForegroundThreshold", "double", 0.5, "Voxels with foreground > this are foreground."),
    )

    def halo(self, spacing=(1.0, 1.0, 1.0)):
        r = int(math.ceil(4.0 * self.p["Sigma"]))
        return (r, r, r)

    def run(self, images, metas):
        try:
            fg = _vol(self, images[0], "foreground")
            flows = _flows(self, images[1:4], copy=False)
            if flows.shape[1:] != fg.shape:
                raise InputError(f"flows: shape {flows.shape[1:]} differs from the foreground's {fg.shape}")
            mask = foreground_mask(fg, self.p["ForegroundThreshold"])
            sm = smooth_flows(flows, self.p["Sigma"], threads=self.threads())
        except C3DError as e:
            raise _err(self, e)
        ref = images[0]
        outs = [ref.derive(mask.astype(np.uint8), is_label=False, channel_name="mask")]
        outs += [images[k + 1].derive(sm[k]) for k in range(3)]
        return outs, []


@register
class FlowTrackingFilter(Filter):
    """Stage 2: every foreground voxel follows the flows; the output holds its end position."""

    name = "FlowTrackingFilter"
    blockwise = "global"  # exact blockwise form: c3dseg.blockwise.reconstruction
    description = ("Moves every foreground voxel along the flows (p -> p - StepSize x flow) and outputs its "
                   "end position as a 3-channel (z, y, x) float32 image; NaN where not tracked.")
    category = "ImageFilter"
    inputs = (
        Port("image", "mask", "Foreground mask (non-zero = tracked)"),
        *_flow_ports("Flow along {} (smoothed)"),
        *_flow_ports("Unsmoothed flow along {} for the first step", "raw_", optional=True),
    )
    outputs = (Port("image", "end_points", "End positions (3, Z, Y, X) float32 in voxels"),)
    params = (P_STEP, P_ITER, P_INTERP, P_SPACING,
              Param("SmoothingSigma", "double", 0.0, "Gaussian smoothing applied here before tracking "
                    "(voxels; 0 when a FlowSmoothingFilter came first). The first step uses the "
                    "unsmoothed flows.", min=0.0, unit="voxels"))

    halo = _halo_from("tracking_halo")

    def run(self, images, metas):
        try:
            mask = _vol(self, images[0], "mask")
            flows = _flows(self, images[1:4], copy=False)
            raw = None
            extra = [im for im in images[4:7] if im is not None] if len(images) > 4 else []
            if extra:
                if len(extra) != 3:
                    raise InputError("unsmoothed flows: give all three of inputs 5-7 or none")
                raw = _flows(self, images[4:7], "unsmoothed flows", copy=False)
            ends = track(flows, mask, step=self.p["StepSize"], n_iter=self.p["NumIterations"],
                         interpolation=self.p["Interpolation"], sigma=self.p["SmoothingSigma"],
                         first_step_flows=raw,
                         spacing=images[1].spacing if self.p["UseImageSpacing"] else None,
                         threads=self.threads())
        except C3DError as e:
            raise _err(self, e)
        return [images[0].derive(ends, is_label=False, channel_names=["end_z", "end_y", "end_x"],
                                 channel_name=None)], []


@register
class SinkClusteringFilter(Filter):
    """Stage 3: close the end-point map, label it, give every voxel the label of its end point."""

    name = "SinkClusteringFilter"
    blockwise = "global"  # exact blockwise form: c3dseg.blockwise.reconstruction
    description = ("Closes the map of end points with a ball, labels its connected components and gives "
                   "every tracked voxel the label of its end point.")
    category = "ImageFilter"
    inputs = (Port("image", "end_points", "End positions from FlowTrackingFilter (3, Z, Y, X)"),)
    outputs = (Port("image", "labels", "Labels (uint16; uint32 past 65535 cells)"),)
    params = (P_CLOSING, P_FULLY)

    halo = _halo_from("sinks_halo")

    def run(self, images, metas):
        img = images[0]
        if img.data.ndim != 4 or img.data.shape[0] != 3:
            raise InputError(f"end points: expected a 3-channel (3, Z, Y, X) image, got {img.data.shape}",
                             item=self.ctx.item_id or None, filter=self.name)
        try:
            labels = cluster_sinks(img.data, closing_radius=self.p["ClosingRadius"],
                                   fully_connected=self.p["FullyConnected"], threads=self.threads())
        except C3DError as e:
            raise _err(self, e)
        return [_labels_out(img, labels)], []


class _LabelFilter(Filter):
    blockwise = "global"  # per-cell tables across blocks: c3dseg.blockwise.reconstruction
    category = "ImageFilter"
    outputs = (Port("image", "labels", "Filtered labels (removed cells set to 0)"),)

    def _labels(self, img):
        try:
            return check_labels(_vol(self, img, "labels"), "labels")
        except C3DError as e:
            raise _err(self, e)


@register
class InstanceSizeFilter(_LabelFilter):
    name = "InstanceSizeFilter"
    description = "Removes cells whose volume lies outside a range of equivalent-sphere radii."
    inputs = (Port("image", "labels", "Label image"),)
    params = (P_MINR, P_MAXR, P_MINR_UM, P_MAXR_UM)

    def run(self, images, metas):
        labels = self._labels(images[0])
        lo, hi = _size_range(self.p, images[0].spacing)
        return [_labels_out(images[0], filter_by_size(labels, min_volume_voxels=lo, max_volume_voxels=hi))], []


@register
class InstanceForegroundOverlapFilter(_LabelFilter):
    name = "InstanceForegroundOverlapFilter"
    description = "Removes cells of which less than MinOverlap lies in the foreground mask."
    inputs = (Port("image", "labels", "Label image"), Port("image", "mask", "Foreground mask (non-zero)"))
    params = (P_OVERLAP,)

    def run(self, images, metas):
        labels = self._labels(images[0])
        try:
            mask = _vol(self, images[1], "mask") != 0
            out = filter_by_foreground_overlap(labels, mask, min_overlap=self.p["MinOverlap"])
        except C3DError as e:
            raise _err(self, e)
        return [_labels_out(images[0], out)], []


@register
class InstanceFlowErrorFilter(_LabelFilter):
    name = "InstanceFlowErrorFilter"
    description = ("Recomputes each cell's flows with the same flow type and removes cells whose mean "
                   "absolute error against the predicted flows exceeds MaxFlowError.")
    inputs = (
        Port("image", "labels", "Label image"),
        *_flow_ports("Predicted flow along {} (unsmoothed)"),
    )
    params = (P_FLOWERR, P_FLOWTYPE, P_FLOWSCALE)

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        check_flow_scale(cls, p)

    def run(self, images, metas):
        labels = self._labels(images[0])
        if self.p["MaxFlowError"] < 0:
            return [_labels_out(images[0], labels.copy())], []
        try:
            flows = _flows(self, images[1:4], copy=False)
            out = filter_by_flow_error(labels, flows, max_error=self.p["MaxFlowError"],
                                       flow_type=self.p["FlowType"],
                                       flow_scale=parse_flow_scale(self.p["FlowScale"]),
                                       threads=self.threads())
        except C3DError as e:
            raise _err(self, e)
        return [_labels_out(images[0], out)], []


@register
class InstanceAxisRatioFilter(_LabelFilter):
    name = "InstanceAxisRatioFilter"
    description = "Removes cells whose minor/major axis ratio (second moments) is below MinAxisRatio."
    inputs = (Port("image", "labels", "Label image"),)
    params = (P_AXIS,)

    def run(self, images, metas):
        labels = self._labels(images[0])
        return [_labels_out(images[0], filter_by_axis_ratio(labels, min_ratio=self.p["MinAxisRatio"],
                                                            threads=self.threads()))], []


@register
class RelabelConsecutiveFilter(_LabelFilter):
    name = "RelabelConsecutiveFilter"
    description = "Renumbers the cells 1..N (uint16; uint32 past 65535 cells)."
    inputs = (Port("image", "labels", "Label image"),)

    def run(self, images, metas):
        labels = self._labels(images[0])
        return [_labels_out(images[0], relabel_consecutive(labels))], []


# -- the whole chain --------------------------------------------------------------------------

@register
class FlowReconstructionFilter(Filter):
    """The paper's post-processing in one item (the stages above with the same parameters)."""

    name = "FlowReconstructionFilter"
    blockwise = "global"  # exact blockwise form: c3dseg.blockwise.reconstruction
    description = ("Cell instances from a foreground map and flows: smoothing, threshold, tracking, sink "
                   "closing, size / overlap / flow-error / axis-ratio filters, consecutive labels.")
    category = "ImageFilter"
    inputs = (
        Port("image", "foreground", "Foreground probability"),
        *_flow_ports(),
    )
    outputs = (Port("image", "labels", "Labels 1..N (uint16; uint32 past 65535 cells)"),)
    params = (
        Param("ForegroundThreshold", "double", 0.5, "Voxels with foreground > this are tracked."),
        Param("SmoothingSigma", "double", 1.0, "Gaussian sigma of the flow smoothing (voxels; 0 = none).",
              min=0.0, unit="voxels"),
        P_STEP, P_ITER, P_INTERP, P_SPACING, P_CLOSING, P_FULLY, P_MINR, P_MAXR, P_MINR_UM, P_MAXR_UM,
        P_OVERLAP, P_FLOWERR, P_FLOWTYPE, P_FLOWSCALE, P_AXIS,
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        check_flow_scale(cls, p)

    halo = _halo_from("reconstruction_halo")

    def run(self, images, metas):
        p = self.p
        try:
            fg = _vol(self, images[0], "foreground")
            flows = _flows(self, images[1:4])
            lo, hi = _size_range(p, images[0].spacing)
            labels = reconstruct(
                fg, flows, flow_type=p["FlowType"], fg_threshold=p["ForegroundThreshold"],
                smoothing_sigma=p["SmoothingSigma"], step=p["StepSize"], n_iter=p["NumIterations"],
                closing_radius=p["ClosingRadius"], interpolation=p["Interpolation"],
                fully_connected=p["FullyConnected"], min_radius_voxels=(3 * lo / (4 * math.pi)) ** (1 / 3),
                max_radius_voxels=(3 * hi / (4 * math.pi)) ** (1 / 3) if math.isfinite(hi) else math.inf,
                min_overlap=p["MinOverlap"], max_flow_error=None if p["MaxFlowError"] < 0 else p["MaxFlowError"],
                min_axis_ratio=p["MinAxisRatio"] or None, flow_scale=parse_flow_scale(p["FlowScale"]),
                spacing=images[1].spacing if p["UseImageSpacing"] else None)
        except C3DError as e:
            raise _err(self, e)
        return [_labels_out(images[0], labels)], []


# -- XPIWIT compatibility ---------------------------------------------------------------------

@register
class GradientVectorFlowTrackingImageFilter(Filter):
    """XPIWIT's tracking filter, so the XPIWIT Cellpose3D pipeline's post-processing runs as is.

    Inputs in XPIWIT's order: image1 = flow along x (axis 2), image2 = y, image3 = z, image4 =
    foreground mask.  Tracking, closing and labelling as FlowTrackingFilter + SinkClusteringFilter
    (nearest-voxel tracking; the XPIWIT update rule itself is not public).
    """

    name = "GradientVectorFlowTrackingImageFilter"
    blockwise = "global"  # exact blockwise form: c3dseg.blockwise.reconstruction
    description = "Two or three channel filter that traces the gradient flow."
    category = "ImageFilter"
    inputs = (
        Port("image", "flow_x", "Flow along x (axis 2)"),
        Port("image", "flow_y", "Flow along y (axis 1)"),
        Port("image", "flow_z", "Flow along z (axis 0)"),
        Port("image", "mask", "Foreground mask (non-zero = foreground)"),
    )
    outputs = (Port("image", "labels", "Labels (uint16; uint32 past 65535 cells)"),)
    params = (
        Param("NumIterations", "int", 25, "The number of iterations (should be slightly larger than the "
              "radius of the biggest object divided by StepSize).", min=0, unit="iterations"),
        Param("IgnoreBackground", "bool", True, "If enabled, background pixels are ignored."),
        Param("FullyConnected", "bool", True, "If enabled, full neighborhood is used, otherwise only 4 / 18 "
              "connectivity."),
        Param("ClosingRadius", "int", 3, "Radius of the structuring element to be used to fuse nearby sinks.",
              min=0, unit="voxels"),
        Param("StepSize", "double", 1.0, "Step scale: a voxel moves by StepSize x flow per iteration "
              "(c3dseg extension; 1 moves at most one voxel per axis).", min=1e-6, unit="voxels"),
    )

    halo = _halo_from("tracking_halo")

    def run(self, images, metas):
        try:
            flows = _flows(self, [images[2], images[1], images[0]])
            mask_img = _vol(self, images[3], "mask")
            if mask_img.shape != flows.shape[1:]:
                raise InputError(f"mask: shape {mask_img.shape} differs from the flows' {flows.shape[1:]}")
            mask = mask_img != 0 if self.p["IgnoreBackground"] else np.ones(mask_img.shape, bool)
            ends = track(flows, mask, step=self.p["StepSize"], n_iter=self.p["NumIterations"],
                         interpolation="nearest")
            labels = cluster_sinks(ends, closing_radius=self.p["ClosingRadius"],
                                   fully_connected=self.p["FullyConnected"])
        except C3DError as e:
            raise _err(self, e)
        return [_labels_out(images[3], labels)], []

"""Intensity filters (XPIWIT names and semantics): rescaling, windowing, thresholding, discrete
Gaussian smoothing and percentile normalisation.  Thin adapters over :mod:`c3dseg.intensity` and
:mod:`c3dseg.normalisation`."""

from __future__ import annotations

import numpy as np

from .. import intensity as alg
from ..errors import ParameterError
from ..schemas.params import Param
from .base import Filter, Port, register

_IN = (Port("image", "image", "Input image"),)
_OUT = (Port("image", "image", "Output image"),)


def _per_channel(fn, data):
    return np.stack([fn(c) for c in data]) if data.ndim == 4 else fn(data)


@register
class RescaleIntensityImageFilter(Filter):
    name = "RescaleIntensityImageFilter"
    description = ("Rescales the image from min to max for integer types and from 0 to 1 for float "
                   "types")
    category = "ImageFilter"
    inputs, outputs = _IN, _OUT
    blockwise = "global"  # min/max over the volume (c3dseg.blockwise.globals)

    def run(self, images, metas):
        img = images[0]
        out = _per_channel(alg.rescale_intensity, img.data)
        return [img.derive(out, is_label=False)], []


@register
class IntensityWindowingImageFilter(Filter):
    name = "IntensityWindowingImageFilter"
    description = ("Maps [WindowMinimum, WindowMaximum] linearly onto [OutputMinimum, OutputMaximum]; "
                   "values outside the window saturate (ITK semantics). float32 output.")
    category = "ImageFilter"
    inputs, outputs = _IN, _OUT
    blockwise = "pointwise"
    params = (
        Param("WindowMinimum", "double", 0.0, "Lower end of the input window."),
        Param("WindowMaximum", "double", 1.0, "Upper end of the input window."),
        Param("OutputMinimum", "double", 0.0, "Output value of WindowMinimum and below."),
        Param("OutputMaximum", "double", 1.0, "Output value of WindowMaximum and above."),
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        if not p["WindowMaximum"] > p["WindowMinimum"]:
            raise ParameterError(f"must be greater than WindowMinimum ({p['WindowMinimum']}), got "
                                 f"{p['WindowMaximum']}", key="WindowMaximum", filter=cls.name)

    def run(self, images, metas):
        img = images[0]
        out = alg.window_intensity(img.data, self.p["WindowMinimum"], self.p["WindowMaximum"],
                                   self.p["OutputMinimum"], self.p["OutputMaximum"])
        return [img.derive(out, is_label=False)], []


@register
class BinaryThresholdImageFilter(Filter):
    name = "BinaryThresholdImageFilter"
    description = ("InsideValue where LowerThreshold <= value <= UpperThreshold, OutsideValue "
                   "elsewhere (uint8 when both values are integers in [0, 255], else float32).")
    category = "ImageFilter"
    inputs, outputs = _IN, _OUT
    blockwise = "pointwise"
    params = (
        Param("LowerThreshold", "double", 0.5, "Lower threshold (inclusive)."),
        Param("UpperThreshold", "double", 1.0, "Upper threshold (inclusive)."),
        Param("OutsideValue", "double", 0.0, "Value outside the thresholds."),
        Param("InsideValue", "double", 1.0, "Value between the thresholds."),
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        if p["UpperThreshold"] < p["LowerThreshold"]:
            raise ParameterError(f"must be >= LowerThreshold ({p['LowerThreshold']}), got "
                                 f"{p['UpperThreshold']}", key="UpperThreshold", filter=cls.name)

    def run(self, images, metas):
        img = images[0]
        out = alg.binary_threshold(img.data, self.p["LowerThreshold"], self.p["UpperThreshold"],
                                   self.p["InsideValue"], self.p["OutsideValue"])
        return [img.derive(out, is_label=False)], []


@register
class DiscreteGaussianImageFilter(Filter):
    name = "DiscreteGaussianImageFilter"
    description = ("Discrete Gaussian smoothing (ITK's DiscreteGaussianImageFilter: Bessel kernel, "
                   "MaximumError/MaximumKernelWidth truncation, zero-flux borders). float32 output.")
    category = "ImageFilter"
    inputs, outputs = _IN, _OUT
    params = (
        Param("Variance", "double", 1.0,
              "Variance of the Gaussian: um^2 with UseImageSpacing=1, else voxels^2.", min=0.0,
              unit="um^2"),
        Param("MaximumError", "double", 0.01,
              "Kernel truncation: the kernel holds at least 1 - MaximumError of the Gaussian's mass.",
              min=1e-9, max=0.999999),
        Param("MaximumKernelWidth", "int", 32,
              "Maximum number of one-sided kernel coefficients (ITK's truncation).", min=1,
              unit="voxels"),
        Param("UseImageSpacing", "bool", True,
              "1: Variance is in physical units (um^2), divided per axis by the spacing squared."),
    )

    blockwise = "local"

    def halo(self, spacing=(1.0, 1.0, 1.0)):
        """The kernel's one-sided width per axis (voxels), for blockwise runs."""
        out = []
        for s in spacing:
            v = self.p["Variance"] / (s * s) if self.p["UseImageSpacing"] else self.p["Variance"]
            k = alg.discrete_gaussian_kernel(v, self.p["MaximumError"], self.p["MaximumKernelWidth"]) if v > 0 else [0]
            out.append((len(k) - 1) // 2)
        return tuple(out)

    def run(self, images, metas):
        img = images[0]
        spacing = img.spacing if self.p["UseImageSpacing"] else None
        out = alg.discrete_gaussian(img.data, self.p["Variance"], spacing,
                                    maximum_error=self.p["MaximumError"],
                                    maximum_kernel_width=self.p["MaximumKernelWidth"])
        return [img.derive(out, is_label=False)], []


@register
class PercentileNormalization(Filter):
    name = "PercentileNormalization"
    description = ("Maps the LowerPercentile/UpperPercentile intensities of the image to 0/1 "
                   "(the reference code's 2/98 % scaling, per image and per channel). float32 output.")
    category = "ImageFilter"
    inputs, outputs = _IN, _OUT
    blockwise = "global"  # percentiles over the volume (c3dseg.blockwise.globals)
    params = (
        Param("LowerPercentile", "double", 2.0, "Percentile mapped to 0.", min=0.0, max=100.0),
        Param("UpperPercentile", "double", 98.0, "Percentile mapped to 1.", min=0.0, max=100.0),
        Param("Clip", "bool", True, "1: clip the result to [0, 1]."),
    )

    @classmethod
    def check_params(cls, p):
        super().check_params(p)
        if not p["UpperPercentile"] > p["LowerPercentile"]:
            raise ParameterError(f"must be greater than LowerPercentile ({p['LowerPercentile']}), "
                                 f"got {p['UpperPercentile']}", key="UpperPercentile", filter=cls.name)

    def run(self, images, metas):
        from ..normalisation import apply_range, percentile_range

        img = images[0]

        def norm(x):
            lo, hi = percentile_range(x, self.p["LowerPercentile"], self.p["UpperPercentile"])
            return apply_range(x, lo, hi, clip=self.p["Clip"])

        out = _per_channel(norm, img.data)
        return [img.derive(out, is_label=False)], []

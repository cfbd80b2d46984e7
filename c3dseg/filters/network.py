"""Network filters: ``OnnxModel`` (tiled prediction), ``TileMerger`` (blending) and XPIWIT's
``TorchModel`` (both in one, with XPIWIT's parameters).

``OnnxModel`` outputs a lazy :class:`~c3dseg.tiling.TileStream` on its image port: the runner passes
it untouched to ``TileMerger``, which runs the network tile batch by tile batch while blending, so
memory holds the four output images and one batch of tiles.  Both are thin adapters over
:mod:`c3dseg.predict` and :mod:`c3dseg.tiling`; nothing here imports torch (``TorchModel`` imports
it lazily, only for TorchScript ``.pt`` files).
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np

from ..errors import InputError, ParameterError
from ..image import Image
from ..predict import (AUGMENTATIONS, CHANNEL_NAMES, FlipAveraged, OnnxNetwork, check_tile_shape, make_transform,
                       tile_stream)
from ..schemas.params import Param
from ..tiling import BLENDINGS, TileStream, plan_tiles, stride_to_overlap
from .base import Filter, Port, register

log = logging.getLogger("c3dseg")

_OUT_PORTS = (
    Port("image", "foreground", "Foreground probability (float32)"),
    Port("image", "flow_z", "Flow along axis 0 (z), pointing away from the cell centre (float32)"),
    Port("image", "flow_y", "Flow along axis 1 (y) (float32)"),
    Port("image", "flow_x", "Flow along axis 2 (x) (float32)"),
)


def _patch_params(depth: int, height: int, width: int, stride: float, stride_text: str) -> tuple[Param, ...]:
    return (
        Param("PatchWidth", "int", width, "Patch width (x) used for processing. Set to -1 for complete image at "
              "once. Rounded up to the network's size divisor (8) with a warning.", min=1, allow=(-1,),
              unit="voxels"),
        Param("PatchHeight", "int", height, "Patch height (y) used for processing. Set to -1 for complete image "
              "at once.", min=1, allow=(-1,), unit="voxels"),
        Param("PatchDepth", "int", depth, "Patch depth (z) used for processing. Set to -1 for complete image at "
              "once.", min=1, allow=(-1,), unit="voxels"),
        Param("PatchStride", "double", stride, stride_text, min=0.0),
    )


_TTA_PARAM = Param(
    "TestTimeAugmentation", "string", "none", "Average the predictions of mirrored inputs: none; xy (4 network "
    "runs per tile: mirrored in y, x and both); xyz (8 runs: every mirror combination). Less noisy flows, at 4 "
    "or 8 times the network's time.", choices=tuple(AUGMENTATIONS))


class _PredictorMixin:
    """Shared set-up of the predictor filters."""

    #: blockwise runs: input percentiles over the whole volume, then the whole volume's tiles, each
    #: predicted once, blended block by block (c3dseg.blockwise.globals)
    blockwise = "global"

    def halo(self, spacing=(1.0, 1.0, 1.0)):
        """Context a block pass reads around its block: none (tiles are cut from the whole volume
        whatever the blocks, and each block blends only its own voxels)."""
        return (0, 0, 0)

    def _network(self) -> OnnxNetwork:
        path = self.resolve_path(self.p["ModelPath"])
        if not path:
            raise ParameterError("no model given: set ModelPath to an .onnx file", key="ModelPath",
                                 filter=self.name)
        return OnnxNetwork(path, use_gpu=bool(self.p["UseGPU"]), threads=self.threads())

    def _plan(self, shape3d, divisor, fixed=(None, None, None)):
        tile = check_tile_shape((self.p["PatchDepth"], self.p["PatchHeight"], self.p["PatchWidth"]), divisor,
                                fixed=fixed)
        stride = float(self.p["PatchStride"])
        if stride > 0:
            overlap = tuple(stride_to_overlap(t if t > 0 else s, stride) for t, s in zip(tile, shape3d))
        else:
            overlap = int(self.p.get("PatchOverlap", 16))
        plan = plan_tiles(shape3d, tile, overlap, multiple=divisor)
        log.info("%s: %d tile(s) of %s (grid %s), redundancy %.2f", self.name, plan.n_tiles,
                 "x".join(map(str, plan.tile)), "x".join(map(str, plan.grid)), plan.redundancy)
        return plan

    def _volume(self, img: Image, net_channels: int | None) -> np.ndarray:
        data = img.data
        if data.ndim not in (3, 4):
            raise InputError(f"expected a 3D (Z, Y, X) or multi-channel (C, Z, Y, X) image, got shape {data.shape}")
        c = 1 if data.ndim == 3 else data.shape[0]
        if net_channels is not None and c != net_channels:
            raise InputError(f"the model takes {net_channels} input channel(s), the image has {c}", key="ModelPath")
        return data

    def _stream(self, img: Image, net: OnnxNetwork) -> TileStream:
        vol = self._volume(img, net.in_channels)
        plan = self._plan(img.shape3d, net.size_divisor, net.fixed_shape)
        trained = getattr(net, "patch_size", None)
        if trained and any(t < p and t < s for t, p, s in zip(plan.tile, trained, img.shape3d)):
            log.warning("%s: tiles of %s are smaller than the training patches (%s); instance normalisation sees "
                        "other statistics, so predictions may differ between tiles - use larger Patch sizes",
                        self.name, "x".join(map(str, plan.tile)), "x".join(map(str, trained)))
        lo, hi = self.p.get("LowerPercentile", -1.0), self.p.get("UpperPercentile", -1.0)
        pct = (lo, hi) if lo >= 0 and hi >= 0 else None
        if pct is not None and not lo < hi:
            raise ParameterError(f"LowerPercentile ({lo}) must be below UpperPercentile ({hi})",
                                 key="LowerPercentile")
        transform = make_transform(net, vol, mode=self.p.get("Normalization", "auto"), percentiles=pct)
        meta = dict(img.meta)
        meta["is_label"] = False
        meta["model_metadata"] = dict(net.metadata)
        meta["model_path"] = net.path
        if "flow_type" in net.metadata:
            meta["flow_type"] = net.metadata["flow_type"]
        axes = AUGMENTATIONS[self.p.get("TestTimeAugmentation", "none")]
        if axes:
            log.info("%s: test-time augmentation, %d mirrored runs per tile", self.name, 2 ** len(axes))
            net = FlipAveraged(net, axes)
        return tile_stream(vol, net, plan, batch_size=int(self.p.get("BatchSize", 1)), transform=transform,
                           spacing=img.spacing, meta=meta, progress=bool(self.ctx.progress))


def _split(stream_or_image, blending: str) -> list[Image]:
    if isinstance(stream_or_image, TileStream):
        s = stream_or_image
        out = s.merge(blending)
        images = []
        for c in range(min(4, out.shape[0])):
            meta = dict(s.meta)
            meta["channel_name"] = (s.channel_names[c] if c < len(s.channel_names) else CHANNEL_NAMES[c])
            images.append(Image(out[c], s.spacing, meta))
        return images
    if isinstance(stream_or_image, Image) and stream_or_image.data.ndim == 4 and stream_or_image.data.shape[0] >= 4:
        img = stream_or_image
        return [img.derive(np.asarray(img.data[c], dtype=np.float32), is_label=False, channel_name=CHANNEL_NAMES[c])
                for c in range(4)]
    raise InputError(f"expected the tile stream of an OnnxModel (or a 4-channel prediction image), got "
                     f"{type(stream_or_image).__name__}"
                     + (f" of shape {stream_or_image.data.shape}" if isinstance(stream_or_image, Image) else ""))


@register
class OnnxModel(_PredictorMixin, Filter):
    name = "OnnxModel"
    description = ("Applies an ONNX network (c3d-export) tile by tile; outputs a lazy tile stream for "
                   "TileMerger. Normalisation and flow settings come from the model's metadata.")
    category = "Network"
    inputs = (Port("image", "image", "Input image (Z, Y, X), or (C, Z, Y, X) for multi-channel models"),)
    outputs = (Port("image", "tiles", "Tile stream (connect to TileMerger)"),)
    params = (
        Param("ModelPath", "string", "", "The .onnx model file (relative paths: to the pipeline's folder).",
              path=True, exists=True),
        Param("UseGPU", "bool", True, "Use the CUDA execution provider when onnxruntime has one; else the CPU."),
    ) + _patch_params(128, 192, 192, 0.0,
                      "Absolute (values > 1, voxels) or patch-relative (values <= 1) stride between tiles, as in "
                      "XPIWIT; 0 = use PatchOverlap.") + (
        Param("PatchOverlap", "int", 16, "Minimum overlap of neighbouring tiles (used when PatchStride is 0). "
              "Tiles shrink to the smallest size that keeps it.", min=0, unit="voxels"),
        Param("BatchSize", "int", 1, "Tiles per network call.", min=1, unit="tiles"),
        Param("Normalization", "string", "auto", "Input normalisation: auto (from the model's metadata), "
              "percentile, minmax or none.", choices=("auto", "percentile", "minmax", "none")),
        Param("LowerPercentile", "double", -1.0, "Lower percentile of the normalisation (-1 = the model's).",
              min=0.0, max=100.0, allow=(-1.0,)),
        Param("UpperPercentile", "double", -1.0, "Upper percentile of the normalisation (-1 = the model's).",
              min=0.0, max=100.0, allow=(-1.0,)),

        _TTA_PARAM,
    )

    def run(self, images, metas):
        img = images[0]
        if not isinstance(img, Image):
            raise InputError(f"expected an image, got {type(img).__name__}")
        net = self._network()
        return [self._stream(img, net)], []


@register
class TileMerger(Filter):
    name = "TileMerger"
    description = ("Blends an OnnxModel's tiles into whole images with weights that fade towards shared tile "
                   "borders: foreground, flow z, flow y, flow x (float32).")
    category = "Network"
    blockwise = "pointwise"
    inputs = (Port("image", "tiles", "Tile stream of an OnnxModel (or a 4-channel prediction image)"),)
    outputs = _OUT_PORTS
    params = (
        Param("Blending", "string", "cosine", "Tile weights: cosine or linear ramps across overlaps, a gaussian "
              "over the tile, uniform averaging, or crop (hard seams).", choices=BLENDINGS),
    )

    def run(self, images, metas):
        return _split(images[0], self.p["Blending"]), []


@register
class TorchModel(_PredictorMixin, Filter):
    name = "TorchModel"
    description = ("Apply specified Torch pipeline from a serialized model (*.pt), or an ONNX model (*.onnx, "
                   "no torch needed); XPIWIT's filter.")
    category = "Network"
    inputs = tuple(Port("image", f"image{k}", "Input image (XPIWIT wires the same image to all four; input 1 is "
                        "used)", optional=k > 1) for k in range(1, 5))
    outputs = _OUT_PORTS
    params = (
        Param("NumInputChannels", "int", 1, "The number of input channels.", min=1),
        Param("UseGPU", "bool", True, "Uses the GPU if possible. Defaults to CPU."),
    ) + _patch_params(64, 256, 256, 0.5, "Absolute (values > 1) or patch-relative stride (values < 1).") + (
        Param("ModelPath", "string", "", "File path to the model file: *.onnx (onnxruntime) or *.pt "
              "(TorchScript; needs torch).", path=True, exists=True),
        Param("Blending", "string", "cosine", "Tile weights (see TileMerger).", choices=BLENDINGS),
        Param("BatchSize", "int", 1, "Tiles per network call.", min=1, unit="tiles"),
        Param("Normalization", "string", "auto", "Input normalisation: auto (from an ONNX model's metadata; none "
              "for TorchScript), percentile, minmax or none.", choices=("auto", "percentile", "minmax", "none")),
        _TTA_PARAM,
    )

    def run(self, images, metas):
        img = next((i for i in images if i is not None), None)
        if not isinstance(img, Image):
            raise InputError("TorchModel needs an input image")
        path = self.resolve_path(self.p["ModelPath"])
        if path.lower().endswith((".pt", ".pth", ".torchscript")):
            net = _TorchScriptNetwork(path, use_gpu=bool(self.p["UseGPU"]), threads=self.threads())
        else:
            net = self._network()
        if net.in_channels is None:
            net.in_channels = int(self.p["NumInputChannels"])
        stream = self._stream(img, net)
        return _split(stream, self.p["Blending"]), []


class _TorchScriptNetwork:
    """A TorchScript model run with torch (imported lazily) behind the OnnxNetwork interface."""

    size_divisor = 8
    fixed_shape = (None, None, None)
    metadata: dict = {}

    def __init__(self, path: str, *, use_gpu: bool, threads: int):
        self.path = path
        self.in_channels = None
        if not os.path.isfile(path):
            raise InputError(f"model file not found: {path}", key="ModelPath")
        try:
            import torch
        except ImportError:
            raise InputError(f"{path}: a TorchScript model needs torch, which is not installed; install torch "
                             f"(pip install 'c3dseg[train]') or export the model to ONNX and use the .onnx file",
                             key="ModelPath") from None
        self.torch = torch
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        log.info("%s: TorchScript on %s", os.path.basename(path), self.device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(path, map_location=self.device).eval()
        except Exception as e:
            raise InputError(f"{path}: not a loadable TorchScript model ({str(e).splitlines()[0] if str(e) else e})",
                             key="ModelPath") from None

    def normalisation(self):
        return {"mode": "none", "percentiles": (1.0, 99.8), "clip": False}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            y = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device))
        if isinstance(y, (tuple, list)):
            y = y[0]
        y = y.float().cpu().numpy()
        if y.ndim != 5 or y.shape[1] < 4 or y.shape[2:] != batch.shape[2:]:
            raise InputError(f"model {self.path}: output shape {y.shape} for input {batch.shape}; expected "
                             f"(N, 4, Z, Y, X)", key="ModelPath")
        return y[:, :4]

"""Running an exported ONNX network on volumes (onnxruntime; no torch).

:class:`OnnxNetwork` opens a model made by ``c3d-export`` (or any ONNX model with one input
``(N, C, Z, Y, X)`` and one output ``(N, 4, Z, Y, X)``), reads the settings stored in its metadata
(flow type, channel meaning, input normalisation, size divisor, training spacing ...) and runs
batches of tiles.  :func:`tile_stream` turns a volume into a lazy :class:`~c3dseg.tiling.TileStream`
and :func:`predict_volume` blends it into the four output maps.

Model metadata (ONNX ``metadata_props``, all strings; written by :mod:`c3dseg.training.export`):

==============================  ==============================================================
key                             meaning
==============================  ==============================================================
``format``                      ``c3dseg-unet``
``c3dseg_version``              package version that exported the model
``channels``                    ``foreground,flow_z,flow_y,flow_x`` (output channel order)
``foreground_activation``       ``sigmoid`` (channel 0 is a probability in [0, 1])
``flow_type``                   ``tanh`` or ``heat``
``flow_scale``                  tanh divisor (voxels) or ``adaptive``
``flow_direction``              ``away_from_centre`` (tracking moves p -> p - s * flow(p))
``size_divisor``                spatial sizes must be multiples of this (8)
``patch_size``                  training patch ``z,y,x`` (voxels)
``spacing_um``                  training voxel spacing ``z,y,x`` (micrometres)
``median_cell_diameter_um``     median equivalent-sphere diameter of the training cells
``median_cell_diameter_voxels`` the model scale: the training volumes' median cell in voxels
``pooled_cell_diameter_voxels`` the median over the cropped training cells (information only)
``normalization``               ``percentile`` or ``none``
``norm_percentiles``            ``lower,upper`` (percent), per image
``norm_clip``                   ``1`` to clip to [0, 1] after the mapping
``opset``                       ONNX opset of the export
==============================  ==============================================================
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from .errors import InputError, ParameterError
from .normalisation import apply_range, percentile_range
from .tiling import TilePlan, TileStream, iter_tile_batches, plan_tiles

log = logging.getLogger("c3dseg")

CHANNEL_NAMES = ("foreground", "flow_z", "flow_y", "flow_x")
DEFAULT_DIVISOR = 8


def _parse_floats(text: str | None, n: int | None = None) -> tuple[float, ...] | None:
    if text is None or text == "":
        return None
    try:
        vals = tuple(float(v) for v in str(text).replace(";", ",").split(","))
    except ValueError:
        return None
    if n is not None and len(vals) != n:
        return None
    return vals


class OnnxNetwork:
    """An ONNX segmentation network in an onnxruntime session.

    Parameters
    ----------
    path : str
        The ``.onnx`` file.
    use_gpu : bool
        Use the CUDA execution provider when onnxruntime has it (else the CPU, with a log line).
    threads : int
        Intra-op threads (0 = onnxruntime's default).
    name : str, optional
        How errors name the model (default: the path).

    Raises
    ------
    InputError
        Missing or unreadable file, or a model whose input/output does not fit
        (``(N, C, Z, Y, X)`` in, ``(N, >=4, Z, Y, X)`` out).
    """

    def __init__(self, path: str, *, use_gpu: bool = False, threads: int = 0, name: str | None = None):
        self.path = str(path)
        self.name = name or self.path
        if not self.path:
            raise InputError("no model file given", key="ModelPath")
        if not os.path.isfile(self.path):
            raise InputError(f"model file not found: {self.path}", key="ModelPath")
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
            raise InputError(f"onnxruntime is needed to run {self.name}: {e}", key="ModelPath") from None
        opts = ort.SessionOptions()
        if threads and threads > 0:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # memory patterns pre-plan one big block per input shape: about 2.3x the peak memory of
        # plain arena allocation for this U-Net, for no measurable speed-up
        opts.enable_mem_pattern = False
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if use_gpu:
            if "CUDAExecutionProvider" in available:
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            else:
                log.info("%s: no CUDA provider in onnxruntime (%s); running on the CPU",
                         os.path.basename(self.path), ", ".join(available))
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{self.name}: not a loadable ONNX model ({msg})", key="ModelPath") from None
        self.provider = self.session.get_providers()[0]
        log.info("%s: onnxruntime on %s%s", os.path.basename(self.path), self.provider,
                 f", {threads} threads" if threads and self.provider == "CPUExecutionProvider" else "")
        meta = self.session.get_modelmeta()
        self.metadata: dict[str, str] = dict(meta.custom_metadata_map or {})
        self._check_io()

    # -- model description ------------------------------------------------------------------
    def _check_io(self) -> None:
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1:
            raise InputError(f"model {self.name} has {len(ins)} inputs; expected one (N, C, Z, Y, X) tensor",
                             key="ModelPath")
        if len(outs) < 1:
            raise InputError(f"model {self.name} has no output", key="ModelPath")
        inp, out = ins[0], outs[0]
        if len(inp.shape) != 5:
            raise InputError(f"model {self.name}: input {inp.name!r} has shape {inp.shape}; expected 5 axes "
                             f"(N, C, Z, Y, X)", key="ModelPath")
        if len(out.shape) != 5:
            raise InputError(f"model {self.name}: output {out.name!r} has shape {out.shape}; expected 5 axes "
                             f"(N, 4, Z, Y, X)", key="ModelPath")
        if "float" not in inp.type:
            raise InputError(f"model {self.name}: input type {inp.type}; expected a float tensor", key="ModelPath")
        self.input_name = inp.name
        self.output_name = out.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        c = inp.shape[1]
        self.in_channels = int(c) if isinstance(c, int) else None
        oc = out.shape[1]
        self.out_channels = int(oc) if isinstance(oc, int) else None
        if self.out_channels is not None and self.out_channels < 4:
            raise InputError(f"model {self.name}: output has {self.out_channels} channels; expected 4 "
                             f"(foreground, flow z, flow y, flow x)", key="ModelPath")
        self.fixed_shape = tuple(d if isinstance(d, int) else None for d in inp.shape[2:])

    @property
    def size_divisor(self) -> int:
        try:
            return max(1, int(float(self.metadata.get("size_divisor", DEFAULT_DIVISOR))))
        except ValueError:
            return DEFAULT_DIVISOR

    @property
    def flow_type(self) -> str:
        return self.metadata.get("flow_type", "tanh")

    @property
    def spacing_um(self) -> tuple[float, float, float] | None:
        return _parse_floats(self.metadata.get("spacing_um"), 3)

    @property
    def patch_size(self) -> tuple[int, int, int] | None:
        v = _parse_floats(self.metadata.get("patch_size"), 3)
        return tuple(int(x) for x in v) if v else None

    def normalisation(self) -> dict[str, Any]:
        """``{"mode": "percentile"|"none", "percentiles": (lo, hi), "clip": bool}`` from the metadata."""
        mode = self.metadata.get("normalization", "none").lower()
        pct = _parse_floats(self.metadata.get("norm_percentiles"), 2) or (1.0, 99.8)
        clip = self.metadata.get("norm_clip", "0").strip().lower() in ("1", "true", "yes")
        return {"mode": mode, "percentiles": pct, "clip": clip}

    # -- running -----------------------------------------------------------------------------
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Run ``(B, C, Z, Y, X)`` -> ``(B, 4, Z, Y, X)`` float32."""
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        try:
            y = self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"model {self.name} failed on a tile of shape {x.shape}: {msg}",
                             key="ModelPath") from None
        if y.ndim != 5 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:] or y.shape[1] < 4:
            raise InputError(f"model {self.name}: output shape {y.shape} for input {x.shape}; expected "
                             f"(N, 4, Z, Y, X) of the input's spatial size", key="ModelPath")
        return np.asarray(y[:, :4], dtype=np.float32)


#: test-time augmentation modes: the axes (of z, y, x) whose flips are averaged
AUGMENTATIONS = {"none": (), "xy": (1, 2), "xyz": (0, 1, 2)}


class FlipAveraged:
    """A network wrapper averaging the predictions of every flip combination of ``axes``.

    Each tile batch is also run mirrored along each subset of ``axes`` (2**len(axes) network
    calls); outputs are mirrored back and the flow channel of every mirrored axis changes sign
    (flows point away from the cell centre, so they mirror with it).  The foreground is averaged
    as it is.  Flow fields of tanh and heat models are both mirror-equivariant, so the average is
    a prediction of the same kind with less noise.
    """

    def __init__(self, network, axes=(0, 1, 2)):
        self.network = network
        self.axes = tuple(sorted(set(int(a) for a in axes)))
        if any(a not in (0, 1, 2) for a in self.axes):
            raise ValueError(f"flip axes must be among 0, 1, 2 (z, y, x), got {axes}")
        self.combinations = [tuple(a for k, a in enumerate(self.axes) if m >> k & 1)
                             for m in range(2 ** len(self.axes))]

    def __getattr__(self, name):  # size_divisor, metadata, normalisation() ... of the wrapped network
        return getattr(self.network, name)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        total = None
        for flips in self.combinations:
            spatial = tuple(2 + a for a in flips)
            x = np.flip(batch, spatial) if flips else batch
            y = np.asarray(self.network(np.ascontiguousarray(x)), dtype=np.float32)
            if flips:
                sign = np.ones((1, y.shape[1], 1, 1, 1), np.float32)
                sign[:, [1 + a for a in flips]] = -1.0
                y = np.flip(y, spatial) * sign
            if total is None:
                total = np.array(y, dtype=np.float32, copy=True)
            else:
                total += y
        total /= float(len(self.combinations))
        return total


def check_tile_shape(tile_shape: Sequence[int], divisor: int, *, fixed: Sequence[int | None] = (None,) * 3,
                     keys: Sequence[str] = ("PatchDepth", "PatchHeight", "PatchWidth"),
                     warn: bool = True) -> tuple[int, int, int]:
    """Round tile sizes the network cannot take up to a multiple of ``divisor`` (with a warning).

    ``-1`` (or 0) means the whole axis and is kept.  A model with a fixed input size forces it.
    """
    out = []
    for t, f, key in zip(tile_shape, fixed, keys):
        t = int(t)
        if f is not None:
            if t not in (f,) and warn:
                log.warning("%s: the model takes a fixed size of %d along this axis; using %d", key, f, f)
            out.append(int(f))
            continue
        if t <= 0:
            out.append(-1)
            continue
        if t % divisor:
            r = (t // divisor + 1) * divisor
            if warn:
                log.warning("%s=%d is not a multiple of %d (the network's size divisor); using %d",
                            key, t, divisor, r)
            t = r
        out.append(t)
    return tuple(out)


def make_transform(network: OnnxNetwork | None, volume: np.ndarray, *, mode: str = "auto",
                   percentiles: Sequence[float] | None = None, clip: bool | None = None):
    """The per-tile input normalisation: a callable ``tile -> float32 tile`` (or None).

    ``mode`` ``auto`` takes the model's metadata; ``percentile`` / ``minmax`` / ``none`` force one.
    Percentiles are computed once on the whole volume (subsampled), then applied tile by tile.
    """
    settings = network.normalisation() if network is not None else {"mode": "none", "percentiles": (1.0, 99.8),
                                                                    "clip": False}
    if mode != "auto":
        settings["mode"] = mode
    if percentiles is not None and all(p >= 0 for p in percentiles):
        settings["percentiles"] = tuple(percentiles)
    if clip is not None:
        settings["clip"] = bool(clip)
    m = settings["mode"]
    if m in ("none", ""):
        return None
    if m == "minmax":
        lo, hi = percentile_range(volume, 0.0, 100.0)
    elif m == "percentile":
        lo, hi = percentile_range(volume, *settings["percentiles"])
    else:
        raise ParameterError(f"unknown normalisation {m!r} (percentile, minmax, none)", key="Normalization")
    do_clip = settings["clip"]
    return lambda t: apply_range(t, lo, hi, clip=do_clip)


def tile_stream(volume: np.ndarray, network, plan: TilePlan, *, batch_size: int = 1, transform=None,
                channels: int = 4, spacing=(1.0, 1.0, 1.0), meta: dict | None = None,
                progress: bool = False) -> TileStream:
    """A lazy :class:`TileStream` applying ``network`` (``batch -> predictions``) to ``volume``."""

    def produce():
        for idx, batch in iter_tile_batches(volume, plan, batch_size, transform=transform):
            yield idx, network(batch)

    return TileStream(plan=plan, channels=channels, produce=produce, spacing=tuple(spacing),
                      meta=dict(meta or {}), channel_names=list(CHANNEL_NAMES[:channels]), progress=progress)


def predict_volume(volume: np.ndarray, network, *, tile_shape=(128, 192, 192), overlap=16, batch_size: int = 1,
                   blending: str = "cosine", normalization: str = "auto", divisor: int | None = None,
                   progress: bool = False) -> np.ndarray:
    """Tiled prediction of a whole volume: ``(4, Z, Y, X)`` float32 (foreground, flow z, y, x).

    ``network`` is an :class:`OnnxNetwork` or any callable ``(B, C, T...) -> (B, 4, T...)``.
    """
    volume = np.asarray(volume)
    spatial = volume.shape[-3:]
    div = divisor or getattr(network, "size_divisor", DEFAULT_DIVISOR)
    plan = plan_tiles(spatial, tile_shape, overlap, multiple=div)
    transform = make_transform(network if isinstance(network, OnnxNetwork) else None, volume, mode=normalization)
    stream = tile_stream(volume, network, plan, batch_size=batch_size, transform=transform, progress=progress)
    return stream.merge(blending)

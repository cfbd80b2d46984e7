"""ONNX export of a trained checkpoint (``c3d-export``).

The exported graph is :class:`~c3dseg.training.unet.InferenceModel`: input ``input``
``(N, C, Z, Y, X)`` float32 (normalised as the metadata says), output ``output``
``(N, 4, Z, Y, X)``: foreground probability (sigmoid, [0, 1]) and the flows along z, y, x (tanh,
pointing away from the cell centres).  Batch and spatial axes are dynamic; spatial sizes must be
multiples of ``size_divisor`` (8).  Opset 17 by default (onnxruntime >= 1.13 runs it).

The settings the predictor needs are stored as metadata properties (see :mod:`c3dseg.predict` for
the table): flow type and scale, channel meaning, training patch size, training voxel spacing and
median cell diameter, input normalisation, size divisor and the c3dseg version.

After writing, onnxruntime runs the file on a random input and the result is compared with torch;
the export fails (and the file is removed) when the largest absolute difference exceeds the
tolerance (1e-3 for float32, 2e-2 for float16).
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings

import numpy as np
import torch

from .. import __version__
from ..errors import ExecutionError, InputError
from .unet import InferenceModel, UNet3D

log = logging.getLogger("c3dseg")

DEFAULT_OPSET = 17


def load_checkpoint(path: str, map_location: str = "cpu") -> dict:
    """A ``c3d-train`` checkpoint (a file, or a run folder: its ``best.pt``)."""
    if os.path.isdir(path):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise InputError(f"cannot read the checkpoint: {str(e).splitlines()[0] if str(e) else e}", file=path) from None
    if not isinstance(ck, dict) or ck.get("format") != "c3dseg-checkpoint":
        raise InputError("not a c3d-train checkpoint", file=path)
    ck["_path"] = path
    return ck


def model_from_checkpoint(ck: dict) -> UNet3D:
    net = UNet3D(**ck["model_config"])
    net.load_state_dict(ck["model"])
    return net.eval()


def metadata_from_checkpoint(ck: dict, opset: int) -> dict[str, str]:
    info = ck.get("data_info", {})
    net_cfg = ck["model_config"]
    norm = info.get("normalization", {}) or {}

    def csv3(v):
        return ",".join(f"{float(x):g}" for x in v) if v is not None else ""

    state = ck.get("state", {})
    meta = {
        "format": "c3dseg-unet",
        "c3dseg_version": __version__,
        "channels": "foreground,flow_z,flow_y,flow_x",
        "foreground_activation": "sigmoid",
        "flow_type": str(info.get("flow_type", "tanh")),
        "flow_scale": str(info.get("flow_scale", "adaptive")),
        "flow_scale_unit": "um" if info.get("flow_scale_um") else "voxels",
        "flow_direction": "away_from_centre",
        "foreground_target": str(info.get("foreground", "union")),
        "size_divisor": str(2 ** int(net_cfg.get("depth", 3))),
        "in_channels": str(net_cfg.get("in_channels", 1)),
        "patch_size": csv3(info.get("patch_size")),
        "spacing_um": csv3(info.get("spacing_um")),
        "median_cell_diameter_um": f"{float(info.get('median_cell_diameter_um', float('nan'))):.4g}",
        # cells of the training data measured in (isotropic-equivalent) voxels: the predictor resamples an
        # input so that its cells have this diameter (see c3dseg.predict.model_scale_spacing)
        "median_cell_diameter_voxels": f"{float(info.get('median_cell_diameter_voxels', float('nan'))):.4g}",
        "pooled_cell_diameter_voxels": f"{float(info.get('pooled_cell_diameter_voxels', float('nan'))):.4g}",
        "resample_isotropic": "1" if isinstance(info.get("resample_to"), dict) else "0",
        "normalization": str(norm.get("mode", "percentile")),
        "norm_percentiles": f"{float(norm.get('lower', 1.0)):g},{float(norm.get('upper', 99.8)):g}",
        "norm_clip": "1" if norm.get("clip") else "0",
        "opset": str(opset),
        "model_config": json.dumps(net_cfg, sort_keys=True),
        "training_steps": str(state.get("step", "")),
        # with train.init (fine-tuning): the steps of the weights it started from, and the sum
        "init_training_steps": str(int(state.get("init_steps", 0))),
        "total_training_steps": str(int(state.get("init_steps", 0)) + int(state.get("step", 0))),
        # the exported weights' own in-training validation score (empty when they were not scored
        # at their step, e.g. a checkpoint between validations), and the run's best so far
        "validation_score": _score_text(state.get("score") if state.get("validated_step") == state.get("step")
                                        else None),
        "best_validation_score": _score_text(state.get("best")),
        "best_validation_step": "" if state.get("best_step") is None else str(state["best_step"]),
        "training_cells": str(info.get("n_cells", "")),
    }
    return meta


def _score_text(score) -> str:
    return "" if score is None else f"{float(score):.4f}"


def export_onnx(checkpoint, path: str, *, opset: int = DEFAULT_OPSET, fp16: bool = False, tol: float | None = None,
                check_shape=(1, 32, 48, 40), seed: int = 0) -> dict:
    """Export a checkpoint (path, run folder or loaded dict) to ONNX and check it against torch.

    Returns ``{"path", "max_abs_diff", "tolerance", "metadata", "checked"}``.  Raises
    :class:`~c3dseg.errors.ExecutionError` when onnxruntime and torch disagree beyond ``tol``.
    """
    import onnx

    ck = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    net = model_from_checkpoint(ck)
    model = InferenceModel(net).eval()
    cin = int(ck["model_config"].get("in_channels", 1))
    div = net.size_divisor
    shape = (check_shape[0], cin) + tuple(max(div, (int(s) // div) * div) for s in check_shape[1:])
    if tol is None:
        tol = 2e-2 if fp16 else 1e-3
    rng = np.random.default_rng(seed)
    x = rng.random(shape, dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()

    export_model = _Half(model) if fp16 else model
    buf = io.BytesIO()
    dyn = {0: "batch", 2: "z", 3: "y", 4: "x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(export_model, (torch.from_numpy(x),), buf, dynamo=False, opset_version=int(opset),
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": dyn, "output": dyn}, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    meta = metadata_from_checkpoint(ck, int(opset))
    meta["precision"] = "float16" if fp16 else "float32"
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = ("c3dseg 3D U-Net: input (N, C, Z, Y, X) normalised image; output (N, 4, Z, Y, X) = "
                        "foreground probability, flow z, flow y, flow x (away from cell centres).")
    onnx.checker.check_model(proto)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(proto.SerializeToString())
    try:
        diff, checked = _check(tmp, x, ref, fp16)
    except BaseException:
        os.remove(tmp)
        raise
    if checked and not diff <= tol:
        os.remove(tmp)
        raise ExecutionError(f"ONNX output differs from torch by {diff:.3g} (tolerance {tol:g}); not written")
    os.replace(tmp, path)
    if checked:
        log.info("exported %s (opset %d%s): max |onnxruntime - torch| = %.3g on a %s input", path, int(opset),
                 ", float16" if fp16 else "", diff, "x".join(map(str, shape)))
    return {"path": path, "max_abs_diff": diff, "tolerance": tol, "metadata": meta, "checked": checked,
            "shape": shape}


class _Half(torch.nn.Module):
    """float16 network with float32 input and output (Cast nodes at the ends)."""

    def __init__(self, model):
        super().__init__()
        self.model = model.half()

    def forward(self, x):
        return self.model(x.half()).float()


def _check(path: str, x: np.ndarray, ref: np.ndarray, fp16: bool) -> tuple[float, bool]:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if fp16 and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider"] + providers
    try:
        sess = ort.InferenceSession(path, providers=providers)
        out = sess.run(None, {"input": x})[0]
    except Exception as e:
        if fp16:
            log.warning("the float16 model could not be run here (%s); it was written unchecked - check it on a GPU",
                        str(e).splitlines()[0][:200])
            return float("nan"), False
        raise ExecutionError(f"onnxruntime cannot run the exported model: {str(e).splitlines()[0]}") from None
    return float(np.max(np.abs(out.astype(np.float32) - ref))), True

"""The training loop behind ``c3d-train``.

One YAML config (defaults in :data:`DEFAULT_CONFIG`; unknown keys are errors, so typos never pass
silently) describes data, targets, model, optimisation, augmentation and validation.  A run writes
to its output folder:

``config.yaml``    the resolved configuration
``last.pt``        the latest checkpoint (every ``train.checkpoint_every`` steps, at validation, on
                   Ctrl-C / SIGTERM and at the end): ``--resume`` continues from it exactly
                   (patches are drawn from ``rng([seed, patch_index])``, the schedule is a function
                   of the step and the elapsed time)
``best.pt``        the checkpoint with the best validation score (``validation.select``)
``log.csv``        losses, learning rate, speed and validation scores per logged step
``log.png``        a plot of them (at the end; needs matplotlib)
``model.onnx``     the best checkpoint exported (``export.onnx``), with its metadata

Validation every ``validation.every`` steps predicts the held-out volumes whole (tiled, as the
predictor does), runs the full reconstruction (:func:`c3dseg.reconstruction.reconstruct`) and
reports mean per-cell Dice and AP@0.5 (:mod:`c3dseg.metrics`).

Speed on a CPU: ``train.amp: auto`` times a few steps with and without bfloat16 autocast and keeps
the faster (bfloat16 is ~3x faster on CPUs with AVX512-BF16/AMX); patches are prepared in a
background thread while the network trains.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import queue
import signal
import threading
import time
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import InputError, ParameterError
from ..tiling import plan_tiles, predict_tiled
from . import augment as augment_mod
from . import losses as losses_mod
from .data import PatchSampler, data_summary, list_pairs, load_volumes
from .unet import UNet3D, build_unet, count_parameters

log = logging.getLogger("c3dseg")

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 1337,
    "out": "runs/model",
    "device": "cpu",            # cpu | cuda
    "threads": 0,               # torch threads; 0 = all cores
    "data": {
        "train": None,          # {images: DIR, labels: DIR} or {csv: FILE}, or a list of them
        "val": None,            # same; None = hold out val_fraction of the training volumes
        "val_fraction": 0.15,
        "spacing": None,        # [z, y, x] um for files without calibration
        "resample_to": None,    # [z, y, x] um: resample every volume to this spacing first
        "cache": True,          # keep computed targets in OUT/cache (fast --resume, heat flows), or
                                # {cell_diameter_voxels: D}: each volume isotropic with median cells D voxels
        "normalization": {"mode": "percentile", "lower": 1.0, "upper": 99.8, "clip": False},
    },
    "targets": {"flow_type": "tanh", "flow_scale": "adaptive", "flow_scale_um": False, "foreground": "union"},
    "model": {"base_width": 16, "depth": 3, "norm": "instance", "norm_first_level": False},
    "train": {
        "init": None,           # a checkpoint (.pt) whose weights start the run (fine-tuning); fresh optimizer
        "steps": 4000,
        "max_minutes": 0,       # stop after this much training time (0 = no limit); counts across resumes
        "patch_size": [64, 64, 64],
        "batch_size": 1,
        "optimizer": "adamw",   # adamw | radam
        "lr": 1.0e-3,
        "weight_decay": 1.0e-4,
        "schedule": "cosine",   # cosine | constant
        "warmup_steps": 100,
        "min_lr_ratio": 0.05,
        "grad_clip": 5.0,
        "amp": "auto",          # auto | bf16 | fp16 | off
        "foreground_bias": 0.8,
        "context": "auto",      # voxels around resampled patches (auto: ~ the median cell diameter)
        "prefetch": 2,          # batches prepared ahead in a thread (0 = in the loop)
        "checkpoint_every": 200,
        "log_every": 20,
        "max_bad_steps": 50,    # consecutive non-finite losses before giving up
    },
    "loss": dict(losses_mod.DEFAULTS),
    "augment": {},
    "validation": {
        "every": 500,
        "tile_size": [64, 128, 128],
        "overlap": 16,
        "max_volumes": 4,
        "select": "ap50",       # ap50 | dice | loss
        "reconstruct": {},      # keyword arguments of c3dseg.reconstruction.reconstruct
    },
    "export": {"onnx": True, "opset": 17},
}

_OPEN_SECTIONS = {"augment", "validation.reconstruct"}  # checked elsewhere / passed through


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (update or {}).items():
        key = f"{path}{k}"
        if k not in out:
            raise ParameterError(f"unknown config key {key!r} (known here: {', '.join(sorted(out))})", key=key)
        if isinstance(out[k], dict) and key not in _OPEN_SECTIONS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ParameterError(f"config key {key!r} must be a mapping, got {v!r}", key=key)
            out[k] = _merge(out[k], v, key + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config(config: dict | None, base_dir: str = ".") -> dict:
    """Defaults updated with ``config``; checks keys and values; paths made absolute."""
    cfg = _merge(DEFAULT_CONFIG, config or {})
    cfg["_base_dir"] = os.path.abspath(base_dir)
    if not os.path.isabs(cfg["out"]):
        cfg["out"] = os.path.normpath(os.path.join(base_dir, cfg["out"]))
    t = cfg["train"]
    if t["init"]:
        t["init"] = os.path.normpath(os.path.join(base_dir, str(t["init"])))
        if not os.path.isfile(t["init"]):
            raise ParameterError(f"train.init: checkpoint not found: {t['init']}", key="train.init")
    ps = t["patch_size"]
    if isinstance(ps, int):
        ps = [ps] * 3
    if len(ps) != 3 or any(int(p) < 8 for p in ps):
        raise ParameterError(f"train.patch_size must be 3 sizes >= 8, got {t['patch_size']!r}", key="train.patch_size")
    t["patch_size"] = [int(p) for p in ps]
    for key in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if int(t[key]) < 1:
            raise ParameterError(f"train.{key} must be >= 1, got {t[key]!r}", key=f"train.{key}")
        t[key] = int(t[key])
    if t["optimizer"] not in ("adamw", "radam"):
        raise ParameterError(f"train.optimizer must be adamw or radam, got {t['optimizer']!r}", key="train.optimizer")
    if t["schedule"] not in ("cosine", "constant"):
        raise ParameterError(f"train.schedule must be cosine or constant, got {t['schedule']!r}", key="train.schedule")
    if str(t["amp"]) not in ("auto", "bf16", "fp16", "off", "False", "True"):
        raise ParameterError(f"train.amp must be auto, bf16, fp16 or off, got {t['amp']!r}", key="train.amp")
    if cfg["device"] not in ("cpu", "cuda"):
        raise ParameterError(f"device must be cpu or cuda, got {cfg['device']!r}", key="device")
    if cfg["targets"]["flow_type"] not in ("tanh", "heat"):
        raise ParameterError(f"targets.flow_type must be tanh or heat, got {cfg['targets']['flow_type']!r}",
                             key="targets.flow_type")
    if cfg["validation"]["select"] not in ("ap50", "dice", "loss"):
        raise ParameterError("validation.select must be ap50, dice or loss", key="validation.select")
    try:
        augment_mod.merge_config(cfg["augment"])
        losses_mod.merge_config(cfg["loss"])
        build_unet(cfg["model"])
    except ValueError as e:
        raise ParameterError(str(e)) from None
    div = 2 ** int(cfg["model"]["depth"])
    if any(p % div for p in t["patch_size"]):
        raise ParameterError(f"train.patch_size {t['patch_size']} must be divisible by {div} (2 ** model.depth)",
                             key="train.patch_size")
    return cfg


def load_config(path: str) -> dict:
    """Read a YAML config (not yet resolved)."""
    import yaml

    if not os.path.isfile(path):
        raise InputError(f"config file not found: {path}")
    with open(path) as fh:
        try:
            cfg = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ParameterError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ParameterError(f"{path}: the config must be a mapping of sections")
    return cfg


def set_key(cfg: dict, dotted: str, value) -> None:
    """``set_key(cfg, "train.lr", 3e-4)``: override one (nested) config key."""
    parts = dotted.split(".")
    d = cfg
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ParameterError(f"cannot set {dotted}: {p} is not a section", key=dotted)
    d[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(progress: float, step: int, tcfg: dict) -> float:
    """Learning rate for a training ``progress`` in [0, 1] (and ``step`` for the warm-up)."""
    lr = float(tcfg["lr"])
    warm = int(tcfg["warmup_steps"])
    f = 1.0
    if warm > 0 and step < warm:
        f = (step + 1) / warm
    if tcfg["schedule"] == "cosine":
        lo = float(tcfg["min_lr_ratio"])
        p = min(max(progress, 0.0), 1.0)
        f *= lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    return lr * f


def _autocast_dtype(amp: str, device: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def choose_amp(model: UNet3D, cfg: dict, device: str) -> str:
    """Resolve ``train.amp``; ``auto`` times a few steps each way on a copy of the model."""
    amp = str(cfg["train"]["amp"])
    if amp in ("off", "False"):
        return "off"
    if amp in ("bf16", "fp16"):
        return amp
    if amp == "True":
        return "bf16" if device == "cpu" else "fp16"
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "off"
    except Exception:
        return "off"
    ps = cfg["train"]["patch_size"]
    x = torch.randn(cfg["train"]["batch_size"], model.config["in_channels"], *ps)
    probe = copy.deepcopy(model).train()
    times = {}
    for mode in ("off", "bf16") * 3:  # interleaved; the minimum resists other load on the machine
        dt = _autocast_dtype(mode, device)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dt or torch.bfloat16, enabled=dt is not None):
            y = probe(x)
        y.float().square().mean().backward()
        times[mode] = min(times.get(mode, 1e9), time.perf_counter() - t0)
        probe.zero_grad(set_to_none=True)
    choice = "bf16" if times["bf16"] < 0.85 * times["off"] else "off"
    log.info("amp auto: %.2f s/step in float32, %.2f s/step in bfloat16 -> %s", times["off"], times["bf16"], choice)
    return choice


class Prefetcher:
    """Prepares batches ``start, start+1, ...`` in a background thread (``depth`` ahead)."""

    def __init__(self, sampler: PatchSampler, batch_size: int, start: int, depth: int):
        self.sampler, self.bs, self.next = sampler, batch_size, start
        self.depth = int(depth)
        self.stop = threading.Event()
        if self.depth > 0:
            self.q: queue.Queue = queue.Queue(maxsize=self.depth)
            self.thread = threading.Thread(target=self._run, name="c3d-prefetch", daemon=True)
            self.thread.start()

    def _run(self):
        k = self.next
        while not self.stop.is_set():
            try:
                item = (k, self.sampler.batch(k, self.bs))
            except BaseException as e:  # handed to the training loop
                item = (k, e)
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            k += 1

    def get(self):
        if self.depth <= 0:
            k = self.next
            self.next += 1
            return self.sampler.batch(k, self.bs)
        k, item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()
        if self.depth > 0:
            self.thread.join(timeout=5)


class CsvLog:
    """Append-only CSV (rows after the resumed step are dropped first)."""

    COLUMNS = ["step", "elapsed_s", "lr", "loss", "bce", "dice", "flow", "steps_per_s", "data_wait",
               "val_loss", "val_ap50", "val_dice", "val_cells", "val_pred_cells"]

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        rows = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step") and int(float(r["step"])) <= resume_step]
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, self.COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in self.COLUMNS})

    def write(self, **row):
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, self.COLUMNS)
            w.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                        for k in self.COLUMNS})


def plot_log(csv_path: str, png_path: str) -> bool:
    """Losses and validation scores against the step (matplotlib; False when unavailable)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot of the training log")
        return False
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def series(key):
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "bce", "dice", "flow", "val_loss"):
        x, y = series(key)
        if x:
            a1.plot(x, y, label=key, marker="o" if key == "val_loss" else None, ms=3)
    a1.set_yscale("log")
    a1.set_xlabel("step")
    a1.set_title("losses")
    if a1.get_legend_handles_labels()[0]:
        a1.legend()
    for key in ("val_ap50", "val_dice"):
        x, y = series(key)
        if x:
            a2.plot(x, y, label=key, marker="o", ms=3)
    a2.set_ylim(0, 1)
    a2.set_xlabel("step")
    a2.set_title("validation")
    if a2.get_legend_handles_labels()[0]:
        a2.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def predict_torch(model: UNet3D, image: np.ndarray, *, tile_size, overlap: int, device: str, amp: str = "off"
                  ) -> np.ndarray:
    """Tiled whole-volume prediction with a torch model: ``(4, Z, Y, X)`` (probability, flows)."""
    plan = plan_tiles(image.shape[-3:], tile_size, overlap, multiple=model.size_divisor)
    dt = _autocast_dtype(amp, device)
    was_training = model.training
    model.eval()

    def run(batch):
        with torch.inference_mode(), torch.autocast(device, dtype=dt or torch.bfloat16, enabled=dt is not None):
            y = model.forward_raw(torch.from_numpy(batch).to(device)).float()
            y = torch.cat([torch.sigmoid(y[:, :1]), torch.tanh(y[:, 1:])], dim=1)
        return y.cpu().numpy()

    try:
        return predict_tiled(image, run, plan, channels=4)
    finally:
        model.train(was_training)


def _reconstruct_kwargs(cfg: dict, summary: dict) -> dict:
    kw = dict(cfg["validation"]["reconstruct"] or {})
    t = cfg["targets"]
    kw.setdefault("flow_type", t["flow_type"])
    if t["flow_type"] == "tanh":
        kw.setdefault("flow_scale", t["flow_scale"])
        if t.get("flow_scale_um"):
            kw.setdefault("spacing", summary.get("spacing_um"))
    r = summary.get("median_cell_radius_voxels")
    if r and np.isfinite(r):
        kw.setdefault("min_radius_voxels", float(min(5.0, 0.4 * r)))
        kw.setdefault("max_radius_voxels", float(max(100.0, 4 * r)))
    return kw


_SEGMENTATION: dict[str, Any] = {}


def load_segmentation_tools() -> dict:
    """Import the reconstruction and metric functions once, when training starts, so that a long
    run validates with the code it started with.  Missing or broken: validation reports the loss
    only (with a warning)."""
    if not _SEGMENTATION:
        try:
            from ..metrics import average_precision, mean_cell_dice
            from ..reconstruction import reconstruct
        except Exception as e:  # noqa: BLE001 - any failure: train anyway, validate by the loss
            log.warning("validation by segmentation is off (cannot import the reconstruction or metrics: %s: %s); "
                        "validation reports the loss only", type(e).__name__, e)
            _SEGMENTATION.update(reconstruct=None, average_precision=None, mean_cell_dice=None)
        else:
            _SEGMENTATION.update(reconstruct=reconstruct, average_precision=average_precision,
                                 mean_cell_dice=mean_cell_dice)
    return _SEGMENTATION


def validate(model, volumes, cfg, device, amp, summary) -> dict:
    """Mean validation loss, AP@0.5 and per-cell Dice over (up to ``max_volumes``) volumes."""
    tools = load_segmentation_tools()
    reconstruct = tools["reconstruct"]
    average_precision, mean_cell_dice = tools["average_precision"], tools["mean_cell_dice"]
    v = cfg["validation"]
    lw = losses_mod.merge_config(cfg["loss"])
    res = {"val_loss": [], "val_ap50": [], "val_dice": [], "val_cells": 0, "val_pred_cells": 0}
    kw = _reconstruct_kwargs(cfg, summary)
    for vol in volumes[: int(v["max_volumes"])]:
        pred = predict_torch(model, vol.image, tile_size=v["tile_size"], overlap=int(v["overlap"]), device=device,
                             amp=amp)
        targets = vol.targets.astype(np.float32)
        fg, tfg = pred[0], targets[0]
        p = np.clip(fg, 1e-6, 1 - 1e-6)
        bce = float(-np.mean(tfg * np.log(p) + (1 - tfg) * np.log(1 - p)))
        w = tfg + lw["background_flow_weight"] * (1 - tfg)
        mse = float(np.sum(((pred[1:] - targets[1:]) ** 2).mean(axis=0) * w) / max(w.sum(), 1.0))
        res["val_loss"].append(lw["fg_weight"] * bce + lw["flow_weight"] * mse)
        if reconstruct is not None:
            try:
                labels = reconstruct(fg, pred[1:], **kw)
            except Exception as e:  # a failing reconstruction must not stop training
                log.warning("validation reconstruction failed on %s: %s", vol.name, e)
                continue
            try:
                ap = average_precision(vol.labels, labels, (0.5,))[0][0]
                d = mean_cell_dice(vol.labels, labels)
            except Exception as e:  # noqa: BLE001
                log.warning("validation metrics failed on %s: %s", vol.name, e)
                continue
            res["val_ap50"].append(0.0 if not np.isfinite(ap) else float(ap))
            res["val_dice"].append(0.0 if not np.isfinite(d) else float(d))
            res["val_cells"] += int(len(np.unique(vol.labels)) - (1 if (vol.labels == 0).any() else 0))
            res["val_pred_cells"] += int(labels.max())
    out = {k: (float(np.mean(x)) if isinstance(x, list) and x else (None if isinstance(x, list) else x))
           for k, x in res.items()}
    return out


def _score(metrics: dict, select: str) -> float | None:
    if select == "loss":
        return None if metrics.get("val_loss") is None else -metrics["val_loss"]
    key = "val_ap50" if select == "ap50" else "val_dice"
    if metrics.get(key) is None:  # no reconstruction: fall back to the loss
        return None if metrics.get("val_loss") is None else -metrics["val_loss"]
    return metrics[key]


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def _split_validation(pairs, fraction: float, seed: int):
    if len(pairs) < 2 or fraction <= 0:
        return pairs, []
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(fraction * len(pairs))))
    idx = rng.permutation(len(pairs))
    val = sorted(idx[:n_val].tolist())
    train = sorted(idx[n_val:].tolist())
    return [pairs[i] for i in train], [pairs[i] for i in val]


def _collect_pairs(source, base_dir):
    if source is None:
        return []
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in list_pairs(s, base_dir)]
    return list_pairs(source, base_dir)


def _make_optimizer(model, tcfg):
    params = model.parameters()
    if tcfg["optimizer"] == "radam":
        return torch.optim.RAdam(params, lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]),
                                 decoupled_weight_decay=True)
    return torch.optim.AdamW(params, lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))


def _init_weights(model, path: str, device) -> int:
    """Start from the weights of checkpoint ``path`` (train.init): same architecture required.
    Returns the steps those weights were trained for, over their whole ``--init`` chain."""
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line error
        raise ParameterError(f"train.init: {path} is not a c3dseg checkpoint ({e.__class__.__name__})",
                             key="train.init") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise ParameterError(f"train.init: {path} is not a c3dseg checkpoint (no model weights)", key="train.init")
    if ck.get("model_config") != model.config:
        raise ParameterError(f"train.init: {path} holds model {ck.get('model_config')}, the config asks for "
                             f"{model.config}", key="train.init")
    model.load_state_dict(ck["model"])
    src = ck.get("state", {})
    steps = int(src.get("init_steps", 0)) + int(src.get("step", 0))
    log.info("initialised from %s (trained %d steps); new optimizer and schedule", path, steps)
    return steps


def train(config: dict, *, resume: bool = False, progress: bool | None = None) -> dict:
    """Train a network.  ``config`` as from :func:`resolve_config`.  Returns a summary dict
    (``steps``, ``best`` score, ``out`` folder, paths of checkpoints and log)."""
    cfg = config if "_base_dir" in config else resolve_config(config)
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    tcfg = cfg["train"]
    device = cfg["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device cuda was asked for but torch sees no CUDA device", key="device")
    threads = int(cfg["threads"]) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))

    # -- data ---------------------------------------------------------------------------------
    base = cfg["_base_dir"]
    d = cfg["data"]
    train_pairs = _collect_pairs(d["train"], base)
    if not train_pairs:
        raise ParameterError("no training data: set data.train to {images: DIR, labels: DIR} or {csv: FILE}",
                             key="data.train")
    val_pairs = _collect_pairs(d["val"], base)
    if not val_pairs:
        train_pairs, val_pairs = _split_validation(train_pairs, float(d["val_fraction"]), seed)
    log.info("data: %d training and %d validation volumes", len(train_pairs), len(val_pairs))
    show = progress if progress is not None else None
    kw = dict(spacing=d["spacing"], norm_cfg=d["normalization"], targets_cfg=_targets_cfg(cfg),
              resample_to=d["resample_to"], progress=bool(show),
              cache_dir=os.path.join(out, "cache") if d["cache"] else None)
    volumes = load_volumes(train_pairs, **kw)
    val_volumes = load_volumes(val_pairs, **kw) if val_pairs else []
    summary = data_summary(volumes)
    radii = np.concatenate([np.cbrt(3 * np.bincount(v.labels.ravel().astype(np.intp))[1:] / (4 * np.pi))
                            for v in volumes])
    radii = radii[radii > 0]
    summary["median_cell_radius_voxels"] = float(np.median(radii)) if radii.size else None
    log.info("training cells: %d, median diameter %.2f um, spacing %s um", summary["n_cells"],
             summary["median_cell_diameter_um"], summary["spacing_um"])

    # -- model and state ----------------------------------------------------------------------
    model = build_unet(cfg["model"]).to(device)
    log.info("U-Net: %d parameters, base width %d, depth %d", count_parameters(model), model.config["base_width"],
             model.depth)
    opt = _make_optimizer(model, tcfg)
    # init_steps: steps of the weights a train.init run started from (0 for a fresh run)
    state = {"step": 0, "elapsed_s": 0.0, "best": None, "best_step": None, "bad_steps": 0, "validated_step": None,
             "init_steps": 0}
    last_path, best_path = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    if resume:
        if os.path.isfile(last_path):
            ck = torch.load(last_path, map_location=device, weights_only=False)
            if ck.get("model_config") != model.config:
                raise ParameterError(f"{last_path} was trained with model {ck.get('model_config')}, the config asks "
                                     f"for {model.config}; use another out folder", key="model")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            state.update(ck["state"])
            log.info("resumed from %s at step %d", last_path, state["step"])
        else:
            log.warning("--resume: no checkpoint in %s; starting from scratch", out)
            resume = False
    if not resume and tcfg["init"]:
        state["init_steps"] = _init_weights(model, tcfg["init"], device)
    if val_volumes:
        load_segmentation_tools()
    from .export import export_onnx  # imported now: the run ends with the code it started with
    amp = choose_amp(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda") if (amp == "fp16" and device == "cuda") else None
    data_info = {
        "c3dseg_version": __version__,
        "flow_type": cfg["targets"]["flow_type"],
        "flow_scale": cfg["targets"]["flow_scale"],
        "flow_scale_um": bool(cfg["targets"].get("flow_scale_um")),
        "foreground": cfg["targets"]["foreground"],
        "normalization": dict(d["normalization"]),
        "patch_size": list(tcfg["patch_size"]),
        "resample_to": d["resample_to"],
        **summary,
    }
    _write_config(cfg, os.path.join(out, "config.yaml"))

    def checkpoint(path):
        _atomic_save({"format": "c3dseg-checkpoint", "version": 1, "model": model.state_dict(),
                      "model_config": model.config, "optimizer": opt.state_dict(), "state": dict(state),
                      "config": {k: v for k, v in cfg.items() if not k.startswith("_")}, "data_info": data_info},
                     path)

    # -- loop ---------------------------------------------------------------------------------
    context = tcfg["context"]
    if context == "auto":
        r = summary.get("median_cell_radius_voxels") or 8.0
        context = int(np.clip(round(2 * r), 8, 32))
    sampler = PatchSampler(volumes, tcfg["patch_size"], augmenter=augment_mod.Augmenter(cfg["augment"]),
                           foreground_bias=float(tcfg["foreground_bias"]), targets_cfg=_targets_cfg(cfg),
                           context=int(context), seed=seed)
    loss_fn = losses_mod.CellposeLoss(**losses_mod.merge_config(cfg["loss"]))
    csvlog = CsvLog(os.path.join(out, "log.csv"), state["step"] if resume else None)
    total = int(tcfg["steps"])
    budget = float(tcfg["max_minutes"]) * 60.0
    vcfg = cfg["validation"]
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, on_signal)
    prefetch = Prefetcher(sampler, tcfg["batch_size"], state["step"], int(tcfg["prefetch"]))
    bar = None
    if show is not False:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=state["step"], desc="training", unit="step", disable=None,
                       dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    meters: dict[str, list[float]] = {}
    t_log = time.perf_counter()
    steps_since_log = 0
    dt_amp = _autocast_dtype(amp, device)
    model.train()
    interrupted = False
    session_t0, elapsed0 = time.perf_counter(), float(state["elapsed_s"])
    try:
        while state["step"] < total:
            if stop["signal"] is not None:
                log.warning("signal %s: saving and stopping", stop["signal"])
                interrupted = True
                break
            if budget > 0 and state["elapsed_s"] >= budget:
                log.info("time budget of %.1f min reached at step %d", budget / 60, state["step"])
                break
            tw = time.perf_counter()
            x, y, valid = prefetch.get()
            meters.setdefault("wait", []).append(time.perf_counter() - tw)
            step = state["step"]
            progress_frac = step / total
            if budget > 0:
                progress_frac = max(progress_frac, state["elapsed_s"] / budget)
            lr = lr_at(progress_frac, step, tcfg)
            for g in opt.param_groups:
                g["lr"] = lr
            xt = torch.from_numpy(x).to(device)
            yt = torch.from_numpy(y).to(device)
            vt = torch.from_numpy(valid).to(device)
            with torch.autocast(device, dtype=dt_amp or torch.bfloat16, enabled=dt_amp is not None):
                pred = model(xt)
            loss, parts = loss_fn(pred.float(), yt, vt)
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                state["bad_steps"] += 1
                log.warning("step %d: non-finite loss (%s); step skipped", step, float(loss))
                if state["bad_steps"] >= int(tcfg["max_bad_steps"]):
                    raise RuntimeError(f"{state['bad_steps']} consecutive non-finite losses; lower train.lr "
                                       f"(the last good checkpoint is {last_path})")
                state["step"] += 1
                continue
            state["bad_steps"] = 0
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if float(tcfg["grad_clip"]) > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg["grad_clip"]))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            state["step"] += 1
            state["elapsed_s"] = elapsed0 + time.perf_counter() - session_t0  # wall time, validation included
            steps_since_log += 1
            for k, v in parts.items():
                meters.setdefault(k, []).append(float(v.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.2e}", refresh=False)
            s = state["step"]
            if s % tcfg["log_every"] == 0 or s == total:
                now = time.perf_counter()
                sps = steps_since_log / max(now - t_log, 1e-9)
                row = {k: float(np.mean(v)) for k, v in meters.items()}
                wait = row.get("wait", 0.0) * sps  # fraction of the time spent waiting for patches
                csvlog.write(step=s, elapsed_s=state["elapsed_s"], lr=lr, loss=row.get("total"), bce=row.get("bce"),
                             dice=row.get("dice"), flow=row.get("flow"), steps_per_s=sps, data_wait=wait)
                if bar is None or bar.disable:
                    log.info("step %d/%d loss %.4f (bce %.4f flow %.4f) lr %.2e, %.2f steps/s (%.0f%% waiting for "
                             "data)", s, total, row.get("total", float("nan")), row.get("bce", float("nan")),
                             row.get("flow", float("nan")), lr, sps, 100 * wait)
                meters, t_log, steps_since_log = {}, now, 0
            if val_volumes and (s % int(vcfg["every"]) == 0 or s == total):
                _validate_and_keep(model, val_volumes, cfg, device, amp, summary, state, csvlog, checkpoint,
                                   best_path, lr)
                t_log = time.perf_counter()
                steps_since_log = 0
            if s % tcfg["checkpoint_every"] == 0:
                checkpoint(last_path)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: saving %s (continue with --resume)", last_path)
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    checkpoint(last_path)
    if not interrupted and val_volumes and state["validated_step"] != state["step"]:
        _validate_and_keep(model, val_volumes, cfg, device, amp, summary, state, csvlog, checkpoint, best_path,
                           lr_at(1.0, state["step"], tcfg))
        checkpoint(last_path)
    if not os.path.isfile(best_path) and not interrupted:
        checkpoint(best_path)  # no validation: the last weights are the best we have
    try:
        plot_log(os.path.join(out, "log.csv"), os.path.join(out, "log.png"))
    except Exception as e:  # a plot is a convenience: never fail a finished run over it
        log.warning("could not plot the training log: %s", e)
    result = {"out": out, "steps": state["step"], "elapsed_s": state["elapsed_s"], "best": state["best"],
              "best_step": state["best_step"], "last": last_path, "best_checkpoint": best_path,
              "log": os.path.join(out, "log.csv"), "interrupted": interrupted, "amp": amp}
    if cfg["export"]["onnx"] and not interrupted and os.path.isfile(best_path):
        try:
            result["onnx"] = export_onnx(best_path, os.path.join(out, "model.onnx"),
                                         opset=int(cfg["export"]["opset"]))["path"]
        except Exception as e:  # the checkpoints are what matters; export can be redone with c3d-export
            log.warning("ONNX export failed (%s); run c3d-export %s -o model.onnx", e, best_path)
    return result


def _targets_cfg(cfg: dict) -> dict:
    t = dict(cfg["targets"])
    if not t.get("flow_scale_um"):
        t.pop("flow_scale_um", None)
    return t


def _validate_and_keep(model, val_volumes, cfg, device, amp, summary, state, csvlog, checkpoint, best_path, lr):
    t0 = time.perf_counter()
    m = validate(model, val_volumes, cfg, device, amp, summary)
    score = _score(m, cfg["validation"]["select"])
    improved = score is not None and (state["best"] is None or score > state["best"])
    state["validated_step"] = state["step"]
    state["score"] = None if score is None else float(score)   # this step's, for the export metadata
    if improved:
        state["best"], state["best_step"] = float(score), state["step"]
    csvlog.write(step=state["step"], elapsed_s=state["elapsed_s"], lr=lr, **m)
    log.info("validation at step %d: loss %s, AP@0.5 %s, dice %s, cells %s/%s (%.1f s)%s", state["step"],
             _fmt(m.get("val_loss")), _fmt(m.get("val_ap50")), _fmt(m.get("val_dice")), m.get("val_pred_cells"),
             m.get("val_cells"), time.perf_counter() - t0, " - best so far" if improved else "")
    if improved:
        checkpoint(best_path)


def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def _write_config(cfg: dict, path: str) -> None:
    import yaml

    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(clean, fh, sort_keys=False)
    os.replace(tmp, path)

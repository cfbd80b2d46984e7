"""Training augmentation (numpy/scipy), each transform with a probability and a range.

Two kinds of geometric transforms, both exact for the flow targets:

* **Resampling** (isotropic/anisotropic scaling, in-plane rotation, smooth elastic deformation):
  the *labels* are resampled (nearest neighbour) together with the image (linear), and the targets
  are recomputed from the resampled labels with :mod:`c3dseg.flows` (in a window with a context
  margin, so cells cut by the patch border keep their true centre).  Voxels that came from outside
  the volume are marked invalid and ignored by the loss.
* **Flips and axis permutations** act on whole-volume targets directly: a flip negates the flow
  component along that axis, a permutation permutes the flow channels.  This is what recomputing
  the flows would give (the flow definitions are equivariant), at no cost.

Intensity transforms (image only, after normalisation): scale/shift, gamma, uneven illumination,
depth attenuation, faint or missing membranes (interfaces between random pairs of cells dimmed),
blur, noise.

The configuration is a dict of ``name: {p: probability, ...ranges}`` (see :data:`DEFAULTS`);
unknown names or keys are errors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

#: Default augmentation settings; ``p`` is the probability of applying each transform.
DEFAULTS: dict[str, dict[str, Any]] = {
    "flip": {"p": 0.5},                                   # per axis
    "permute": {"p": 0.5, "axes": "auto"},                # auto: yx only for anisotropic spacing
    "scale": {"p": 0.25, "range": [0.7, 1.4], "anisotropy": 0.15},  # zoom factor; extra per-axis spread
    "rotate": {"p": 0.2, "degrees": 180.0},              # in-plane (y, x) rotation
    "elastic": {"p": 0.1, "magnitude": 2.0, "grid": 16},  # displacement std (voxels), control spacing
    "intensity": {"p": 0.5, "scale": [0.7, 1.3], "shift": [-0.1, 0.1]},
    "gamma": {"p": 0.3, "range": [0.7, 1.5]},
    "illumination": {"p": 0.2, "strength": [0.1, 0.5], "grid": 32},
    "depth_attenuation": {"p": 0.2, "strength": [0.2, 1.0]},
    "membranes": {"p": 0.25, "fraction": [0.05, 0.3], "faint": [0.0, 0.5]},
    "blur": {"p": 0.2, "sigma": [0.3, 1.2], "z_factor": [1.0, 2.0]},
    "noise": {"p": 0.3, "std": [0.0, 0.12], "poisson": [0.0, 0.1]},
}


def merge_config(config: dict | None) -> dict:
    """DEFAULTS updated with ``config``; ``{name: None}`` or ``{name: {p: 0}}`` turns one off."""
    out = copy.deepcopy(DEFAULTS)
    for name, settings in (config or {}).items():
        if name not in out:
            raise ValueError(f"unknown augmentation {name!r} (known: {', '.join(out)})")
        if settings is None or settings is False:
            out[name]["p"] = 0.0
            continue
        if not isinstance(settings, dict):
            raise ValueError(f"augmentation {name}: expected a mapping, got {settings!r}")
        bad = set(settings) - set(out[name])
        if bad:
            raise ValueError(f"augmentation {name}: unknown setting(s) {', '.join(sorted(bad))} "
                             f"(known: {', '.join(out[name])})")
        out[name].update(settings)
    for name, s in out.items():
        if not 0.0 <= float(s["p"]) <= 1.0:
            raise ValueError(f"augmentation {name}: p must be in [0, 1], got {s['p']}")
    return out


def _u(rng, rng_range) -> float:
    lo, hi = (float(v) for v in rng_range)
    return float(rng.uniform(lo, hi)) if hi > lo else lo


@dataclass
class Geometry:
    """A drawn resampling transform: output voxel offset ``d`` (from the window centre) maps to
    source offset ``R(angle) (d / scale) + displacement``."""

    scale: tuple[float, float, float]
    angle: float
    displacement: np.ndarray | None  # coarse (3, gz, gy, gx) control grid, voxels
    magnitude: float

    def source_window(self, outer) -> tuple[int, int, int]:
        """Source extent (voxels) that the output window reads from (before clipping)."""
        ext = [o / s for o, s in zip(outer, self.scale)]
        c, s = abs(math.cos(self.angle)), abs(math.sin(self.angle))
        ey, ex = c * ext[1] + s * ext[2], s * ext[1] + c * ext[2]
        m = 3 * self.magnitude
        return tuple(int(math.ceil(e + 2 * m)) for e in (ext[0], ey, ex))

    def coordinates(self, start, window, outer) -> np.ndarray:
        """Source coordinates ``(3, *outer)`` float32 for a source window at ``start``."""
        centre = [st + (w - 1) / 2.0 for st, w in zip(start, window)]
        d = [np.arange(o, dtype=np.float32) - (o - 1) / 2.0 for o in outer]
        dz = d[0][:, None, None] / self.scale[0]
        dy = d[1][None, :, None] / self.scale[1]
        dx = d[2][None, None, :] / self.scale[2]
        c, s = math.cos(self.angle), math.sin(self.angle)
        coords = np.empty((3, *outer), np.float32)
        coords[0] = centre[0] + dz
        coords[1] = centre[1] + c * dy - s * dx
        coords[2] = centre[2] + s * dy + c * dx
        if self.displacement is not None:
            for a in range(3):
                g = self.displacement[a]
                coords[a] += ndi.zoom(g, [o / n for o, n in zip(outer, g.shape)], order=1, mode="nearest",
                                      grid_mode=True)
        return coords

    def resample(self, image, labels, start, window, outer):
        """``(image float32, labels int32, valid bool)`` of shape ``outer``."""
        coords = self.coordinates(start, window, outer)
        shape = labels.shape
        valid = np.ones(outer, bool)
        for a in range(3):
            valid &= (coords[a] > -0.5) & (coords[a] < shape[a] - 0.5)
        img = ndi.map_coordinates(image, coords, order=1, mode="mirror", output=np.float32)
        lab = ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=np.int32)
        lab[~valid] = 0
        return img, lab, valid


class Augmenter:
    """Draws and applies augmentations (see the module docstring); thread-safe (no state)."""

    def __init__(self, config: dict | None = None):
        self.cfg = merge_config(config)

    def _on(self, rng, name) -> bool:
        p = float(self.cfg[name]["p"])
        return p > 0 and rng.random() < p

    # -- geometry ---------------------------------------------------------------------------
    def draw_geometry(self, rng, spacing=(1.0, 1.0, 1.0)) -> Geometry | None:
        """A resampling transform, or None when none was drawn (the cheap path)."""
        c = self.cfg
        scale, angle, mag = [1.0, 1.0, 1.0], 0.0, 0.0
        drawn = False
        if self._on(rng, "scale"):
            lo, hi = c["scale"]["range"]
            f = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # log-uniform zoom
            an = float(c["scale"].get("anisotropy", 0.0))
            scale = [f * math.exp(rng.uniform(-an, an)) for _ in range(3)]
            drawn = True
        if self._on(rng, "rotate"):
            angle = math.radians(rng.uniform(-1, 1) * float(c["rotate"]["degrees"]))
            drawn = True
        if self._on(rng, "elastic"):
            mag = float(c["elastic"]["magnitude"])
            drawn = drawn or mag > 0
        if not drawn:
            return None
        geo = Geometry(tuple(scale), angle, None, mag)
        if mag > 0:
            grid = max(4, int(c["elastic"]["grid"]))
            # control points every `grid` voxels over a nominal 128^3 window: shape-independent draw
            n = max(2, 128 // grid)
            geo.displacement = (rng.normal(0.0, mag, size=(3, n, n, n))).astype(np.float32)
        return geo

    def flip_permute(self, rng, image, targets, labels, valid, spacing=(1.0, 1.0, 1.0)):
        """Random flips (flow component negated) and axis permutations (flow channels permuted)."""
        shape = image.shape
        if self.cfg["permute"]["p"] > 0 and self._on(rng, "permute"):
            axes = self.cfg["permute"]["axes"]
            sp = np.asarray(spacing, float)
            if axes == "auto":
                axes = "zyx" if sp.max() / sp.min() < 1.5 else "yx"
            cand = [a for a in range(3) if "zyx"[a] in axes]
            perm = list(range(3))
            if len(cand) >= 2:
                shuffled = list(rng.permutation(cand))
                for a, b in zip(cand, shuffled):
                    perm[a] = int(b)
            if any(shape[p] != shape[a] for a, p in enumerate(perm)):
                perm = list(range(3))  # only permutations that keep the patch shape
            if perm != [0, 1, 2]:
                image = np.transpose(image, perm)
                labels = np.transpose(labels, perm)
                valid = np.transpose(valid, perm)
                targets = np.transpose(targets, [0] + [p + 1 for p in perm])
                targets = targets[[0] + [p + 1 for p in perm]]
        if self.cfg["flip"]["p"] > 0:
            for a in range(3):
                if self._on(rng, "flip"):
                    image = np.flip(image, a)
                    labels = np.flip(labels, a)
                    valid = np.flip(valid, a)
                    targets = np.flip(targets, a + 1).copy()
                    targets[a + 1] *= -1
        return (np.ascontiguousarray(image), np.ascontiguousarray(targets), np.ascontiguousarray(labels),
                np.ascontiguousarray(valid))

    # -- intensity --------------------------------------------------------------------------
    def intensity(self, rng, image: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Intensity transforms of a normalised ``(Z, Y, X)`` patch (float32)."""
        c = self.cfg
        x = np.array(image, dtype=np.float32)
        if labels is not None and self._on(rng, "membranes"):
            x = faint_membranes(x, labels, rng, _u(rng, c["membranes"]["fraction"]), _u(rng, c["membranes"]["faint"]))
        if self._on(rng, "illumination"):
            x *= smooth_field(rng, x.shape, _u(rng, c["illumination"]["strength"]), int(c["illumination"]["grid"]))
        if self._on(rng, "depth_attenuation"):
            k = _u(rng, c["depth_attenuation"]["strength"])
            z = np.linspace(0.0, 1.0, x.shape[0], dtype=np.float32)
            if rng.random() < 0.5:
                z = z[::-1]
            x *= np.exp(-k * z)[:, None, None]
        if self._on(rng, "gamma"):
            g = math.exp(rng.uniform(*(math.log(v) for v in c["gamma"]["range"])))
            np.maximum(x, 0, out=x)
            np.power(x, g, out=x)
        if self._on(rng, "intensity"):
            x *= np.float32(_u(rng, c["intensity"]["scale"]))
            x += np.float32(_u(rng, c["intensity"]["shift"]))
        if self._on(rng, "blur"):
            s = _u(rng, c["blur"]["sigma"])
            x = ndi.gaussian_filter(x, (s * _u(rng, c["blur"]["z_factor"]), s, s), mode="reflect", truncate=3.0)
        if self._on(rng, "noise"):
            std = _u(rng, c["noise"]["std"])
            pois = _u(rng, c["noise"]["poisson"])
            sd = np.float32(std)
            if pois > 0:
                sd = np.sqrt(np.float32(std) ** 2 + np.float32(pois) ** 2 * np.maximum(x, 0))
            x += rng.standard_normal(x.shape, dtype=np.float32) * sd
        return x.astype(np.float32, copy=False)


def smooth_field(rng, shape, strength: float, grid: int = 32) -> np.ndarray:
    """A smooth multiplicative field around 1 (``1 +- strength``), float32."""
    n = [max(2, int(math.ceil(s / max(4, grid))) + 1) for s in shape]
    g = rng.uniform(-strength, strength, size=n).astype(np.float32)
    f = ndi.zoom(g, [s / m for s, m in zip(shape, n)], order=1, mode="nearest", grid_mode=True)
    return (1.0 + f[: shape[0], : shape[1], : shape[2]]).astype(np.float32)


def faint_membranes(image: np.ndarray, labels: np.ndarray, rng, fraction: float, faint: float) -> np.ndarray:
    """Dim the membranes between a random ``fraction`` of the touching cell pairs to ``faint`` of
    their contrast (0 = missing), vectorised over voxels.

    Every voxel within one voxel of a label interface takes its own label ``a`` and the largest
    differing neighbour label ``b`` (3x3x3 max/min filters); the pair ``(min, max)`` is hashed with
    a per-call salt and selected when the hash falls below ``fraction``.
    """
    lab = labels.astype(np.int64)
    mx = ndi.maximum_filter(lab, size=3, mode="nearest")
    mn = ndi.minimum_filter(lab, size=3, mode="nearest")
    other = np.where(mx != lab, mx, mn)
    near = (other != lab) & (lab > 0) & (other > 0)
    if not near.any():
        return image
    a = np.minimum(lab[near], other[near])
    b = np.maximum(lab[near], other[near])
    salt = np.int64(rng.integers(1, 2**31 - 1))
    h = (a * np.int64(73856093)) ^ (b * np.int64(19349663)) ^ salt
    h = (h * np.int64(2654435761)) & np.int64(0xFFFFFF)
    sel = h < np.int64(fraction * 0x1000000)
    if not sel.any():
        return image
    out = image.copy()
    low = np.float32(np.percentile(image, 10))
    idx = np.flatnonzero(near)[sel]
    flat = out.reshape(-1)
    flat[idx] = low + np.float32(faint) * (flat[idx] - low)
    return out

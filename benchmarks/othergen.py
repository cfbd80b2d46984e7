"""A second synthetic-tissue generator, written apart from ``c3d-synth``, to see how the shipped
models do on stacks that their training generator did not make.

    python benchmarks/othergen.py -o DIR [-n 6] [--seed 0] [--shape 64,128,128]
    python benchmarks/accuracy.py --n 0 --ood 0 --no-timing --pairs othergen=DIR

Its generator shares no code and few choices with :mod:`c3dseg.synthesis` (only the true median
diameter is measured the same way, :func:`c3dseg.synthesis.median_cell_diameter`):

- cells: seeds thrown as a Poisson-disc sample (random sequential adsorption, a minimum distance) in
  physical coordinates, labels the plain Voronoi cells of the seeds (nearest seed through a Euclidean
  distance transform with the voxel spacing): flat walls, no relaxation, no stretching, no power
  weights; the tissue is a half-ellipsoid (dome) or a slab with a tilted surface, the rest is
  background (label 0);
- walls: the voxels on either side of a label change (the tissue surface included), at half
  weight, so that a wall is centred on the boundary, each side at the brightness of its own cell
  (one factor per cell, 1 +- up to 0.6); cytoplasm at a constant fraction of the wall level;
- optics: a separable Gaussian point-spread function given in micrometres (z 2.5-4x wider than
  xy), exponential attenuation with depth below the tissue surface;
- camera: Poisson shot noise at a peak photon count, Gaussian read noise, an offset.

The ranges (per volume, uniform or log-uniform) are those of :data:`RANGES`.  Writes
``DIR/images/NAME.tif`` (uint16 counts) and ``DIR/labels/NAME.tif`` (uint16) as ImageJ TIFFs with
the spacing, and ``DIR/params.json`` with every drawn value and the median equivalent diameter of
the interior cells.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from c3dseg.image import Image  # noqa: E402
from c3dseg.io import write_image  # noqa: E402
from c3dseg.labels import relabel_consecutive  # noqa: E402
from c3dseg.synthesis import median_cell_diameter  # noqa: E402  (the truth, measured as for c3d-synth)

#: name: (low, high, log-uniform?)
RANGES = {
    "spacing_xy": (0.2, 0.5, False),          # um
    "z_ratio": (1.0, 4.0, False),             # z step / xy step
    "cell_diameter_vox": (8.0, 24.0, True),   # lateral voxels, Poisson-disc distance ~ 0.85 x this
    "psf_xy_um": (0.15, 0.35, False),         # Gaussian sigma
    "psf_z_factor": (2.5, 4.0, False),        # z sigma / xy sigma
    "cytoplasm": (0.0, 0.25, False),          # fraction of the wall level
    "cell_gain_spread": (0.0, 0.6, False),    # wall brightness per cell: 1 +- this
    "attenuation_um": (15.0, 120.0, True),    # 1/e depth below the tissue surface
    "photons": (8.0, 250.0, True),            # at a wall of gain 1, before attenuation
    "read_noise": (0.5, 5.0, False),
    "offset": (50.0, 150.0, False),
}


def draw(rng):
    p = {}
    for k, (lo, hi, log) in RANGES.items():
        p[k] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))) if log else rng.uniform(lo, hi))
    p["tissue"] = str(rng.choice(["dome", "slab"]))
    return p


def poisson_disc(extent_um, r_min, rng, inside, *, rounds=25):
    """Random sequential adsorption in batches: points of the box ``extent_um`` (z, y, x) where
    ``inside`` (a vectorised test) holds, no two closer than ``r_min``.  Each round throws a batch
    of candidates, drops those too close to a point already kept, and of two close candidates keeps
    the first; it stops when a round keeps almost nothing."""
    from scipy.spatial import cKDTree

    kept = np.zeros((0, 3))
    batch = int(4 * np.prod(extent_um) / r_min ** 3) + 100
    for _ in range(rounds):
        q = rng.uniform(0, 1, (batch, 3)) * extent_um
        q = q[inside(q)]
        if len(kept) and len(q):
            d, _ = cKDTree(kept).query(q, distance_upper_bound=r_min)
            q = q[~np.isfinite(d)]
        if len(q) > 1:
            drop = np.zeros(len(q), bool)
            for i, j in sorted(cKDTree(q).query_pairs(r_min)):
                if not drop[i]:
                    drop[j] = True
            q = q[~drop]
        kept = np.concatenate([kept, q])
        if len(q) < 0.002 * batch:
            break
    return kept


def make_volume(seed, shape=(64, 128, 128)):
    """(image float32 counts, labels uint16, spacing, params) of one volume."""
    rng = np.random.default_rng(seed)
    p = draw(rng)
    sxy = p["spacing_xy"]
    spacing = (sxy * p["z_ratio"], sxy, sxy)
    extent = np.array(shape, float) * np.array(spacing)
    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    if p["tissue"] == "dome":
        # half-ellipsoid standing on the deep face (z = end), its apex towards the objective (z = 0)
        c = extent / 2.0
        r = np.array([extent[0] * rng.uniform(0.75, 1.1)] + list(extent[1:] / 2 * rng.uniform(0.8, 1.2, 2)))
        lateral = ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        height = extent[0] - zz                                  # above the deep face
        surface = r[0] * np.sqrt(np.clip(1.0 - lateral, 0.0, None))
        tissue = height < surface
        depth = np.where(tissue, surface - height, 0.0)          # below the surface, along z
        p["dome_radii_um"] = r.tolist()
    else:
        # slab below a tilted plane
        top = extent[0] * rng.uniform(0.05, 0.4)
        tilt = rng.uniform(-0.15, 0.15, 2)
        surf = top + tilt[0] * (yy - extent[1] / 2) + tilt[1] * (xx - extent[2] / 2)
        tissue = zz > surf
        depth = np.where(tissue, zz - surf, 0.0)
        p["slab_top_um"] = float(top)
    d_um = p["cell_diameter_vox"] * sxy

    def inside(q):
        i = np.minimum((q / np.array(spacing)).astype(int), np.array(shape) - 1)
        return tissue[tuple(i.T)]
    pts = poisson_disc(extent, 0.85 * d_um, rng, inside)
    seeds = np.zeros(shape, np.int32)
    idx = np.minimum((pts / np.array(spacing)).astype(int), np.array(shape) - 1)
    seeds[tuple(idx.T)] = np.arange(1, len(pts) + 1)
    _, ind = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
    labels = seeds[tuple(ind)]
    labels[~tissue] = 0
    # walls: the two voxels on either side of a label change along an axis (the tissue surface
    # included) at half weight each, so that a wall is centred on the cells' boundary
    wall = np.zeros(shape, bool)
    for ax in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        change = np.diff(labels, axis=ax) != 0
        wall[tuple(lo)] |= change
        wall[tuple(hi)] |= change
    wall &= tissue
    gain = 1.0 + rng.uniform(-1, 1, len(pts) + 1) * p["cell_gain_spread"]
    signal = np.where(wall, 0.5 * gain[labels], 0.0) + np.where(tissue, p["cytoplasm"], 0.0)
    sig_vox = [p["psf_xy_um"] * p["psf_z_factor"] / spacing[0], p["psf_xy_um"] / sxy, p["psf_xy_um"] / sxy]
    signal = ndi.gaussian_filter(signal.astype(np.float32), sig_vox)
    # a thin wall loses most of its peak to the blur: scale so that a flat wall of gain 1 peaks at 1
    probe = np.zeros(33, np.float32)
    probe[16:18] = 0.5
    peak = float(ndi.gaussian_filter1d(probe, sig_vox[2])[16])
    signal *= np.exp(-depth / p["attenuation_um"]) / peak
    counts = rng.poisson(np.clip(signal, 0, None) * p["photons"]).astype(np.float32)
    counts += rng.normal(p["offset"], p["read_noise"], shape).astype(np.float32)
    labels = relabel_consecutive(labels)
    p["cells"] = int(labels.max())
    p["median_diameter_um"] = median_cell_diameter(labels, spacing)
    return counts, labels, spacing, p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, help="output folder (images/, labels/, params.json)")
    ap.add_argument("-n", type=int, default=6, help="volumes")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--shape", default="64,128,128")
    ap.add_argument("--overwrite", action="store_true", help="replace volumes of the same names")
    a = ap.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(","))
    names = [f"othergen_{a.seed + i:04d}" for i in range(a.n)]
    existing = [os.path.join(a.out, d, n + ".tif") for n in names for d in ("images", "labels")]
    existing = [f for f in existing + [os.path.join(a.out, "params.json")] if os.path.exists(f)]
    if existing and not a.overwrite:
        ap.error(f"{existing[0]} exists (--overwrite replaces it)")
    params = {}
    for i, name in enumerate(names):
        img, lab, sp, p = make_volume(a.seed + i, shape)
        counts = np.clip(np.rint(img), 0, 65535).astype(np.uint16)
        write_image(os.path.join(a.out, "images", name + ".tif"), Image(counts, sp, {"is_label": False}))
        write_image(os.path.join(a.out, "labels", name + ".tif"), Image(lab, sp, {"is_label": True}),
                    label=True)
        params[name] = p
        print(f"{name}: {p['tissue']} {p['cells']} cells, median diameter {p['median_diameter_um']:.2f} um "
              f"({p['median_diameter_um'] / sp[2]:.1f} lateral voxels), z/xy {p['z_ratio']:.2f}, "
              f"photons {p['photons']:.0f}", flush=True)
    with open(os.path.join(a.out, "params.json"), "w") as f:
        json.dump({"generator": "benchmarks/othergen.py", "shape": shape, "seed": a.seed, "samples": params},
                  f, indent=1)


if __name__ == "__main__":
    main()

"""Cell-diameter estimate against the truth on synthetic validation and out-of-distribution volumes.

    python benchmarks/diameter.py [--n-val 40] [--n-ood 20] [--shape 64,128,128] [--calibrate N]
                                  [--cache DIR] [--model PATH]

Volumes come from :func:`c3dseg.synthesis.make_sample` with the seed convention of ``c3d-synth``
(validation: 10**6 + i, ood: 2 * 10**6 + i, i = 0..n-1), so they are exactly what
``c3d-synth --preset validation -n N --seed 0`` writes.  The truth is the median equivalent-sphere
diameter of the interior ground-truth cells.  ``--calibrate N`` first measures N *training* volumes
(seeds 0..N-1) with the calibration factor set to 1 and prints the factor that would centre them
(``c3dseg.diameter.CALIBRATION`` holds the value in use).  ``--model PATH`` also refines every
estimate with that ONNX model (``EstimateCellDiameter ModelPath``): each line then shows the
classical estimate, the refined one, the network passes (scale -> measured median) and whether the
refinement was kept; the summaries cover both.  Everything printed is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from c3dseg import diameter as dm  # noqa: E402
from c3dseg.synthesis import PRESET_SEED_OFFSET, make_sample  # noqa: E402


def load_sample(preset, seed, shape, cache=None):
    """``make_sample(preset, seed, shape)`` (image, spacing, parameters), kept in ``cache`` (a folder)
    when given: generating a volume takes longer than measuring it."""
    if cache:
        path = os.path.join(cache, f"{preset}_{seed}_{'x'.join(map(str, shape))}.npz")
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as z:
                return z["image"], tuple(z["spacing"]), json.loads(str(z["params"]))
    img, _, sp, p = make_sample(preset, seed, shape=shape)
    if cache:
        os.makedirs(cache, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, image=img, spacing=np.asarray(sp), params=json.dumps(p, default=str))
        os.replace(tmp, path)
    return img, tuple(sp), p


def measure(preset, n, shape, calibration=None, verbose=True, cache=None, model=None):
    """Rows (seed, truth, estimate, seconds, structure, classical estimate)."""
    rows = []
    for i in range(n):
        seed = PRESET_SEED_OFFSET[preset] + i
        img, sp, p = load_sample(preset, seed, shape, cache)
        t0 = time.perf_counter()
        est, info = dm.estimate_cell_diameter(img, sp, calibration=calibration, model=model,
                                              return_details=True)
        dt = time.perf_counter() - t0
        truth = p["median_diameter_um"]
        rows.append((seed, truth, est, dt, info["structure"], info["classical"]))
        if verbose:
            extra = ",".join(p.get("ood_keys", []))
            if "refine" in info:
                r = info["refine"]
                extra = (f"classical {info['classical'] / truth:5.2f}  network "
                         + " ".join(f"{a / truth:.2f}->{b / truth:.2f}({c})" for a, b, c in r["passes"])
                         + f" slope {r['slope']:.2f} {'kept' if r['accepted'] else 'rejected'}  " + extra)
            print(f"{preset:10s} {seed:8d} {p['tissue']:9s} truth {truth:7.2f} um  estimate {est:7.2f} um  "
                  f"ratio {est / truth:5.2f}  {dt:5.1f} s  d/vox {truth / sp[2]:5.1f}  z/xy {sp[0] / sp[2]:4.2f}  "
                  f"photons {p['photons']:6.1f}  faint {p['faint_wall_fraction']:.2f}  "
                  f"downscale {info['downscale']}  structure {info['structure']:5.1f}  {extra}", flush=True)
    return np.array(rows, dtype=np.float64)


def summary(name, rows, column=2):
    ratio = rows[:, column] / rows[:, 1]
    err = np.abs(ratio - 1)
    ok = np.isfinite(ratio)
    print(f"{name}: {len(rows)} volumes, within 20 %: {np.mean(err[ok] <= 0.2) * 100:.1f} % "
          f"({int(np.sum(err[ok] <= 0.2))}/{len(rows)}), within 30 %: {np.mean(err[ok] <= 0.3) * 100:.1f} %, "
          f"median |error| {np.median(err[ok]) * 100:.1f} %, max |error| {np.max(err[ok]) * 100:.1f} %, "
          f"median ratio {np.median(ratio[ok]):.3f}, failed (NaN) {int(np.sum(~ok))}, "
          f"time per volume mean {rows[:, 3].mean():.2f} s / max {rows[:, 3].max():.2f} s, "
          f"lowest structure-to-noise {rows[:, 4].min():.1f} (empty below {dm.MIN_STRUCTURE:g})", flush=True)


def empty_stacks(shape):
    """The estimate on stacks without tissue (must be NaN: no cells)."""
    rng = np.random.default_rng(0)
    for name, img in (("constant", np.full(shape, 100.0, np.float32)),
                      ("poisson noise, 3 photons", rng.poisson(3.0, shape).astype(np.float32)),
                      ("poisson noise, 300 photons", rng.poisson(300.0, shape).astype(np.float32)),
                      ("gaussian noise", rng.normal(100.0, 10.0, shape).astype(np.float32))):
        t0 = time.perf_counter()
        est, info = dm.estimate_cell_diameter(img, (2.0, 0.5, 0.5), return_details=True)
        print(f"empty stack ({name}): estimate {est} (structure-to-noise {info['structure']:.2f}), "
              f"{time.perf_counter() - t0:.1f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--n-ood", type=int, default=20)
    ap.add_argument("--shape", default="64,128,128")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="fit the calibration factor on N training volumes first")
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="keep the generated volumes in DIR (.npz) and reuse them on later runs")
    ap.add_argument("--model", default=None, metavar="PATH",
                    help="also refine the estimates with this ONNX model (c3dseg/models/tanh.onnx, ...)")
    args = ap.parse_args(argv)
    if args.model and not os.path.isfile(args.model):
        ap.error(f"--model: no such file: {args.model}")
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"c3dseg.diameter.CALIBRATION = {dm.CALIBRATION:.4f}, shape {shape}", flush=True)
    if args.calibrate:
        rows = measure("train", args.calibrate, shape, calibration=1.0, cache=args.cache)
        fit = float(np.nanmedian(rows[:, 1] / rows[:, 2]))
        print(f"calibration fitted on {args.calibrate} training volumes: {fit:.4f} "
              f"(1/{1 / fit:.3f}); in use: {dm.CALIBRATION:.4f}", flush=True)
        rows[:, 2] *= dm.CALIBRATION
        summary("train (calibration in use)", rows)
    empty_stacks(shape)
    for preset, n in (("validation", args.n_val), ("ood", args.n_ood)):
        if not n:
            continue
        rows = measure(preset, n, shape, cache=args.cache, model=args.model)
        if args.model:
            summary(f"{preset} classical", rows, column=5)
            summary(f"{preset} refined with {os.path.basename(args.model)} (time: both)", rows)
        else:
            summary(preset, rows)


if __name__ == "__main__":
    main()

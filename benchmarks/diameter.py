"""Cell-diameter estimate against the truth on synthetic validation and out-of-distribution volumes.

    python benchmarks/diameter.py [--n-val 40] [--n-ood 20] [--shape 64,128,128] [--calibrate N]

Volumes come from :func:`c3dseg.synthesis.make_sample` with the seed convention of ``c3d-synth``
(validation: 10**6 + i, ood: 2 * 10**6 + i, i = 0..n-1), so they are exactly what
``c3d-synth --preset validation -n N --seed 0`` writes.  The truth is the median equivalent-sphere
diameter of the interior ground-truth cells.  ``--calibrate N`` first measures N *training* volumes
(seeds 0..N-1) with the calibration factor set to 1 and prints the factor that would centre them
(``c3dseg.diameter.CALIBRATION`` holds the value in use).  Everything printed is measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from c3dseg import diameter as dm  # noqa: E402
from c3dseg.synthesis import PRESET_SEED_OFFSET, make_sample  # noqa: E402


def measure(preset, n, shape, calibration=None, verbose=True):
    rows = []
    for i in range(n):
        seed = PRESET_SEED_OFFSET[preset] + i
        img, lab, sp, p = make_sample(preset, seed, shape=shape)
        t0 = time.perf_counter()
        est = dm.estimate_cell_diameter(img, sp, calibration=calibration)
        dt = time.perf_counter() - t0
        truth = p["median_diameter_um"]
        rows.append((seed, truth, est, dt))
        if verbose:
            extra = ",".join(p.get("ood_keys", []))
            print(f"{preset:10s} {seed:8d} {p['tissue']:9s} truth {truth:7.2f} um  estimate {est:7.2f} um  "
                  f"ratio {est / truth:5.2f}  {dt:5.1f} s  d/vox {truth / sp[2]:5.1f}  z/xy {sp[0] / sp[2]:4.2f}  "
                  f"photons {p['photons']:6.1f}  {extra}", flush=True)
    return np.array(rows, dtype=np.float64)


def summary(name, rows):
    ratio = rows[:, 2] / rows[:, 1]
    err = np.abs(ratio - 1)
    ok = np.isfinite(ratio)
    print(f"{name}: {len(rows)} volumes, within 20 %: {np.mean(err[ok] <= 0.2) * 100:.1f} % "
          f"({int(np.sum(err[ok] <= 0.2))}/{len(rows)}), within 30 %: {np.mean(err[ok] <= 0.3) * 100:.1f} %, "
          f"median |error| {np.median(err[ok]) * 100:.1f} %, max |error| {np.max(err[ok]) * 100:.1f} %, "
          f"median ratio {np.median(ratio[ok]):.3f}, failed (NaN) {int(np.sum(~ok))}, "
          f"mean time {rows[:, 3].mean():.2f} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--n-ood", type=int, default=20)
    ap.add_argument("--shape", default="64,128,128")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="fit the calibration factor on N training volumes first")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"c3dseg.diameter.CALIBRATION = {dm.CALIBRATION:.4f}, shape {shape}", flush=True)
    if args.calibrate:
        rows = measure("train", args.calibrate, shape, calibration=1.0)
        fit = float(np.nanmedian(rows[:, 1] / rows[:, 2]))
        print(f"calibration fitted on {args.calibrate} training volumes: {fit:.4f} "
              f"(1/{1 / fit:.3f}); in use: {dm.CALIBRATION:.4f}", flush=True)
        rows[:, 2] *= dm.CALIBRATION
        summary("train (calibration in use)", rows)
    if args.n_val:
        summary("validation", measure("validation", args.n_val, shape))
    if args.n_ood:
        summary("ood", measure("ood", args.n_ood, shape))


if __name__ == "__main__":
    main()

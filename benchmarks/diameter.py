"""Cell-diameter estimate against the truth on synthetic validation and out-of-distribution volumes.

    python benchmarks/diameter.py [--n-val 40] [--n-ood 20] [--shape 64,128,128] [--cache DIR]
                                  [--fit DIR [--write FILE]] [--folder DIR ...] [--model PATH]

Volumes come from :func:`c3dseg.synthesis.make_sample` with the seed convention of ``c3d-synth``
(validation: 10**6 + i, ood: 2 * 10**6 + i, i = 0..n-1), so they are exactly what
``c3d-synth --preset validation -n N --seed 0`` writes.  The truth is the median equivalent-sphere
diameter of the interior ground-truth cells.

``--fit DIR`` first fits the estimator's correction (``c3dseg.diameter``: ``log(true / m2) = w0 +
w1 * log(m4 / m1) + w2 * log(m1 / voxel)``, least squares) on every volume of a ``c3d-synth``
folder (``images/`` and ``params.json`` with each volume's ``median_diameter_um``; the shipped fit
used ``c3d-synth -o data/train -n 200 --preset train``, the models' training data, never the
validation seeds), prints the coefficients, how many training volumes they bring within 20 % and the
same under 10-fold cross-validation, and with ``--write FILE`` saves them (``c3dseg/data/
diameter_fit.json`` is the file the estimator reads); the evaluation that follows uses the new fit.
``--correction FILE`` scores with another correction file (e.g. coefficients [ln 0.8722, 0, 0]:
the single calibration factor used before).  ``--folder DIR`` (repeatable) also scores the volumes
of any folder of that layout, e.g. one written by ``benchmarks/othergen.py``, a generator the fit
never saw.  ``--model PATH`` also refines every
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
from c3dseg.diameter_fit import fit_correction as fit_correction_rows  # noqa: E402
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


def generated(preset, n, shape, cache=None):
    """(seed, image, spacing, parameters) of the first ``n`` volumes of a ``c3d-synth`` preset."""
    for i in range(n):
        seed = PRESET_SEED_OFFSET[preset] + i
        img, sp, p = load_sample(preset, seed, shape, cache)
        yield seed, img, sp, p


def folder_volumes(root):
    """(index, image, spacing, parameters) of every volume of a ``c3d-synth``-layout folder whose
    ``params.json`` gives its ``median_diameter_um``."""
    from c3dseg.io import read_image

    with open(os.path.join(root, "params.json"), encoding="utf-8") as fh:
        samples = json.load(fh)["samples"]
    for i, name in enumerate(sorted(samples)):
        p = samples[name]
        img = read_image(os.path.join(root, "images", name + ".tif"))
        p = {"tissue": str(p.get("tissue", "?")), "photons": float(p.get("photons", float("nan"))),
             "faint_wall_fraction": float(p.get("faint_wall_fraction", 0.0)), **p}
        yield i, np.asarray(img.data), tuple(img.spacing), p


def data_description(root):
    """What a folder's ``params.json`` says about how it was made (generator, preset, seeds, shape)."""
    with open(os.path.join(root, "params.json"), encoding="utf-8") as fh:
        p = json.load(fh)
    keys = ("generator", "preset", "seed_offset", "seed", "shape")
    return {k: p[k] for k in keys if k in p} | {"volumes": len(p.get("samples", {}))}


def measure(volumes, preset, fit=None, verbose=True, model=None):
    """Rows (seed, truth, estimate, seconds, structure, classical estimate) over ``volumes``
    (:func:`generated` or :func:`folder_volumes`); with ``fit="none"`` the estimate is the raw
    median.  Also returns the features (:data:`c3dseg.diameter.FEATURES`) of every volume."""
    rows, feats = [], []
    for seed, img, sp, p in volumes:
        t0 = time.perf_counter()
        est, info = dm.estimate_cell_diameter(img, sp, fit=fit, model=model, return_details=True)
        dt = time.perf_counter() - t0
        truth = p["median_diameter_um"]
        rows.append((seed, truth, est, dt, info["structure"], info["classical"]))
        feats.append(info["features"] or (float("nan"),) * len(dm.FEATURES))
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
                  f"downscale {info['downscale']}  structure {info['structure']:5.1f}  "
                  f"correction {info['correction']:.3f}  {extra}", flush=True)
    return np.array(rows, dtype=np.float64), np.array(feats, dtype=np.float64).reshape(len(rows), len(dm.FEATURES))


def fit_correction(rows, feats, folds=10):
    """:func:`c3dseg.diameter_fit.fit_correction` on :func:`measure`'s rows: (coefficients,
    within-20 % count on the fitted volumes, the same under ``folds``-fold cross-validation, volumes
    used)."""
    r = fit_correction_rows(rows[:, 1], rows[:, 2], feats, folds=folds)
    return np.asarray(r["coefficients"]), r["hits"], r["cv_hits"], r["used"]


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
    ap.add_argument("--fit", default=None, metavar="DIR",
                    help="fit the correction on every volume of this c3d-synth folder first")
    ap.add_argument("--write", default=None, metavar="FILE",
                    help="with --fit: save the fit there (c3dseg/data/diameter_fit.json is the one in use)")
    ap.add_argument("--correction", default=None, metavar="FILE",
                    help="score with this correction file (diameter_fit.json layout) instead of the packaged one")
    ap.add_argument("--folder", action="append", default=[], metavar="DIR",
                    help="also score the volumes of this folder (c3d-synth layout; repeatable)")
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="keep the generated volumes in DIR (.npz) and reuse them on later runs")
    ap.add_argument("--model", default=None, metavar="PATH",
                    help="also refine the estimates with this ONNX model (c3dseg/models/tanh.onnx, ...)")
    args = ap.parse_args(argv)
    if args.model and not os.path.isfile(args.model):
        ap.error(f"--model: no such file: {args.model}")
    for d in ([args.fit] if args.fit else []) + args.folder:
        if not os.path.isfile(os.path.join(d, "params.json")):
            ap.error(f"{d}: no params.json (not a c3d-synth folder)")
    if args.write and not args.fit:
        ap.error("--write needs --fit")
    if args.correction and args.fit:
        ap.error("--correction and --fit exclude each other")
    shape = tuple(int(v) for v in args.shape.split(","))
    fit = None
    if args.fit:
        rows, feats = measure(folder_volumes(args.fit), "train", fit="none")
        w, hits, cv, n = fit_correction(rows, feats)
        fit = {"features": list(dm.FEATURES), "coefficients": [round(float(v), 6) for v in w],
               "fitted_on": args.fit, "data": data_description(args.fit), "volumes": n,
               "within_20_percent_fitted": f"{hits}/{n}", "within_20_percent_10fold_cv": f"{cv}/{n}",
               "command": "python benchmarks/diameter.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        print(f"fit on {n} volumes of {args.fit}: coefficients {fit['coefficients']} ({', '.join(dm.FEATURES)}); "
              f"within 20 %: {hits}/{n} fitted, {cv}/{n} under 10-fold cross-validation; "
              f"raw median within 20 %: {int(np.sum(np.abs(rows[:, 2] / rows[:, 1] - 1) <= 0.2))}/{len(rows)}",
              flush=True)
        if args.write:
            tmp = args.write + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(fit, fh, indent=1)
                fh.write("\n")
            os.replace(tmp, args.write)
            print(f"wrote {args.write}", flush=True)
    else:
        f = fit = dm.load_fit(args.correction)
        print(f"correction in use: {args.correction or dm.FIT_FILE}: coefficients {f['coefficients']} "
              f"({', '.join(f['features'])}), fitted on {f.get('volumes', '?')} volumes", flush=True)
    print(f"shape of the generated volumes {shape}", flush=True)
    empty_stacks(shape)
    sets = [(preset, generated(preset, n, shape, args.cache)) for preset, n in
            (("validation", args.n_val), ("ood", args.n_ood)) if n]
    sets += [(os.path.basename(os.path.normpath(d)), folder_volumes(d)) for d in args.folder]
    for name, volumes in sets:
        rows, _ = measure(volumes, name, fit=fit, model=args.model)
        if args.model:
            summary(f"{name} classical", rows, column=5)
            summary(f"{name} refined with {os.path.basename(args.model)} (time: both)", rows)
        else:
            summary(name, rows)


if __name__ == "__main__":
    main()

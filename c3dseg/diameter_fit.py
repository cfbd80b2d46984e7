"""Fit the cell-diameter estimator's correction to your own annotated stacks: ``c3d-fit-diameter``.

:func:`c3dseg.diameter.estimate_cell_diameter` corrects the median size of the regions a seeded
watershed finds with a small linear model in log space::

    log(true / m2) = w0 + w1 * log(m4 / m1) + w2 * log(m1 / voxel)

The packaged coefficients (:data:`c3dseg.diameter.FIT_FILE`) were fitted on synthetic tissue.  When
a microscope or a tissue makes the estimate miss, annotate a few stacks and fit the coefficients to
them::

    c3d-fit-diameter my_annotated -o my_fit.json

``my_annotated`` holds ``images/`` and ``labels/`` with files matched by name (the layout
``c3d-synth`` writes; ``labels/`` may hold only some of the images).  The truth of each stack is the
median equivalent-sphere diameter of its labelled cells that touch no face of the volume (all cells
when fewer than 5 do).  Then use the file in a pipeline::

    c3d-run pipelines/segment.xml -i stack.tif --set EstimateCellDiameter.CorrectionFile=my_fit.json

With fewer than :data:`MIN_FULL_FIT` usable stacks only ``w0`` is fitted (one calibration factor,
the other weights 0): three weights from a handful of stacks would fit noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from . import diameter as dm
from .errors import ArgumentError, C3DError, InputError, print_error

__all__ = ["fit_correction", "usable", "fit_folders", "write_fit", "main", "MIN_FULL_FIT"]

#: Fewer usable stacks than this: only the intercept w0 is fitted.
MIN_FULL_FIT = 10
#: The "within 20 %" the estimator is judged by.
TOLERANCE = 0.2


def usable(truth, raw, feats):
    """Mask of the stacks a fit can use: finite positive truth and raw median, finite features."""
    truth, raw = np.asarray(truth, np.float64), np.asarray(raw, np.float64)
    feats = np.asarray(feats, np.float64).reshape(len(truth), len(dm.FEATURES))
    return np.isfinite(raw) & (raw > 0) & np.isfinite(truth) & (truth > 0) & np.all(np.isfinite(feats), axis=1)


def fit_correction(truth, raw, feats, *, folds=10, intercept_only=False, reference=None):
    """Least-squares ``log(truth / raw) = w0 + w . features`` over the :func:`usable` stacks.

    Parameters
    ----------
    truth, raw : array (n,)
        True median diameters and the estimator's uncorrected medians (``fit="none"``), um.
    feats : array (n, len(FEATURES))
    folds : int
        Cross-validation folds (at most the number of stacks: leave-one-out below that).
    intercept_only : bool
        Fit w0 only (the other weights 0).
    reference : sequence of float, optional
        Other coefficients (e.g. the packaged fit's) to count hits for on the same stacks.

    Returns
    -------
    dict with ``coefficients`` [w0, w1, w2], ``used`` (stacks in the fit), ``hits`` (stacks the fit
    brings within 20 %), ``cv_hits`` (the same, each stack predicted by a fit without its fold;
    None for a single stack), ``folds`` and, with ``reference``, ``reference_hits``.
    """
    truth, raw = np.asarray(truth, np.float64), np.asarray(raw, np.float64)
    feats = np.asarray(feats, np.float64).reshape(len(truth), len(dm.FEATURES))
    ok = usable(truth, raw, feats)
    n = int(ok.sum())
    if n == 0:
        raise InputError("no stack to fit: every estimate failed (no visible cells) or no truth")
    x = np.c_[np.ones(n), feats[ok]]
    y = np.log(truth[ok] / raw[ok])
    cols = 1 if intercept_only else x.shape[1]

    def solve(idx):
        w = np.zeros(x.shape[1])
        w[:cols] = np.linalg.lstsq(x[idx, :cols], y[idx], rcond=None)[0]
        return w

    def hits(w, idx):
        c = np.clip(np.exp(x[idx] @ np.asarray(w, np.float64)), dm.MIN_CORRECTION, dm.MAX_CORRECTION)
        return int(np.sum(np.abs(c * np.exp(-y[idx]) - 1) <= TOLERANCE))

    everything = np.arange(n)
    w = solve(everything)
    k = min(int(folds), n)
    cv = None
    if k >= 2:
        order = np.random.default_rng(0).permutation(n)
        cv = sum(hits(solve(np.setdiff1d(everything, order[i::k])), order[i::k]) for i in range(k))
    out = {"coefficients": [float(v) for v in w], "used": n, "hits": hits(w, everything), "cv_hits": cv,
           "folds": k}
    if reference is not None:
        out["reference_hits"] = hits(reference, everything)
    return out


def _pairs(folder):
    from .evaluation import match_pairs

    images, labels = os.path.join(folder, "images"), os.path.join(folder, "labels")
    for sub in (images, labels):
        if not os.path.isdir(sub):
            raise ArgumentError(f"no {os.path.basename(sub)}/ folder (expected images/ and labels/ with files "
                                f"matched by name)", file=folder)
    return [(name, img, lab) for name, lab, img in match_pairs(labels, images)]


def measure_folder(folder, *, say=print):
    """One row per labelled stack of ``folder``: (name, truth um, raw median um, features)."""
    from .io import read_image
    from .synthesis import median_cell_diameter

    rows = []
    for name, img_path, lab_path in _pairs(folder):
        img, lab = read_image(img_path), read_image(lab_path)
        data = np.asarray(img.data)
        if data.ndim != 3:
            raise InputError(f"{img_path}: expected a 3D stack, got shape {data.shape}")
        if tuple(lab.data.shape) != tuple(data.shape):
            raise InputError(f"{lab_path}: labels of shape {tuple(lab.data.shape)} for an image of shape "
                             f"{tuple(data.shape)} ({img_path})")
        truth = median_cell_diameter(np.asarray(lab.data), img.spacing)
        t0 = time.perf_counter()
        raw, info = dm.estimate_cell_diameter(data, img.spacing, fit="none", return_details=True)
        feats = info["features"] or (float("nan"),) * len(dm.FEATURES)
        note = ""
        if not math.isfinite(truth):
            note = "  (no labelled cells: left out)"
        elif not (math.isfinite(raw) and all(math.isfinite(f) for f in feats)):
            note = "  (no estimate: too little visible structure; left out)"
        say(f"{os.path.join(os.path.basename(os.path.normpath(folder)), name)}: truth {truth:.3g} um, "
            f"raw median {raw:.3g} um, spacing {tuple(round(s, 4) for s in img.spacing)} um, "
            f"{time.perf_counter() - t0:.1f} s{note}")
        rows.append((name, truth, raw, tuple(feats)))
    return rows


def fit_folders(folders, *, folds=10, say=print):
    """Measure every labelled stack of ``folders`` and fit the correction; returns the fit as the
    dict :func:`c3dseg.diameter.load_fit` reads (with provenance and the measured accuracy)."""
    rows = [r for f in folders for r in measure_folder(f, say=say)]
    truth = np.array([r[1] for r in rows])
    raw = np.array([r[2] for r in rows])
    feats = np.array([r[3] for r in rows], np.float64).reshape(len(rows), len(dm.FEATURES))
    intercept_only = int(usable(truth, raw, feats).sum()) < MIN_FULL_FIT
    r = fit_correction(truth, raw, feats, folds=folds, intercept_only=intercept_only,
                       reference=dm.load_fit()["coefficients"])
    n = r["used"]
    return {"features": list(dm.FEATURES), "coefficients": [round(v, 6) for v in r["coefficients"]],
            "fitted_on": [os.path.abspath(f) for f in folders], "volumes": n,
            "intercept_only": intercept_only,
            "within_20_percent_fitted": f"{r['hits']}/{n}",
            "within_20_percent_cross_validated": None if r["cv_hits"] is None else f"{r['cv_hits']}/{n}",
            "cross_validation_folds": r["folds"],
            "within_20_percent_packaged_fit": f"{r['reference_hits']}/{n}",
            "truth": "median equivalent-sphere diameter of the labelled interior cells",
            "command": "c3d-fit-diameter " + " ".join(folders)}


def write_fit(fit, path, *, overwrite=False):
    """Write ``fit`` as JSON to ``path`` (through a temporary file: no half-written file); an
    existing file is replaced only with ``overwrite``."""
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path}: exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: no such folder {folder}")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(fit, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="c3d-fit-diameter",
        description="Fit EstimateCellDiameter's correction to annotated stacks (each FOLDER holds images/ "
                    "and labels/ matched by name) and write it as JSON for EstimateCellDiameter's "
                    "CorrectionFile.")
    ap.add_argument("folders", metavar="FOLDER", nargs="+", help="folder with images/ and labels/")
    ap.add_argument("-o", "--output", required=True, metavar="FILE.json", help="where to write the fit")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--folds", type=int, default=10, help="cross-validation folds (default 10)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no line per stack")
    ap.add_argument("-v", "--verbose", action="store_true", help="traceback on errors")
    args = ap.parse_args(argv)
    if args.folds < 2:
        ap.error("--folds: at least 2")
    say = (lambda *_: None) if args.quiet else (lambda s: print(s, flush=True))
    try:
        if os.path.exists(args.output) and not args.overwrite:   # before minutes of measuring
            raise ArgumentError("exists (pass --overwrite to replace it)", file=args.output)
        for f in args.folders:
            if not os.path.isdir(f):
                raise ArgumentError("no such folder", file=f)
            _pairs(f)                                           # images/ and labels/ pair up
        fit = fit_folders(args.folders, folds=args.folds, say=say)
        fit["command"] = "c3d-fit-diameter " + " ".join(sys.argv[1:] if argv is None else argv)
        write_fit(fit, args.output, overwrite=args.overwrite)
    except C3DError as e:
        print_error(e, args.verbose)
        return e.exit_code
    cv = fit["within_20_percent_cross_validated"] or "-"
    only = f" (w0 only: fewer than {MIN_FULL_FIT} stacks)" if fit["intercept_only"] else ""
    print(f"fit on {fit['volumes']} stacks{only}: coefficients {fit['coefficients']} ({', '.join(dm.FEATURES)}); "
          f"within 20 %: {fit['within_20_percent_fitted']} fitted, {cv} under {fit['cross_validation_folds']}-fold "
          f"cross-validation, {fit['within_20_percent_packaged_fit']} with the packaged fit")
    print(f"wrote {args.output}; use it with --set EstimateCellDiameter.CorrectionFile={args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

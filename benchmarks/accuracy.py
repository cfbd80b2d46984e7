"""Accuracy of the default models on held-out synthetic tissue, against a seeded-watershed baseline.

    python benchmarks/accuracy.py [--n 8] [--ood 4] [--plot benchmarks/accuracy.png] [--quick]

1. Makes the validation set with ``c3d-synth --preset validation`` (seeds never used in training:
   offset 10**6) and an out-of-distribution set (``--preset ood``: settings outside the training
   ranges), 64x128x128 each.
2. Segments every stack with ``pipelines/segment.xml`` (tanh model) and ``segment_heat.xml`` (heat
   model) through ``c3d-run`` exactly as a user would (cell diameter estimated from the image), and
   with the classical seeded watershed of the smoothed membrane image (``c3dseg.watershed``,
   diameter from the same estimate).
3. Prints mean per-cell Dice (as in the paper), AP@0.5/0.75, F1 and AJI per volume and pooled, says
   on how many volumes each model beats the baseline, and writes a box plot of per-cell Dice.
4. Times the whole pipeline on a 64x256x256 stack (median of 3 runs) and prints the share of
   everything but the network.

``--variant NAME MODEL ITEM.KEY=VALUE ...`` adds a method: the ``MODEL`` (tanh or heat) pipeline with
those ``c3d-run --set`` values, scored beside the others in the same run, e.g. test-time
augmentation: ``--models tanh --variant tanh-tta tanh OnnxModel.TestTimeAugmentation=xyz``.

``--pairs NAME=DIR`` adds a set of your own: ``DIR/images`` and ``DIR/labels`` matched by name (as
``c3d-eval`` matches folders), e.g. annotated stacks of your own or those of another generator
(``benchmarks/othergen.py``); ``--n 0 --ood 0`` leaves the synthetic sets out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from c3dseg.diameter import estimate_cell_diameter  # noqa: E402
from c3dseg.io import read_image, write_image  # noqa: E402
from c3dseg.evaluation import ArgumentError, match_pairs, score_pair  # noqa: E402
from c3dseg.metrics import GT_ERRORS, PRED_ERRORS, sum_breakdowns  # noqa: E402
from c3dseg.watershed import seeded_watershed  # noqa: E402

PIPELINES = {"tanh": os.path.join(ROOT, "pipelines", "segment.xml"),
             "heat": os.path.join(ROOT, "pipelines", "segment_heat.xml")}


def synth(out, n, preset, shape):
    from c3dseg.synthesis import main as c3d_synth

    if c3d_synth(["-o", out, "-n", str(n), "--preset", preset, "-q", "--shape", ",".join(map(str, shape))]):
        raise RuntimeError(f"c3d-synth failed for {out}")
    names = sorted(f for f in os.listdir(os.path.join(out, "images")) if f.endswith(".tif"))
    return [(os.path.join(out, "images", f), os.path.join(out, "labels", f)) for f in names]


def run_pipeline(pipeline, image, out, extra=()):
    from c3dseg.runner.cli import main

    t0 = time.perf_counter()
    rc = main([pipeline, "-i", image, "-o", out, "--overwrite", "-q", *extra])
    if rc != 0:
        raise RuntimeError(f"c3d-run {os.path.basename(pipeline)} failed on {image} (exit {rc})")
    return time.perf_counter() - t0


def score(gt, pred):
    """c3d-eval's figures of one volume (one overlap table for all): the metrics with the error
    breakdown, and the per-cell Dice."""
    r = score_pair(gt, pred)
    return r["metrics"], np.asarray(r["dice"], float)


def errors_table(rows, sets, methods):
    """Why cells go unmatched at IoU 0.5 (c3d-eval --errors), summed over each set's volumes."""
    print("\nUnmatched cells at IoU 0.5, summed over the volumes (c3d-eval --errors):")
    print("| set | method | GT cells | unmatched | " + " | ".join(GT_ERRORS) + " | predicted cells | unmatched | "
          + " | ".join(PRED_ERRORS) + " |")
    print("|---" * (6 + len(GT_ERRORS) + len(PRED_ERRORS)) + "|")
    for set_name in sets:
        rs = [r for r in rows if r["set"] == set_name]
        for m in methods:
            tot = sum_breakdowns(r[f"{m}_errors"] for r in rs)
            g, p = tot["gt"], tot["pred"]
            if not g:
                continue
            print(f"| {set_name} | {m} | {g['cells']} | {g['cells'] - g['matched']} | "
                  + " | ".join(str(g[k]) for k in GT_ERRORS) + f" | {p['cells']} | {p['cells'] - p['matched']} | "
                  + " | ".join(str(p[k]) for k in PRED_ERRORS) + " |")


def _interior(row, method, r):
    """The figures of the GT cells that touch no face of the volume (c3d-eval's border="separate"):
    cut cells at the faces have no whole ground truth; they are scored apart."""
    inner = r["interior"]
    row[f"{method}_dice_int"], row[f"{method}_ap50_int"] = inner["mean_dice"], inner["ap@0.5"]
    row[f"{method}_ap75_int"] = inner["ap@0.75"]
    row["cells_int"] = int(inner["n_gt"])


def _table(rows, sets, suffix, title, methods):
    print(f"\n{title}")
    print("| set | method | volumes | mean per-cell Dice | AP@0.5 | AP@0.75 | beats watershed (Dice) |")
    print("|---|---|---|---|---|---|---|")
    for set_name in sets:
        rs = [r for r in rows if r["set"] == set_name]
        for m in methods:
            beats = "" if m == "watershed" else \
                f"{sum(r[f'{m}_dice{suffix}'] > r[f'watershed_dice{suffix}'] for r in rs)}/{len(rs)}"
            print(f"| {set_name} | {m} | {len(rs)} | {np.nanmean([r[f'{m}_dice{suffix}'] for r in rs]):.3f} | "
                  f"{np.nanmean([r[f'{m}_ap50{suffix}'] for r in rs]):.3f} | "
                  f"{np.nanmean([r[f'{m}_ap75{suffix}'] for r in rs]):.3f} | {beats} |")


def timing(tmp, shape=(64, 256, 256), img=None):
    """Network time vs everything else, from c3d-run -v's per-item log lines (on ``img``, or on a
    new validation stack of ``shape``)."""
    if img is None:
        img = synth(os.path.join(tmp, "timing"), 1, "validation", shape)[0][0]
    else:
        from c3dseg.io import read_image
        shape = read_image(img).data.shape
    cmd = [sys.executable, "-m", "c3dseg.runner.cli", PIPELINES["tanh"], "-i", img, "-o",
           os.path.join(tmp, "timing_out.tif"), "--overwrite", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    per_item = {}
    for line in r.stderr.splitlines():
        # "info: [k/n] item_0004 OnnxModel: 1.23 s, peak ..."
        if line.startswith("info: [") and ": " in line and " s" in line:
            head, _, rest = line.partition("] ")
            name_part, _, t = rest.partition(": ")
            per_item[name_part] = float(t.split(" s")[0])
    network = sum(t for k, t in per_item.items() if k.split()[-1] in ("OnnxModel", "TileMerger"))
    other = sum(per_item.values()) - network
    return shape, network, other, per_item


def report_timing(tmp, img=None, repeat=3):
    """The timing run ``repeat`` times (the first also makes the stack); medians per item, of the
    network's time and of the rest's (run-to-run spread on a shared 2-core machine is ~10%)."""
    runs = []
    for k in range(max(1, repeat)):
        runs.append(timing(tmp, img=img))
        if img is None:
            img = os.path.join(tmp, "timing", "images", os.listdir(os.path.join(tmp, "timing", "images"))[0])
    shape_t = runs[0][0]
    net = float(np.median([r[1] for r in runs]))
    other = float(np.median([r[2] for r in runs]))
    ratios = [100 * r[2] / r[1] for r in runs]
    print(f"\nend-to-end on a {'x'.join(map(str, shape_t))} stack, median of {len(runs)} runs: network "
          f"(OnnxModel+TileMerger) {net:.1f} s, everything else {other:.1f} s = {100 * other / net:.0f}% of the "
          f"network's time (runs: {', '.join(f'{x:.0f}%' for x in ratios)})")
    for k in runs[0][3]:
        print(f"    {k}: {np.median([r[3].get(k, np.nan) for r in runs]):.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="validation volumes")
    ap.add_argument("--ood", type=int, default=4, help="out-of-distribution volumes")
    ap.add_argument("--shape", default="64,128,128")
    ap.add_argument("--plot", default=os.path.join(HERE, "accuracy.png"))
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    ap.add_argument("--quick", action="store_true", help="2 + 1 volumes, no timing run")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="only the end-to-end timing run")
    ap.add_argument("--timing-repeat", type=int, default=3, help="timing runs (medians are printed)")
    ap.add_argument("--models", default="tanh,heat",
                    help="default pipelines to score (tanh, heat; empty: only the --variant ones)")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME MODEL ITEM.KEY=VALUE",
                    help="also score pipeline MODEL (tanh or heat) with these c3d-run --set values, as "
                         "method NAME (repeatable)")
    ap.add_argument("--pairs", action="append", default=[], metavar="NAME=DIR",
                    help="an extra set: DIR/images and DIR/labels matched by name (repeatable)")
    ap.add_argument("--timing-image", default=None,
                    help="stack for the timing run (default: a new 64x256x256 validation stack; "
                         "c3d-synth --preset validation -n 1 --shape 64,256,256 makes the same one)")
    a = ap.parse_args()
    methods = {}
    for m in filter(None, a.models.split(",")):
        if m not in PIPELINES:
            ap.error(f"--models: unknown model {m!r} (tanh, heat)")
        methods[m] = (PIPELINES[m], [])
    for v in a.variant:
        if len(v) < 2 or v[1] not in PIPELINES or v[0] in methods or v[0] == "watershed":
            ap.error(f"--variant {' '.join(v)}: expected a new NAME, then tanh or heat, then ITEM.KEY=VALUE ...")
        methods[v[0]] = (PIPELINES[v[1]], [x for kv in v[2:] for x in ("--set", kv)])
    if a.timing_only:
        report_timing(tempfile.mkdtemp(prefix="c3d_timing_"), a.timing_image, a.timing_repeat)
        return
    if a.quick:
        a.n, a.ood, a.no_timing = 2, 1, True
    shape = tuple(int(s) for s in a.shape.split(","))
    tmp = tempfile.mkdtemp(prefix="c3d_accuracy_")
    sets = {}
    if a.n:
        sets["validation"] = synth(os.path.join(tmp, "val"), a.n, "validation", shape)
    if a.ood:
        sets["ood"] = synth(os.path.join(tmp, "ood"), a.ood, "ood", shape)
    for spec in a.pairs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or name in sets:
            ap.error(f"--pairs {spec}: expected a new NAME=DIR")
        try:
            sets[name] = [(img, gt) for _, gt, img in match_pairs(os.path.join(folder, "labels"),
                                                                  os.path.join(folder, "images"))]
        except ArgumentError as e:
            ap.error(f"--pairs {spec}: {e}")
    if not sets:
        ap.error("nothing to score: --n 0, --ood 0 and no --pairs")

    rows, per_cell = [], {m: [] for m in list(methods) + ["watershed"]}

    def figures(row, key):  # "tanh 0.612 heat 0.637 ws 0.506"
        return " ".join(f"{'ws' if m == 'watershed' else m} {row[f'{m}_{key}']:.3f}" for m in per_cell)
    for set_name, pairs in sets.items():
        for img_path, lab_path in pairs:
            name = os.path.basename(img_path)[:-4]
            gt = read_image(lab_path).data.astype(np.int64)
            img = read_image(img_path)
            row = {"set": set_name, "volume": name, "cells": int(len(np.unique(gt)) - 1)}
            for model, (pipe, extra) in methods.items():
                out = os.path.join(tmp, f"{name}_{model}.tif")
                row[f"{model}_s"] = run_pipeline(pipe, img_path, out, extra)
                pred = read_image(out).data.astype(np.int64)
                r, d = score(gt, pred)
                row[f"{model}_dice"], row[f"{model}_ap50"], row[f"{model}_ap75"] = \
                    r["mean_dice"], r["ap@0.5"], r["ap@0.75"]
                row[f"{model}_aji"], row[f"{model}_errors"] = r["aji"], r["errors"]
                _interior(row, model, r)
                per_cell[model].append(d)
            diam = estimate_cell_diameter(img.data, img.spacing)
            t0 = time.perf_counter()
            ws = seeded_watershed(img.data, img.spacing, diameter_um=diam)
            row["watershed_s"] = time.perf_counter() - t0
            r, d = score(gt, np.asarray(ws, np.int64))
            row["watershed_dice"], row["watershed_ap50"], row["watershed_ap75"] = \
                r["mean_dice"], r["ap@0.5"], r["ap@0.75"]
            row["watershed_aji"], row["watershed_errors"] = r["aji"], r["errors"]
            _interior(row, "watershed", r)
            per_cell["watershed"].append(d)
            rows.append(row)
            print(f"{set_name:10s} {name:22s} cells {row['cells']:5d}  dice {figures(row, 'dice')}   AP50 "
                  f"{figures(row, 'ap50')}   interior ({row['cells_int']} cells) dice {figures(row, 'dice_int')}",
                  flush=True)

    _table(rows, sets, "", "All ground-truth cells (cells cut by the volume faces included):", list(per_cell))
    _table(rows, sets, "_int", "Interior cells (ground-truth cells touching no face of the volume; c3d-eval's "
                               "border=separate):", list(per_cell))
    print("(means over volumes; Dice: each ground-truth cell against the predicted cell overlapping it most)")
    errors_table(rows, sets, list(per_cell))

    if a.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            data = [np.concatenate(per_cell[m]) for m in per_cell]
            ax.boxplot(data, showfliers=False)
            names = {"tanh": "tanh model", "heat": "heat model", "watershed": "seeded watershed"}
            ax.set_xticks(range(1, len(data) + 1), [names.get(m, m) for m in per_cell])
            ax.set_ylabel("per-cell Dice")
            ax.set_title(f"{sum(len(p) for p in sets.values())} volumes ({' + '.join(sets)})")
            fig.tight_layout()
            fig.savefig(a.plot, dpi=100)
            print(f"box plot: {a.plot}")
        except ImportError:
            print("matplotlib not installed: no plot")

    if not a.no_timing:
        report_timing(tmp, a.timing_image, a.timing_repeat)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

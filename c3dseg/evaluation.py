"""``c3d-eval``: score label predictions against ground truth.

::

    c3d-eval GT PRED [PRED ...] [--json] [--plot FILE.png] [--exclude-border] [--per-file]

``GT`` and every ``PRED`` are label images, or folders of label images matched by name (the file
name without its image extension, so ``a.tif`` matches ``a.nrrd``).  For every prediction the
tool prints mean per-cell Dice as in the seed paper (each ground-truth cell against the predicted
cell that overlaps it most), AP at IoU 0.5 / 0.75 / 0.9 (TP / (TP + FP + FN)), matched F1 at IoU
0.5 and the aggregated Jaccard index, for all cells, for the interior cells and for the cells
touching a face of the volume (``--exclude-border``: interior cells only).  The metric functions
live in :mod:`c3dseg.metrics`; this module reads files, pools results over files and reports.

Pooling over the files of a folder: AP and F1 from the summed TP / FP / FN counts, mean Dice over
all ground-truth cells of all files, AJI as the mean over files.

Exit codes: 0 success, 2 bad arguments or inputs (missing file, unmatched names, different
shapes, non-label data), with a one-line ``error:`` message naming the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from .errors import ArgumentError, C3DError, print_error
from .metrics import GT_ERRORS, PRED_ERRORS, sum_breakdowns

THRESHOLDS = (0.5, 0.75, 0.9)
SECTIONS = ("all", "interior", "border")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def _stem(path: str) -> str:
    from .io import strip_image_extension
    return strip_image_extension(os.path.basename(path))


def _list_images(folder: str) -> dict[str, str]:
    from .io import is_image_file
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and is_image_file(path) and not name.startswith("."):
            stem = _stem(path)
            if stem in out:
                raise ArgumentError(f"two images named {stem!r} ({os.path.basename(out[stem])}, {name})",
                                    file=folder)
            out[stem] = path
    return out


def match_pairs(gt: str, pred: str) -> list[tuple[str, str, str]]:
    """``[(name, gt_file, pred_file), ...]`` for a GT and a PRED argument (files or folders).

    Raises :class:`ArgumentError` for a missing path, a folder against a file, an empty folder or a
    ground-truth name the prediction folder lacks.
    """
    for p in (gt, pred):
        if not os.path.exists(p):
            raise ArgumentError("no such file or folder", file=p)
    if os.path.isdir(gt):
        if not os.path.isdir(pred):
            raise ArgumentError("the ground truth is a folder, so the prediction must be one too",
                                file=pred)
        gts = _list_images(gt)
        if not gts:
            raise ArgumentError("no images in the ground-truth folder", file=gt)
        preds = _list_images(pred)
        missing = [n for n in gts if n not in preds]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ArgumentError(f"no prediction for ground truth {missing[0]!r}{more}", file=pred)
        return [(n, gts[n], preds[n]) for n in gts]
    if os.path.isdir(pred):
        stem = _stem(gt)
        preds = _list_images(pred)
        if stem not in preds:
            raise ArgumentError(f"no prediction named {stem!r}", file=pred)
        return [(stem, gt, preds[stem])]
    return [(_stem(gt), gt, pred)]


def _read_labels(path: str) -> np.ndarray:
    from .io import read_image
    from .labels import check_labels
    try:
        img = read_image(path)
    except C3DError as e:
        raise ArgumentError(e.message, file=path) from None
    if img.is_multichannel:
        raise ArgumentError(f"expected a label image, got {img.data.shape[0]} channels", file=path)
    try:
        return check_labels(img.data, name="labels", ndim=3)
    except C3DError as e:
        raise ArgumentError(e.message, file=path) from None


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------

def score_pair(gt: np.ndarray, pred: np.ndarray, *, exclude_border: bool = False) -> dict:
    """Metrics of one prediction against its ground truth.

    Returns
    -------
    dict
        ``metrics``: :func:`c3dseg.metrics.evaluate` (``border="separate"``, or ``"exclude"``);
        ``dice``: (G,) per-GT-cell Dice (float64) and ``dice_border``: (G,) bool, whether the
        cell touches a face of the volume.
    """
    from .metrics import error_breakdown, evaluate, mean_cell_dice, overlap_table

    table = overlap_table(gt, pred)
    metrics = evaluate(table, None, border="exclude" if exclude_border else "separate",
                       thresholds=THRESHOLDS)
    metrics["errors"] = error_breakdown(table, None, threshold=0.5, exclude_border=exclude_border)
    _, dice = mean_cell_dice(table, None, return_per_cell=True)
    return {"metrics": metrics, "dice": dice, "dice_border": np.asarray(table.gt_border, bool)}


def pool_errors(results: list[dict]) -> dict:
    """The :func:`c3dseg.metrics.error_breakdown` counts of one prediction summed over its files."""
    return sum_breakdowns(r["metrics"]["errors"] for r in results)


def format_errors(name: str, e: dict) -> str:
    """One line: why cells of prediction ``name`` go unmatched at IoU 0.5."""
    g, p = e["gt"], e["pred"]
    gt_kinds = ", ".join(f"{k} {g[k]}" for k in GT_ERRORS)
    pred_kinds = ", ".join(f"{k} {p[k]}" for k in PRED_ERRORS)
    return (f"{name}: unmatched at IoU {e['threshold']:g}: {g['cells'] - g['matched']} of {g['cells']} "
            f"ground-truth cells ({gt_kinds}); {p['cells'] - p['matched']} of {p['cells']} predicted "
            f"cells ({pred_kinds})")


def _section(metrics: dict, section: str) -> dict | None:
    if metrics.get("border") == "exclude":
        return metrics if section == "interior" else None
    if section == "all":
        return metrics
    return metrics.get("interior" if section == "interior" else "touching_border")


def pool(results: list[dict], section: str) -> dict:
    """Pool the per-file results of one prediction for one section (all / interior / border)."""
    out = {"files": len(results), "n_gt": 0, "n_pred": 0}
    counts = {t: [0, 0, 0] for t in THRESHOLDS}
    ajis = []
    dice_all = []
    for r in results:
        m = _section(r["metrics"], section)
        if m is None:
            return {}
        out["n_gt"] += m["n_gt"]
        out["n_pred"] += m["n_pred"]
        for t in THRESHOLDS:
            k = f"{t:g}"
            c = counts[t]
            c[0] += m[f"tp@{k}"]
            c[1] += m[f"fp@{k}"]
            c[2] += m[f"fn@{k}"]
        if not math.isnan(m["aji"]):
            ajis.append(m["aji"])
        d, b = r["dice"], r["dice_border"]
        dice_all.append(d if section == "all" else d[~b] if section == "interior" else d[b])
    dice = np.concatenate(dice_all) if dice_all else np.zeros(0)
    out["mean_dice"] = float(dice.mean()) if len(dice) else float("nan")
    out["median_dice"] = float(np.median(dice)) if len(dice) else float("nan")
    for t in THRESHOLDS:
        k = f"{t:g}"
        tp, fp, fn = counts[t]
        d = tp + fp + fn
        out[f"ap@{k}"] = tp / d if d else float("nan")
        out[f"f1@{k}"] = 2 * tp / (2 * tp + fp + fn) if d else float("nan")
        out[f"tp@{k}"], out[f"fp@{k}"], out[f"fn@{k}"] = tp, fp, fn
    out["aji"] = float(np.mean(ajis)) if ajis else float("nan")
    return out


def per_cell_dice(results: list[dict], *, exclude_border: bool = False) -> np.ndarray:
    """All per-GT-cell Dice values of one prediction (interior cells only with ``exclude_border``)."""
    parts = [r["dice"][~r["dice_border"]] if exclude_border else r["dice"] for r in results]
    return np.concatenate(parts) if parts else np.zeros(0)


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------

COLUMNS = (("cells", "n_gt", "{:d}"), ("pred", "n_pred", "{:d}"), ("Dice", "mean_dice", "{:.3f}"),
           ("AP50", "ap@0.5", "{:.3f}"), ("AP75", "ap@0.75", "{:.3f}"), ("AP90", "ap@0.9", "{:.3f}"),
           ("F1@50", "f1@0.5", "{:.3f}"), ("AJI", "aji", "{:.3f}"))


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return spec.format(value)


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """Plain-text table of ``(prediction, section, pooled-dict)`` rows."""
    head = ["prediction", "section"] + [c[0] for c in COLUMNS]
    body = [[name, section] + [_fmt(d.get(key), spec) for _, key, spec in COLUMNS]
            for name, section, d in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = []
    for j, r in enumerate([head] + body):
        cells = [r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def box_plot(path: str, names: list[str], values: list[np.ndarray], *, title: str = "") -> str:
    """Box plot of per-cell Dice per prediction (the seed paper's Fig. 3), written to ``path``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ArgumentError("--plot needs matplotlib: pip install 'c3dseg[plot]'") from None
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 4.5))
    data = [v if len(v) else np.array([np.nan]) for v in values]
    ax.boxplot(data, showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names, rotation=20, ha="right")
    for i, v in enumerate(values, start=1):
        if len(v):
            ax.plot([i], [float(np.mean(v))], marker="^", color="tab:green")
    ax.set_ylabel("per-cell Dice")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "per-cell Dice (triangle: mean)", fontsize=10)
    fig.tight_layout()
    from .io_atomic import atomic_path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def _json_clean(o):
    if isinstance(o, dict):
        return {k: _json_clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_clean(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        o = float(o)
        return None if math.isnan(o) else o
    return o


def _names(preds: list[str]) -> list[str]:
    base = [_stem(p.rstrip(os.sep)) if not os.path.isdir(p) else os.path.basename(os.path.normpath(p))
            for p in preds]
    if len(set(base)) == len(base):
        return base
    return [os.path.normpath(p) for p in preds]


def run(gt: str, preds: list[str], *, exclude_border: bool = False, progress: bool = False) -> dict:
    """Score every prediction; returns a JSON-ready report (also what ``--json`` prints)."""
    pairs = [match_pairs(gt, p) for p in preds]       # all argument errors before any work
    names = _names(preds)
    gt_cache: dict[str, np.ndarray] = {}
    report = {"ground_truth": gt, "thresholds": list(THRESHOLDS), "exclude_border": exclude_border,
              "predictions": []}
    for name, pred_arg, plist in zip(names, preds, pairs):
        results, files = [], []
        for stem, gpath, ppath in plist:
            if gpath not in gt_cache:
                gt_cache.clear()   # one ground truth in memory at a time
                gt_cache[gpath] = _read_labels(gpath)
            g = gt_cache[gpath]
            p = _read_labels(ppath)
            if p.shape != g.shape:
                raise ArgumentError(f"shape {p.shape} differs from the ground truth's {g.shape} "
                                    f"({os.path.basename(gpath)})", file=ppath)
            r = score_pair(g, p, exclude_border=exclude_border)
            results.append(r)
            files.append({"name": stem, "gt": gpath, "pred": ppath, "metrics": r["metrics"]})
            if progress:
                print(f"{name}: {stem}", file=sys.stderr, flush=True)
        sections = ("interior",) if exclude_border else SECTIONS
        entry = {"name": name, "path": pred_arg, "summary": {s: pool(results, s) for s in sections},
                 "errors": pool_errors(results), "files": files,
                 "_dice": per_cell_dice(results, exclude_border=exclude_border)}
        report["predictions"].append(entry)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="c3d-eval",
        description="Score label predictions against ground truth: mean per-cell Dice (each GT cell "
                    "against the predicted cell overlapping it most), AP at IoU 0.5/0.75/0.9, F1, "
                    "aggregated Jaccard; cells touching the volume border reported apart.")
    ap.add_argument("gt", metavar="GT", help="ground-truth label image or folder")
    ap.add_argument("pred", metavar="PRED", nargs="+", help="predicted label image(s) or folder(s)")
    ap.add_argument("--json", action="store_true", help="print a JSON report instead of a table")
    ap.add_argument("--plot", metavar="FILE.png", help="box plot of per-cell Dice per prediction")
    ap.add_argument("--exclude-border", action="store_true",
                    help="score only cells that do not touch a face of the volume")
    ap.add_argument("--per-file", action="store_true", help="table rows for every file too")
    ap.add_argument("--errors", action="store_true",
                    help="also say why cells go unmatched at IoU 0.5: ground-truth cells missed, merged, "
                         "split; predicted cells in the background, merges, fragments")
    ap.add_argument("-v", "--verbose", action="store_true", help="traceback on errors")
    args = ap.parse_args(argv)
    try:
        if args.plot and not args.plot.lower().endswith(".png"):
            raise ArgumentError("--plot: expected a .png file name", file=args.plot)
        report = run(args.gt, args.pred, exclude_border=args.exclude_border,
                     progress=not args.json and sys.stderr.isatty())
        if args.plot:
            box_plot(args.plot, [p["name"] for p in report["predictions"]],
                     [p["_dice"] for p in report["predictions"]],
                     title="per-cell Dice" + (" (interior cells)" if args.exclude_border else ""))
    except C3DError as e:
        print_error(e, args.verbose)
        return e.exit_code
    for p in report["predictions"]:
        p.pop("_dice")
    try:
        return _print_report(report, args)
    except BrokenPipeError:           # e.g. piped into head
        return 0


def _print_report(report, args) -> int:
    if args.json:
        print(json.dumps(_json_clean(report), indent=1))
        return 0
    rows = []
    for p in report["predictions"]:
        for section, d in p["summary"].items():
            rows.append((p["name"], section, d))
        if args.per_file and len(p["files"]) > 1:
            for f in p["files"]:
                m = f["metrics"]
                rows.append((f"  {f['name']}", "all" if not args.exclude_border else "interior",
                             {**m, "mean_dice": m["mean_dice"]}))
    print(format_table(rows))
    if args.errors:
        for p in report["predictions"]:
            print(format_errors(p["name"], p["errors"]))
            if args.per_file and len(p["files"]) > 1:
                for f in p["files"]:
                    print(format_errors(f"  {f['name']}", f["metrics"]["errors"]))
    if args.plot:
        print(f"box plot: {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

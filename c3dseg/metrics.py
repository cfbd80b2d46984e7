"""Instance-segmentation metrics for label images (tests, training validation, ``c3d-eval``).

Everything is computed from one sparse contingency table of the two label images
(:func:`overlap_table`): a single pass over the voxels, then per-cell arithmetic on arrays of
pairs.  No loop over cells, no dense (n_gt x n_pred) matrix.

Conventions
-----------
- Label images are integer arrays of the same shape; 0 is background; ids need not be
  consecutive.
- **AP** at an IoU threshold t is ``TP / (TP + FP + FN)`` (the Cellpose / StarDist definition, not
  the area under a precision-recall curve).  A ground-truth (GT) cell and a predicted cell match
  when their IoU >= t, one to one; for t > 0.5 a cell can have at most one such partner, and ties
  or lower thresholds are resolved by an assignment that maximises the number of matches, then
  the summed IoU.
- **mean Dice** (the seed paper's measure): each GT cell against the predicted cell that overlaps
  it most (largest intersection, ties to the higher IoU); Dice = 2|G n P| / (|G| + |P|), 0 when nothing overlaps; mean
  over GT cells.
- **AJI** (aggregated Jaccard index, Kumar et al. 2017): each GT cell against the predicted cell
  of highest IoU; sum of intersections over sum of unions plus the sizes of unused predictions.
- **ARand** (adapted Rand error, ignoring GT background voxels) and **VOI** split / merge
  (conditional entropies H(pred | gt) and H(gt | pred), background included, in bits) as in
  scikit-image.
- Empty inputs: a metric over zero cells is NaN (e.g. AP when both images are empty).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError, ParameterError
from .labels import check_labels, compress_labels

__all__ = [
    "OverlapTable", "overlap_table", "match", "average_precision", "mean_cell_dice",
    "matched_f1", "aggregated_jaccard", "adapted_rand_error", "variation_of_information",
    "evaluate", "error_breakdown", "sum_breakdowns",
]

DEFAULT_THRESHOLDS = (0.5, 0.75, 0.9)

# Above this many (gt, pred) cells a bincount key table gives way to np.unique.
_DENSE_KEYS = 1 << 26


@dataclass(frozen=True)
class OverlapTable:
    """Sparse contingency table of two label images.

    Attributes
    ----------
    gt_ids, pred_ids : ndarray (G,), (P,) int64
        Label values present (background excluded), increasing.
    gt_sizes, pred_sizes : ndarray (G,), (P,) int64
        Voxel counts.
    gt_index, pred_index : ndarray (K,) int64
        For every overlapping pair, the row in ``gt_ids`` and ``pred_ids``.
    intersection : ndarray (K,) int64
        Voxels shared by each pair (> 0).
    gt_border, pred_border : ndarray (G,), (P,) bool
        Whether the cell touches a face of the volume.
    n_voxels : int
        Voxels in the volume.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_sizes: np.ndarray
    pred_sizes: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray
    intersection: np.ndarray
    gt_border: np.ndarray
    pred_border: np.ndarray
    n_voxels: int

    @property
    def n_gt(self) -> int:
        return len(self.gt_ids)

    @property
    def n_pred(self) -> int:
        return len(self.pred_ids)

    @property
    def union(self) -> np.ndarray:
        """(K,) union of each overlapping pair."""
        return self.gt_sizes[self.gt_index] + self.pred_sizes[self.pred_index] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        """(K,) intersection over union of each overlapping pair."""
        return self.intersection / self.union

    def best_pred_for_gt(self, by: str = "intersection") -> np.ndarray:
        """(G,) index of the pair with the largest ``by`` ("intersection" or "iou") for each GT
        cell, -1 where no predicted cell overlaps it."""
        return _argmax_per_group(self.gt_index, self._score(by), self.n_gt)

    def best_gt_for_pred(self, by: str = "intersection") -> np.ndarray:
        """(P,) index of the pair with the largest ``by`` for each predicted cell, -1 if none."""
        return _argmax_per_group(self.pred_index, self._score(by), self.n_pred)

    def _score(self, by):
        if by == "intersection":
            # ties (equal voxel counts) go to the pair of higher IoU (IoU < 1 never reorders
            # different integer counts)
            return self.intersection + 0.5 * self.iou
        if by == "iou":
            return self.iou
        raise ValueError(by)

    def subset(self, gt_keep: np.ndarray, pred_keep: np.ndarray) -> "OverlapTable":
        """The table restricted to some GT and predicted cells (boolean masks (G,), (P,)).

        Pairs with a dropped cell disappear; the kept cells keep their full sizes.
        """
        gt_keep = np.asarray(gt_keep, bool)
        pred_keep = np.asarray(pred_keep, bool)
        gmap = np.cumsum(gt_keep) - 1
        pmap = np.cumsum(pred_keep) - 1
        k = gt_keep[self.gt_index] & pred_keep[self.pred_index]
        return OverlapTable(
            self.gt_ids[gt_keep], self.pred_ids[pred_keep], self.gt_sizes[gt_keep],
            self.pred_sizes[pred_keep], gmap[self.gt_index[k]], pmap[self.pred_index[k]],
            self.intersection[k], self.gt_border[gt_keep], self.pred_border[pred_keep],
            self.n_voxels)


def _argmax_per_group(group, score, n):
    """For each group 0..n-1, the index (into ``group``) of its highest score, -1 if empty."""
    out = np.full(n, -1, dtype=np.int64)
    if len(group) == 0:
        return out
    order = np.lexsort((score, group))  # by group, then score ascending
    g_sorted = group[order]
    last = np.ones(len(order), bool)
    last[:-1] = g_sorted[1:] != g_sorted[:-1]
    out[g_sorted[last]] = order[last]
    return out


def _border_flags(index: np.ndarray, n: int) -> np.ndarray:
    """(n,) whether each compressed id 1..n occurs on a face of the volume."""
    flags = np.zeros(n + 1, bool)
    for ax in range(index.ndim):
        for sl in (0, -1):
            face = np.take(index, sl, axis=ax)
            flags[face.reshape(-1)] = True
    return flags[1:]


def _check_pair(gt, pred):
    gt = check_labels(gt, "gt", ndim=None)
    pred = check_labels(pred, "pred", ndim=None)
    if gt.shape != pred.shape:
        raise InputError(f"gt and pred have different shapes: {gt.shape} vs {pred.shape}")
    return gt, pred


def overlap_table(gt, pred) -> OverlapTable:
    """Sparse contingency table of two label images.

    Parameters
    ----------
    gt, pred : ndarray of non-negative int, same shape (any dimension)
        Ground truth and prediction.

    Returns
    -------
    OverlapTable

    Raises
    ------
    InputError
        Different shapes, non-integer or negative labels.
    """
    if isinstance(gt, OverlapTable):
        return gt
    gt, pred = _check_pair(gt, pred)
    g_ids, g_idx, g_sizes = compress_labels(gt)
    p_ids, p_idx, p_sizes = compress_labels(pred)
    n_g, n_p = len(g_ids), len(p_ids)
    both = (g_idx > 0) & (p_idx > 0)
    key = g_idx[both].astype(np.int64) * (n_p + 1) + p_idx[both]
    if (n_g + 1) * (n_p + 1) <= _DENSE_KEYS:
        counts = np.bincount(key, minlength=(n_g + 1) * (n_p + 1))
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(key, return_counts=True)
    gi = keys // (n_p + 1) - 1
    pi = keys % (n_p + 1) - 1
    return OverlapTable(g_ids, p_ids, g_sizes, p_sizes, gi.astype(np.int64), pi.astype(np.int64),
                        counts.astype(np.int64), _border_flags(g_idx, n_g),
                        _border_flags(p_idx, n_p), int(gt.size))


def _check_thresholds(thresholds):
    th = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if th.ndim != 1 or len(th) == 0 or np.any(~np.isfinite(th)) or np.any(th <= 0) or np.any(th > 1):
        raise ParameterError(f"IoU thresholds must lie in (0, 1], got {thresholds!r}", key="thresholds")
    return th


def match(table: OverlapTable, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of GT and predicted cells with IoU >= ``threshold``.

    Pairs whose GT and predicted cell have no other candidate are matched directly (always the
    case for thresholds > 0.5); the remaining conflicts are solved by an assignment maximising
    the number of matches, then their summed IoU.

    Returns
    -------
    gt_rows, pred_rows : ndarray (TP,) int64
        Indices into ``table.gt_ids`` and ``table.pred_ids`` of the matched pairs.
    """
    iou = table.iou
    cand = np.flatnonzero(iou >= threshold)
    gi, pi = table.gt_index[cand], table.pred_index[cand]
    gcount = np.bincount(gi, minlength=table.n_gt)
    pcount = np.bincount(pi, minlength=table.n_pred)
    simple = (gcount[gi] == 1) & (pcount[pi] == 1)
    g_out, p_out = [gi[simple]], [pi[simple]]
    if not np.all(simple):
        from scipy.optimize import linear_sum_assignment

        cg, cp, cs = gi[~simple], pi[~simple], iou[cand[~simple]]
        rows, r_inv = np.unique(cg, return_inverse=True)
        cols, c_inv = np.unique(cp, return_inverse=True)
        cost = np.zeros((len(rows), len(cols)))
        # maximise matches first (-1 each), then IoU (a fraction < 1 in total)
        cost[r_inv, c_inv] = -1.0 - cs / (2.0 * len(cs))
        r, c = linear_sum_assignment(cost)
        ok = cost[r, c] < 0
        g_out.append(rows[r[ok]])
        p_out.append(cols[c[ok]])
    return np.concatenate(g_out).astype(np.int64), np.concatenate(p_out).astype(np.int64)


def _ap_counts(table, thresholds):
    out = []
    for t in thresholds:
        tp = len(match(table, t)[0])
        out.append((tp, table.n_pred - tp, table.n_gt - tp))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def average_precision(gt, pred, thresholds=DEFAULT_THRESHOLDS):
    """AP = TP / (TP + FP + FN) at each IoU threshold.

    Parameters
    ----------
    gt, pred : ndarray of int, same shape, or an :class:`OverlapTable` as ``gt`` (``pred`` None)
    thresholds : sequence of float in (0, 1]

    Returns
    -------
    ap : ndarray (T,) float64
        NaN where both images have no cell.
    tp, fp, fn : ndarray (T,) int64
    """
    th = _check_thresholds(thresholds)
    table = overlap_table(gt, pred)
    c = _ap_counts(table, th)
    tp, fp, fn = c[:, 0], c[:, 1], c[:, 2]
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    return ap, tp, fp, fn


def matched_f1(gt, pred, threshold: float = 0.5) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) of the one-to-one matching at an IoU threshold (NaN if both
    images are empty)."""
    _, tp, fp, fn = average_precision(gt, pred, (threshold,))
    d = 2 * tp[0] + fp[0] + fn[0]
    return float(2 * tp[0] / d) if d else float("nan")


def mean_cell_dice(gt, pred, *, return_per_cell: bool = False):
    """Mean over GT cells of the Dice with the predicted cell that overlaps each most.

    Parameters
    ----------
    gt, pred : ndarray of int, same shape (or an OverlapTable as ``gt``)
    return_per_cell : bool
        Also return the (G,) Dice of every GT cell (0 for cells no prediction touches).

    Returns
    -------
    float (NaN when GT has no cell) [, ndarray (G,)]
    """
    table = overlap_table(gt, pred)
    dice = _per_gt_dice(table)
    m = float(dice.mean()) if len(dice) else float("nan")
    return (m, dice) if return_per_cell else m


def _per_gt_dice(table):
    best = table.best_pred_for_gt("intersection")
    dice = np.zeros(table.n_gt, dtype=np.float64)
    has = best >= 0
    k = best[has]
    inter = table.intersection[k]
    dice[has] = 2.0 * inter / (table.gt_sizes[has] + table.pred_sizes[table.pred_index[k]])
    return dice


def aggregated_jaccard(gt, pred) -> float:
    """Aggregated Jaccard index (Kumar et al. 2017); NaN when both images are empty."""
    table = overlap_table(gt, pred)
    best = table.best_pred_for_gt("iou")
    has = best >= 0
    k = best[has]
    inter = table.intersection[k].sum()
    union = table.union[k].sum() + table.gt_sizes[~has].sum()
    used = np.zeros(table.n_pred, bool)
    used[table.pred_index[k]] = True
    union += table.pred_sizes[~used].sum()
    return float(inter / union) if union else float("nan")


def _full_contingency(table):
    """All non-zero cells of the contingency table including background rows/columns.

    Returns (g, p, n) with g = 0 / p = 0 for background."""
    gsum = np.bincount(table.gt_index, weights=table.intersection, minlength=table.n_gt)
    psum = np.bincount(table.pred_index, weights=table.intersection, minlength=table.n_pred)
    g_bg = table.gt_sizes - gsum            # GT cell voxels on predicted background
    p_bg = table.pred_sizes - psum          # predicted cell voxels on GT background
    bg_bg = table.n_voxels - table.gt_sizes.sum() - p_bg.sum()
    g = np.concatenate([table.gt_index + 1, np.arange(1, table.n_gt + 1), np.zeros(table.n_pred, np.int64), [0]])
    p = np.concatenate([table.pred_index + 1, np.zeros(table.n_gt, np.int64), np.arange(1, table.n_pred + 1), [0]])
    n = np.concatenate([table.intersection, g_bg, p_bg, [bg_bg]]).astype(np.float64)
    keep = n > 0
    return g[keep], p[keep], n[keep]


def variation_of_information(gt, pred) -> tuple[float, float]:
    """(split, merge) = (H(pred | gt), H(gt | pred)) in bits, background counted as a label."""
    table = overlap_table(gt, pred)
    g, p, n = _full_contingency(table)
    total = n.sum()
    if total == 0:
        return float("nan"), float("nan")
    pij = n / total
    pg = np.bincount(g, weights=pij)
    pp = np.bincount(p, weights=pij)
    split = -np.sum(pij * np.log2(pij / pg[g]))
    merge = -np.sum(pij * np.log2(pij / pp[p]))
    return (float(split) if split > 0 else 0.0), (float(merge) if merge > 0 else 0.0)


def adapted_rand_error(gt, pred) -> tuple[float, float, float]:
    """Adapted Rand error (SNEMI3D), ignoring voxels where GT is background.

    Returns ``(error, precision, recall)`` as :func:`skimage.metrics.adapted_rand_error`.
    """
    table = overlap_table(gt, pred)
    g, p, n = _full_contingency(table)
    keep = g > 0
    g, p, n = g[keep], p[keep], n[keep]
    total = n.sum()
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    a = np.bincount(g, weights=n)
    b = np.bincount(p, weights=n)
    sum_pij2 = np.sum(n * n) - total
    sum_a2 = np.sum(a * a) - total
    sum_b2 = np.sum(b * b) - total
    precision = sum_pij2 / sum_a2 if sum_a2 else 1.0
    recall = sum_pij2 / sum_b2 if sum_b2 else 1.0
    f = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(1.0 - f), float(precision), float(recall)


def _summary(table, thresholds, voxel_metrics=True):
    out = {"n_gt": int(table.n_gt), "n_pred": int(table.n_pred)}
    c = _ap_counts(table, thresholds)
    for t, (tp, fp, fn) in zip(thresholds, c):
        key = f"{t:g}"
        d = tp + fp + fn
        out[f"ap@{key}"] = float(tp / d) if d else float("nan")
        out[f"tp@{key}"], out[f"fp@{key}"], out[f"fn@{key}"] = int(tp), int(fp), int(fn)
        out[f"precision@{key}"] = float(tp / (tp + fp)) if tp + fp else float("nan")
        out[f"recall@{key}"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        out[f"f1@{key}"] = float(2 * tp / (2 * tp + fp + fn)) if d else float("nan")
    dice = _per_gt_dice(table)
    out["mean_dice"] = float(dice.mean()) if len(dice) else float("nan")
    out["aji"] = aggregated_jaccard(table, None)
    if voxel_metrics:
        out["arand"] = adapted_rand_error(table, None)[0]
        out["voi_split"], out["voi_merge"] = variation_of_information(table, None)
    return out


def _side_split(table):
    """Partition cells into interior / touching the border.

    GT cells touching a face of the volume are "border" cells.  A predicted cell follows the GT
    cell it overlaps most; a predicted cell overlapping no GT cell is a border cell when it
    touches a face itself.  Returns boolean masks (gt_border, pred_border)."""
    gb = table.gt_border
    best = table.best_gt_for_pred("intersection")
    pb = table.pred_border.copy()
    has = best >= 0
    pb[has] = gb[table.gt_index[best[has]]]
    return gb, pb


#: :func:`error_breakdown`: a predicted cell "holds" a ground-truth cell when their overlap is at least
#: this fraction of the ground-truth cell's volume
HOLD_SHARE = 0.2

#: the kinds :func:`error_breakdown` counts, in the order they are tested
GT_ERRORS = ("missed", "merged", "split", "other")
PRED_ERRORS = ("background", "merge", "fragment", "other")


def _first_kind(cells, tests):
    """Counts of ``cells`` (a mask) by the first of ``tests`` ((kind, mask) ...) each meets; the
    rest count as "other"."""
    left = cells.copy()
    counts = {}
    for kind, hit in tests:
        counts[kind] = int((left & hit).sum())
        left &= ~hit
    counts["other"] = int(left.sum())
    return counts


def error_breakdown(gt, pred, *, threshold: float = 0.5, exclude_border: bool = False) -> dict:
    """Why cells go unmatched at IoU ``threshold`` (the errors behind AP = TP / (TP + FP + FN)).

    Each unmatched ground-truth cell is, tested in this order:

    - ``missed``: predicted cells cover less than half of it;
    - ``merged``: the predicted cell overlapping it most also holds another ground-truth cell
      (a predicted cell holds a ground-truth cell when it covers at least :data:`HOLD_SHARE` of it);
    - ``split``: two or more predicted cells hold it;
    - ``other``: covered by one predicted cell that matches it too poorly (shifted or too large).

    Each unmatched predicted cell is ``background`` (at least half of it lies outside every
    ground-truth cell), ``merge`` (it holds two or more ground-truth cells), ``fragment`` (at least
    half of it lies inside one ground-truth cell) or ``other``.  With ``exclude_border`` only the
    interior cells count (as in :func:`evaluate`).

    Returns
    -------
    dict
        ``threshold``, ``gt`` and ``pred``: ``{"cells", "matched", <kind>: count ...}``.
    """
    th = float(_check_thresholds(threshold)[0])
    table = overlap_table(gt, pred)
    if exclude_border:
        gb, pb = _side_split(table)
        table = table.subset(~gb, ~pb)
    g_m, p_m = match(table, th)
    gi, pi, inter = table.gt_index, table.pred_index, table.intersection
    g_un = np.ones(table.n_gt, bool)
    g_un[g_m] = False
    p_un = np.ones(table.n_pred, bool)
    p_un[p_m] = False
    held = inter >= HOLD_SHARE * table.gt_sizes[gi]
    n_held = np.bincount(pi[held], minlength=table.n_pred)       # GT cells each predicted cell holds
    n_holders = np.bincount(gi[held], minlength=table.n_gt)      # predicted cells holding each GT cell
    covered = np.bincount(gi, weights=inter, minlength=table.n_gt)
    best = table.best_pred_for_gt("intersection")
    best_holds = np.zeros(table.n_gt, np.int64)
    has = best >= 0
    best_holds[has] = n_held[pi[best[has]]]
    out = {"threshold": th, "gt": {"cells": int(table.n_gt), "matched": int(len(g_m))},
           "pred": {"cells": int(table.n_pred), "matched": int(len(p_m))}}
    out["gt"].update(_first_kind(g_un, (("missed", covered < 0.5 * table.gt_sizes), ("merged", best_holds >= 2),
                                        ("split", n_holders >= 2))))
    in_gt = np.bincount(pi, weights=inter, minlength=table.n_pred)
    best_g = table.best_gt_for_pred("intersection")
    most = np.zeros(table.n_pred)
    has = best_g >= 0
    most[has] = inter[best_g[has]]
    out["pred"].update(_first_kind(p_un, (("background", in_gt < 0.5 * table.pred_sizes), ("merge", n_held >= 2),
                                          ("fragment", most >= 0.5 * table.pred_sizes))))
    return out


def sum_breakdowns(breakdowns) -> dict:
    """:func:`error_breakdown` results of several volumes, counts summed (the first one's threshold)."""
    out = {"threshold": 0.5, "gt": {}, "pred": {}}
    for e in breakdowns:
        out["threshold"] = e["threshold"]
        for side in ("gt", "pred"):
            for k, v in e[side].items():
                out[side][k] = out[side].get(k, 0) + v
    return out


def evaluate(gt, pred, *, border: str = "separate", thresholds=DEFAULT_THRESHOLDS) -> dict:
    """All metrics in one dictionary.

    Parameters
    ----------
    gt, pred : ndarray of int, same shape
    border : {"separate", "include", "exclude"}
        How to treat cells that touch a face of the volume (cut cells):

        - ``"include"``: score every cell.
        - ``"exclude"``: score only interior GT cells and the predicted cells assigned to them
          (a predicted cell goes with the GT cell it overlaps most; one overlapping no GT cell
          is dropped when it touches a face).
        - ``"separate"`` (default): the ``"include"`` figures, plus the same metrics for the
          interior and for the border cells under the keys ``"interior"`` and
          ``"touching_border"``.
    thresholds : sequence of float
        IoU thresholds of the AP / F1 figures.

    Returns
    -------
    dict
        ``n_gt``, ``n_pred``, ``ap@t``, ``tp@t``, ``fp@t``, ``fn@t``, ``precision@t``,
        ``recall@t``, ``f1@t`` for every threshold t, ``mean_dice``, ``aji``, ``border``; and, from
        all voxels of the volume, ``arand``, ``voi_split``, ``voi_merge`` (not in ``"exclude"``
        mode nor in the sub-dictionaries: they are voxel-level, not per cell).
    """
    if border not in ("separate", "include", "exclude"):
        raise ParameterError(f"expected separate|include|exclude, got {border!r}", key="border")
    th = _check_thresholds(thresholds)
    table = overlap_table(gt, pred)
    gb, pb = _side_split(table)
    if border == "exclude":
        out = _summary(table.subset(~gb, ~pb), th, voxel_metrics=False)
    else:
        out = _summary(table, th)
    out["border"] = border
    if border == "separate":
        out["interior"] = _summary(table.subset(~gb, ~pb), th, voxel_metrics=False)
        out["touching_border"] = _summary(table.subset(gb, pb), th, voxel_metrics=False)
    return out

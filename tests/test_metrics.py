"""Metrics: checked against brute-force per-cell loops and scikit-image on small label images."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from c3dseg.errors import InputError, ParameterError
from c3dseg.metrics import (adapted_rand_error, aggregated_jaccard, average_precision, evaluate,
                            match, matched_f1, mean_cell_dice, overlap_table,
                            variation_of_information)
from c3dseg.synthesis import voronoi_labels


def _brute_iou(gt, pred):
    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [i for i in np.unique(pred) if i]
    iou = np.zeros((len(g_ids), len(p_ids)))
    inter = np.zeros_like(iou)
    for a, g in enumerate(g_ids):
        for b, p in enumerate(p_ids):
            i = np.sum((gt == g) & (pred == p))
            u = np.sum((gt == g) | (pred == p))
            iou[a, b], inter[a, b] = i / u, i
    return g_ids, p_ids, iou, inter


def _brute_ap(gt, pred, t):
    _, _, iou, _ = _brute_iou(gt, pred)
    if iou.size == 0:
        tp = 0
    else:
        hit = iou >= t
        r, c = linear_sum_assignment(-(hit + iou / (2 * iou.size)))
        tp = int(hit[r, c].sum())
    n_g, n_p = iou.shape
    return tp / (tp + (n_p - tp) + (n_g - tp))


def _brute_dice(gt, pred):
    g_ids, p_ids, iou, inter = _brute_iou(gt, pred)
    out = []
    for a, g in enumerate(g_ids):
        if inter.shape[1] == 0 or inter[a].max() == 0:
            out.append(0.0)
            continue
        b = int(np.argmax(inter[a] + 0.5 * iou[a]))  # ties: higher IoU
        out.append(2 * inter[a, b] / (np.sum(gt == g) + np.sum(pred == p_ids[b])))
    return float(np.mean(out))


def _perturbed(seed=1):
    gt = voronoi_labels((20, 24, 22), 12, seed=seed).astype(np.int32)
    rng = np.random.default_rng(seed)
    pred = gt.copy()
    # merge two cells, split one, shift ids, blank one, add noise voxels
    pred[pred == 2] = 3
    z = np.nonzero(pred == 5)
    half = z[0] < np.median(z[0])
    pred[z[0][half], z[1][half], z[2][half]] = 50
    pred[pred == 7] = 0
    noise = rng.random(pred.shape) < 0.05
    pred[noise] = rng.integers(0, 14, noise.sum())
    pred[pred > 0] += 100
    return gt, pred


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_overlap_table_matches_brute_force(seed):
    gt, pred = _perturbed(seed)
    t = overlap_table(gt, pred)
    g_ids, p_ids, iou, inter = _brute_iou(gt, pred)
    assert list(t.gt_ids) == g_ids and list(t.pred_ids) == p_ids
    dense = np.zeros_like(iou)
    dense[t.gt_index, t.pred_index] = t.iou
    np.testing.assert_allclose(dense, iou)
    dense[:] = 0
    dense[t.gt_index, t.pred_index] = t.intersection
    np.testing.assert_array_equal(dense, inter)
    assert t.gt_sizes.sum() == np.count_nonzero(gt)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ap_and_dice_match_brute_force(seed):
    gt, pred = _perturbed(seed)
    ap, tp, fp, fn = average_precision(gt, pred, (0.1, 0.3, 0.5, 0.75, 0.9))
    for a, t in zip(ap, (0.1, 0.3, 0.5, 0.75, 0.9)):
        assert a == pytest.approx(_brute_ap(gt, pred, t))
    assert np.all(tp + fn == np.count_nonzero(np.unique(gt)))
    assert mean_cell_dice(gt, pred) == pytest.approx(_brute_dice(gt, pred))


def test_perfect_and_permuted_ids():
    gt = voronoi_labels((16, 16, 16), 10, seed=4)
    perm = np.random.default_rng(0).permutation(np.arange(1, gt.max() + 1)) * 7
    pred = np.concatenate([[0], perm])[gt]
    ap, *_ = average_precision(gt, pred)
    np.testing.assert_array_equal(ap, 1.0)
    assert mean_cell_dice(gt, pred) == 1.0
    assert aggregated_jaccard(gt, pred) == 1.0
    assert matched_f1(gt, pred) == 1.0
    assert variation_of_information(gt, pred) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert adapted_rand_error(gt, pred)[0] == pytest.approx(0.0, abs=1e-12)


def test_merge_counts():
    gt = np.zeros((4, 4, 8), np.uint16)
    gt[:, :, :4] = 1
    gt[:, :, 4:] = 2
    pred = (gt > 0).astype(np.uint16)  # both merged into one
    ap, tp, fp, fn = average_precision(gt, pred, (0.5,))
    # IoU of each GT cell with the merged cell is exactly 0.5: one may match
    assert (tp[0], fp[0], fn[0]) == (1, 0, 1)
    assert mean_cell_dice(gt, pred) == pytest.approx(2 * 64 / (64 + 128))
    assert matched_f1(gt, pred) == pytest.approx(2 / 3)
    # AJI: both GT cells pick the merged cell: C = 128, U = 128 + 128
    assert aggregated_jaccard(gt, pred) == pytest.approx(0.5)


def test_match_tie_is_one_to_one():
    gt = np.zeros((2, 2, 4), np.uint8)
    gt[..., :2] = 1
    gt[..., 2:] = 2
    pred = np.ones_like(gt)
    g, p = match(overlap_table(gt, pred), 0.5)
    assert len(g) == 1 and len(set(p)) == 1


def test_voxel_metrics_match_skimage():
    from skimage.metrics import adapted_rand_error as sk_are
    from skimage.metrics import variation_of_information as sk_voi

    gt, pred = _perturbed(5)
    are = adapted_rand_error(gt, pred)
    np.testing.assert_allclose(are, sk_are(gt, pred), rtol=1e-9)
    np.testing.assert_allclose(variation_of_information(gt, pred), sk_voi(gt, pred), rtol=1e-9, atol=1e-12)


def test_empty_images():
    z = np.zeros((4, 4, 4), np.uint16)
    ap, tp, fp, fn = average_precision(z, z)
    assert np.all(np.isnan(ap))
    one = z.copy()
    one[1:3, 1:3, 1:3] = 1
    ap, *_ = average_precision(one, z)
    np.testing.assert_array_equal(ap, 0.0)
    assert mean_cell_dice(one, z) == 0.0
    assert np.isnan(mean_cell_dice(z, one))
    assert aggregated_jaccard(z, one) == 0.0


def test_evaluate_border_modes():
    gt = voronoi_labels((24, 24, 24), 30, seed=6).astype(np.int32)
    t = overlap_table(gt, gt)
    n_border = int(t.gt_border.sum())
    assert 0 < n_border < t.n_gt
    pred = gt.copy()
    # ruin one border cell: give it to background
    border_id = int(t.gt_ids[np.flatnonzero(t.gt_border)[0]])
    pred[pred == border_id] = 0
    res = evaluate(gt, pred)
    assert res["border"] == "separate"
    assert res["n_gt"] == t.n_gt
    assert res["fn@0.5"] == 1
    assert res["interior"]["ap@0.5"] == 1.0
    assert res["interior"]["n_gt"] == t.n_gt - n_border
    assert res["touching_border"]["fn@0.5"] == 1
    assert res["touching_border"]["n_gt"] == n_border
    ex = evaluate(gt, pred, border="exclude")
    assert ex["ap@0.5"] == 1.0 and ex["n_gt"] == t.n_gt - n_border
    assert "voi_split" not in ex and "arand" in res
    inc = evaluate(gt, pred, border="include")
    assert inc["ap@0.5"] == pytest.approx((t.n_gt - 1) / t.n_gt)
    assert "interior" not in inc


def test_bad_input():
    a = np.zeros((4, 4, 4), np.int32)
    with pytest.raises(InputError, match="shapes"):
        overlap_table(a, np.zeros((4, 4, 5), np.int32))
    b = a.copy()
    b[0, 0, 0] = -1
    with pytest.raises(InputError, match=">= 0"):
        overlap_table(b, a)
    with pytest.raises(InputError, match="integers"):
        overlap_table(a + 0.5, a)
    with pytest.raises(ParameterError):
        evaluate(a, a, border="nope")
    with pytest.raises(ParameterError):
        average_precision(a, a, thresholds=(0.0,))
    # whole-number floats are accepted
    assert overlap_table(a.astype(np.float32), a).n_gt == 0


def test_large_ids_use_sparse_path():
    gt = voronoi_labels((10, 10, 10), 6, seed=7).astype(np.int64)
    pred = gt * (1 << 40)
    ap, *_ = average_precision(gt, pred)
    np.testing.assert_array_equal(ap, 1.0)


def test_error_breakdown_names_each_kind_of_error():
    """One cell of each kind: matched, missed, two merged, one split in three, a background blob."""
    from c3dseg.metrics import error_breakdown

    gt = np.zeros((4, 20, 60), np.int32)
    pred = np.zeros_like(gt)
    for k, (a, b) in enumerate(((0, 10), (10, 20), (20, 30), (30, 45), (45, 55)), start=1):
        gt[:, :10, a:b] = k
    pred[:, :10, 0:10] = 1                      # cell 1 matched
    pred[:, :10, 10:31] = 2                     # cells 2 and 3 merged (IoU 10/21 each)
    for j, a in enumerate((30, 35, 40)):        # cell 4 split in three
        pred[:, :10, a + (a == 30):a + 5] = 3 + j
    pred[:, 12:18, 0:10] = 6                    # a blob in the background; cell 5 missed
    e = error_breakdown(gt, pred)
    assert e["gt"] == {"cells": 5, "matched": 1, "missed": 1, "merged": 2, "split": 1, "other": 0}
    assert e["pred"] == {"cells": 6, "matched": 1, "background": 1, "merge": 1, "fragment": 3, "other": 0}
    perfect = error_breakdown(gt, gt)
    assert perfect["gt"]["matched"] == 5 and perfect["pred"]["fragment"] == 0
    # every cell touches a face of this volume: nothing is left in the interior
    assert error_breakdown(gt, pred, exclude_border=True)["gt"]["cells"] == 0

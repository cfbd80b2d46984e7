"""Reconstruction: the round-trip oracle (labels -> flows -> labels), each stage, the filters,
the XPIWIT tracking filter and bad input."""

import os

import numpy as np
import pytest
from scipy import ndimage as ndi

from c3dseg.errors import InputError, ParameterError
from c3dseg.flows import labels_to_prediction, tanh_flows
from c3dseg.image import Image
from c3dseg.labels import relabel_consecutive
from c3dseg.metrics import evaluate
from c3dseg.reconstruction import (_step_map, axis_ratio_per_cell, closed_end_map, cluster_sinks,
                                   filter_by_axis_ratio, filter_by_flow_error,
                                   filter_by_foreground_overlap, filter_by_size,
                                   flow_error_per_cell, reconstruct, sink_labels, smooth_flows,
                                   sink_map_reach, sphere_volume, track, track_voxels)
from c3dseg.synthesis import voronoi_labels


def _ellipsoid_outside(shape, frac=0.48):
    g = np.indices(shape).astype(float)
    c = (np.array(shape)[:, None, None, None] - 1) / 2
    return np.sqrt((((g - c) / (np.array(shape)[:, None, None, None] * frac)) ** 2).sum(0)) > 1


# name -> (labels, reconstruct keywords)
CASES = {
    "dense": (lambda: voronoi_labels((40, 44, 48), 16, seed=1), {}),
    "elongated": (lambda: voronoi_labels((32, 32, 96), 10, seed=2, spacing=(1, 1, 1 / 3)), {}),
    "sizes": (lambda: voronoi_labels((48, 48, 48), 14, seed=3,
                                     weights=np.r_[np.full(3, 250.0), np.zeros(11)]), {}),
    "anisotropic": (lambda: voronoi_labels((20, 64, 64), 16, seed=5, spacing=(3, 1, 1)), {}),
    "background": (lambda: voronoi_labels((36, 40, 40), 8, seed=8,
                                          background=_ellipsoid_outside((36, 40, 40))), {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    make, kw = CASES[request.param]
    return request.param, make(), kw


@pytest.mark.parametrize("flow_type", ["tanh", "heat"])
def test_round_trip_oracle(case, flow_type):
    name, lab, kw = case
    pred = labels_to_prediction(lab, flow_type)
    rec = reconstruct(pred[0], pred[1:], flow_type=flow_type, **kw)
    assert rec.dtype == np.uint16
    ids = np.unique(rec[rec > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # 1..N consecutive
    res = evaluate(lab, rec)
    assert res["ap@0.5"] >= 0.99, (name, res)
    assert res["mean_dice"] >= 0.99, (name, res)
    if name == "dense":
        assert res["touching_border"]["n_gt"] > 0 and res["touching_border"]["ap@0.5"] == 1.0


def test_thin_cells_need_less_smoothing():
    """A sliver 2-4 voxels thick (cut by the tissue outline) drowns in its neighbour's flows
    once smoothed with sigma 1; unsmoothed flows recover it (r_min 3: it has 298 voxels)."""
    lab = voronoi_labels((36, 40, 40), 10, seed=7, background=_ellipsoid_outside((36, 40, 40)))
    pred = labels_to_prediction(lab, "tanh")
    smoothed = evaluate(lab, reconstruct(pred[0], pred[1:], min_radius_voxels=3))
    sharp = evaluate(lab, reconstruct(pred[0], pred[1:], min_radius_voxels=3, smoothing_sigma=0))
    assert smoothed["ap@0.5"] < 1.0 and sharp["ap@0.5"] == 1.0 and sharp["mean_dice"] > 0.99


def test_round_trip_with_noisy_flows():
    lab = voronoi_labels((40, 44, 48), 16, seed=1)
    rng = np.random.default_rng(0)
    for flow_type in ("tanh", "heat"):
        pred = labels_to_prediction(lab, flow_type)
        pred[1:] += rng.normal(0, 0.3, pred[1:].shape).astype(np.float32)
        res = evaluate(lab, reconstruct(pred[0], pred[1:], flow_type=flow_type))
        assert res["ap@0.5"] >= 0.9 and res["mean_dice"] >= 0.95, (flow_type, res)


def test_round_trip_linear_interpolation_and_reference_scale():
    lab = voronoi_labels((32, 36, 40), 10, seed=8)
    pred = labels_to_prediction(lab, "tanh")
    res = evaluate(lab, reconstruct(pred[0], pred[1:], interpolation="linear"))
    assert res["ap@0.5"] >= 0.99 and res["mean_dice"] >= 0.98
    pred = labels_to_prediction(lab, "tanh", scale=5.0)  # the reference code's flows
    res = evaluate(lab, reconstruct(pred[0], pred[1:], flow_scale=5.0))
    assert res["ap@0.5"] >= 0.99


def test_spacing_scales_the_step(monkeypatch):
    import c3dseg.reconstruction as rec_mod

    monkeypatch.setattr(rec_mod, "_SETTLE_STEPS", 0)  # one step exactly
    lab = voronoi_labels((20, 64, 64), 16, seed=5, spacing=(3, 1, 1))
    pred = labels_to_prediction(lab, "heat")
    flows = pred[1:]
    s0, e0 = track_voxels(flows, lab > 0, step=4, n_iter=1)
    s1, e1 = track_voxels(flows, lab > 0, step=4, n_iter=1, spacing=(3, 1, 1))
    dz0 = np.abs(e0 // (64 * 64) - s0 // (64 * 64)).max()
    dz1 = np.abs(e1 // (64 * 64) - s1 // (64 * 64)).max()
    assert dz0 == 4 and dz1 <= 2
    res = evaluate(lab, reconstruct(pred[0], flows, flow_type="heat", spacing=(3, 1, 1)))
    assert res["ap@0.5"] >= 0.99


# -- tracking -------------------------------------------------------------------------------

def _naive_nearest(flows, mask, step, n_iter, sigma, raw_first):
    start = np.flatnonzero(mask).astype(np.int32)
    steps = (float(step),) * 3
    first = _step_map(flows, 0.0, start, mask.shape, steps) if raw_first else None
    nxt = _step_map(flows, sigma, start, mask.shape, steps)
    cur = np.arange(len(start)) if first is None else first
    for _ in range(n_iter - (1 if raw_first else 0)):
        cur = nxt[cur]
    unit = _step_map(flows, sigma, start, mask.shape, (1.0, 1.0, 1.0))
    for _ in range(16):  # the settling unit steps
        cur = unit[cur]
    return start[cur]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("n_iter", [0, 1, 2, 7, 100, 129])
def test_pointer_doubling_equals_naive_iteration(n_iter, threads):
    rng = np.random.default_rng(n_iter)
    flows = rng.normal(0, 0.7, (3, 9, 10, 11)).astype(np.float32)
    mask = rng.random((9, 10, 11)) > 0.2
    for sigma, raw in ((0.0, False), (1.0, True)):
        _, end = track_voxels(flows, mask, step=3.0, n_iter=n_iter, sigma=sigma,
                              unsmoothed_first_step=raw, threads=threads)
        if n_iter == 0:
            np.testing.assert_array_equal(end, np.flatnonzero(mask))
            continue
        np.testing.assert_array_equal(end, _naive_nearest(flows, mask, 3.0, n_iter, sigma, raw))


def test_step_map_mask_gather_and_rounding():
    """The boolean-mask gather gives the same map as the index gather, and a move rounds like
    the position it leads to (moves clipped at the volume faces)."""
    rng = np.random.default_rng(3)
    flows = rng.normal(0, 1.0, (3, 6, 7, 8)).astype(np.float32)
    mask = rng.random((6, 7, 8)) > 0.3
    start = np.flatnonzero(mask).astype(np.int32)
    a = _step_map(flows, 0.0, start, mask.shape, (2.0, 2.0, 2.0))
    b = _step_map(flows, 0.0, start, mask.shape, (2.0, 2.0, 2.0), mask=mask)
    np.testing.assert_array_equal(a, b)
    # the same map, one point at a time
    lut = np.full(mask.size, -1)
    lut[start] = np.arange(len(start))
    for k in rng.choice(len(start), 40, replace=False):
        p = np.array(np.unravel_index(start[k], mask.shape), float)
        d = -2.0 * flows[(slice(None),) + tuple(p.astype(int))].astype(np.float64)
        big = np.abs(d).max()
        if 1e-4 * 2.0 < big < 0.5:
            d = d / big
        q = np.clip(p + np.rint(d), 0, np.array(mask.shape) - 1).astype(int)
        j = lut[np.ravel_multi_index(tuple(q), mask.shape)]
        assert a[k] == (k if j < 0 else j)


def test_threads_do_not_change_results():
    from c3dseg.resampling import resample

    lab = voronoi_labels((20, 24, 28), 12, seed=5)
    pred = labels_to_prediction(lab, "tanh")
    rng = np.random.default_rng(0)
    flows = np.clip(pred[1:] + rng.normal(0, 0.3, pred[1:].shape).astype(np.float32), -1, 1)
    ref = smooth_flows(flows, 1.0)
    np.testing.assert_array_equal(ref, smooth_flows(flows, 1.0, threads=3))
    np.testing.assert_array_equal(smooth_flows(flows, (2.0, 1.0, 0.5)),
                                  smooth_flows(flows, (2.0, 1.0, 0.5), threads=4))
    inplace = flows.copy()
    smooth_flows(inplace, 1.0, out=inplace, threads=2)
    np.testing.assert_array_equal(ref, inplace)
    mask = pred[0] > 0.5
    e1 = track(flows, mask, sigma=1.0, threads=1)
    e3 = track(flows, mask, sigma=1.0, threads=3)
    np.testing.assert_array_equal(e1, e3)
    from c3dseg.reconstruction import _ball_dilation
    occ = rng.random((40, 9, 11)) > 0.97
    for r in (1, 2, 4):
        np.testing.assert_array_equal(_ball_dilation(occ, r), _ball_dilation(occ, r, threads=3))
    for r in (1, 3):
        np.testing.assert_array_equal(cluster_sinks(e1, closing_radius=r),
                                      cluster_sinks(e1, closing_radius=r, threads=3))
    r1, s1 = axis_ratio_per_cell(lab)
    r3, s3 = axis_ratio_per_cell(lab, threads=3)
    np.testing.assert_array_equal(r1, r3)
    np.testing.assert_array_equal(s1, s3)
    err1, n1 = flow_error_per_cell(lab, flows, threads=1)
    err3, n3 = flow_error_per_cell(lab, flows, threads=3)
    np.testing.assert_allclose(err1, err3, rtol=1e-12)
    np.testing.assert_array_equal(n1, n3)
    img = rng.random((20, 24, 28)).astype(np.float32)
    r1, _ = resample(img, (2.0, 1.0, 1.0), (150, 30, 20), threads=1)
    r2, _ = resample(img, (2.0, 1.0, 1.0), (150, 30, 20), threads=2)
    np.testing.assert_array_equal(r1, r2)


def test_flow_filters_read_tile_merger_planes_without_a_copy():
    from c3dseg.filters.instances import _planes_view

    base = np.zeros((4, 3, 4, 5), np.float32)
    view = _planes_view([base[1], base[2], base[3]])
    assert view is not None and np.shares_memory(view, base) and view.shape == (3, 3, 4, 5)
    assert _planes_view([base[0], base[1], base[2]]) is not None
    assert _planes_view([base[1], base[3], base[2]]) is None            # not in order
    assert _planes_view([base[1], base[2], base[3].copy()]) is None     # not one array
    assert _planes_view([base[1, :, :2], base[2, :, :2], base[3, :, :2]]) is None
    assert _planes_view([base[1].astype(np.float64)] * 3) is None


def test_track_moves_only_foreground_and_stays_inside():
    lab = voronoi_labels((20, 22, 24), 6, seed=9)
    flows = tanh_flows(lab)
    mask = lab > 0
    mask[:, :, :5] = False
    ends = track(flows, mask)
    assert ends.shape == (3,) + lab.shape and ends.dtype == np.float32
    assert np.all(np.isnan(ends[:, ~mask]))
    e = ends[:, mask]
    assert np.all(e >= 0) and np.all(e <= np.array(lab.shape)[:, None] - 1)
    # end points lie on foreground voxels (moves out of the mask are refused)
    ei = np.rint(e).astype(int)
    assert mask[tuple(ei)].all()
    # points pushed against the volume faces are clamped
    out = np.ones((3, 6, 6, 6), np.float32)
    ends = track(out, np.ones((6, 6, 6), bool), step=2, n_iter=10)
    assert np.all(ends == 0)
    lin = track(out * -1, np.ones((6, 6, 6), bool), step=2, n_iter=10, interpolation="linear")
    np.testing.assert_allclose(lin, 5)


def test_smooth_flows_and_unsmoothed_first_step():
    lab = voronoi_labels((24, 24, 24), 8, seed=10)
    flows = tanh_flows(lab)
    sm = smooth_flows(flows, 1.0)
    assert sm.shape == flows.shape and not np.shares_memory(sm, flows)
    assert np.abs(sm).max() <= np.abs(flows).max()
    np.testing.assert_array_equal(smooth_flows(flows, 0.0), flows)
    # tracking pre-smoothed flows with the raw first step equals smoothing inside the tracker
    a = track(sm, lab > 0, first_step_flows=flows)
    b = track(flows, lab > 0, sigma=1.0)
    np.testing.assert_array_equal(a, b)


# -- sinks ----------------------------------------------------------------------------------

def test_sink_labels_closing_and_components():
    shape = (20, 20, 20)
    blob = np.argwhere(np.ones((3, 3, 3))).T + 3          # a dense 3^3 cloud
    pair = np.array([[15, 15], [15, 15], [10, 13]])       # two points 3 voxels apart
    pts = np.concatenate([blob, pair], axis=1)
    lab, n = sink_labels(pts, shape, closing_radius=0)
    assert n == 3 and len(set(lab[:27])) == 1
    # a closing fills the gap between two clouds
    gap = np.concatenate([blob, blob + np.array([[0], [0], [5]])], axis=1)
    assert sink_labels(gap, shape, closing_radius=0)[1] == 2
    assert sink_labels(gap, shape, closing_radius=3)[1] == 1
    # isolated end voxels are marked as unit balls first: they join up to ~2 sqrt(2r + 1) apart
    for d, expect in ((3, (2, 1, 1, 1)), (5, (2, 2, 1, 1)), (6, (2, 2, 2, 2))):
        p2 = np.array([[10, 10], [10, 10], [5, 5 + d]])
        assert tuple(sink_labels(p2, shape, closing_radius=r)[1] for r in range(4)) == expect, d
    # diagonal neighbours: one sink when fully connected, two when 6-connected
    diag = np.array([[5, 6], [5, 6], [5, 6]])
    assert sink_labels(diag, shape, closing_radius=0, fully_connected=True)[1] == 1
    assert sink_labels(diag, shape, closing_radius=0, fully_connected=False)[1] == 2
    # points on a face are not eroded away
    face = np.array([[0, 0, 0], [0, 1, 2], [0, 0, 0]])
    lab, n = sink_labels(face, shape, closing_radius=3)
    assert n == 1 and np.all(lab == 1)
    # linear indices work too
    lab2, n2 = sink_labels(np.ravel_multi_index(tuple(pts), shape), shape, closing_radius=0)
    assert n2 == 3


@pytest.mark.parametrize("r", [0, 1, 3])
def test_closed_end_map_over_a_box(r):
    """A box of the closed map from the end voxels within sink_map_reach of it equals that box of
    the whole map (what the blockwise sinks rely on)."""
    rng = np.random.default_rng(r)
    shape = (19, 23, 21)
    pts = np.stack([rng.integers(0, s, 60) for s in shape])
    whole = closed_end_map(pts, shape, r)
    assert whole.shape == shape and whole[tuple(pts)].all()
    if r:
        assert whole.sum() > 2 * len(np.unique(np.ravel_multi_index(tuple(pts), shape)))   # marked and closed
    reach = sink_map_reach(r)
    assert reach == (2 * r + 1 if r else 0)
    for lo, hi in (((0, 0, 0), (7, 9, 8)), ((6, 8, 7), (13, 15, 14)), ((12, 15, 14), shape)):
        lo, hi = np.array(lo), np.array(hi)
        near = np.all((pts >= (lo - reach)[:, None]) & (pts < (hi + reach)[:, None]), axis=0)
        box = closed_end_map(pts[:, near], shape, r, lo=lo, hi=hi)
        assert np.array_equal(box, whole[tuple(slice(a, b) for a, b in zip(lo, hi))])


@pytest.mark.parametrize("region", ["box", "slab", "whole"])
def test_sink_labels_equal_the_whole_maps_components(region):
    """sink_labels closes and labels only the points' bounding box grown by the map's reach: the
    labels (numbers included) equal the consecutive components of the whole volume's map."""
    rng = np.random.default_rng(7)
    shape = (30, 34, 32)
    lo, hi = {"box": ((9, 5, 11), (21, 22, 25)), "slab": ((10, 0, 0), (20, 34, 32)),
              "whole": ((0, 0, 0), shape)}[region]
    centres = np.stack([rng.integers(a, b, 12) for a, b in zip(lo, hi)])
    pts = np.concatenate([np.clip(centres + rng.integers(-1, 2, centres.shape), 0, np.array(shape)[:, None] - 1)
                          for _ in range(6)], axis=1)
    comp, _ = ndi.label(closed_end_map(pts, shape, 1), np.ones((3, 3, 3), bool))
    raw = comp[tuple(pts)]
    _, expected = np.unique(raw, return_inverse=True)          # consecutive in component order
    for given in (pts, np.ravel_multi_index(tuple(pts), shape)):
        lab, n = sink_labels(given, shape, closing_radius=1)
        assert n == expected.max() + 1 > 3
        np.testing.assert_array_equal(lab, expected + 1)


def test_cluster_sinks_dense_and_compact_agree():
    lab = voronoi_labels((24, 26, 28), 9, seed=11)
    flows = tanh_flows(lab)
    mask = lab > 0
    start, end = track_voxels(flows, mask, sigma=1.0)
    compact = cluster_sinks(end, start=start, shape=lab.shape)
    dense = cluster_sinks(track(flows, mask, sigma=1.0))
    np.testing.assert_array_equal(compact, dense)
    assert evaluate(lab, dense)["ap@0.5"] == 1.0


# -- filters --------------------------------------------------------------------------------

def test_filter_by_size():
    lab = np.zeros((10, 10, 30), np.uint16)
    lab[:2, :2, :2] = 4           # 8 voxels
    lab[3:8, 3:8, 3:8] = 9        # 125
    lab[:, :, 12:] = 2            # 1800
    out = filter_by_size(lab, min_volume_voxels=10, max_volume_voxels=1000)
    assert set(np.unique(out).tolist()) == {0, 9}
    assert out.dtype == lab.dtype and lab.max() == 9  # input untouched
    assert sphere_volume(5) == pytest.approx(523.5988, rel=1e-6)


def test_filter_by_foreground_overlap():
    lab = np.zeros((4, 4, 8), np.uint16)
    lab[..., :4] = 1
    lab[..., 4:] = 2
    fg = np.zeros(lab.shape, bool)
    fg[..., :5] = True              # all of cell 1, a quarter of cell 2
    out = filter_by_foreground_overlap(lab, fg, min_overlap=0.3)
    assert set(np.unique(out).tolist()) == {0, 1}
    assert set(np.unique(filter_by_foreground_overlap(lab, fg, min_overlap=0.2)).tolist()) == {1, 2}


@pytest.mark.parametrize("flow_type", ["tanh", "heat"])
def test_filter_by_flow_error(flow_type):
    lab = voronoi_labels((20, 22, 24), 6, seed=12)
    pred = labels_to_prediction(lab, flow_type)[1:]
    err, size = flow_error_per_cell(lab, pred, flow_type=flow_type)
    assert err[1:].max() < 0.05
    bad = pred.copy()
    bad[:, lab == 3] *= -1  # flows pointing inwards
    out = filter_by_flow_error(lab, bad, flow_type=flow_type, max_error=0.5)
    assert set(np.unique(out).tolist()) == {0, 1, 2, 4, 5, 6}


def test_filter_by_axis_ratio():
    lab = np.zeros((30, 30, 30), np.uint16)
    z, y, x = np.indices(lab.shape)
    lab[((z - 10) ** 2 + (y - 10) ** 2 + (x - 10) ** 2) <= 36] = 1   # a ball
    lab[25, 2, 2:28] = 2                                              # a rod 1 x 1 x 26
    ratio, size = axis_ratio_per_cell(lab)
    assert ratio[1] > 0.95 and ratio[2] < 0.1
    out = filter_by_axis_ratio(lab, min_ratio=0.1)
    assert set(np.unique(out).tolist()) == {0, 1}


def test_relabel_consecutive_and_uint32():
    lab = np.zeros((3, 4, 5), np.uint32)
    lab[0, 0, :3] = [7, 70000, 12]
    out = relabel_consecutive(lab)
    assert out.dtype == np.uint16 and list(out[0, 0, :4]) == [1, 3, 2, 0]
    # more than 65535 cells: uint32 with a warning, never wrapped
    many = np.arange(70000, dtype=np.uint32).reshape(1, 70, 1000) * 3
    with pytest.warns(UserWarning, match="uint32"):
        out = relabel_consecutive(many)
    assert out.dtype == np.uint32 and out.max() == 69999


def test_more_than_65535_sinks_give_uint32():
    shape = (1, 600, 500)
    zz, yy, xx = np.meshgrid([0], np.arange(0, 600, 2), np.arange(0, 500, 2), indexing="ij")
    pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()])
    lin = np.ravel_multi_index(tuple(pts), shape)
    with pytest.warns(UserWarning, match="uint32"):
        lab = cluster_sinks(lin, start=lin, shape=shape, closing_radius=0, fully_connected=False)
    assert lab.dtype == np.uint32 and lab.max() == pts.shape[1] > 65535


# -- bad input ------------------------------------------------------------------------------

def test_bad_input():
    flows = np.zeros((3, 4, 5, 6), np.float32)
    mask = np.ones((4, 5, 6), bool)
    with pytest.raises(InputError, match="shape"):
        track(flows, np.ones((4, 5, 7), bool))
    with pytest.raises(InputError, match="shape"):
        reconstruct(np.ones((4, 5, 7)), flows)
    with pytest.raises(InputError, match=r"\(3, Z, Y, X\)"):
        track(flows[:2], mask)
    m = mask.astype(np.uint8)
    m[0, 0, 0] = 2
    with pytest.raises(InputError, match="not binary"):
        track(flows, m)
    track(flows, mask.astype(np.float32))  # 0/1 floats are fine
    half = mask.copy()
    half[:2] = False
    np.testing.assert_array_equal(track(flows, half.astype(np.uint8)), track(flows, half))      # 0/1 bytes
    np.testing.assert_array_equal(track(flows, half.astype(np.uint8) * 255), track(flows, half))  # 0/255
    bad = flows.copy()
    bad[0, 1, 1, 1] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        track(bad, mask)
    bad[0, 1, 1, 1] = np.inf
    with pytest.raises(InputError, match="non-finite"):
        reconstruct(np.ones((4, 5, 6)), bad)
    with pytest.raises(ParameterError):
        track(flows, mask, step=0)
    with pytest.raises(ParameterError):
        track(flows, mask, interpolation="cubic")
    with pytest.raises(ParameterError):
        track(flows, mask, n_iter=-1)
    with pytest.raises(InputError, match="integers"):
        filter_by_size(np.full((3, 3, 3), 1.5))
    with pytest.raises(InputError, match=">= 0"):
        filter_by_axis_ratio(-np.ones((3, 3, 3), np.int16))


def test_empty_foreground_warns_and_gives_empty_labels():
    flows = np.zeros((3, 5, 6, 7), np.float32)
    with pytest.warns(UserWarning, match="empty foreground"):
        lab = reconstruct(np.zeros((5, 6, 7), np.float32), flows)
    assert lab.shape == (5, 6, 7) and lab.dtype == np.uint16 and not lab.any()
    with pytest.warns(UserWarning, match="empty foreground"):
        lab = cluster_sinks(np.full((3, 5, 6, 7), np.nan, np.float32))
    assert not lab.any()


# -- filters over the stages ------------------------------------------------------------------

def _images(lab, flow_type="tanh"):
    pred = labels_to_prediction(lab, flow_type)
    return [Image(pred[k], (1.0, 1.0, 1.0), {"basename": "p"}) for k in range(4)]


def test_stage_filters_match_reconstruct():
    from c3dseg.filters.instances import (FlowSmoothingFilter, FlowTrackingFilter,
                                          InstanceAxisRatioFilter, InstanceFlowErrorFilter,
                                          InstanceForegroundOverlapFilter, InstanceSizeFilter,
                                          RelabelConsecutiveFilter, SinkClusteringFilter)

    lab = voronoi_labels((24, 28, 30), 9, seed=13)
    fg, fz, fy, fx = _images(lab)
    (mask, sz, sy, sx), _ = FlowSmoothingFilter({"Sigma": "1"}).run([fg, fz, fy, fx], [])
    assert mask.data.dtype == np.uint8
    (ends,), _ = FlowTrackingFilter({}).run([mask, sz, sy, sx, fz, fy, fx], [])
    assert ends.data.shape == (3,) + lab.shape
    (labels,), _ = SinkClusteringFilter({}).run([ends], [])
    (labels,), _ = InstanceSizeFilter({"MinRadiusVoxels": "5"}).run([labels], [])
    (labels,), _ = InstanceForegroundOverlapFilter({}).run([labels, mask], [])
    (labels,), _ = InstanceFlowErrorFilter({}).run([labels, fz, fy, fx], [])
    (labels,), _ = InstanceAxisRatioFilter({}).run([labels], [])
    (labels,), _ = RelabelConsecutiveFilter({}).run([labels], [])
    pred = np.stack([i.data for i in (fg, fz, fy, fx)])
    np.testing.assert_array_equal(labels.data, reconstruct(pred[0], pred[1:]))
    assert labels.meta["is_label"] and labels.data.dtype == np.uint16


def test_flow_reconstruction_filter_and_units():
    from c3dseg.filters.instances import FlowReconstructionFilter, InstanceSizeFilter

    lab = voronoi_labels((24, 28, 30), 9, seed=13)
    imgs = _images(lab, "heat")
    (out,), _ = FlowReconstructionFilter({"FlowType": "heat"}).run(imgs, [])
    assert evaluate(lab, out.data)["ap@0.5"] == 1.0
    aniso = [im.derive(im.data) for im in imgs]
    for im in aniso:
        im.spacing = (3.0, 1.0, 1.0)
    (o3,), _ = FlowReconstructionFilter({"FlowType": "heat", "UseImageSpacing": "1"}).run(aniso, [])
    pred = np.stack([im.data for im in imgs])
    np.testing.assert_array_equal(o3.data, reconstruct(pred[0], pred[1:], flow_type="heat",
                                                       spacing=(3.0, 1.0, 1.0)))
    # MinRadiusUm uses the spacing: at 2 um voxels, 6 um = 3 voxels
    small = np.zeros((10, 10, 10), np.uint16)
    small[:3, :3, :3] = 1         # 27 voxels: r_eq = 1.86 voxels
    small[4:10, 4:10, 4:10] = 2   # 216 voxels: r_eq = 3.72 voxels
    img = Image(small, (2.0, 2.0, 2.0))
    (o,), _ = InstanceSizeFilter({"MinRadiusUm": "6"}).run([img], [])
    assert set(np.unique(o.data).tolist()) == {0, 2}
    (o,), _ = InstanceSizeFilter({"MinRadiusVoxels": "1", "MaxRadiusVoxels": "3"}).run([img], [])
    assert set(np.unique(o.data).tolist()) == {0, 1}


def test_xpiwit_tracking_filter_takes_reversed_flows():
    from c3dseg.filters.instances import GradientVectorFlowTrackingImageFilter as GVF

    lab = voronoi_labels((24, 28, 30), 9, seed=14)
    fg, fz, fy, fx = _images(lab)
    mask = fg.derive((fg.data > 0.5).astype(np.float32))
    assert GVF({}).p["ClosingRadius"] == 3 and GVF({}).p["NumIterations"] == 25  # XPIWIT's
    params = {"NumIterations": "100", "StepSize": "4", "ClosingRadius": "1"}
    (out,), _ = GVF(params).run([fx, fy, fz, mask], [])
    assert out.data.dtype == np.uint16
    assert evaluate(lab, out.data)["ap@0.5"] == 1.0
    (wrong,), _ = GVF(params).run([fz, fy, fx, mask], [])  # flows in the model's order: wrong
    assert evaluate(lab, wrong.data)["ap@0.5"] < 0.9
    # IgnoreBackground=0 tracks every voxel: background gets labels too
    mask.data[:, :, :4] = 0
    (all_,), _ = GVF({**params, "IgnoreBackground": "0"}).run([fx, fy, fz, mask], [])
    assert all_.data[:, :, :4].all()
    with pytest.raises(InputError, match="GradientVectorFlowTrackingImageFilter"):
        GVF(params).run([fx, fy, fz, mask.derive(mask.data[:, :, :-1])], [])


# -- shipped pipelines through the runner -----------------------------------------------------

def _run(args):
    from c3dseg.runner.cli import main

    assert main(args + ["-q"]) == 0


@pytest.mark.parametrize("flow_type", ["tanh", "heat"])
def test_pipelines_round_trip_through_c3d_run(tmp_path, flow_type):
    from c3dseg.io import read_image, write_image
    import c3dseg

    pipes = os.path.join(os.path.dirname(c3dseg.__file__), "pipelines")
    lab = voronoi_labels((28, 32, 36), 8, seed=15, spacing=(2.0, 1.0, 1.0))
    write_image(str(tmp_path / "labels.tif"), Image(lab, (2.0, 1.0, 1.0), {"is_label": True}))
    _run([os.path.join(pipes, "flows_from_labels.xml"), "-i", str(tmp_path / "labels.tif"),
          "-o", str(tmp_path / "pred.tif"), "--set", f"LabelsToFlows.FlowType={flow_type}"])
    pred = read_image(str(tmp_path / "pred.tif"))
    assert pred.data.shape == (4,) + lab.shape and pred.data.dtype == np.float32
    assert pred.spacing == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(pred.data, labels_to_prediction(lab, flow_type))
    _run([os.path.join(pipes, "reconstruct.xml"), "-i", str(tmp_path / "pred.tif"),
          "-o", str(tmp_path / "rec.tif"), "--set", f"InstanceFlowErrorFilter.FlowType={flow_type}"])
    rec = read_image(str(tmp_path / "rec.tif"))
    assert rec.data.dtype == np.uint16 and rec.spacing == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(rec.data, reconstruct(pred.data[0], pred.data[1:], flow_type=flow_type))
    res = evaluate(lab, rec.data)
    assert res["ap@0.5"] >= 0.99 and res["mean_dice"] >= 0.99


XPIWIT_FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "xpiwit",
                              "Cellpose3D.xml")


@pytest.mark.skipif(not os.path.exists(XPIWIT_FIXTURE), reason="../shared/fixtures/xpiwit absent")
def test_xpiwit_cellpose3d_post_processing_runs_as_is(tmp_path):
    """The published Cellpose3D.xml with its TorchModel replaced by the channels of a stored
    prediction: threshold, volume rejection, the three Gaussians and the GVF tracking run
    unchanged."""
    from lxml import etree

    from c3dseg.io import read_image, write_image

    lab = voronoi_labels((40, 44, 48), 16, seed=1)
    pred = labels_to_prediction(lab, "tanh")
    write_image(str(tmp_path / "pred.tif"), Image(pred, (1.0, 1.0, 1.0)))
    tree = etree.parse(XPIWIT_FIXTURE)
    items = {it.get("item_id"): it for it in tree.iter("item")}
    # the reader keeps the stored values; the network becomes a channel splitter
    reader = items["item_0001"]
    for p in reader.iter("parameter"):
        if p.get("key") in ("InputMinimumValue", "InputMaximumValue"):
            p.set("value", "-1")
    args = reader.find("arguments")
    etree.SubElement(args, "parameter", key="KeepDataType", value="1", type="3")
    net = items["item_0002"]
    net.find("name").text = "ChannelSplitter"
    inp = net.find("input")
    for extra in list(inp)[1:]:
        inp.remove(extra)
    inp.set("number_images", "1")
    inp[0].set("item_id_ref", "item_0001")
    for p in list(net.find("arguments")):
        if p.get("key") not in ("WriteResult", "WriteMetaData", "MaxThreads", "Compression", "Precision"):
            net.find("arguments").remove(p)
    items["item_0007"].find("arguments").append(
        etree.Element("parameter", key="StepSize", value="4", type="1"))
    for p in items["item_0007"].iter("parameter"):
        if p.get("key") == "NumIterations":
            p.set("value", "100")
    xml = tmp_path / "Cellpose3D_stored_prediction.xml"
    tree.write(str(xml), xml_declaration=True, encoding="UTF-8")
    _run([str(xml), "-i", str(tmp_path / "pred.tif"), "-o", str(tmp_path / "out")])
    found = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "out") for f in fs
             if "GradientVectorFlowTracking" in f and f.endswith(".tif")]
    assert len(found) == 1
    out = read_image(found[0])
    assert out.data.dtype == np.uint16
    res = evaluate(lab, out.data)
    assert res["ap@0.5"] >= 0.95 and res["mean_dice"] >= 0.95

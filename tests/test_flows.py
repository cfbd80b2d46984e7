"""Flow targets from labels: tanh (adaptive, per cell, fixed), heat diffusion, foreground, filter."""

import logging

import numpy as np
import pytest
from scipy.spatial import Delaunay

from c3dseg.errors import InputError, ParameterError
from c3dseg.flows import (cell_statistics, foreground_target, heat_flows, iter_tanh_flows,
                          labels_to_prediction, tanh_flows)
from c3dseg.image import Image
from c3dseg.synthesis import voronoi_labels


def _centroids(lab):
    ids = [i for i in np.unique(lab) if i]
    return {i: np.array([c.mean() for c in np.nonzero(lab == i)]) for i in ids}


def _box(shape, lo, hi, value=1, lab=None):
    lab = np.zeros(shape, np.uint16) if lab is None else lab
    lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return lab


@pytest.fixture(scope="module")
def tissue():
    return voronoi_labels((24, 28, 26), 10, seed=3)


def test_tanh_fixed_scale_matches_reference_formula(tissue):
    f = tanh_flows(tissue, 5.0)
    assert f.dtype == np.float32 and f.shape == (3,) + tissue.shape
    grid = np.indices(tissue.shape)
    for i, c in _centroids(tissue).items():
        m = tissue == i
        for a in range(3):
            np.testing.assert_allclose(f[a][m], np.tanh((grid[a][m] - c[a]) / 5.0), atol=2e-6)


def test_tanh_fixed_scale_in_micrometres(tissue):
    spacing = (2.0, 1.0, 0.5)
    f = tanh_flows(tissue, 5.0, spacing=spacing)
    grid = np.indices(tissue.shape)
    for i, c in list(_centroids(tissue).items())[:3]:
        m = tissue == i
        for a in range(3):
            np.testing.assert_allclose(f[a][m], np.tanh((grid[a][m] - c[a]) * spacing[a] / 5.0), atol=2e-6)


@pytest.mark.parametrize("scale", ["adaptive", "axis", 3.0])
def test_tanh_points_away_from_centroid_and_background_zero(tissue, scale):
    lab = tissue.copy()
    lab[:, :3] = 0  # some background
    f = tanh_flows(lab, scale)
    assert np.all(f[:, lab == 0] == 0)
    assert np.all(np.abs(f) < 1)
    grid = np.indices(lab.shape)
    for i, c in _centroids(lab).items():
        m = lab == i
        for a in range(3):
            assert np.all(f[a][m] * (grid[a][m] - c[a]) >= 0)


def test_tanh_adaptive_scales_each_cell_by_its_size():
    lab = np.zeros((40, 40, 60), np.uint16)
    lab[5:36, 5:36, 2:58] = 1      # big
    lab[15:22, 15:22, 28:35] = 2   # small, inside the big one
    lab[1:3, 1:4, 1:3] = 3         # tiny: the minimum scale applies
    f = tanh_flows(lab)
    grid = np.indices(lab.shape)
    for i in (1, 2, 3):
        m = lab == i
        r_eq = (3 * m.sum() / (4 * np.pi)) ** (1 / 3)
        s = max(2.5, r_eq / 1.25)
        c = [g[m].mean() for g in grid]
        for a in range(3):  # one divisor for every axis
            np.testing.assert_allclose(f[a][m], np.tanh((grid[a][m] - c[a]) / s), atol=3e-6)
    # the same relative position gives the same flow in the small and the big cell
    small = f[2][18, 18, 34]
    rel = (34 - 31.0) / max(2.5, (3 * 343 / (4 * np.pi)) ** (1 / 3) / 1.25)
    assert small == pytest.approx(np.tanh(rel), rel=1e-5)


def test_tanh_axis_is_the_authors_per_extent_variant():
    lab = np.zeros((12, 20, 30), np.uint16)
    lab[2:10, 3:9, 4:27] = 1
    f = tanh_flows(lab, "axis")
    zs, ys, xs = np.nonzero(lab == 1)
    for a, co in enumerate((zs, ys, xs)):
        c = co.mean()
        lo, hi = co.min(), co.max() + 1  # hi exclusive
        s = max(1.0, min(abs(c - lo), abs(c - hi)) / 3)
        np.testing.assert_allclose(f[a][lab == 1], np.tanh((co - c) / s), atol=3e-6)


def test_tanh_ids_need_not_be_consecutive(tissue):
    big = tissue.astype(np.int64) * 1_000_003
    np.testing.assert_array_equal(tanh_flows(big), tanh_flows(tissue))
    np.testing.assert_array_equal(tanh_flows(tissue.astype(np.uint32) * 3), tanh_flows(tissue))


def test_iter_tanh_flows_yields_the_same_channels(tissue):
    full = tanh_flows(tissue)
    for a, ch in iter_tanh_flows(tissue):
        np.testing.assert_array_equal(ch, full[a])


def test_cell_statistics_median_and_bbox():
    lab = np.zeros((5, 6, 7), np.uint16)
    lab[1, 2, [1, 2, 6]] = 3
    st = cell_statistics(lab, 3, median=True)
    assert st["size"][3] == 3
    np.testing.assert_allclose(st["centroid"][:, 3], [1, 2, 3])
    np.testing.assert_array_equal(st["median"][:, 3], [1, 2, 2])
    np.testing.assert_array_equal(st["lo"][:, 3], [1, 2, 1])
    np.testing.assert_array_equal(st["hi"][:, 3], [1, 2, 6])


def _explicit_heat(lab, src, n_iter):
    """Cellpose's explicit averaging (7-point, other labels count 0), slow but obvious."""
    T = np.zeros(lab.shape)
    pad = np.pad(lab, 1)
    for _ in range(n_iter):
        T[tuple(src)] += 1
        Tp = np.pad(T, 1)
        acc = T.copy()
        for a in range(3):
            for d in (-1, 1):
                sh = np.roll(Tp, d, axis=a)[1:-1, 1:-1, 1:-1]
                same = np.roll(pad, d, axis=a)[1:-1, 1:-1, 1:-1] == lab
                acc += sh * same
        T = np.where(lab > 0, acc / 7.0, 0)
    g = np.stack(np.gradient(T))
    return -g


def test_heat_flows_agree_with_explicit_diffusion():
    lab = voronoi_labels((14, 16, 15), 3, seed=5)
    f, T = heat_flows(lab, return_heat=True)
    fg = lab > 0
    norm = np.sqrt((f ** 2).sum(0))
    assert np.all(f[:, ~fg] == 0)
    assert np.mean(np.abs(norm[fg] - 1) < 1e-4) > 0.99
    # sources: the heat maximum of each cell
    for i in range(1, lab.max() + 1):
        m = lab == i
        src = np.unravel_index(np.argmax(np.where(m, T, -1)), lab.shape)
        assert lab[src] == i
    # direction agrees with an explicit (converged) diffusion away from the same sources
    srcs = np.array([np.unravel_index(np.argmax(np.where(lab == i, T, -1)), lab.shape)
                     for i in range(1, lab.max() + 1)]).T
    ref = _explicit_heat(lab, srcs, 1500)
    # compare away from cell borders, where np.gradient mixes cells
    inner = fg.copy()
    for a in range(3):
        for d in (-1, 1):
            inner &= np.roll(lab, d, axis=a) == lab
    rn = np.sqrt((ref ** 2).sum(0))
    ok = inner & (rn > 0)
    cos = (f * ref).sum(0)[ok] / rn[ok]
    assert np.median(cos) > 0.99 and np.mean(cos > 0.9) > 0.95


def test_heat_flows_point_away_from_centre_of_a_sphere():
    z, y, x = np.indices((21, 21, 21)) - 10
    lab = ((z ** 2 + y ** 2 + x ** 2) <= 81).astype(np.uint16)
    f = heat_flows(lab)
    r = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    m = (lab > 0) & (r >= 2)
    cos = (f[0] * z + f[1] * y + f[2] * x)[m] / r[m]
    assert cos.min() > 0.9


def test_heat_source_lies_in_a_non_convex_cell():
    lab = np.zeros((5, 20, 20), np.uint16)
    lab[:, 2:18, 2:5] = 1     # a C shape: its median lies outside
    lab[:, 2:5, 2:18] = 1
    lab[:, 15:18, 2:18] = 1
    f, T = heat_flows(lab, return_heat=True)
    src = np.unravel_index(np.argmax(T), T.shape)
    assert lab[src] == 1
    assert np.all(np.isfinite(f))


def test_empty_labels_give_zero_flows():
    z = np.zeros((4, 5, 6), np.uint8)
    assert not tanh_flows(z).any() and not heat_flows(z).any()
    pred = labels_to_prediction(z, "heat", foreground="hull")
    assert pred.shape == (4, 4, 5, 6) and not pred.any()


def test_foreground_union_and_hull():
    lab = np.zeros((12, 14, 16), np.uint16)
    lab[2:5, 2:5, 2:5] = 1
    lab[7:10, 9:12, 11:14] = 2
    union = foreground_target(lab, "union")
    np.testing.assert_array_equal(union, lab > 0)
    hull = foreground_target(lab, "hull")
    assert hull[lab > 0].all() and hull.sum() > union.sum()
    # exact: a voxel is in the hull iff its centre lies in the convex hull of the cells' voxels
    tri = Delaunay(np.argwhere(lab > 0))
    inside = tri.find_simplex(np.indices(lab.shape).reshape(3, -1).T, tol=1e-9) >= 0
    np.testing.assert_array_equal(hull.reshape(-1), inside)


def test_flat_hull_falls_back_to_union(caplog):
    lab = np.zeros((5, 6, 7), np.uint16)
    lab[2, 1:4, 1:5] = 1  # a single plane
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        hull = foreground_target(lab, "hull")
    np.testing.assert_array_equal(hull, lab > 0)
    assert "flat" in caplog.text


@pytest.mark.parametrize("flow_type", ["tanh", "heat"])
def test_labels_to_prediction_channels(tissue, flow_type):
    pred = labels_to_prediction(tissue, flow_type)
    assert pred.shape == (4,) + tissue.shape and pred.dtype == np.float32
    np.testing.assert_array_equal(pred[0], tissue > 0)
    ref = tanh_flows(tissue) if flow_type == "tanh" else heat_flows(tissue)
    np.testing.assert_array_equal(pred[1:], ref)


def test_bad_input():
    with pytest.raises(InputError, match="integers"):
        tanh_flows(np.full((3, 3, 3), 0.5))
    with pytest.raises(InputError, match=">= 0"):
        heat_flows(-np.ones((3, 3, 3), np.int32))
    with pytest.raises(InputError, match="3D"):
        tanh_flows(np.zeros((3, 3), np.uint8))
    lab = np.ones((3, 3, 3), np.uint8)
    for bad in ("wide", -1, 0, float("nan")):
        with pytest.raises(ParameterError):
            tanh_flows(lab, bad)
    with pytest.raises(ParameterError):
        labels_to_prediction(lab, "diffusion")
    with pytest.raises(ParameterError):
        foreground_target(lab, "box")
    with pytest.raises(ParameterError):
        tanh_flows(lab, 5.0, spacing=(1, 0, 1))


# -- the LabelsToFlows filter -----------------------------------------------------------------

def test_labels_to_flows_filter(tissue):
    from c3dseg.filters.flows import LabelsToFlows

    img = Image(tissue, (2.0, 1.0, 1.0), {"basename": "t"})
    outs, metas = LabelsToFlows({"FlowType": "tanh", "FlowScale": "5", "FlowScaleInMicrometres": "1"}).run([img], [])
    assert len(outs) == 4 and metas == []
    np.testing.assert_array_equal(outs[1].data, tanh_flows(tissue, 5.0, spacing=(2.0, 1.0, 1.0))[0])
    assert outs[0].spacing == (2.0, 1.0, 1.0) and outs[0].data.dtype == np.float32
    outs, _ = LabelsToFlows({"FlowType": "heat", "ForegroundMode": "hull"}).run([img], [])
    assert outs[0].data.sum() >= np.count_nonzero(tissue)
    with pytest.raises(ParameterError, match="FlowScale"):
        LabelsToFlows({"FlowScale": "huge"})
    with pytest.raises(ParameterError):
        LabelsToFlows({"FlowType": "sine"})
    with pytest.raises(InputError, match="LabelsToFlows"):
        LabelsToFlows({}).run([Image(np.full((3, 3, 3), 0.5, np.float32))], [])

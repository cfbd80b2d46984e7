"""Cell-diameter estimate, seeded-watershed baseline and their filters."""

import math

import numpy as np
import pytest

from c3dseg import synthesis as S
from c3dseg.diameter import estimate_cell_diameter
from c3dseg.errors import InputError
from c3dseg.filters.base import get_filter
from c3dseg.image import Image
from c3dseg.metrics import evaluate
from c3dseg.watershed import noise_sigma, normalise_percentiles, region_diameters, seeded_watershed, tissue_mask

EASY = {"photons": 300.0, "read_noise": 1.0, "haze": 0.05, "faint_wall_fraction": 0.0, "speck_density": 0.0,
        "anisotropy": 1.5, "cell_diameter_vox": 12.0, "wall_texture": 0.1, "depth_decay": 0.3,
        "illumination": 0.1, "stretch": 1.2, "size_cv": 0.1, "size_gradient": 0.1}


@pytest.fixture(scope="module")
def easy():
    return S.make_sample({**EASY, "tissue": "full"}, 3, shape=(32, 80, 80))


@pytest.fixture(scope="module")
def organ():
    return S.make_sample({**EASY, "tissue": "ovoid"}, 5, shape=(32, 80, 80))


def test_estimate_close_to_truth(easy):
    img, lab, sp, p = easy
    d = estimate_cell_diameter(img, sp)
    assert abs(d / p["median_diameter_um"] - 1) < 0.25


def test_estimate_scales_with_spacing(easy):
    img, lab, sp, p = easy
    d1 = estimate_cell_diameter(img, sp)
    d2 = estimate_cell_diameter(img, tuple(2 * s for s in sp))
    assert d2 == pytest.approx(2 * d1, rel=1e-6)
    # an intensity scaling changes nothing (percentile normalisation)
    assert estimate_cell_diameter(img * 7 + 100, sp) == pytest.approx(d1, rel=1e-6)


def test_estimate_details_and_large_images_use_a_block(easy):
    img, lab, sp, p = easy
    d, info = estimate_cell_diameter(img, sp, max_voxels=60000, return_details=True)
    assert np.prod(info["block_shape"]) <= 60000 + 80 * 80
    # pass 1, then the second pass at the three seed depths
    assert len(info["passes"]) == 4 and math.isfinite(d)


def test_correction_is_the_packaged_fit_applied_to_the_middle_median(easy):
    from c3dseg import diameter as dm

    img, lab, sp, p = easy
    d, info = estimate_cell_diameter(img, sp, return_details=True)
    m1, m2, m4 = info["medians"]
    assert [h for _, h, _, _ in info["passes"][1:]] == sorted(h for _, h, _, _ in info["passes"][1:])
    assert info["features"] == pytest.approx((math.log(m4 / m1), math.log(m1 / sp[2])))
    w = dm.load_fit()["coefficients"]
    expected = math.exp(w[0] + w[1] * info["features"][0] + w[2] * info["features"][1])
    assert info["correction"] == pytest.approx(min(dm.MAX_CORRECTION, max(dm.MIN_CORRECTION, expected)))
    assert d == pytest.approx(m2 * info["correction"])
    # uncorrected: the middle median itself; an explicit fit is used as given
    assert estimate_cell_diameter(img, sp, fit="none") == pytest.approx(m2)
    assert estimate_cell_diameter(img, sp, fit={"coefficients": [math.log(0.9), 0.0, 0.0]}) == pytest.approx(0.9 * m2)
    # an extreme fit is clipped
    assert estimate_cell_diameter(img, sp, fit={"coefficients": [5.0, 0.0, 0.0]}) == pytest.approx(
        dm.MAX_CORRECTION * m2)


def test_block_at_and_central_block():
    from c3dseg.diameter import block_at, block_shape, central_block

    a = np.arange(32 * 100 * 100).reshape(32, 100, 100)
    shape = block_shape(a.shape, 80_000)
    assert shape[0] == 32 and np.prod(shape) <= 80_000
    assert np.array_equal(block_at(a, 80_000), central_block(a, 80_000))
    corner = block_at(a, 80_000, (0, 0, 1000))          # shifted inside the array
    assert corner.shape == shape and corner[0, 0, -1] == a[0, 0, -1]
    assert block_at(a, a.size) is a


def test_off_centre_tissue_is_measured_where_it_is(easy):
    """Tissue in one corner of a field that is otherwise noisy background: the measured window
    moves onto the tissue, and the estimate stays close to the truth (the central window holds
    noise only: NaN)."""
    from c3dseg import diameter as dm

    img, lab, sp, p = easy
    rng = np.random.default_rng(0)
    bg = float(np.percentile(img, 5))
    field = rng.poisson(bg, (img.shape[0], 300, 300)).astype(np.float32)
    field[:, -img.shape[1]:, -img.shape[2]:] = img
    centre = dm.structured_centre(field, sp, dm.PASS1_VOXELS // 4)
    window = dm.block_shape(field.shape, dm.PASS1_VOXELS // 4)
    assert centre[1] > 300 - img.shape[1] / 2 - window[1] / 2 and centre[2] > 300 - img.shape[2] / 2 - window[2] / 2
    d = estimate_cell_diameter(field, sp)
    assert abs(d / p["median_diameter_um"] - 1) < 0.25


def test_packaged_fit_records_how_it_was_made():
    from c3dseg import diameter as dm

    fit = dm.load_fit()
    assert tuple(fit["features"]) == dm.FEATURES and len(fit["coefficients"]) == 3
    assert fit["volumes"] >= 100 and "benchmarks/diameter.py" in fit["command"] and "--fit" in fit["command"]
    assert fit["data"]["preset"] == "train"          # never the validation seeds


@pytest.mark.parametrize("text", ["{", '{"features": ["x", "y"], "coefficients": [0, 0, 0]}',
                                  '{"features": ["log_m4_over_m1", "log_m1_voxels"], "coefficients": [0]}'])
def test_bad_fit_file_names_the_file(tmp_path, text):
    from c3dseg import diameter as dm

    path = tmp_path / f"fit{len(text)}.json"
    path.write_text(text)
    with pytest.raises(InputError, match=str(path.name)):
        dm.load_fit(path)


@pytest.fixture(scope="module")
def bench():
    """``benchmarks/diameter.py`` as a module."""
    from bench_kit import load_benchmark

    return load_benchmark("diameter")


def test_benchmark_rejects_correction_with_fit(tmp_path, bench):
    (tmp_path / "params.json").write_text('{"samples": {}}')
    with pytest.raises(SystemExit):
        bench.main(["--fit", str(tmp_path), "--correction", str(tmp_path / "c.json"), "--n-val", "0", "--n-ood", "0"])


def test_fit_correction_recovers_known_coefficients(bench):
    rng = np.random.default_rng(1)
    feats = np.c_[rng.uniform(0, 0.5, 60), rng.uniform(1.5, 3.5, 60)]
    raw = rng.uniform(2, 20, 60)
    w = np.array([-0.6, -0.33, 0.2])
    truth = raw * np.exp(w[0] + feats @ w[1:]) * np.exp(rng.normal(0, 0.02, 60))
    rows = np.c_[np.arange(60), truth, raw, np.zeros((60, 3))]
    got, hits, cv, n = bench.fit_correction(rows, feats)
    assert got == pytest.approx(w, abs=0.05)
    assert n == 60 and hits == 60 and cv == 60


def test_featureless_image_gives_nan():
    assert math.isnan(estimate_cell_diameter(np.zeros((16, 32, 32), np.uint16), (1, 1, 1)))


@pytest.mark.parametrize("bad", [np.zeros((32, 32)), np.zeros((2, 8, 8, 8))])
def test_bad_shape(bad):
    with pytest.raises(InputError):
        estimate_cell_diameter(bad, (1, 1, 1))


def test_bad_spacing():
    with pytest.raises(InputError):
        estimate_cell_diameter(np.zeros((8, 8, 8)), (1, 0, 1))


def test_noise_sigma_ignores_sheets():
    rng = np.random.default_rng(0)
    walls = np.zeros((32, 32, 32), np.float32)
    walls[:, ::6, :] = 5.0          # bright planes
    walls[:, :, ::7] = 5.0
    noisy = walls + rng.normal(0, 0.3, walls.shape).astype(np.float32)
    assert noise_sigma(noisy) == pytest.approx(0.3, rel=0.1)
    # a 1D-difference estimate would be inflated by the planes
    d = np.diff(noisy, axis=2)
    assert np.median(np.abs(d)) / 0.6745 / np.sqrt(2) > 0.36


def test_watershed_recovers_clear_cells(easy):
    img, lab, sp, p = easy
    pred = seeded_watershed(img, sp, diameter_um=p["median_diameter_um"])
    assert pred.dtype == np.uint16
    ids = np.unique(pred)
    np.testing.assert_array_equal(ids[ids > 0], np.arange(1, pred.max() + 1))
    r = evaluate(lab, pred)
    assert r["interior"]["mean_dice"] > 0.7
    assert r["ap@0.5"] > 0.5


def test_watershed_background(organ):
    img, lab, sp, p = organ
    pred = seeded_watershed(img, sp, diameter_um=p["median_diameter_um"])
    bg_gt = lab == 0
    agree = np.mean((pred == 0) == bg_gt)
    assert agree > 0.8
    # no background asked: every voxel labelled
    assert (seeded_watershed(img, sp, diameter_um=p["median_diameter_um"], background="none") > 0).all()
    # evenly lit dense tissue: no background found
    img2, _, sp2, p2 = S.make_sample({**EASY, "tissue": "full", "depth_decay": 0.0, "illumination": 0.0}, 3,
                                     shape=(24, 48, 48))
    g = normalise_percentiles(img2)
    assert tissue_mask(g, sp2, p2["median_diameter_um"]) is None


def test_region_diameters_planar():
    lab = np.zeros((2, 10, 10), np.uint16)
    lab[0, 2:6, 2:6] = 1   # 16 px
    lab[1, 1:9, 1:9] = 2   # 64 px
    d = region_diameters(lab, (5.0, 0.5, 0.5), planar=True, exclude_border=False)
    np.testing.assert_allclose(d, np.sqrt(4 * np.array([16, 64]) * 0.25 / np.pi))


def test_filters(easy):
    img, lab, sp, p = easy
    est = get_filter("EstimateCellDiameter")
    ws = get_filter("SeededWatershed")
    assert est is not None and ws is not None
    image = Image(img, sp, {"basename": "easy"})
    out, metas = est({}).run([image], [])
    d = out[0].meta["cell_diameter_um"]
    assert out[0].data is image.data
    assert metas[0].column("cell_diameter_um")[0] == pytest.approx(d)
    labels, _ = ws({}).run([out[0]], [])
    assert labels[0].meta["is_label"] and labels[0].data.dtype == np.uint16
    direct = seeded_watershed(img, sp, diameter_um=d)
    np.testing.assert_array_equal(labels[0].data, direct)
    with pytest.raises(InputError):
        est({"Channel": 3}).run([Image(np.stack([img, img]), sp)], [])
    two, _ = est({"Channel": 1}).run([Image(np.stack([img * 0, img]), sp)], [])
    assert two[0].meta["cell_diameter_um"] == pytest.approx(d)


@pytest.mark.parametrize("kind", ["constant", "poisson", "gaussian"])
def test_stacks_without_tissue_give_nan(kind):
    from c3dseg.diameter import MIN_STRUCTURE

    rng = np.random.default_rng(0)
    img = {"constant": np.full((16, 48, 48), 7.0), "poisson": rng.poisson(2.0, (16, 48, 48)),
           "gaussian": rng.normal(100, 5, (16, 48, 48))}[kind]
    d, info = estimate_cell_diameter(img, (2.0, 0.5, 0.5), return_details=True)
    assert math.isnan(d) and info["empty"] and info["structure"] < MIN_STRUCTURE
    assert info["passes"] == []


def test_tissue_is_far_above_the_empty_threshold(easy):
    from c3dseg.diameter import MIN_STRUCTURE, structure_to_noise

    img, lab, sp, p = easy
    assert structure_to_noise(img, sp) > 3 * MIN_STRUCTURE


def test_large_cells_are_measured_downscaled():
    img, lab, sp, p = S.make_sample({**EASY, "tissue": "full", "cell_diameter_vox": 30.0, "anisotropy": 1.0},
                                    4, shape=(48, 112, 112))
    d, info = estimate_cell_diameter(img, sp, return_details=True)
    assert info["downscale"] == 2
    assert abs(d / p["median_diameter_um"] - 1) < 0.25


# -- refinement with a network ------------------------------------------------------------------

def _lattice(cell=8, shape=(24, 48, 48)):
    """Cubic cells ``cell`` voxels apart with one-voxel bright walls (spacing 1 um)."""
    img = np.full(shape, 0.1, np.float32)
    for a in range(3):
        idx = [slice(None)] * 3
        idx[a] = slice(0, None, cell)
        img[tuple(idx)] = 1.0
    truth = (6.0 * cell ** 3 / np.pi) ** (1 / 3)
    return img, truth


class _Oracle:
    """Stands in for a good network: segments the dark interiors of its input (whatever the scale)
    and returns their foreground and tanh flows, as a trained model would."""

    name = "oracle"
    flow_type = "tanh"
    size_divisor = 8
    metadata = {"median_cell_diameter_voxels": "12.78", "flow_scale": "adaptive"}

    def __init__(self, echo=False):
        self.echo = echo   # ignore the input: cells of the training size at any scale
        self.calls = 0

    def __call__(self, batch):
        from skimage.segmentation import expand_labels

        from c3dseg.flows import tanh_flows

        self.calls += 1
        out = []
        for x in batch[:, 0]:
            if self.echo:
                x, _ = _lattice(9, x.shape)   # 0.87x the training size
            lo, hi = float(x.min()), float(x.max())
            cells, _ = __import__("scipy").ndimage.label(x < (lo + hi) / 2)
            cells = expand_labels(cells, 2)
            flows = tanh_flows(cells)
            out.append(np.concatenate([(cells > 0)[None].astype(np.float32), flows]))
        return np.stack(out)


@pytest.mark.parametrize("wrong", [1.5, 0.6])
def test_refinement_moves_a_wrong_estimate_toward_the_truth(wrong):
    from c3dseg.diameter import refine_with_network

    img, truth = _lattice()
    d0 = wrong * truth
    net = _Oracle()
    d, info = refine_with_network(img, (1.0, 1.0, 1.0), d0, net)
    assert info["accepted"] and 1 <= len(info["passes"]) <= 2 and net.calls == len(info["passes"])
    assert abs(math.log(d / truth)) < 0.5 * abs(math.log(d0 / truth))
    assert abs(d / truth - 1) < 0.2


def test_refinement_rejects_a_network_that_echoes_the_scale():
    from c3dseg.diameter import refine_with_network

    img, truth = _lattice()
    d, info = refine_with_network(img, (1.0, 1.0, 1.0), 1.5 * truth, _Oracle(echo=True))
    assert not info["accepted"] and d == 1.5 * truth
    assert info["slope"] > 0.5


def test_estimate_with_model_keeps_the_classical_value_in_details():
    img, truth = _lattice()
    d, info = estimate_cell_diameter(img, (1.0, 1.0, 1.0), model=_Oracle(), return_details=True)
    classical = estimate_cell_diameter(img, (1.0, 1.0, 1.0))
    assert info["classical"] == classical and "refine" in info
    assert abs(d / truth - 1) <= abs(classical / truth - 1) + 0.05
    # empty stacks stay NaN (no network pass)
    net = _Oracle()
    e, info = estimate_cell_diameter(np.zeros((16, 32, 32)), (1, 1, 1), model=net, return_details=True)
    assert math.isnan(e) and info["empty"] and net.calls == 0


def test_filter_model_path(tmp_path):
    from c3dseg.filters.base import Context

    img, truth = _lattice()
    image = Image(img, (1.0, 1.0, 1.0), {"basename": "lattice"})
    model = __import__("os").path.join(__import__("os").path.dirname(__import__("c3dseg").__file__),
                                       "models", "tanh.onnx")
    out, metas = get_filter("EstimateCellDiameter")({"ModelPath": model}).run([image], [])
    assert math.isfinite(out[0].meta["cell_diameter_um"])
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="ModelPath|model"):
        get_filter("EstimateCellDiameter")({"ModelPath": str(bad)}).run([image], [])

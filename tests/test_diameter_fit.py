"""c3d-fit-diameter: the estimator's correction fitted to annotated stacks, and its use through
EstimateCellDiameter's CorrectionFile (whole image and blockwise)."""

import math

import numpy as np
import pytest

from c3dseg import diameter as dm
from c3dseg import synthesis as S
from c3dseg.diameter_fit import MIN_FULL_FIT, fit_correction, main
from c3dseg.errors import InputError
from c3dseg.filters.base import get_filter
from c3dseg.image import Image

EASY = {"photons": 300.0, "read_noise": 1.0, "haze": 0.05, "faint_wall_fraction": 0.0, "speck_density": 0.0,
        "anisotropy": 1.5, "wall_texture": 0.1, "depth_decay": 0.3, "illumination": 0.1, "stretch": 1.2,
        "size_cv": 0.1, "size_gradient": 0.1, "tissue": "full"}


def test_fit_recovers_known_coefficients_and_cross_validates():
    rng = np.random.default_rng(1)
    feats = np.c_[rng.uniform(0, 0.5, 60), rng.uniform(1.5, 3.5, 60)]
    raw = rng.uniform(2, 20, 60)
    w = np.array([-0.6, -0.33, 0.2])
    truth = raw * np.exp(w[0] + feats @ w[1:]) * np.exp(rng.normal(0, 0.02, 60))
    r = fit_correction(truth, raw, feats)
    assert r["coefficients"] == pytest.approx(w, abs=0.05)
    assert r["used"] == 60 and r["hits"] == 60 and r["cv_hits"] == 60 and r["folds"] == 10


def test_intercept_only_is_one_factor_and_leaves_out_failed_stacks():
    raw = np.array([4.0, 5.0, 6.0, np.nan])
    truth = np.array([6.0, 7.5, 9.0, 5.0])                       # 1.5 x raw
    feats = np.array([[0.1, 2.0], [0.3, 2.5], [0.2, 1.0], [np.nan, np.nan]])
    r = fit_correction(truth, raw, feats, intercept_only=True)
    assert r["coefficients"] == pytest.approx([math.log(1.5), 0.0, 0.0])
    assert r["used"] == 3 and r["hits"] == 3 and r["folds"] == 3 and r["cv_hits"] == 3
    one = fit_correction(truth[:1], raw[:1], feats[:1], intercept_only=True)
    assert one["cv_hits"] is None and one["folds"] == 1


def test_nothing_to_fit_is_an_error():
    with pytest.raises(InputError, match="no stack to fit"):
        fit_correction([5.0], [np.nan], [[np.nan, np.nan]])


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """Three annotated stacks (images/, labels/) whose cells the packaged fit sizes well; the
    labels are eroded to 0.7 of the cells' volume, so their truth is ~0.89 x the image's."""
    from scipy import ndimage as ndi

    root = tmp_path_factory.mktemp("annotated")
    truths = {}
    for i, d in enumerate((10.0, 12.0, 14.0)):
        img, lab, sp, _ = S.make_sample({**EASY, "cell_diameter_vox": d}, 20 + i, shape=(32, 72, 72))
        inner = ndi.grey_erosion(lab, size=(1, 3, 3)) == lab
        lab = np.where(inner & (ndi.grey_dilation(lab, size=(1, 3, 3)) == lab), lab, 0)
        S.write_pair(str(root), f"stack{i}", img, lab, sp)
        truths[f"stack{i}"] = S.median_cell_diameter(lab, sp)
    return root, truths


def test_cli_fits_writes_and_the_filter_uses_it(annotated, tmp_path, capsys):
    root, truths = annotated
    out = tmp_path / "fit.json"
    assert main([str(root), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "w0 only" in printed and "wrote" in printed and "CorrectionFile" in printed
    fit = dm.load_fit(out)                                    # the estimator reads it
    assert fit["intercept_only"] and fit["volumes"] == 3 < MIN_FULL_FIT
    assert fit["coefficients"][1:] == [0.0, 0.0] and fit["coefficients"][0] != 0.0
    assert fit["within_20_percent_fitted"].endswith("/3") and fit["cross_validation_folds"] == 3
    # the filter with CorrectionFile: the raw median times exp(w0), on every stack
    from c3dseg.io import read_image

    for name, truth in truths.items():
        img = read_image(str(root / "images" / f"{name}.tif"))
        raw = dm.estimate_cell_diameter(img.data, img.spacing, fit="none")
        (res,), _ = get_filter("EstimateCellDiameter")({"CorrectionFile": str(out)}).run([img], [])
        assert res.meta["cell_diameter_um"] == pytest.approx(raw * math.exp(fit["coefficients"][0]), rel=1e-6)
    # the fitted factor brings the median estimate onto the labels' truth
    fitted = [get_filter("EstimateCellDiameter")({"CorrectionFile": str(out)}).run(
        [read_image(str(root / "images" / f"{n}.tif"))], [])[0][0].meta["cell_diameter_um"] / t
        for n, t in truths.items()]
    assert abs(np.median(fitted) - 1) < 0.1


def test_cli_never_overwrites_and_names_bad_folders(annotated, tmp_path, capsys):
    root, _ = annotated
    out = tmp_path / "fit.json"
    out.write_text("mine")
    assert main([str(root), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "mine"
    (tmp_path / "nolabels" / "images").mkdir(parents=True)
    assert main([str(tmp_path / "nolabels"), "-o", str(tmp_path / "f2.json")]) == 2
    err = capsys.readouterr().err
    assert "nolabels" in err and "labels/" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f2.json").exists()


def test_filter_bad_correction_file_names_the_parameter(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    img = Image(np.zeros((8, 8, 8), np.float32), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError) as e:
        get_filter("EstimateCellDiameter")({"CorrectionFile": str(bad)}).run([img], [])
    assert "CorrectionFile" in str(e.value) and "bad.json" in str(e.value)


def test_cli_exit_codes_bad_arguments_2_bad_stack_1(tmp_path, capsys):
    """Bad arguments (nothing measured) exit 2, like c3d-run; a stack found unusable while measuring
    exits 1 and names the file; neither leaves an output."""
    from c3dseg.io import write_image

    out = tmp_path / "fit.json"
    assert main([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    write_image(str(root / "images" / "a.tif"), Image(np.zeros((1, 24, 24), np.float32), (1.0, 1.0, 1.0)))
    write_image(str(root / "labels" / "a.tif"), Image(np.ones((1, 24, 24), np.uint16), (1.0, 1.0, 1.0)))
    rc = main([str(root), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "a.tif" in err[0] and not out.exists()

"""Synthetic tissue generator (c3dseg.synthesis) and the c3d-synth command line."""

import json
import os

import numpy as np
import pytest
from skimage.measure import label as cc_label
from skimage.segmentation import find_boundaries

from c3dseg import synthesis as S

SHAPE = (20, 48, 48)


def test_voronoi_labels_unchanged_contract():
    lab = S.voronoi_labels((10, 20, 20), 12, seed=1)
    assert lab.dtype == np.uint16
    assert lab.min() >= 1
    assert set(np.unique(lab)) == set(range(1, lab.max() + 1))


def test_make_sample_types_and_determinism():
    a = S.make_sample("train", 3, shape=SHAPE)
    b = S.make_sample("train", 3, shape=SHAPE)
    img, lab, sp, p = a
    assert img.shape == SHAPE and lab.shape == SHAPE
    assert img.dtype == np.float32 and lab.dtype == np.uint16
    assert img.min() >= 0
    np.testing.assert_array_equal(img, b[0])
    np.testing.assert_array_equal(lab, b[1])
    assert sp == b[2]
    # consecutive labels, every cell (26-)connected
    ids = np.unique(lab)
    ids = ids[ids > 0]
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert p["n_cells"] == len(ids)
    assert cc_label(lab, connectivity=3, background=0).max() == len(ids)
    # anisotropic grid within the training range, z coarser
    assert sp[1] == sp[2]
    assert 1.0 <= sp[0] / sp[1] <= 4.0 + 1e-9
    json.dumps(p)  # serialisable
    assert S.make_sample("train", 4, shape=SHAPE)[0].tobytes() != img.tobytes()


def test_set_one_setting_keeps_the_other_draws():
    p1 = S.draw_params("train", 11)
    p2 = S.draw_params({"photons": 50.0}, 11)
    assert p2["photons"] == 50.0
    for k in S.TRAIN_RANGES:
        if k != "photons":
            assert p1[k] == p2[k], k


def test_ranges_are_respected():
    for seed in range(20):
        p = S.draw_params("train", seed)
        lo, hi = S.TRAIN_RANGES["cell_diameter_vox"]["loguniform"]
        assert lo <= p["cell_diameter_vox"] <= hi
        assert p["tissue"] in S.TRAIN_RANGES["tissue"]["choice"]
        assert isinstance(p["lloyd_iterations"], int)
    assert hi / lo >= 3.0   # diameters over at least a 3x range


def test_ood_preset_moves_settings_outside_training_ranges():
    for seed in range(10):
        p = S.draw_params("ood", seed)
        assert len(p["ood_keys"]) == 2
        for k in p["ood_keys"]:
            spec = S.TRAIN_RANGES[k]
            lo, hi = next(iter(v for kk, v in spec.items() if kk in ("uniform", "loguniform", "int")))
            assert not (lo <= p[k] <= hi), (k, p[k])


def test_membrane_is_bright_on_walls():
    img, lab, sp, p = S.make_sample({"photons": 2000.0, "read_noise": 0.0, "haze": 0.0,
                                     "speck_density": 0.0, "faint_wall_fraction": 0.0,
                                     "wall_texture": 0.0, "tissue": "full",
                                     "cell_diameter_vox": 12.0, "psf_sigma_xy_vox": 0.6,
                                     "anisotropy": 1.0}, 5, shape=SHAPE)
    walls = find_boundaries(lab, mode="thick")
    inner = ~walls & (lab > 0)
    # distance to walls: interiors at least 2 voxels away
    from scipy import ndimage
    far = ndimage.distance_transform_edt(~walls) >= 2
    assert img[walls].mean() > 2.0 * img[inner & far].mean()
    assert (lab > 0).all()       # "full" tissue: no background


def test_tissue_outline_has_background_and_layers():
    img, lab, sp, p = S.make_sample({"tissue": "ovoid", "epidermis_layers": 2, "cell_diameter_vox": 8.0,
                                     "photons": 500.0}, 2, shape=(24, 64, 64))
    assert 0.05 < p["tissue_fraction"] < 0.95
    assert (lab == 0).any() and (lab > 0).any()
    assert p["epidermis_layers"] == 2
    assert len(p["seeds_per_region"]) == 3
    # background darker than tissue on average
    assert img[lab == 0].mean() < img[lab > 0].mean()


def test_diameter_follows_setting():
    d = []
    for vox in (8.0, 24.0):
        _, lab, sp, p = S.make_sample({"tissue": "full", "cell_diameter_vox": vox, "size_gradient": 0.0,
                                       "anisotropy": 1.0, "stretch": 1.0}, 1, shape=(40, 64, 64))
        d.append(p["median_diameter_um"] / sp[2])
        assert 0.6 * vox < d[-1] < 1.25 * vox
    assert d[1] > 2.2 * d[0]


def test_smooth_noise_statistics():
    f = S.smooth_noise((16, 32, 32), (2.0, 1.0, 1.0), 6.0, np.random.default_rng(0), count=2)
    assert f.shape == (2, 16, 32, 32) and f.dtype == np.float32
    for g in f:
        assert abs(float(g.mean())) < 1e-4 and abs(float(g.std()) - 1) < 1e-3
    # smooth: neighbouring voxels strongly correlated
    g = f[0]
    assert np.corrcoef(g[:, :, 1:].ravel(), g[:, :, :-1].ravel())[0, 1] > 0.9


def test_cell_diameters_cube():
    lab = np.zeros((12, 12, 12), np.uint16)
    lab[1:11, 1:11, 1:11] = 1
    d = S.cell_diameters(lab, (2.0, 1.0, 1.0))
    assert d[0] == pytest.approx((6 * 2000 / np.pi) ** (1 / 3))
    assert S.median_cell_diameter(lab, (2.0, 1.0, 1.0)) == pytest.approx(d[0])
    lab[0, 0, 0] = 2
    assert len(S.cell_diameters(lab, exclude_border=True)) == 1


def test_parse_setting():
    assert S.parse_setting("photons=20") == ("photons", 20)
    assert S.parse_setting("photons=5:50") == ("photons", {"uniform": [5.0, 50.0]})
    assert S.parse_setting("photons=5~50") == ("photons", {"loguniform": [5.0, 50.0]})
    assert S.parse_setting("tissue=dome|slab") == ("tissue", {"choice": ["dome", "slab"]})
    assert S.parse_setting("lloyd_iterations=1:3") == ("lloyd_iterations", {"int": [1, 3]})
    assert S.parse_setting("dome_flip=true") == ("dome_flip", True)
    with pytest.raises(KeyError):
        S.parse_setting("nonsense=1")
    with pytest.raises(ValueError):
        S.parse_setting("photons")


def test_cli_writes_pairs_params_and_preview(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = S.main(["-o", str(out), "-n", "2", "--seed", "7", "--shape", "16,40,40",
                 "--preset", "validation", "--set", "tissue=slab", "--preview", "-q"])
    assert rc == 0
    names = sorted(os.listdir(out / "images"))
    assert names == ["validation_1000007.tif", "validation_1000008.tif"]
    assert sorted(os.listdir(out / "labels")) == names
    assert sorted(os.listdir(out / "previews")) == [n.replace(".tif", ".png") for n in names]
    doc = json.loads((out / "params.json").read_text())
    assert set(doc["samples"]) == {"validation_1000007", "validation_1000008"}
    assert doc["samples"]["validation_1000007"]["tissue"] == "slab"
    from c3dseg.io import read_image
    img = read_image(out / "images" / names[0])
    lab = read_image(out / "labels" / names[0])
    p = doc["samples"]["validation_1000007"]
    assert img.data.dtype == np.uint16 and lab.data.dtype == np.uint16
    np.testing.assert_allclose(img.spacing, p["spacing_um"], rtol=1e-5)
    assert int(lab.data.max()) == p["n_cells"]
    # same seed in python gives the same labels
    _, lab2, _, _ = S.make_sample({**S.PRESETS["validation"], "tissue": "slab"}, 1000007, shape=(16, 40, 40))
    np.testing.assert_array_equal(lab.data, lab2)


@pytest.mark.parametrize("args", [["-n", "1"], ["-o", "X", "--shape", "1,2"], ["-o", "X", "--set", "bogus=1"],
                                  ["-o", "X", "-n", "0"], ["-o", "X", "--set", "photons=9:1"]])
def test_cli_bad_arguments_exit_2(tmp_path, args, capsys):
    args = [a.replace("X", str(tmp_path / "o")) for a in args]
    assert S.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_cli_parallel_jobs_and_resume(tmp_path):
    out = tmp_path / "par"
    args = ["-o", str(out), "-n", "3", "--seed", "2", "--shape", "12,32,32", "-q"]
    assert S.main(args + ["-j", "2"]) == 0
    doc = json.loads((out / "params.json").read_text())
    assert sorted(doc["samples"]) == ["train_0000002", "train_0000003", "train_0000004"]
    # same bytes as a sequential run
    seq = tmp_path / "seq"
    assert S.main(["-o", str(seq), "-n", "3", "--seed", "2", "--shape", "12,32,32", "-q"]) == 0
    for n in doc["samples"]:
        assert (out / "labels" / f"{n}.tif").read_bytes() == (seq / "labels" / f"{n}.tif").read_bytes()
    # resume: an existing sample is not remade
    stamp = (out / "images" / "train_0000002.tif").stat().st_mtime_ns
    assert S.main(["-o", str(out), "-n", "4", "--seed", "2", "--shape", "12,32,32", "-q", "--skip-existing"]) == 0
    assert (out / "images" / "train_0000002.tif").stat().st_mtime_ns == stamp
    assert len(json.loads((out / "params.json").read_text())["samples"]) == 4

"""The second synthetic generator of benchmarks/othergen.py (used to score the models on stacks
that c3d-synth did not make)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from c3dseg.evaluation import match_pairs
from c3dseg.io import read_image

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def othergen():
    spec = importlib.util.spec_from_file_location(
        "othergen", os.path.join(HERE, "..", "benchmarks", "othergen.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_volume_is_tissue_with_cells(othergen):
    img, lab, sp, p = othergen.make_volume(3, shape=(24, 48, 48))
    assert img.shape == lab.shape == (24, 48, 48)
    assert sp[0] >= sp[1] == sp[2]
    assert p["cells"] == lab.max() == len(np.unique(lab)) - 1 > 5
    # walls are brighter than the cells' insides: the membrane stain the models expect
    inside = lab > 0
    edge = np.zeros_like(inside)
    for ax in range(3):
        edge |= np.diff(lab, axis=ax, append=np.take(lab, [-1], axis=ax)) != 0
    assert img[edge & inside].mean() > img[inside & ~edge].mean()
    # the median diameter is that of the interior cells, in um
    assert 0.5 * p["cell_diameter_vox"] * sp[2] < p["median_diameter_um"] < 2.0 * p["cell_diameter_vox"] * sp[2]


def test_seed_makes_the_same_volume(othergen):
    a = othergen.make_volume(5, shape=(16, 32, 32))
    b = othergen.make_volume(5, shape=(16, 32, 32))
    c = othergen.make_volume(6, shape=(16, 32, 32))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_poisson_disc_keeps_its_distance(othergen):
    rng = np.random.default_rng(0)
    pts = othergen.poisson_disc(np.array([10.0, 20.0, 20.0]), 3.0, rng, lambda q: q[:, 0] < 8.0)
    assert len(pts) > 20
    assert np.all(pts[:, 0] < 8.0)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    assert d[np.triu_indices(len(pts), 1)].min() >= 3.0


def test_cli_writes_pairs_accuracy_can_read(othergen, tmp_path):
    othergen.main(["-o", str(tmp_path), "-n", "2", "--seed", "7", "--shape", "16,32,32"])
    pairs = match_pairs(str(tmp_path / "labels"), str(tmp_path / "images"))
    assert [n for n, _, _ in pairs] == ["othergen_0007", "othergen_0008"]
    img, lab = read_image(pairs[0][2]), read_image(pairs[0][1])
    assert img.data.dtype == np.uint16 and lab.data.shape == img.data.shape
    assert img.spacing == pytest.approx(lab.spacing)
    params = json.loads((tmp_path / "params.json").read_text())
    assert set(params["samples"]) == {"othergen_0007", "othergen_0008"}


def test_cli_keeps_existing_volumes(othergen, tmp_path):
    othergen.main(["-o", str(tmp_path), "-n", "1", "--shape", "16,32,32"])
    before = (tmp_path / "images" / "othergen_0000.tif").read_bytes()
    with pytest.raises(SystemExit) as e:
        othergen.main(["-o", str(tmp_path), "-n", "1", "--seed", "0", "--shape", "16,24,24"])
    assert e.value.code == 2
    assert (tmp_path / "images" / "othergen_0000.tif").read_bytes() == before
    othergen.main(["-o", str(tmp_path), "-n", "1", "--shape", "16,24,24", "--overwrite"])
    assert read_image(str(tmp_path / "images" / "othergen_0000.tif")).data.shape == (16, 24, 24)

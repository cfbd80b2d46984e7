"""pipelines/segment.xml on bad input through the command line (stacks without tissue, 2D images) and
the diameter handling of ResampleToModelScale (no cells, the >2x disagreement warning)."""

import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from c3dseg.filters.base import get_filter
from c3dseg.image import Image
from c3dseg.io import read_image, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEGMENT = os.path.join(ROOT, "pipelines", "segment.xml")
MODEL = os.path.join(ROOT, "c3dseg", "models", "tanh.onnx")
SPACING = (2.0, 0.5, 0.5)


def c3d_run(*args):
    return subprocess.run([sys.executable, "-m", "c3dseg.runner.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _stack(kind):
    rng = np.random.default_rng(0)
    if kind == "constant":
        return np.full((12, 40, 40), 300, np.uint16)
    return rng.poisson(40.0, (12, 40, 40)).astype(np.uint16)


@pytest.mark.parametrize("kind", ["constant", "noise"])
def test_stack_without_tissue_gives_empty_labels_and_one_warning(tmp_path, kind):
    src = tmp_path / f"{kind}.tif"
    write_image(str(src), Image(_stack(kind), SPACING, {}))
    out = tmp_path / "out.tif"
    r = c3d_run(SEGMENT, "-i", str(src), "-o", str(out))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "no cells found" in warnings[0], r.stderr
    raw = tifffile.imread(str(out))
    assert raw.dtype == np.uint16 and raw.shape == (12, 40, 40) and not raw.any()
    img = read_image(str(out))
    np.testing.assert_allclose(img.spacing, SPACING, rtol=1e-4)


def test_2d_input_is_a_one_line_error_naming_file_and_item(tmp_path):
    src = tmp_path / "plane.tif"
    tifffile.imwrite(str(src), np.random.default_rng(0).poisson(50, (40, 40)).astype(np.uint16), imagej=True)
    out = tmp_path / "out.tif"
    r = c3d_run(SEGMENT, "-i", str(src), "-o", str(out))
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1, r.stderr
    assert "plane.tif" in errors[0] and "item_0001" in errors[0] and "2D" in errors[0]
    assert not out.exists()


def _resample(params, meta, shape=(8, 24, 24)):
    flt = get_filter("ResampleToModelScale")({"ModelPath": MODEL, "ModelCellDiameterVoxels": 8.0, **params})
    img = Image(np.random.default_rng(1).random(shape, dtype=np.float32), (1.0, 0.5, 0.5),
                {"basename": "x", **meta})
    return flt.run([img], [])[0][0]


def test_disagreement_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        out = _resample({"CellDiameterUm": 4.0}, {"cell_diameter_um": 4.5})
    assert not [r for r in caplog.records if "disagrees" in r.getMessage()]
    assert out.spacing == pytest.approx((0.5, 0.5, 0.5))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        _resample({"CellDiameterUm": 4.0}, {"cell_diameter_um": 12.0})
    assert [r for r in caplog.records if "disagrees" in r.getMessage() and "12" in r.getMessage()]


def test_max_upsampling_allows_the_20_voxel_scale():
    """Coarse z steps and small cells at the tanh model's scale need 8-9x along z: allowed by the
    default MaxUpsampling (12); past it, a one-line error naming CellDiameterUm."""
    from c3dseg.errors import C3DError

    # z spacing 1 um, cells 1 um across at 8 voxels per cell: iso spacing 0.125 um, z zoom 8
    out = _resample({"CellDiameterUm": 1.0}, {}, shape=(2, 3, 3))
    assert out.spacing == pytest.approx((0.125, 0.125, 0.125)) and out.data.shape[0] == 16
    with pytest.raises(C3DError, match="CellDiameterUm.*MaxUpsampling 12"):
        _resample({"CellDiameterUm": 0.6}, {}, shape=(2, 3, 3))    # z zoom 13.3


def test_zoom_shows_cells_larger_than_the_training_diameter():
    """Zoom 1.5: cells of 4 um at 8 voxels x 1.5 = 12 voxels, so the grid's spacing is 4/12 um; the
    zoom counts toward MaxUpsampling."""
    from c3dseg.errors import C3DError

    plain = _resample({"CellDiameterUm": 4.0}, {})
    zoomed = _resample({"CellDiameterUm": 4.0, "Zoom": 1.5}, {})
    assert plain.spacing == pytest.approx((0.5, 0.5, 0.5))
    assert zoomed.spacing == pytest.approx((1 / 3, 1 / 3, 1 / 3), rel=0.02)
    assert zoomed.data.shape == (24, 36, 36)      # 8 x 1 um and 24 x 0.5 um at 1/3 um
    assert zoomed.meta["cell_diameter_um"] == plain.meta["cell_diameter_um"] == 4.0
    with pytest.raises(C3DError, match="MaxUpsampling"):
        _resample({"CellDiameterUm": 1.0, "Zoom": 1.6}, {}, shape=(2, 3, 3))   # z zoom 8 x 1.6 > 12


def test_no_cells_meta_gives_a_small_stand_in(caplog):
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        out = _resample({"CellDiameterUm": 4.0}, {"cell_diameter_um": float("nan"), "no_cells": True},
                        shape=(20, 40, 40))
    # no warning about a NaN estimate: the no-cells warning came from EstimateCellDiameter
    assert not caplog.records
    assert out.meta["no_cells"] and out.data.shape == (16, 16, 16) and not out.data.any()
    assert out.meta["input_shape"] == (20, 40, 40)
    assert out.spacing == pytest.approx((20 / 16, 40 * 0.5 / 16, 40 * 0.5 / 16))
    assert math.isnan(out.meta["cell_diameter_um"])


def test_label_filters_give_zeros_for_images_without_cells():
    lab = np.zeros((4, 8, 8), np.uint16)
    lab[1:3, 2:6, 2:6] = 7
    size = get_filter("InstanceSizeFilter")({"MinRadiusVoxels": 0.0, "MaxRadiusVoxels": -1.0})
    kept = size.run([Image(lab, (1, 1, 1), {})], [])[0][0]
    assert kept.data.max() == 7
    empty = size.run([Image(lab, (1, 1, 1), {"no_cells": True})], [])[0][0]
    assert empty.data.dtype == lab.dtype and not empty.data.any()

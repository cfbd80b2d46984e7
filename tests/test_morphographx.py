"""The MorphoGraphX integration's command-line part, against a stand-in stack: single file in,
single file out, uint16 labels with the input's calibration, one-line error and non-zero exit."""

import os
import subprocess
import sys

import numpy as np
import pytest

from c3dseg.image import Image
from c3dseg.io import read_image, write_image
from c3dseg.synthesis import voronoi_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "integrations", "morphographx", "c3dseg_mgx.py")


def run_script(*args, env=None):
    e = dict(os.environ)
    e["C3D_RUN"] = f"{sys.executable} -m c3dseg.runner.cli"
    e.update(env or {})
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=e, timeout=600)


@pytest.fixture
def stand_in_stack(tmp_path):
    """A membrane-like stack as MorphoGraphX would save it: uint16 ImageJ TIFF with um calibration."""
    lab = voronoi_labels((24, 64, 64), 30, seed=3, spacing=(1.0, 0.5, 0.5))
    from scipy import ndimage as ndi
    walls = (ndi.grey_dilation(lab, size=3) != ndi.grey_erosion(lab, size=3)).astype(np.float32)
    img = ndi.gaussian_filter(walls, 1.0) * 3000 + 200
    path = tmp_path / "stack.tif"
    write_image(str(path), Image(img.astype(np.uint16), (1.0, 0.5, 0.5), {}))
    return path


def test_script_segments_a_stand_in_stack(stand_in_stack, tmp_path):
    out = tmp_path / "labels.tif"
    r = run_script(str(stand_in_stack), str(out), "--set", "ResampleToModelScale.CellDiameterUm=6")
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.exists()
    labels = read_image(str(out), channel=None)
    src = read_image(str(stand_in_stack))
    assert labels.data.dtype == np.uint16
    assert labels.data.shape == src.data.shape
    np.testing.assert_allclose(labels.spacing, src.spacing, rtol=1e-4)
    assert "c3dseg:" in r.stdout  # progress lines were relayed
    assert sorted(os.listdir(tmp_path)) == ["labels.tif", "stack.tif"]  # nothing else written


def test_script_reports_one_line_error_and_exit_code(tmp_path):
    r = run_script(str(tmp_path / "missing.tif"), str(tmp_path / "out.tif"))
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and "missing.tif" in err[0]
    assert not (tmp_path / "out.tif").exists()

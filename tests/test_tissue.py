"""The tissue mask (c3dseg.tissue, filter TissueMask): tissue versus the empty surround of a membrane
image, and the cells it removes from segment.xml's result."""

import logging
import os
import sys

import numpy as np
import pytest

from c3dseg import synthesis as S
from c3dseg.filters.base import get_filter
from c3dseg.image import Image
from c3dseg.reconstruction import filter_by_foreground_overlap
from c3dseg.tissue import tissue_halo, tissue_mask_image

sys.path.insert(0, os.path.dirname(__file__))
from test_diameter import EASY  # noqa: E402  (the same clean imaging settings)


@pytest.fixture(scope="module")
def organ():
    """An ovoid organ with an empty, noisy surround."""
    return S.make_sample({**EASY, "tissue": "ovoid"}, 5, shape=(32, 80, 80))


def test_mask_follows_the_tissue(organ):
    img, lab, sp, p = organ
    mask, info = tissue_mask_image(img, sp, p["median_diameter_um"], return_details=True)
    assert mask.shape == img.shape and mask.dtype == bool and not info["everything"]
    cells = lab > 0
    assert 0.2 < info["fraction"] < 0.9 and info["fraction"] == pytest.approx(mask.mean())
    assert mask[cells].mean() > 0.97          # the cells lie in the tissue
    # the mask reaches about one cell diameter beyond the walls (Reach 0.75 plus the boxes); farther
    # out it is surround
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(~cells, sampling=sp) / p["median_diameter_um"]
    assert mask[dist > 1.0].mean() < 0.4
    assert (dist > 1.5).sum() > 5000 and mask[dist > 1.5].mean() < 0.02


def test_mask_ignores_offset_and_gain(organ):
    img, _, sp, p = organ
    d = p["median_diameter_um"]
    a = tissue_mask_image(img, sp, d)
    b = tissue_mask_image(img.astype(np.float32) * 7.0 + 300.0, sp, d)
    assert np.mean(a == b) > 0.999            # float rounding may flip a voxel on a threshold


def test_noise_only_counts_as_tissue():
    """No visible walls anywhere: too little tissue to trust, so every voxel counts (no cell removed)."""
    rng = np.random.default_rng(0)
    img = rng.poisson(20.0, (24, 48, 48)).astype(np.float32)
    mask, info = tissue_mask_image(img, (2.0, 0.5, 0.5), 5.0, return_details=True)
    assert info["fraction"] < 0.05 and info["everything"] and mask.all()
    # the rule can be switched off
    mask, info = tissue_mask_image(img, (2.0, 0.5, 0.5), 5.0, min_fraction=0.0, return_details=True)
    assert not info["everything"] and mask.mean() == info["fraction"] < 0.05


def test_cells_in_the_surround_are_removed(organ):
    """segment.xml's last filter: InstanceForegroundOverlapFilter(labels, TissueMask, MinOverlap 0.5)
    removes cells found in the empty surround and keeps the organ's."""
    img, lab, sp, p = organ
    mask = tissue_mask_image(img, sp, p["median_diameter_um"])
    fake = lab.copy()
    top = int(fake.max())
    fake[:8, :10, :10] = top + 1              # corners of the volume: surround
    fake[-8:, -10:, -10:] = top + 2
    assert (lab[:8, :10, :10] == 0).all() and (lab[-8:, -10:, -10:] == 0).all()
    out = filter_by_foreground_overlap(fake, mask, min_overlap=0.5)
    kept = set(np.unique(out)) - {0}
    assert top + 1 not in kept and top + 2 not in kept
    assert len(kept) >= 0.97 * len(set(np.unique(lab)) - {0})


def test_filter_diameter_sources(organ, caplog):
    img, _, sp, p = organ
    flt = get_filter("TissueMask")
    d = p["median_diameter_um"]
    ref = tissue_mask_image(img, sp, d)
    (out,), _ = flt({}).run([Image(img, sp, {"cell_diameter_um": d})], [])   # the upstream estimate
    assert out.data.dtype == np.uint8 and np.array_equal(out.data, ref) and not out.meta.get("is_label")
    (out,), _ = flt({"CellDiameterUm": d}).run([Image(img, sp, {"cell_diameter_um": 3 * d})], [])  # the parameter wins
    assert np.array_equal(out.data, ref)
    (out,), _ = flt({}).run([Image(img, sp)], [])                            # none: estimated here
    assert out.data.shape == img.shape and 0 < out.data.mean() < 1
    (out,), _ = flt({}).run([Image(img, sp, {"cell_diameter_um": float("nan")})], [])  # no cells: all tissue
    assert out.data.all()
    rng = np.random.default_rng(1)
    noise = rng.poisson(20.0, (24, 48, 48)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        (out,), _ = flt({"CellDiameterUm": 5.0}).run([Image(noise, (2.0, 0.5, 0.5), {"basename": "n.tif"})], [])
    assert out.data.all() and "n.tif" in caplog.text and "every voxel counts as tissue" in caplog.text


def test_halo_covers_the_filters():
    h = tissue_halo((2.0, 0.5, 0.5), 5.0)
    # lateral: Gaussian sigma 0.5 um = 1 voxel truncated at 4, box of one cell (11 voxels) and of
    # 1.5 cells (17 voxels), halves; z: sigma 0.25 voxel (1), boxes 3 and 5 voxels (1, 2)
    assert h == (1 + 1 + 2, 4 + 5 + 8, 4 + 5 + 8)

"""The generic filters (intensity, regions, resampling, channels) on tiny arrays."""

import numpy as np
import pytest
import SimpleITK as sitk

from c3dseg.errors import ExecutionError, ParameterError
from c3dseg.filters.base import Context, registry
from c3dseg.filters.channels import ChannelMerger, ChannelSplitter
from c3dseg.filters.intensity import (BinaryThresholdImageFilter, DiscreteGaussianImageFilter,
                                      IntensityWindowingImageFilter, PercentileNormalization,
                                      RescaleIntensityImageFilter)
from c3dseg.filters.morphology import (RegionPropertiesFilter, ResampleImageFilter,
                                       VolumeBasedRegionRejectionFilter)
from c3dseg.image import Image
from c3dseg.intensity import discrete_gaussian, discrete_gaussian_kernel
from c3dseg.io import read_image, write_image, write_table
from c3dseg.regions import compact_labels, filter_by_volume, region_properties

SP = (2.0, 0.5, 0.25)


def run1(flt, *images):
    imgs, metas = flt.run(list(images), [])
    return imgs[0] if imgs else None, metas


# ------------------------------------------------------------------ intensity ------------------

def test_rescale_intensity_float_and_integer():
    f = Image(np.array([[[-2.0, 0.0, 2.0]]], np.float64), SP)
    out, _ = run1(RescaleIntensityImageFilter({}), f)
    assert out.data.dtype == np.float32
    np.testing.assert_allclose(out.data, [[[0, 0.5, 1]]])
    assert out.spacing == SP
    u = Image(np.array([[[10, 20, 30]]], np.uint16), SP)
    out, _ = run1(RescaleIntensityImageFilter({}), u)
    assert out.data.dtype == np.uint16
    np.testing.assert_array_equal(out.data, [[[0, 32768, 65535]]])
    const, _ = run1(RescaleIntensityImageFilter({}), Image(np.full((2, 2, 2), 7.0, np.float32), SP))
    assert not const.data.any()
    mc = Image(np.stack([np.full((1, 1, 2), [0.0, 1.0]), np.full((1, 1, 2), [10.0, 30.0])]), SP)
    out, _ = run1(RescaleIntensityImageFilter({}), mc)
    np.testing.assert_allclose(out.data[:, 0, 0], [[0, 1], [0, 1]])  # per channel


def test_intensity_windowing_itk_semantics():
    # PrimordiumSegmentation maps [0, 1] back to [-1, 1] before tracking
    img = Image(np.array([[[-0.5, 0.0, 0.25, 1.0, 3.0]]], np.float32), SP)
    p = {"WindowMinimum": "0", "WindowMaximum": "1", "OutputMinimum": "-1", "OutputMaximum": "1"}
    out, _ = run1(IntensityWindowingImageFilter(p), img)
    np.testing.assert_allclose(out.data, [[[-1, -1, -0.5, 1, 1]]])
    assert out.data.dtype == np.float32
    with pytest.raises(ParameterError, match="WindowMaximum"):
        IntensityWindowingImageFilter({"WindowMinimum": "2", "WindowMaximum": "1"})


def test_binary_threshold_inclusive_bounds():
    img = Image(np.array([[[0.2, 0.5, 0.7, 1.0, 1.2]]], np.float32), SP)
    out, _ = run1(BinaryThresholdImageFilter({"LowerThreshold": "0.5", "UpperThreshold": "1.0"}), img)
    assert out.data.dtype == np.uint8
    np.testing.assert_array_equal(out.data, [[[0, 1, 1, 1, 0]]])
    out, _ = run1(BinaryThresholdImageFilter({"InsideValue": "0.5", "OutsideValue": "-1"}), img)
    assert out.data.dtype == np.float32
    np.testing.assert_array_equal(out.data, [[[-1, 0.5, 0.5, 0.5, -1]]])
    with pytest.raises(ParameterError, match="UpperThreshold"):
        BinaryThresholdImageFilter({"LowerThreshold": "2", "UpperThreshold": "1"})


@pytest.mark.parametrize("use_spacing", [True, False])
def test_discrete_gaussian_matches_itk(use_spacing):
    rng = np.random.default_rng(0)
    a = rng.random((9, 14, 16)).astype(np.float32)
    # (ITK's Bessel recurrence loses accuracy past ~100 voxels^2; ours uses scipy's ive, so the
    # comparison stays below that)
    for variance, max_error, max_width in [(1.0, 0.01, 32), (2.5, 0.001, 32), (3.0, 0.01, 4)]:
        params = {"Variance": variance, "MaximumError": max_error, "MaximumKernelWidth": max_width,
                  "UseImageSpacing": int(use_spacing)}
        out, _ = run1(DiscreteGaussianImageFilter(params), Image(a, SP))
        ref = sitk.Image(sitk.GetImageFromArray(a))
        ref.SetSpacing(SP[::-1])
        expect = sitk.GetArrayFromImage(sitk.DiscreteGaussian(ref, [variance] * 3, max_width,
                                                              max_error, use_spacing))
        assert out.data.dtype == np.float32
        np.testing.assert_allclose(out.data, expect, atol=2e-6)


def test_discrete_gaussian_kernel_properties():
    k = discrete_gaussian_kernel(4.0, 0.001, 32)
    assert k.size % 2 == 1 and k.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(k, k[::-1])
    r = np.arange(k.size) - k.size // 2
    assert float((k * r ** 2).sum()) == pytest.approx(4.0, rel=0.01)  # the variance is kept
    assert discrete_gaussian_kernel(100.0, 0.01, 5).size == 2 * 6 - 1  # ITK: 6 one-sided coeffs
    a = np.zeros((15, 15, 15), np.float32)
    a[7, 7, 7] = 1
    np.testing.assert_array_equal(discrete_gaussian(a, 0.0), a)
    assert discrete_gaussian(a, 1.0).sum() == pytest.approx(1.0, rel=1e-5)
    assert discrete_gaussian(a, (0.0, 0.0, 1.0))[7, 7].sum() == pytest.approx(1.0, rel=1e-5)
    assert discrete_gaussian(a, (0.0, 0.0, 1.0))[6].max() == 0  # z untouched


def test_percentile_normalization():
    data = np.arange(101, dtype=np.float32).reshape(1, 1, 101)
    out, _ = run1(PercentileNormalization({}), Image(data, SP))
    assert out.data.dtype == np.float32
    assert out.data[0, 0, 2] == pytest.approx(0) and out.data[0, 0, 98] == pytest.approx(1)
    assert out.data.min() == 0 and out.data.max() == 1  # clipped
    out, _ = run1(PercentileNormalization({"Clip": "0", "LowerPercentile": "0",
                                           "UpperPercentile": "50"}), Image(data, SP))
    assert out.data[0, 0, 100] == pytest.approx(2.0)
    mc = Image(np.stack([data, data * 10]), SP)
    out, _ = run1(PercentileNormalization({}), mc)
    np.testing.assert_allclose(out.data[0], out.data[1], atol=1e-6)  # per channel
    with pytest.raises(ParameterError, match="UpperPercentile"):
        PercentileNormalization({"LowerPercentile": "60", "UpperPercentile": "40"})


# ------------------------------------------------------------------ regions --------------------

def _two_blobs():
    m = np.zeros((8, 8, 8), np.uint8)
    m[0:2, 0:2, 0:2] = 1        # 8 voxels
    m[4:7, 4:7, 4:7] = 1        # 27 voxels
    return m


def test_volume_rejection_binary_and_label_output():
    m = _two_blobs()
    out, _ = run1(VolumeBasedRegionRejectionFilter({"MinimumVolume": "10"}), Image(m, SP))
    assert out.data.dtype == np.uint8 and out.data.sum() == 27 and out.data[5, 5, 5] == 1
    assert out.data[0, 0, 0] == 0
    out, _ = run1(VolumeBasedRegionRejectionFilter({"MaximumVolume": "10", "LabelOutput": "1"}),
                  Image(m.astype(np.float32), SP))
    assert out.data.dtype == np.uint16 and out.meta["is_label"]
    assert set(np.unique(out.data)) == {0, 1} and out.data[1, 1, 1] == 1
    out, _ = run1(VolumeBasedRegionRejectionFilter({"LabelOutput": "1"}), Image(m, SP))
    assert set(np.unique(out.data)) == {0, 1, 2}
    with pytest.raises(ParameterError, match="MaximumVolume"):
        VolumeBasedRegionRejectionFilter({"MinimumVolume": "10", "MaximumVolume": "5"})


def test_volume_rejection_connectivity_and_label_input():
    m = np.zeros((4, 4, 4), np.uint8)
    m[0, 0, 0] = m[1, 1, 1] = 1  # touch only by a corner
    full, _ = run1(VolumeBasedRegionRejectionFilter({"MinimumVolume": "2"}), Image(m, SP))
    face, _ = run1(VolumeBasedRegionRejectionFilter({"MinimumVolume": "2", "FullyConnected": "0"}),
                   Image(m, SP))
    assert full.data.sum() == 2 and face.data.sum() == 0
    lab = np.zeros((4, 4, 4), np.uint16)
    lab[0, :, :] = 5           # 16 voxels, touching label 9
    lab[1, :2, :2] = 9         # 4 voxels
    out, _ = run1(VolumeBasedRegionRejectionFilter({"BinaryInput": "0", "LabelOutput": "1",
                                                    "MinimumVolume": "5"}), Image(lab, SP))
    assert out.data[0].min() == 1 and out.data[1].max() == 0  # labels are not merged
    with pytest.raises(ExecutionError, match="KeepDataType"):
        run1(VolumeBasedRegionRejectionFilter({"BinaryInput": "0"}), Image(lab * 0.5, SP))


def test_filter_by_volume_sparse_label_values():
    lab = np.zeros((3, 3, 3), np.int64)
    lab[0] = 4_000_000_000
    lab[1, 0, 0] = 7
    out = filter_by_volume(lab, min_volume=2)
    assert set(np.unique(out)) == {0, 1} and out[0].min() == 1
    out = filter_by_volume(lab, min_volume=2, relabel=False)
    assert out[0, 0, 0] == 4_000_000_000 and out[1, 0, 0] == 0
    compact, ids = compact_labels(lab)
    assert list(ids) == [0, 7, 4_000_000_000] and compact[1, 0, 0] == 1


def test_region_properties_table(tmp_path):
    lab = np.zeros((6, 7, 8), np.uint32)
    lab[1:3, 2:5, 3:7] = 4      # 2 x 3 x 4 = 24 voxels
    lab[5, 6, 7] = 9            # one voxel
    img, metas = RegionPropertiesFilter({}).run([Image(lab, SP, {"basename": "s"})], [])
    assert img[0].data is lab
    t = metas[0]
    assert t.columns[:5] == ["label", "volume", "centroid_x", "centroid_y", "centroid_z"]
    np.testing.assert_array_equal(t.column("label"), [4, 9])
    np.testing.assert_array_equal(t.column("volume"), [24, 1])
    np.testing.assert_allclose(t.column("volume_um3"), [24 * 0.25, 0.25])
    np.testing.assert_allclose(t.column("centroid_x"), [4.5, 7])
    np.testing.assert_allclose(t.column("centroid_y"), [3, 6])
    np.testing.assert_allclose(t.column("centroid_z"), [1.5, 5])
    np.testing.assert_allclose(t.column("centroid_z_um"), [3.0, 10.0])
    np.testing.assert_array_equal(t.column("bbox_x_min"), [3, 7])
    np.testing.assert_array_equal(t.column("bbox_x_max"), [6, 7])
    np.testing.assert_array_equal(t.column("bbox_z_max"), [2, 5])
    text = open(write_table(tmp_path / "p.csv", t)).read().splitlines()
    assert text[0].startswith("label;volume;centroid_x;centroid_y;centroid_z;")
    assert text[1].startswith("4;24;4.5;3.0;1.5;")
    _, metas = RegionPropertiesFilter({}).run([Image(np.zeros((2, 2, 2), np.uint16), SP)], [])
    assert len(metas[0]) == 0
    with pytest.raises(ExecutionError, match="label image"):
        RegionPropertiesFilter({}).run([Image(np.full((2, 2, 2), 0.5, np.float32), SP)], [])


def test_region_properties_agrees_with_skimage():
    from skimage.measure import regionprops

    from c3dseg.synthesis import voronoi_labels

    lab = voronoi_labels((20, 24, 28), 15, seed=3)
    props = region_properties(lab)
    ref = regionprops(lab)
    np.testing.assert_array_equal(props["label"], [r.label for r in ref])
    np.testing.assert_array_equal(props["volume"], [r.area for r in ref])
    np.testing.assert_allclose(props["centroid_z"], [r.centroid[0] for r in ref])
    np.testing.assert_allclose(props["centroid_x"], [r.centroid[2] for r in ref])
    np.testing.assert_array_equal(props["bbox_y_max"], [r.bbox[4] - 1 for r in ref])


# ------------------------------------------------------------------ resampling -----------------

def test_resample_to_spacing_and_factors():
    a = np.random.default_rng(1).random((4, 6, 8)).astype(np.float32)
    out, _ = run1(ResampleImageFilter({"SpacingZ": "0.5", "SpacingX": "0.5"}), Image(a, SP))
    assert out.data.shape == (16, 6, 4) and out.spacing == pytest.approx((0.5, 0.5, 0.5))
    assert out.data.dtype == np.float32
    out, _ = run1(ResampleImageFilter({"FactorY": "2"}), Image(a, SP))
    assert out.data.shape == (4, 12, 8) and out.spacing == pytest.approx((2.0, 0.25, 0.25))
    const, _ = run1(ResampleImageFilter({"FactorZ": "3"}), Image(np.full((2, 3, 3), 5.0, np.float32), SP))
    np.testing.assert_allclose(const.data, 5.0)
    with pytest.raises(ParameterError, match="not both"):
        ResampleImageFilter({"SpacingZ": "1", "FactorZ": "2"})


def test_resample_labels_nearest_and_back_onto_a_reference():
    lab = np.zeros((4, 6, 8), np.uint16)
    lab[1:3, 1:4, 2:7] = 3
    lab[0, 0, 0] = 12
    ref = Image(np.zeros((4, 6, 8), np.float32), SP)
    img = Image(lab, SP, {"is_label": True})
    up, _ = run1(ResampleImageFilter({"SpacingZ": "0.25", "SpacingY": "0.25"}), img)
    assert up.data.dtype == np.uint16 and set(np.unique(up.data)) == {0, 3, 12}  # nothing blended
    assert up.data.shape == (32, 12, 8)
    back, _ = run1(ResampleImageFilter({}), up, ref)
    assert back.spacing == SP
    np.testing.assert_array_equal(back.data, lab)
    # linear on request, even for integers
    lin, _ = run1(ResampleImageFilter({"FactorX": "2", "Interpolation": "linear"}), img)
    assert len(np.unique(lin.data)) > 3


# ------------------------------------------------------------------ channels -------------------

def test_channel_split_and_merge(tmp_path):
    a = np.random.default_rng(2).random((3, 4, 5, 6)).astype(np.float32)
    img = Image(a, SP, {"channel_names": ["mem", "nuc", "bg"], "basename": "x"})
    outs, _ = ChannelSplitter({}).run([img], [])
    assert len(outs) == 4 and outs[3] is None
    for k in range(3):
        np.testing.assert_array_equal(outs[k].data, a[k])
        assert outs[k].spacing == SP and outs[k].meta["channel_name"] == img.meta["channel_names"][k]
    merged, _ = run1(ChannelMerger({}), *outs[:3])
    np.testing.assert_array_equal(merged.data, a)
    assert merged.meta["channel_names"] == ["mem", "nuc", "bg"] and merged.spacing == SP
    merged, _ = run1(ChannelMerger({"ChannelNames": "a, b"}), outs[0], Image(a[1], (9, 9, 9)))
    assert merged.data.shape == (2, 4, 5, 6) and merged.meta["channel_names"] == ["a", "b"]
    assert merged.spacing == SP  # spacing of input 1
    p = write_image(tmp_path / "m.ome.tif", merged)
    assert read_image(p).meta["channel_names"] == ["a", "b"]
    single, _ = ChannelSplitter({}).run([Image(a[0], SP)], [])
    np.testing.assert_array_equal(single[0].data, a[0])
    assert single[1] is None


def test_channel_errors():
    a = np.zeros((3, 4, 5), np.float32)
    with pytest.raises(ExecutionError, match="shape"):
        ChannelMerger({}, Context(item_id="item_0004")).run([Image(a, SP), Image(a[:2], SP)], [])
    with pytest.raises(ExecutionError, match="3 names for 2 channels"):
        ChannelMerger({"ChannelNames": "a,b,c"}).run([Image(a, SP), Image(a, SP)], [])
    with pytest.raises(ExecutionError, match="at most 4"):
        ChannelSplitter({}).run([Image(np.zeros((5, 2, 2, 2)), SP)], [])


# ------------------------------------------------------------------ registry -------------------

MINE = ["ImageReader", "ImageWriter", "RescaleIntensityImageFilter", "IntensityWindowingImageFilter",
        "BinaryThresholdImageFilter", "DiscreteGaussianImageFilter", "PercentileNormalization",
        "VolumeBasedRegionRejectionFilter", "ResampleImageFilter", "RegionPropertiesFilter",
        "ChannelSplitter", "ChannelMerger"]


@pytest.mark.parametrize("name", MINE)
def test_filters_are_registered_and_described(name):
    cls = registry()[name]
    text = cls.describe()
    assert name in text and "parameters:" in text
    cls({})  # defaults are valid


def test_fixture_parameters_are_accepted(xpiwit_fixture):
    from lxml import etree

    tree = etree.parse(xpiwit_fixture("Cellpose3D.xml"))
    seen = 0
    for item in tree.iter("item"):
        name = item.findtext("name")
        if name not in MINE:
            continue
        params = {p.get("key"): p.get("value") for p in item.iter("parameter")}
        unknown = []
        registry()[name].resolve_params(params, unknown=unknown)
        assert unknown == [], (name, unknown)
        seen += 1
    assert seen == 7  # reader, rescale, threshold, region rejection, three Gaussians

"""Image I/O: round trips with spacing, layouts, labels, atomic writes, bad input, the reader and
writer filters."""

import errno
import logging
import os

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from c3dseg.errors import C3DError, ExecutionError, InputError, ParameterError
from c3dseg.filters.base import Context
from c3dseg.filters.io import ImageReader, ImageWriter
from c3dseg.image import Image, MetaTable
from c3dseg.io import (count_nonfinite, image_extensions, image_format, is_image_file, read_image,
                       read_series, strip_image_extension, to_precision, write_image, write_table)

SPACING = (2.5, 0.4, 0.3)
FORMATS = ["tif", "ome.tif", "nrrd", "nii", "nii.gz", "mha", "mhd"]


def _vol(dtype=np.uint16, shape=(5, 6, 7), seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 200, shape).astype(dtype)


def _listing(folder):
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------ round trips ----------------

@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_round_trip_keeps_data_type_and_spacing(tmp_path, ext, dtype):
    a = _vol(dtype)
    path = write_image(tmp_path / f"cells.{ext}", Image(a, SPACING), compression=(dtype != np.uint8))
    img = read_image(path)
    assert img.data.dtype == a.dtype
    np.testing.assert_array_equal(img.data, a)
    np.testing.assert_allclose(img.spacing, SPACING, rtol=1e-5)
    assert img.meta["basename"] == "cells"
    assert img.meta["spacing_from_file"] is True
    assert img.meta["source"] == os.path.abspath(path)
    assert img.meta["dtype"] == str(a.dtype)
    assert img.meta["unit"] == "um"


def test_imagej_tiff_calibration_is_what_fiji_reads(tmp_path):
    p = write_image(tmp_path / "a.tif", Image(_vol(), SPACING), compression=True)
    with tifffile.TiffFile(p) as tif:
        assert tif.is_imagej and not tif.is_ome
        ij = tif.imagej_metadata
        assert ij["unit"] == "um" and ij["spacing"] == pytest.approx(2.5)
        assert ij["slices"] == 5
        page = tif.pages[0]
        num, den = page.tags["XResolution"].value
        assert num / den == pytest.approx(1 / 0.3, rel=1e-5)  # pixels per um
        num, den = page.tags["YResolution"].value
        assert num / den == pytest.approx(1 / 0.4, rel=1e-5)
        # deflate (code 8) without predictor, in strips: what ImageJ 1.x decodes
        assert page.compression == 8 and page.predictor == 1 and not page.is_tiled
    p2 = write_image(tmp_path / "b.tif", Image(_vol(), SPACING), compression=False)
    with tifffile.TiffFile(p2) as tif:
        assert tif.pages[0].compression == 1


def test_ome_tiff_physical_size_and_channel_names(tmp_path):
    a = _vol(np.float32, (2, 4, 5, 6))
    p = write_image(tmp_path / "a.ome.tif", Image(a, SPACING, {"channel_names": ["membrane", "nuclei"]}))
    with tifffile.TiffFile(p) as tif:
        assert tif.is_ome and "PhysicalSizeZ=\"2.5\"" in tif.ome_metadata
    img = read_image(p)
    assert img.data.shape == (2, 4, 5, 6) and img.meta["channel_names"] == ["membrane", "nuclei"]
    np.testing.assert_array_equal(img.data, a)
    # ome=True on a .tif writes OME too
    p2 = write_image(tmp_path / "b.tif", Image(a[0], SPACING), ome=True)
    assert read_image(p2).meta["format"] == "ome-tiff"


@pytest.mark.parametrize("ext", ["tif", "ome.tif", "nrrd", "nii.gz", "mha"])
def test_multichannel_round_trip_and_channel_selection(tmp_path, ext):
    a = np.stack([_vol(seed=1), _vol(seed=2), _vol(seed=3)])  # C Z Y X
    p = write_image(tmp_path / f"mc.{ext}", Image(a, SPACING))
    img = read_image(p)
    assert img.is_multichannel and img.data.shape == a.shape
    np.testing.assert_array_equal(img.data, a)
    np.testing.assert_allclose(img.spacing, SPACING, rtol=1e-5)
    one = read_image(p, channel=2)
    assert one.data.shape == a.shape[1:]
    np.testing.assert_array_equal(one.data, a[2])
    with pytest.raises(InputError, match="channel 3 does not exist: the image has 3 channels"):
        read_image(p, channel=3)


def test_imagej_hyperstack_is_zcyx_on_disk(tmp_path):
    a = np.zeros((2, 3, 4, 5), np.uint16)
    a[1] = 9
    p = write_image(tmp_path / "h.tif", Image(a, SPACING))
    with tifffile.TiffFile(p) as tif:
        assert tif.series[0].axes == "ZCYX"
        assert tif.imagej_metadata["channels"] == 2 and tif.imagej_metadata["slices"] == 3
    assert read_image(p).data[1].min() == 9


def test_spacing_override_and_uncalibrated_files(tmp_path):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, _vol(), photometric="minisblack")  # no calibration at all
    img = read_image(p)
    assert img.spacing == (1.0, 1.0, 1.0) and img.meta["spacing_from_file"] is False
    img = read_image(p, spacing=(3.0, None, -1))
    assert img.spacing == (3.0, 1.0, 1.0)
    p2 = write_image(tmp_path / "cal.nrrd", Image(_vol(), SPACING))
    assert read_image(p2, spacing=(0, 0.2, 0)).spacing == (2.5, 0.2, 0.3)
    p3 = write_image(tmp_path / "ones.nrrd", Image(_vol(), (1, 1, 1)))
    assert read_image(p3).meta["spacing_from_file"] is False


def test_plain_tiff_centimetre_resolution(tmp_path):
    p = tmp_path / "cm.tif"
    tifffile.imwrite(p, _vol(), photometric="minisblack", resolution=(1e4 / 0.5, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    img = read_image(p)
    assert img.spacing[1:] == pytest.approx((0.25, 0.5))


def test_imagej_units_are_converted_to_micrometres(tmp_path):
    p = tmp_path / "nm.tif"
    tifffile.imwrite(p, _vol(), imagej=True, resolution=(1 / 200.0, 1 / 100.0),
                     metadata={"spacing": 1000.0, "unit": "nm", "axes": "ZYX"})
    assert read_image(p).spacing == pytest.approx((1.0, 0.1, 0.2))  # (z, y, x)


def test_foreign_layouts(tmp_path):
    # ImageJ file saved with frames instead of slices: T is the stack axis
    p = tmp_path / "frames.tif"
    tifffile.imwrite(p, _vol()[:, None, None], imagej=True, metadata={"axes": "TZCYX"})
    assert read_image(p).data.shape == (5, 6, 7)
    # a time series of stacks is not taken for a 3D image
    p = tmp_path / "tz.tif"
    tifffile.imwrite(p, np.zeros((2, 3, 4, 5), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(InputError, match="time series"):
        read_image(p)
    # an RGB stack: samples become channels
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, np.zeros((3, 4, 5, 3), np.uint8), photometric="rgb")
    assert read_image(p).data.shape == (3, 3, 4, 5)
    # OME written CZYX by another tool
    p = tmp_path / "o.ome.tif"
    tifffile.imwrite(p, np.zeros((2, 3, 4, 5), np.uint16), ome=True,
                     metadata={"axes": "CZYX", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "nm"})
    img = read_image(p)
    assert img.data.shape == (2, 3, 4, 5) and img.spacing[2] == pytest.approx(0.0005)


def test_nifti_micron_header_is_read_in_micrometres(tmp_path):
    p = write_image(tmp_path / "x.nii", Image(_vol(), SPACING))
    raw = bytearray(open(p, "rb").read())
    raw[123] = 3 | 8  # xyzt_units: micron, seconds (ITK would report millimetres)
    q = tmp_path / "micron.nii"
    q.write_bytes(bytes(raw))
    assert sitk.ReadImage(str(q)).GetSpacing()[0] == pytest.approx(0.0003)
    assert read_image(q).spacing == pytest.approx(SPACING)


# ------------------------------------------------------------------ series reader --------------

def _write_series(folder, n, shape=(6, 7), start=0, dtype=np.uint16):
    planes = []
    for i in range(start, start + n):
        plane = np.full(shape, i, dtype)
        tifffile.imwrite(folder / f"cells_t{i:03d}.tif", plane, imagej=True,
                         resolution=(1 / 0.5, 1 / 0.5), metadata={"unit": "um"})
        planes.append(plane)
    return np.stack(planes)


def test_series_reader_stacks_2d_files(tmp_path):
    expect = _write_series(tmp_path, 4)
    img = read_series(str(tmp_path / "cells_t%03d.tif"), 0, 499, 1)  # XPIWIT's default range
    np.testing.assert_array_equal(img.data, expect)
    assert img.spacing == pytest.approx((1.0, 0.5, 0.5))
    assert img.meta["basename"] == "cells_t"
    img = read_series(str(tmp_path / "cells_t%03d.tif"), 1, 3, 2, spacing=(4.0, None, None))
    np.testing.assert_array_equal(img.data[:, 0, 0], [1, 3])
    assert img.spacing[0] == 4.0


def test_series_reader_errors(tmp_path):
    _write_series(tmp_path, 3)
    os.remove(tmp_path / "cells_t001.tif")
    with pytest.raises(InputError, match="missing, first: .*cells_t001.tif"):
        read_series(str(tmp_path / "cells_t%03d.tif"), 0, 10)
    with pytest.raises(InputError, match="no file of the series"):
        read_series(str(tmp_path / "other_%03d.tif"), 0, 10)
    with pytest.raises(InputError, match="%0nd"):
        read_series(str(tmp_path / "cells_t000.tif"), 0, 10)
    tifffile.imwrite(tmp_path / "cells_t001.tif", np.zeros((3, 3), np.uint16))
    with pytest.raises(InputError, match="shape"):
        read_series(str(tmp_path / "cells_t%03d.tif"), 0, 10)
    tifffile.imwrite(tmp_path / "cells_t001.tif", np.zeros((2, 6, 7), np.uint16))
    with pytest.raises(InputError, match="must be 2D"):
        read_series(str(tmp_path / "cells_t%03d.tif"), 0, 10)


# ------------------------------------------------------------------ labels and types -----------

@pytest.mark.parametrize("ext", ["tif", "nrrd", "ome.tif"])
def test_labels_past_65535_are_uint32_with_a_warning(tmp_path, ext, caplog):
    lab = np.zeros((4, 5, 6), np.int64)
    lab[0, 0, :3] = [1, 65535, 70000]
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        p = write_image(tmp_path / f"lab.{ext}", Image(lab, SPACING, {"is_label": True}))
    assert any("exceed 65535" in r.message and "uint32" in r.message for r in caplog.records)
    back = read_image(p)
    assert back.data.dtype == np.uint32 and back.data[0, 0, 2] == 70000
    np.testing.assert_allclose(back.spacing, SPACING, rtol=1e-5)


def test_small_labels_are_uint16_without_warning(tmp_path, caplog):
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1, 1, 1] = 3
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        p = write_image(tmp_path / "lab.tif", Image(lab, SPACING, {"is_label": True}))
        q = write_image(tmp_path / "int.tif", Image(lab.astype(np.int64), SPACING))  # integer: label
    assert not caplog.records
    assert read_image(p).data.dtype == np.uint16 and read_image(q).data.dtype == np.uint16


def test_bad_labels_are_refused(tmp_path):
    with pytest.raises(ExecutionError, match="non-integer"):
        write_image(tmp_path / "l.tif", Image(np.full((2, 2, 2), 1.5, np.float32), SPACING), label=True)
    with pytest.raises(ExecutionError, match="negative"):
        write_image(tmp_path / "l.tif", Image(np.full((2, 2, 2), -1, np.int32), SPACING), label=True)
    with pytest.raises(ExecutionError, match="wrap"):
        write_image(tmp_path / "l.tif", Image(np.full((2, 2, 2), 300, np.int32), SPACING), dtype=np.uint8)
    assert _listing(tmp_path) == []


def test_types_stored(tmp_path):
    b = write_image(tmp_path / "b.tif", Image(np.ones((2, 3, 4), bool), SPACING))
    assert read_image(b).data.dtype == np.uint8
    f = write_image(tmp_path / "f.nrrd", Image(np.ones((2, 3, 4), np.float64), SPACING))
    assert read_image(f).data.dtype == np.float32
    i = write_image(tmp_path / "i.tif", Image(np.full((2, 3, 4), -5, np.int32), SPACING), label=False)
    back = read_image(i)
    assert back.data.dtype == np.int16 and back.data.min() == -5


# ------------------------------------------------------------------ atomic writes ---------------

def test_disk_full_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = tifffile.FileHandle.write

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(tifffile.FileHandle, "write", failing_write)
    with pytest.raises(ExecutionError, match="No space left on device") as ei:
        write_image(tmp_path / "out.tif", Image(_vol(shape=(20, 30, 40)), SPACING))
    assert str(tmp_path / "out.tif") in str(ei.value)
    assert calls["n"] > 3  # the failure happened mid-write
    assert _listing(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    p = write_image(tmp_path / "out.tif", Image(_vol(), SPACING))
    before = open(p, "rb").read()

    def failing_write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile.FileHandle, "write", failing_write)
    with pytest.raises(ExecutionError):
        write_image(p, Image(_vol(seed=5), SPACING))
    assert open(p, "rb").read() == before
    assert _listing(tmp_path) == ["out.tif"]


def test_simpleitk_failure_leaves_nothing(tmp_path, monkeypatch):
    def partial(img, path, useCompression=False):
        with open(path, "wb") as f:
            f.write(b"NRRD0004\npartial")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: write failed")

    monkeypatch.setattr(sitk, "WriteImage", partial)
    with pytest.raises(ExecutionError, match="write failed"):
        write_image(tmp_path / "out.nrrd", Image(_vol(), SPACING))
    assert _listing(tmp_path) == []


def test_mhd_writes_header_and_data(tmp_path):
    write_image(tmp_path / "v.mhd", Image(_vol(), SPACING), compression=False)
    assert _listing(tmp_path) == ["v.mhd", "v.raw"]


def test_protected_input_is_never_overwritten(tmp_path):
    src = write_image(tmp_path / "input.tif", Image(_vol(), SPACING))
    before = open(src, "rb").read()
    other = os.path.join(str(tmp_path), ".", "input.tif")  # another spelling of the same path
    with pytest.raises(ExecutionError, match="refusing to overwrite an input") as ei:
        write_image(other, Image(_vol(seed=9), SPACING), protect=[src])
    assert "input.tif" in str(ei.value)
    assert open(src, "rb").read() == before
    os.symlink(src, tmp_path / "link.tif")
    with pytest.raises(ExecutionError, match="refusing"):
        write_image(tmp_path / "link.tif", Image(_vol(), SPACING), protect=[src])


def test_overwrite_false_and_unwritable_targets(tmp_path, monkeypatch):
    p = write_image(tmp_path / "x.tif", Image(_vol(), SPACING))
    with pytest.raises(ExecutionError, match="exists"):
        write_image(p, Image(_vol(), SPACING), overwrite=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExecutionError, match="cannot create the output folder"):
        write_image(tmp_path / "afile" / "sub" / "y.tif", Image(_vol(), SPACING))
    with pytest.raises(ExecutionError, match="unknown output format"):
        write_image(tmp_path / "y.png", Image(_vol(), SPACING))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(tmp_path / "ro") else real_access(p, m))
    (tmp_path / "ro").mkdir()
    with pytest.raises(ExecutionError, match="not writable") as ei:
        write_image(tmp_path / "ro" / "y.tif", Image(_vol(), SPACING))
    assert str(tmp_path / "ro") in str(ei.value)
    # creating missing folders is fine
    assert os.path.exists(write_image(tmp_path / "new" / "deep" / "z.nrrd", Image(_vol(), SPACING)))


def test_write_table_semicolon_csv(tmp_path):
    t = MetaTable(["label", "volume", "x"], [[1, 10, 0.5], [2, 20, 1.25]])
    p = write_table(tmp_path / "props.csv", t)
    lines = open(p).read().splitlines()
    assert lines == ["label;volume;x", "1;10;0.5", "2;20;1.25"]
    assert _listing(tmp_path) == ["props.csv"]


# ------------------------------------------------------------------ bad input ------------------

def test_bad_input_files(tmp_path):
    with pytest.raises(InputError, match="file not found") as ei:
        read_image(tmp_path / "nope.tif")
    assert ei.value.file == str(tmp_path / "nope.tif")
    with pytest.raises(InputError, match="folder"):
        read_image(tmp_path)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_image(tmp_path / "empty.tif")
    (tmp_path / "junk.tif").write_bytes(os.urandom(300))
    with pytest.raises(InputError, match="cannot read") as ei:
        read_image(tmp_path / "junk.tif")
    assert "\n" not in str(ei.value)
    (tmp_path / "junk.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\n"
                                        b"encoding: raw\n\n" + b"\0" * 20)
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "junk.nrrd")
    good = write_image(tmp_path / "good.tif", Image(_vol(shape=(8, 30, 40)), SPACING), compression=False)
    data = open(good, "rb").read()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        read_image(tmp_path / "truncated.tif")
    (tmp_path / "x.png").write_bytes(b"\x89PNG....")
    with pytest.raises(InputError, match="unknown image format"):
        read_image(tmp_path / "x.png")


def test_2d_empty_and_non_finite_images(tmp_path):
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, np.zeros((6, 7), np.uint8))
    with pytest.raises(InputError, match=r"2D \(Y, X\) \(6, 7\); a 3D stack is needed"):
        read_image(p)
    assert read_image(p, allow_2d=True).data.shape == (1, 6, 7)
    p = tmp_path / "zero.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(p, np.zeros((0, 4, 5), np.uint8))
    with pytest.raises(InputError, match="empty"):
        read_image(p)
    a = np.zeros((3, 4, 5), np.float32)
    a[1, 2, 3] = np.nan
    a[0, 0, 0] = np.inf
    p = tmp_path / "nan.tif"
    tifffile.imwrite(p, a, photometric="minisblack")
    with pytest.raises(InputError, match="2 non-finite values"):
        read_image(p)
    assert count_nonfinite(a) == 2 and count_nonfinite(np.zeros(3)) == 0
    assert np.isnan(read_image(p, check_finite=False).data[1, 2, 3])


# ------------------------------------------------------------------ names ----------------------

def test_names_and_extensions(tmp_path):
    assert ".ome.tif" in image_extensions() and ".nii.gz" in image_extensions()
    assert strip_image_extension("/a/b/cells.ome.tif") == "cells"
    assert strip_image_extension("x.nii.gz") == "x"
    assert strip_image_extension("x.TIF") == "x"
    assert strip_image_extension("notes.txt") == "notes"
    assert image_format("a.ome.tiff") == "ome" and image_format("a.tif") == "tiff"
    assert image_format("a.csv") is None and image_format(".tif") is None
    write_image(tmp_path / "a.tif", Image(_vol(), SPACING))
    (tmp_path / "b.csv").write_text("x")
    assert is_image_file(tmp_path / "a.tif")
    assert not is_image_file(tmp_path / "b.csv") and not is_image_file(tmp_path / "missing.tif")
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    assert not is_image_file(tmp_path / ".hidden.tif")


# ------------------------------------------------------------------ precision ------------------

def test_to_precision():
    img = Image(np.array([[[0.0, 0.5, 1.0]]], np.float32), SPACING)
    np.testing.assert_array_equal(to_precision(img, 8).data, [[[0, 128, 255]]])
    np.testing.assert_array_equal(to_precision(img, 16).data, [[[0, 32768, 65535]]])
    assert to_precision(img, 16).data.dtype == np.uint16
    assert to_precision(img, 32).data.dtype == np.float32
    flow = Image(np.array([[[-1.0, 0.0, 1.0]]], np.float32), SPACING)  # not in [0, 1]: min-max
    np.testing.assert_array_equal(to_precision(flow, 8).data, [[[0, 128, 255]]])
    raw = Image(np.array([[[0, 100, 1000]]], np.uint16), SPACING)
    np.testing.assert_array_equal(to_precision(raw, 16).data, [[[0, 100, 1000]]])  # fits: kept
    np.testing.assert_array_equal(to_precision(raw, 8).data, [[[0, 26, 255]]])  # rescaled
    lab = Image(np.array([[[0, 3, 70000]]], np.uint32), SPACING, {"is_label": True})
    out = to_precision(lab, 8)
    assert out.data.dtype == np.uint32 and out.data.max() == 70000  # labels never rescaled
    assert to_precision(Image(np.array([[[0, 3, 9]]], np.int32), SPACING), 8).data.dtype == np.uint16
    assert out.spacing == SPACING
    with pytest.raises(ValueError):
        to_precision(img, 12)


# ------------------------------------------------------------------ the filters ----------------

def test_image_reader_spacing_rules(tmp_path):
    cal = write_image(tmp_path / "cal.tif", Image(_vol(), SPACING))
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _vol(), photometric="minisblack")
    xpiwit = {"SpacingX": "1", "SpacingY": "1", "SpacingZ": "1"}  # the fixture's values
    [img], _ = ImageReader(xpiwit).run([str(cal)], [])
    assert img.spacing == pytest.approx(SPACING)  # a calibrated file wins over 1/1/1
    [img], _ = ImageReader({"SpacingZ": "5", "SpacingX": "0.2", "SpacingY": "-1"}).run([str(plain)], [])
    assert img.spacing == pytest.approx((5.0, 1.0, 0.2))  # uncalibrated: parameters apply
    [img], _ = ImageReader({"SpacingZ": "5", "OverrideSpacing": "1"}).run([str(cal)], [])
    assert img.spacing == pytest.approx((5.0, 0.4, 0.3))


def test_image_reader_intensity_mapping(tmp_path):
    a = np.array([[[10, 20], [30, 50]]] * 2, np.uint16)
    p = write_image(tmp_path / "a.tif", Image(a, SPACING))
    [img], _ = ImageReader({"InputMinimumValue": "0", "InputMaximumValue": "255"}).run([p], [])
    assert img.data.dtype == np.float32 and img.data.max() == pytest.approx(50 / 255)
    [img], _ = ImageReader({}).run([p], [])  # -1/-1: detect
    assert img.data.min() == 0 and img.data.max() == 1 and img.data[0, 0, 1] == pytest.approx(0.25)
    [img], _ = ImageReader({"KeepDataType": "1"}).run([p], [])
    assert img.data.dtype == np.uint16 and img.data.max() == 50
    with pytest.raises(ParameterError, match="InputMaximumValue"):
        ImageReader({"InputMinimumValue": "5", "InputMaximumValue": "1"})


def test_image_reader_channels_series_and_errors(tmp_path):
    a = np.stack([_vol(seed=1), _vol(seed=2)])
    p = write_image(tmp_path / "mc.tif", Image(a, SPACING))
    [img], _ = ImageReader({"Channel": "1", "KeepDataType": "1"}).run([p], [])
    np.testing.assert_array_equal(img.data, a[1])
    [img], _ = ImageReader({"KeepDataType": "1"}).run([p], [])
    assert img.data.shape == a.shape
    with pytest.raises(InputError) as ei:
        ImageReader({"Channel": "4"}, Context(item_id="item_0001")).run([p], [])
    assert "item_0001 (ImageReader)" in str(ei.value) and "channel 4" in str(ei.value)
    _write_series(tmp_path, 3)
    [img], _ = ImageReader({"UseSeriesReader": "1", "SeriesMaxIndex": "2", "KeepDataType": "1",
                            "SpacingZ": "2"}).run([str(tmp_path / "cells_t%03d.tif")], [])
    assert img.data.shape == (3, 6, 7) and img.spacing == pytest.approx((2.0, 0.5, 0.5))
    with pytest.raises(InputError, match="file not found"):
        ImageReader({}).run([str(tmp_path / "missing.tif")], [])


def test_image_writer(tmp_path):
    base = tmp_path / "pipe"
    base.mkdir()
    ctx = Context(item_id="item_0010", base_dir=str(base),
                  extra={"output_path": str(tmp_path / "out" / "result.tif"),
                         "protected_paths": (str(tmp_path / "in.tif"),)})
    lab = Image(np.arange(24, dtype=np.int32).reshape(2, 3, 4), SPACING, {"is_label": True, "basename": "s"})
    assert ImageWriter({}, ctx).run([lab], []) == ([], [])
    assert ctx.extra["written"] == [str(tmp_path / "out" / "result.tif")]
    back = read_image(tmp_path / "out" / "result.tif")
    assert back.data.dtype == np.uint16 and back.spacing == pytest.approx(SPACING)
    # FileName relative to the pipeline's folder, Format replaces the extension
    ImageWriter({"FileName": "res/x.tif", "Format": "nrrd"}, ctx).run([lab], [])
    assert os.path.exists(base / "res" / "x.nrrd")
    # a folder output: <basename>.<ext>
    ctx.extra["output_path"] = str(tmp_path / "folder") + os.sep
    ImageWriter({"Format": "nii.gz"}, ctx).run([lab], [])
    assert os.path.exists(tmp_path / "folder" / "s.nii.gz")
    # LabelImage=1 turns an integral float image into uint16 labels; Precision converts
    f = Image(np.array([[[0.0, 2.0], [1.0, 1.0]]] * 2, np.float32), SPACING)
    ImageWriter({"FileName": str(tmp_path / "f.tif"), "LabelImage": "1"}, ctx).run([f], [])
    assert read_image(tmp_path / "f.tif").data.dtype == np.uint16
    ImageWriter({"FileName": str(tmp_path / "p.tif"), "Precision": "8"}, ctx).run([f], [])
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif").data[1], [[0, 255], [128, 128]])
    with pytest.raises(ExecutionError, match="refusing") as ei:
        ImageWriter({"FileName": str(tmp_path / "in.tif")}, ctx).run([lab], [])
    assert "item_0010 (ImageWriter)" in str(ei.value)
    with pytest.raises(ParameterError, match="FileName"):
        ImageWriter({"FileName": "out.png"})
    with pytest.raises(ParameterError, match="Precision"):
        ImageWriter({"Precision": "12"})
    with pytest.raises(ExecutionError, match="no FileName"):
        ImageWriter({}, Context()).run([lab], [])


def test_errors_are_c3d_errors_with_one_line(tmp_path):
    for call in (lambda: read_image(tmp_path / "x.tif"),
                 lambda: write_image(tmp_path / "x.xyz", Image(_vol(), SPACING))):
        with pytest.raises(C3DError) as ei:
            call()
        assert "\n" not in str(ei.value)


# ------------------------------------------------------------------ through the runner ---------

def test_reader_filters_writer_through_c3d_run(tmp_path, monkeypatch):
    from c3dseg.runner.cli import main
    from pipeline_kit import item, pipeline_xml

    mem = np.full((6, 12, 12), 200, np.uint16)
    mem[1:5, 2:6, 2:6] = 10     # 64 voxels
    mem[1:3, 8:10, 8:10] = 10   # 8 voxels: rejected
    src = write_image(tmp_path / "mem.tif", Image(mem, SPACING))
    xml = pipeline_xml(
        item("item_0001", "ImageReader", [("cmd", 0)], params={"SpacingX": 1, "SpacingY": 1, "SpacingZ": 1}),
        item("item_0002", "RescaleIntensityImageFilter", [("item_0001", 1)]),
        item("item_0003", "BinaryThresholdImageFilter", [("item_0002", 1)],
             params={"LowerThreshold": 0, "UpperThreshold": 0.5}),
        item("item_0004", "VolumeBasedRegionRejectionFilter", [("item_0003", 1)],
             params={"LabelOutput": 1, "MinimumVolume": 20}),
        item("item_0005", "RegionPropertiesFilter", [("item_0004", 1)],
             outputs=(("image", 1), ("meta", 1)), params={"WriteResult": 1}),
        item("item_0006", "ImageWriter", [("item_0004", 1)], outputs=(),
             params={"FileName": "labels.tif"}),
    )
    (tmp_path / "p.xml").write_bytes(xml)
    assert main([str(tmp_path / "p.xml"), "-i", src, "-o", str(tmp_path / "out"), "-q"]) == 0
    labels = read_image(tmp_path / "labels.tif")  # FileName relative to the pipeline's folder
    assert labels.data.dtype == np.uint16 and labels.data.max() == 1
    assert labels.spacing == pytest.approx(SPACING)
    [csv] = list((tmp_path / "out" / "item_0005_RegionPropertiesFilter").glob("mem_*.csv"))
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("label;volume;") and rows[1].startswith("1;64;")


def test_image_reader_spacing_per_axis(tmp_path):
    p = tmp_path / "xy_only.tif"  # ImageJ calibration without z spacing
    tifffile.imwrite(p, _vol(), imagej=True, resolution=(1 / 0.4, 1 / 0.3),
                     metadata={"unit": "um", "axes": "ZYX"})
    img = read_image(p)
    assert img.meta["spacing_known"] == (False, True, True)
    [img], _ = ImageReader({"SpacingX": "1", "SpacingY": "1", "SpacingZ": "2.5"}).run([str(p)], [])
    assert img.spacing == pytest.approx((2.5, 0.3, 0.4))
    _write_series(tmp_path, 2)
    [img], _ = ImageReader({"UseSeriesReader": "1", "SpacingX": "1", "SpacingY": "1", "SpacingZ": "3",
                            "KeepDataType": "1"}).run([str(tmp_path / "cells_t%03d.tif")], [])
    assert img.spacing == pytest.approx((3.0, 0.5, 0.5))

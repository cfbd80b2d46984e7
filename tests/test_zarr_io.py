"""OME-Zarr (v2/NGFF 0.4 and v3/NGFF 0.5) and lazy TIFF reading (c3dseg.zarr_io)."""

import json
import os

import numpy as np
import pytest

from c3dseg.errors import ExecutionError, InputError
from c3dseg.image import Image
from c3dseg.zarr_io import (create_zarr, finish_zarr, is_zarr_path, open_volume, read_zarr, set_status,
                            write_zarr, zarr_status)

zarr = pytest.importorskip("zarr")


@pytest.fixture
def volume():
    rng = np.random.default_rng(3)
    return (rng.random((12, 20, 24)) * 1000).astype(np.float32)


@pytest.mark.parametrize("fmt,version", [(2, "0.4"), (3, "0.5")])
def test_round_trip_spacing_levels(tmp_path, volume, fmt, version):
    path = str(tmp_path / f"a{fmt}.ome.zarr")
    write_zarr(path, Image(volume, (2.0, 0.5, 0.25), {"basename": "a"}), zarr_format=fmt, n_levels=3,
               chunks=(4, 8, 8))
    vol = open_volume(path)
    assert vol.shape == volume.shape and vol.spacing == (2.0, 0.5, 0.25)
    assert vol.meta["ngff_version"] == version and vol.meta["zarr_format"] == fmt
    assert vol.chunks == (4, 8, 8)
    np.testing.assert_array_equal(vol.read((slice(3, 7), slice(5, 20), slice(0, 1))), volume[3:7, 5:20, 0:1])
    np.testing.assert_array_equal(read_zarr(path).data, volume)
    np.testing.assert_array_equal(read_zarr(path, lazy=True).data.compute(), volume)
    # metadata as the NGFF spec writes it
    if fmt == 3:
        attrs = json.load(open(os.path.join(path, "zarr.json")))["attributes"]
        ms = attrs["ome"]["multiscales"][0]
        assert attrs["ome"]["version"] == "0.5"
    else:
        ms = json.load(open(os.path.join(path, ".zattrs")))["multiscales"][0]
        assert ms["version"] == "0.4"
        assert json.load(open(os.path.join(path, "0", ".zarray")))["dimension_separator"] == "/"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["axes"][0]["unit"] == "micrometer"
    # anisotropic: z (2 um, 8x the finest) is not halved, y then x are
    lvl1, lvl2 = open_volume(path, level=1), open_volume(path, level=2)
    assert lvl1.spacing == (2.0, 1.0, 0.5) and lvl1.shape == (12, 10, 12)
    assert lvl2.spacing == (2.0, 2.0, 1.0) and lvl2.shape == (12, 5, 6)
    np.testing.assert_allclose(lvl1.read()[0, 0, 0], volume[0, 0:2, 0:2].mean(), rtol=1e-6)
    with pytest.raises(InputError, match="level 3 does not exist"):
        open_volume(path, level=3)


def test_labels_multichannel_and_units(tmp_path):
    lab = np.zeros((6, 8, 10), np.int64)
    lab[1:4, 2:6, 3:9] = 70000
    path = str(tmp_path / "l.ome.zarr")
    with pytest.warns(UserWarning):
        write_zarr(path, Image(lab, (1, 1, 1), {"is_label": True}), n_levels=2)
    v = open_volume(path)
    assert v.dtype == np.uint32 and v.meta["is_label"]
    assert np.array_equal(open_volume(path, level=1).read(), lab[::2, ::2, ::2])   # labels subsampled, not averaged
    c = np.arange(2 * 6 * 8 * 10, dtype=np.uint16).reshape(2, 6, 8, 10)
    path = str(tmp_path / "c.ome.zarr")
    write_zarr(path, Image(c, (1, 1, 1), {"channel_names": ["membrane", "nuclei"]}), zarr_format=2)
    v = open_volume(path)
    assert v.shape == (2, 6, 8, 10) and v.meta["channel_names"] == ["membrane", "nuclei"]
    assert np.array_equal(open_volume(path, channel=1).read(), c[1])
    with pytest.raises(InputError, match="channel 2 does not exist"):
        open_volume(path, channel=2)
    # a store written by another tool: tczyx axes, nanometres, a translation
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=2)
    g.create_array("s0", shape=(1, 1, 5, 6, 7), chunks=(1, 1, 5, 6, 7), dtype="uint8",
                   chunk_key_encoding={"name": "v2", "separator": "/"})
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "nanometer"}, {"name": "y", "type": "space", "unit": "nanometer"},
        {"name": "x", "type": "space", "unit": "nanometer"}],
        "datasets": [{"path": "s0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 500, 200, 200]},
            {"type": "translation", "translation": [0, 0, 1000, 0, 0]}]}]}]
    v = open_volume(str(tmp_path / "other.zarr"))
    assert v.shape == (5, 6, 7) and v.spacing == pytest.approx((0.5, 0.2, 0.2))
    assert v.meta["origin_um"] == pytest.approx((1.0, 0.0, 0.0))


def test_blockwise_create_status_and_errors(tmp_path):
    path = str(tmp_path / "out.ome.zarr")
    arr = create_zarr(path, (8, 16, 16), np.uint16, spacing=(1, 0.5, 0.5), chunks=(4, 8, 8), n_levels=2,
                      is_label=True, status="running")
    assert zarr_status(path)["status"] == "running"
    with pytest.raises(InputError, match="unfinished"):
        open_volume(path)
    arr[0:4, 0:8, 0:8] = 5
    finish_zarr(path, 2)
    assert zarr_status(path)["status"] == "complete"
    assert open_volume(path, level=1).read()[0, 0, 0] == 5
    set_status(path, "complete", note="x")
    assert zarr_status(path)["note"] == "x"
    with pytest.raises(ExecutionError, match="exists"):
        create_zarr(path, (8, 16, 16), np.uint16)
    assert is_zarr_path(path) and not is_zarr_path(str(tmp_path / "a.tif"))
    with pytest.raises(InputError, match="file not found"):
        open_volume(str(tmp_path / "missing.ome.zarr"))
    os.makedirs(tmp_path / "empty.zarr")
    with pytest.raises(InputError):
        open_volume(str(tmp_path / "empty.zarr"))


def test_write_is_atomic_and_protects_inputs(tmp_path, volume):
    path = str(tmp_path / "a.ome.zarr")
    write_zarr(path, Image(volume))
    with pytest.raises(ExecutionError, match="input"):
        write_zarr(path, Image(volume), protect=[path])
    with pytest.raises(ExecutionError, match="exists"):
        write_zarr(path, Image(volume), overwrite=False)
    bad = Image(np.full((4, 4, 4), 0.5, np.float32))
    with pytest.raises(ExecutionError, match="non-negative integers"):
        write_zarr(str(tmp_path / "b.ome.zarr"), bad, label=True)
    assert sorted(os.listdir(tmp_path)) == ["a.ome.zarr"]   # no temporary left behind


def test_lazy_tiff(tmp_path, volume):
    from c3dseg.io import write_image

    data = volume.astype(np.uint16)
    for name, kw in (("plain.tif", {}), ("packed.tif", {"compression": True}), ("o.ome.tif", {})):
        p = str(tmp_path / name)
        write_image(p, Image(data, (2.0, 0.5, 0.5)), **kw)
        v = open_volume(p)
        assert v.shape == data.shape and v.spacing == pytest.approx((2.0, 0.5, 0.5))
        np.testing.assert_array_equal(v.read((slice(2, 5), slice(1, 19), slice(3, 4))), data[2:5, 1:19, 3:4])
    import tifffile

    tifffile.imwrite(str(tmp_path / "flat.tif"), data[0])
    with pytest.raises(InputError, match="2D"):
        open_volume(str(tmp_path / "flat.tif"))
    # other formats are read whole
    p = str(tmp_path / "a.nrrd")
    write_image(p, Image(data, (2.0, 0.5, 0.5)))
    assert np.array_equal(open_volume(p).read((slice(0, 2), slice(None), slice(None))), data[:2])


def test_io_dispatch_and_whole_volume_runs(tmp_path, volume):
    """c3dseg.io reads and writes .ome.zarr through zarr_io, so whole-volume pipelines take and
    write OME-Zarr too (-o x.ome.zarr is a single output)."""
    from c3dseg.io import image_format, read_image, write_image
    from c3dseg.runner.executor import Target

    assert image_format("a.ome.zarr") == image_format("b.zarr") == "zarr"
    assert Target.from_arg(str(tmp_path / "out.ome.zarr")).is_file
    p = str(tmp_path / "v.ome.zarr")
    write_image(p, Image(volume, (3.0, 1.0, 1.0), {"basename": "v"}))
    img = read_image(p)
    assert img.spacing == (3.0, 1.0, 1.0) and img.meta["format"] == "ome-zarr" and img.meta["basename"] == "v"
    np.testing.assert_array_equal(img.data, volume)
    assert read_image(p, spacing=(None, 0.5, 0.5)).spacing == (3.0, 0.5, 0.5)
    bad = volume.copy()
    bad[0, 0, 0] = np.nan
    write_image(str(tmp_path / "nan.ome.zarr"), Image(bad))
    with pytest.raises(InputError, match="non-finite"):
        read_image(str(tmp_path / "nan.ome.zarr"))
    with pytest.raises(ExecutionError, match="exists"):
        write_image(p, Image(volume), overwrite=False)

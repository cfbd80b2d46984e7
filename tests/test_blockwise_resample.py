"""Blockwise runs across grid changes (c3dseg.blockwise.resample): resampling block by block equals
the whole-volume resampling exactly, the cell-diameter estimate is the same number, segment.xml runs
blockwise (model grid and back) and gives the whole-volume labels, the tissue mask is the same mask, and too small a block on the
resampled grid is refused with the smallest valid size."""

import os
import re
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

pytest.importorskip("distributed")
pytest.importorskip("zarr")

from c3dseg.errors import PipelineError  # noqa: E402
from c3dseg.image import Image  # noqa: E402
from c3dseg.resampling import resample, resample_box, source_box  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from pipeline_kit import item, pipeline_xml  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEGMENT = os.path.join(ROOT, "c3dseg", "pipelines", "segment.xml")
MODEL = os.path.join(ROOT, "c3dseg", "models", "tanh.onnx")


@pytest.fixture(scope="module")
def client():
    from c3dseg.blockwise.runtime import ClusterOptions, close_client, open_client

    c, cluster = open_client(ClusterOptions(workers=1, threads_per_worker=2, processes=False))
    yield c
    close_client(c, cluster)


def _plan(path):
    from c3dseg.runner.pipeline import Pipeline
    from c3dseg.runner.plan import build_plan

    return build_plan(Pipeline.load(path))


def _whole(path, inputs, out):
    from c3dseg.io import read_image
    from c3dseg.runner.executor import RunOptions, Target, execute

    execute(_plan(path), inputs, Target(out, True), RunOptions())
    return read_image(out)


def _blockwise(path, inputs, out, client, block):
    from c3dseg.blockwise.executor import BlockwiseOptions, run_blockwise
    from c3dseg.runner.executor import Target
    from c3dseg.zarr_io import open_volume

    opts = BlockwiseOptions(block=block, client=client)
    run_blockwise(_plan(path), inputs, Target(out, True), opts)
    return open_volume(out), opts


def _write(tmp_path, name, *items):
    path = tmp_path / f"{name}.xml"
    path.write_bytes(pipeline_xml(*items))
    return str(path)


# ---------------------------------------------------------------------------------------------
# the coordinate mapping
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [0, 1])
def test_boxes_reproduce_whole_resampling(order):
    """Output boxes that do not divide the shape, each from its own input box, put together equal
    resample() of the whole volume; order 0 also equals ndimage.zoom (the previous implementation)."""
    rng = np.random.default_rng(3)
    cases = [((7, 9, 11), (13, 5, 22)), ((10, 12, 9), (4, 30, 9))]
    for shape, out_shape in cases:
        data = rng.integers(0, 60, shape).astype(np.uint16) if order == 0 else \
            rng.random((2,) + shape).astype(np.float32)      # channels too
        whole, _ = resample(data, (1.0, 1.0, 1.0), out_shape, order=order)
        got = np.zeros_like(whole)
        box = (4, 3, 5)
        for z in range(0, out_shape[0], box[0]):
            for y in range(0, out_shape[1], box[1]):
                for x in range(0, out_shape[2], box[2]):
                    lo = (z, y, x)
                    hi = tuple(min(a + b, n) for a, b, n in zip(lo, box, out_shape))
                    slo, shi = source_box(shape, out_shape, lo, hi, order)
                    src = data[(Ellipsis,) + tuple(slice(a, b) for a, b in zip(slo, shi))]
                    got[(Ellipsis,) + tuple(slice(a, b) for a, b in zip(lo, hi))] = \
                        resample_box(src, slo, shape, out_shape, lo, hi, order)
        np.testing.assert_array_equal(got, whole)
        if order == 0:
            ref = ndi.zoom(data, [m / n for m, n in zip(out_shape, shape)], order=0, mode="nearest",
                           grid_mode=True, prefilter=False)
            np.testing.assert_array_equal(whole, ref)
        else:
            assert whole.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# pipelines: blockwise == whole volume
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resampling_pipeline_identical(tmp_path, client, mode):
    """Resample by factors (up along z and x, down along y), a Gaussian on the new grid (its halo in
    voxels of that grid), back onto the reader's grid: blocks that divide neither grid give the
    whole-volume result exactly."""
    from c3dseg.io import write_image

    rng = np.random.default_rng(4)
    if mode == "nearest":
        data = ndi.zoom(rng.integers(1, 40, (4, 5, 5)), (6, 7, 8), order=0).astype(np.uint16)[:23, :31, :37]
        reader = {"KeepDataType": 1}
        middle = None
    else:
        data = (ndi.gaussian_filter(rng.random((23, 31, 37)), 1.0) * 1000).astype(np.float32)
        reader = {}
        middle = item("item_0003", "DiscreteGaussianImageFilter", [("item_0002", 1)], params={"Variance": 2.0})
    src = str(tmp_path / "in.tif")
    write_image(src, Image(data, (2.0, 1.0, 1.0)))
    last = "item_0003" if middle else "item_0002"
    items = [item("item_0001", "ImageReader", [("cmd", 0)], params=reader),
             item("item_0002", "ResampleImageFilter", [("item_0001", 1)],
                  params={"FactorZ": 1.7, "FactorY": 0.6, "FactorX": 1.3, "Interpolation": mode})]
    items += [middle] if middle else []
    items += [item("item_0004", "ResampleImageFilter", [(last, 1), ("item_0001", 1)],
                   params={"Interpolation": mode, "WriteResult": 1}),
              item("item_0005", "ImageWriter", [("item_0004", 1)], outputs=())]
    path = _write(tmp_path, f"resample_{mode}", *items)
    whole = _whole(path, {0: src}, str(tmp_path / "whole.tif")).data
    vol, opts = _blockwise(path, {0: src}, str(tmp_path / "bw.ome.zarr"), client, (9, 10, 11))
    res = vol.read()
    assert [g["shape"] for g in opts.stats["grids"]] == [(23, 31, 37), (39, 19, 48)]
    assert res.shape == whole.shape == data.shape and res.dtype == whole.dtype
    np.testing.assert_array_equal(res, whole)
    if mode == "nearest":
        assert np.array_equal(np.unique(res), np.unique(data))   # labels are copied, never blended


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A small synthetic membrane stack (c3d-synth's generator) as TIFF."""
    from c3dseg.io import write_image
    from c3dseg.synthesis import make_sample

    image, labels, spacing, _ = make_sample("validation", seed=3, shape=(24, 48, 48))
    path = str(tmp_path_factory.mktemp("stack") / "stack.tif")
    write_image(path, Image(image.astype(np.uint16), tuple(spacing)))
    return path, image, spacing


def test_cell_diameter_estimate_same_number(tmp_path, client, stack):
    """EstimateCellDiameter blockwise reads only the central box (MaxVoxels smaller than the stack)
    and gives the whole-image number; the estimate reaches ResampleToModelScale (same model grid,
    identical resampled values)."""
    from c3dseg.blockwise.resample import central_box
    from c3dseg.diameter import central_block

    path, image, spacing = stack
    lo, hi = central_box(image.shape, 32768)
    assert np.array_equal(image[tuple(slice(a, b) for a, b in zip(lo, hi))], central_block(image, 32768))
    assert np.prod(np.subtract(hi, lo)) < image.size
    pipe = _write(tmp_path, "diam",
                  item("item_0001", "ImageReader", [("cmd", 0)]),
                  item("item_0002", "EstimateCellDiameter", [("item_0001", 1)], params={"MaxVoxels": 32768},
                       outputs=(("image", 1), ("meta", 1))),
                  item("item_0003", "ResampleToModelScale", [("item_0002", 1)], params={"ModelPath": MODEL}),
                  item("item_0004", "ImageWriter", [("item_0003", 1)], outputs=()))
    whole = _whole(pipe, {0: path}, str(tmp_path / "whole.tif"))
    vol, opts = _blockwise(pipe, {0: path}, str(tmp_path / "bw.ome.zarr"), client, (10, 20, 20))
    res = vol.read()
    assert len(opts.stats["grids"]) == 2 and res.shape == whole.data.shape != image.shape
    np.testing.assert_allclose(vol.spacing, whole.spacing, rtol=1e-5)
    np.testing.assert_array_equal(res, whole.data)

    # the number itself, against the whole-image filter
    from c3dseg.blockwise.executor import Env
    from c3dseg.blockwise.grid import BlockGrid
    from c3dseg.blockwise.resample import estimate_diameter
    from c3dseg.blockwise.runtime import Runtime
    from c3dseg.blockwise.values import Stored
    from c3dseg.diameter import estimate_cell_diameter

    rt = Runtime(client, BlockGrid(image.shape, (10, 20, 20)), str(tmp_path / "w"))
    env = Env(rt, spacing, ".", "test")
    src = Stored(path, "volume", image.shape, "<u2", None, tuple(spacing), {})
    d, regions, block_shape = estimate_diameter(env, src, max_voxels=32768)
    ref, info = estimate_cell_diameter(image.astype(np.uint16), spacing, max_voxels=32768, return_details=True)
    assert np.isfinite(ref) and d == ref and tuple(block_shape) == tuple(info["block_shape"])
    # with the network refinement (ModelPath) too: the same central box, the same number
    d, _, _ = estimate_diameter(env, src, max_voxels=32768, name="refined", model=MODEL)
    ref, info = estimate_cell_diameter(image.astype(np.uint16), spacing, max_voxels=32768, model=MODEL,
                                       return_details=True)
    assert np.isfinite(ref) and d == ref and "refine" in info
    # with a user's correction file (EstimateCellDiameter CorrectionFile): the same number as the filter's
    import json

    from c3dseg import diameter as dm

    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"features": list(dm.FEATURES), "coefficients": [0.3, 0.0, 0.0]}))
    d, _, _ = estimate_diameter(env, src, max_voxels=32768, name="corrected", correction=str(fit))
    raw = estimate_cell_diameter(image.astype(np.uint16), spacing, max_voxels=32768, fit="none")
    assert d == pytest.approx(raw * np.exp(0.3), rel=1e-9)


def test_tissue_mask_same_mask(tmp_path, client):
    """TissueMask blockwise (small blocks, each read with its halo; the noise from the same central
    box as the whole-image filter): the whole-image mask exactly, on an organ with an empty surround;
    the diameter comes from the upstream estimate."""
    from c3dseg import synthesis as S
    from c3dseg.io import write_image

    easy = {"photons": 300.0, "read_noise": 1.0, "faint_wall_fraction": 0.0, "speck_density": 0.0,
            "cell_diameter_vox": 10.0, "tissue": "ovoid"}
    image, _, spacing, _ = S.make_sample(easy, 5, shape=(24, 64, 64))
    path = str(tmp_path / "organ.tif")
    write_image(path, Image(image.astype(np.uint16), tuple(spacing)))
    pipe = _write(tmp_path, "tissue",
                  item("item_0001", "ImageReader", [("cmd", 0)]),
                  item("item_0002", "EstimateCellDiameter", [("item_0001", 1)], params={"MaxVoxels": 32768},
                       outputs=(("image", 1), ("meta", 1))),
                  item("item_0003", "TissueMask", [("item_0002", 1)], params={"MaxVoxels": 32768}),
                  item("item_0004", "ImageWriter", [("item_0003", 1)], outputs=()))
    whole = _whole(pipe, {0: path}, str(tmp_path / "whole.tif")).data
    assert 0.1 < whole.mean() < 0.95                       # tissue and surround both present
    vol, _ = _blockwise(pipe, {0: path}, str(tmp_path / "bw.ome.zarr"), client, (8, 20, 20))
    np.testing.assert_array_equal(vol.read(), whole)


def _small_segment(tmp_path, patch=48):
    """segment.xml with small tiles (the model path made absolute)."""
    text = open(SEGMENT).read().replace('"../models/tanh.onnx"', f'"{MODEL}"')
    for k in ("PatchWidth", "PatchHeight", "PatchDepth"):
        text = re.sub(rf'key="{k}" value="\d+"', f'key="{k}" value="{patch}"', text)
    path = tmp_path / "segment_small.xml"
    path.write_text(text)
    return str(path)


def test_planner_accepts_segment_xml():
    from c3dseg.blockwise.planner import plan_blocks

    bp = plan_blocks(_plan(SEGMENT), spacing=(1.0, 0.3, 0.3))
    assert bp.steps["item_0003"].mode == bp.steps["item_0013"].mode == "resample"
    assert bp.steps["item_0002"].mode == "global"
    assert bp.segments["item_0004"] == bp.segments["item_0012"] == 1          # the model's grid
    assert bp.segments["item_0013"] == bp.segments["item_0015"] == 0          # back on the reader's
    assert min(bp.needed_on(1)) >= 16                                         # network and tracking halos


def test_segment_pipeline_blockwise_equals_whole(tmp_path, client, stack):
    """The default pipeline (diameter estimate, model scale, network, tracking, instance filters,
    back to the input grid) blockwise: the whole-volume labels (AP@0.5 and mean Dice 1 up to
    renumbering); a block smaller than the model grid's halo is refused with the smallest size."""
    pytest.importorskip("onnxruntime")
    from c3dseg.metrics import average_precision, mean_cell_dice

    path, image, _ = stack
    pipe = _small_segment(tmp_path)
    whole = _whole(pipe, {0: path}, str(tmp_path / "whole.tif")).data
    vol, opts = _blockwise(pipe, {0: path}, str(tmp_path / "bw.ome.zarr"), client, (48, 48, 48))
    res = vol.read()
    grids = [g["shape"] for g in opts.stats["grids"]]
    assert grids[0] == image.shape and len(grids) == 2 and grids[1][0] > 48        # cut on the model grid
    assert res.shape == whole.shape and whole.max() > 5
    ap, *_ = average_precision(whole, res, thresholds=(0.5,))
    assert ap[0] >= 0.99 and mean_cell_dice(whole, res) >= 0.99
    with pytest.raises(PipelineError, match=r"on the grid item_0003 resamples to .* smallest valid block size is "):
        _blockwise(pipe, {0: path}, str(tmp_path / "small.ome.zarr"), client, (8, 48, 48))


def test_segment_pipeline_empty_stack_blockwise(tmp_path, client):
    """A stack without cells: the estimate says so, ResampleToModelScale's stand-in is used and the
    labels come back empty, as in the whole-volume run."""
    pytest.importorskip("onnxruntime")
    from c3dseg.io import write_image

    src = str(tmp_path / "const.tif")
    write_image(src, Image(np.full((16, 32, 32), 100, np.uint16), (1.0, 0.5, 0.5)))
    vol, opts = _blockwise(_small_segment(tmp_path), {0: src}, str(tmp_path / "bw.ome.zarr"), client, (16, 16, 16))
    res = vol.read()
    assert res.shape == (16, 32, 32) and res.max() == 0
    assert (16, 16, 16) in [g["shape"] for g in opts.stats["grids"]]        # the stand-in's grid


def _without_return_to_input_grid(path, tmp_path):
    """The pipeline at ``path`` with everything after the instance filters of the model's grid
    removed (ResampleImageFilter, the tissue filter, RelabelConsecutiveFilter): the writer takes the
    labels of the model's grid (InstanceAxisRatioFilter's)."""
    from lxml import etree

    tree = etree.parse(path)
    for it in list(tree.iter("item")):
        name = it.findtext("name")
        if name in ("ResampleImageFilter", "RelabelConsecutiveFilter", "TissueMask") or \
                (name == "InstanceForegroundOverlapFilter" and it.get("item_id") > "item_0012"):
            it.getparent().remove(it)
        elif name == "ImageWriter":
            it.find("input/image").set("item_id_ref", "item_0012")
    out = tmp_path / "model_grid_labels.xml"
    tree.write(str(out))
    return str(out)


@pytest.mark.parametrize("variant", ["model_grid", "no_resampling"])
def test_empty_stack_blockwise_any_pipeline_shape(tmp_path, client, variant):
    """A stack without cells gives empty labels blockwise whatever the pipeline does after the
    estimate, as the whole-volume run: labels written on the model's grid (no ResampleImageFilter
    back) and a pipeline without ResampleToModelScale (the network on the input grid)."""
    pytest.importorskip("onnxruntime")
    from lxml import etree

    from c3dseg.io import write_image

    src = str(tmp_path / "const.tif")
    write_image(src, Image(np.full((16, 32, 32), 100, np.uint16), (1.0, 0.5, 0.5)))
    pipe = _without_return_to_input_grid(_small_segment(tmp_path, patch=16), tmp_path)
    if variant == "no_resampling":
        tree = etree.parse(pipe)
        for it in tree.iter("item"):
            if it.findtext("name") == "ResampleToModelScale":
                it.getparent().remove(it)
            elif it.findtext("name") == "OnnxModel":
                it.find("input/image").set("item_id_ref", "item_0002")
        tree.write(pipe)
    vol, opts = _blockwise(pipe, {0: src}, str(tmp_path / "bw.ome.zarr"), client, (16, 17, 17))
    res = vol.read()
    # the whole-volume run's labels: empty (tests/test_segment_pipeline.py), on the stand-in's grid
    # or the input's
    assert res.shape == ((16, 16, 16) if variant == "model_grid" else (16, 32, 32))
    assert res.max() == 0

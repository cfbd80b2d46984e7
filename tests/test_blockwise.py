"""Blockwise runs on Dask (c3dseg.blockwise): exactness against whole-volume runs, the planner's
refusals, resume, faults (a failing task, a dying worker, an unreachable scheduler), the CLI."""

import functools
import os
import shutil
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

pytest.importorskip("distributed")
pytest.importorskip("zarr")

from c3dseg.blockwise.grid import BlockGrid  # noqa: E402
from c3dseg.errors import ExecutionError, PipelineError  # noqa: E402
from c3dseg.image import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from blockwise_faults import inject  # noqa: E402
from pipeline_kit import item, pipeline_xml  # noqa: E402

SHAPE = (30, 40, 44)
BLOCK = (21, 21, 22)          # 2 x 2 x 2 blocks: cells cross faces, edges and corners


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    from c3dseg.blockwise.runtime import ClusterOptions, close_client, open_client

    c, cluster = open_client(ClusterOptions(workers=1, threads_per_worker=2, processes=False))
    yield c
    close_client(c, cluster)


@pytest.fixture(scope="module")
def prediction():
    """Foreground and noisy tanh flows of a Voronoi tissue with a background margin."""
    from c3dseg.flows import labels_to_prediction
    from c3dseg.synthesis import voronoi_labels

    lab = voronoi_labels(SHAPE, 40, seed=5)
    lab[:, :5] = 0
    lab[24:] = 0
    pred = labels_to_prediction(lab)
    rng = np.random.default_rng(1)
    pred[1:] += rng.normal(0, 0.15, pred[1:].shape).astype(np.float32)
    pred[0] = np.clip(pred[0] + rng.normal(0, 0.2, SHAPE), 0, 1).astype(np.float32)
    return lab, pred


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, prediction):
    """The four prediction channels as OME-Zarr (blockwise input) and TIFF (whole-volume input)."""
    from c3dseg.io import write_image
    from c3dseg.zarr_io import write_zarr

    _, pred = prediction
    d = tmp_path_factory.mktemp("pred")
    zarr_in, tif_in = {}, {}
    for c in range(4):
        zarr_in[c] = write_zarr(str(d / f"p{c}.ome.zarr"), Image(pred[c], (1.0, 1.0, 1.0)), chunks=(8, 16, 16))
        tif_in[c] = str(d / f"p{c}.tif")
        write_image(tif_in[c], Image(pred[c], (1.0, 1.0, 1.0)))
    return zarr_in, tif_in


def _readers():
    return [item(f"item_000{c + 1}", "ImageReader", [("cmd", c)], params={"KeepDataType": 1}) for c in range(4)]


RECON = {"StepSize": 2, "NumIterations": 10, "ClosingRadius": 2, "MinRadiusVoxels": 1.5,
         "MaxRadiusVoxels": 30, "WriteResult": 1}


def _pipeline(tmp_path, name, *items):
    path = tmp_path / f"{name}.xml"
    path.write_bytes(pipeline_xml(*items))
    return str(path)


def _fused(tmp_path):
    return _pipeline(tmp_path, "fused", *_readers(),
                     item("item_0005", "FlowReconstructionFilter",
                          [("item_0001", 1), ("item_0002", 1), ("item_0003", 1), ("item_0004", 1)], params=RECON))


def _plan(path):
    from c3dseg.runner.pipeline import Pipeline
    from c3dseg.runner.plan import build_plan

    return build_plan(Pipeline.load(path))


def _whole(path, tif_in, out):
    from c3dseg.io import read_image
    from c3dseg.runner.executor import RunOptions, Target, execute

    execute(_plan(path), tif_in, Target(out, True), RunOptions())
    return read_image(out).data


def _blockwise(path, zarr_in, out, client, **kw):
    from c3dseg.blockwise.executor import BlockwiseOptions, run_blockwise
    from c3dseg.runner.executor import Target
    from c3dseg.zarr_io import open_volume

    opts = BlockwiseOptions(block=kw.pop("block", BLOCK), client=client, **kw)
    run_blockwise(_plan(path), zarr_in, Target(out, True), opts)
    return open_volume(out).read(), opts


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------

def _mask_of(block, arr):
    return arr[block.core]


@pytest.mark.parametrize("fully", [True, False])
def test_components_identical_to_ndimage_label(tmp_path, client, fully):
    """Connected components across blocks equal ndimage.label on the whole mask (same numbers)."""
    from c3dseg.blockwise.components import global_labels, label_components_blockwise
    from c3dseg.blockwise.runtime import Runtime

    rng = np.random.default_rng(7)
    m = ndi.gaussian_filter(rng.random((23, 29, 31)), 1.2) > 0.52
    ref, n = ndi.label(m, np.ones((3, 3, 3)) if fully else None)
    grid = BlockGrid(m.shape, (6, 7, 9))
    rt = Runtime(client, grid, str(tmp_path / "w"))
    comps = label_components_blockwise(rt, "cc", functools.partial(_mask_of, arr=m), fully_connected=fully)
    out = np.zeros(m.shape, np.int64)
    for b in grid:
        out[b.core] = global_labels(b.region((0, 0, 0), grid.shape), comps, grid)
    assert comps.n == n > 5
    assert np.array_equal(out, ref)
    assert np.array_equal(comps.size[1:], np.bincount(ref.ravel())[1:])


def test_tracking_escapes_retry_and_stay_exact(tmp_path, client, prediction):
    """A starting reach far too small: blocks whose paths leave it redo themselves; labels identical."""
    from c3dseg import reconstruction as rec
    from c3dseg.blockwise import reconstruction as brec
    from c3dseg.blockwise.components import create_block_array
    from c3dseg.blockwise.executor import Env
    from c3dseg.blockwise.runtime import Runtime
    from c3dseg.blockwise.values import Stored, evaluate

    _, pred = prediction
    kw = dict(step=2.0, n_iter=12, smoothing_sigma=1.0, closing_radius=2, min_radius_voxels=1.5,
              max_radius_voxels=30)
    whole = rec.reconstruct(pred[0], pred[1:], **kw)
    grid = BlockGrid(SHAPE, (15, 20, 22))      # 2 x 2 x 2 blocks
    rt = Runtime(client, grid, str(tmp_path / "w"))
    env = Env(rt, (1.0, 1.0, 1.0), ".", "test")
    vals = []
    for c in range(4):
        p = rt.path("arrays", f"in{c}.zarr")
        create_block_array(p, grid, np.float32)[...] = pred[c]
        vals.append(Stored(p, "array", SHAPE, "<f4", None, (1.0, 1.0, 1.0), {}))
    out = brec.reconstruct_blockwise(env, "rec", vals[0], vals[1:], reach=2, **kw)
    res = np.zeros(SHAPE, np.uint16)
    for b in grid:
        res[b.core] = evaluate([out], b.start, b.stop, SHAPE)[0]
    retried = [r for r in (rt.load("rec-track", b) for b in grid) if r["reach"] > 2]
    assert retried, "the test should make some blocks retry"
    assert whole.max() > 10
    assert np.array_equal(res, whole)


# ---------------------------------------------------------------------------------------------
# pipelines: blockwise == whole volume
# ---------------------------------------------------------------------------------------------

def test_reconstruction_pipelines_identical(tmp_path, client, inputs):
    """The fused filter, XPIWIT's tracking filter and the staged filters: same labels as whole runs."""
    zarr_in, tif_in = inputs
    staged = _pipeline(
        tmp_path, "staged", *_readers(),
        item("item_0010", "FlowSmoothingFilter", [("item_0001", 1), ("item_0002", 1), ("item_0003", 1),
                                                  ("item_0004", 1)],
             outputs=(("image", 1), ("image", 2), ("image", 3), ("image", 4))),
        item("item_0011", "FlowTrackingFilter", [("item_0010", 1), ("item_0010", 2), ("item_0010", 3),
                                                 ("item_0010", 4), ("item_0002", 1), ("item_0003", 1),
                                                 ("item_0004", 1)], params={"StepSize": 2, "NumIterations": 10}),
        item("item_0012", "SinkClusteringFilter", [("item_0011", 1)], params={"ClosingRadius": 2}),
        item("item_0013", "InstanceSizeFilter", [("item_0012", 1)], params={"MinRadiusVoxels": 1.5}),
        item("item_0014", "InstanceForegroundOverlapFilter", [("item_0013", 1), ("item_0010", 1)]),
        item("item_0015", "InstanceFlowErrorFilter", [("item_0014", 1), ("item_0002", 1), ("item_0003", 1),
                                                      ("item_0004", 1)]),
        item("item_0016", "InstanceAxisRatioFilter", [("item_0015", 1)]),
        item("item_0017", "RelabelConsecutiveFilter", [("item_0016", 1)], params={"WriteResult": 1}))
    gvf = _pipeline(
        tmp_path, "gvf", *_readers(),
        item("item_0006", "BinaryThresholdImageFilter", [("item_0001", 1)], params={"LowerThreshold": 0.5}),
        item("item_0007", "VolumeBasedRegionRejectionFilter", [("item_0006", 1)], params={"MinimumVolume": 30}),
        item("item_0005", "GradientVectorFlowTrackingImageFilter",
             [("item_0004", 1), ("item_0003", 1), ("item_0002", 1), ("item_0007", 1)],
             params={"NumIterations": 12, "ClosingRadius": 2, "WriteResult": 1}))
    for path in (_fused(tmp_path), staged, gvf):
        name = os.path.basename(path)[:-4]
        whole = _whole(path, tif_in, str(tmp_path / f"{name}.tif"))
        res, opts = _blockwise(path, zarr_in, str(tmp_path / f"{name}.ome.zarr"), client)
        assert opts.stats["grid"]["blocks"] == 8
        assert whole.max() > 10, name
        assert res.dtype == whole.dtype == np.uint16
        assert np.array_equal(res, whole), name


def test_generic_filters_identical(tmp_path, client):
    """Rescale (global extrema), Gaussian (halo), threshold, region rejection (components), reader
    min/max mapping and percentile normalisation: blockwise equals whole; TIFF output streamed."""
    from c3dseg.io import read_image, write_image

    rng = np.random.default_rng(3)
    vol = (ndi.gaussian_filter(rng.random(SHAPE), 1.5) * 3000).astype(np.uint16)
    src = str(tmp_path / "in.tif")
    write_image(src, Image(vol, (2.0, 0.5, 0.5)))
    path = _pipeline(
        tmp_path, "generic",
        item("item_0001", "ImageReader", [("cmd", 0)]),
        item("item_0002", "PercentileNormalization", [("item_0001", 1)]),
        item("item_0003", "RescaleIntensityImageFilter", [("item_0002", 1)]),
        item("item_0004", "DiscreteGaussianImageFilter", [("item_0003", 1)], params={"Variance": 0.5}),
        item("item_0005", "BinaryThresholdImageFilter", [("item_0004", 1)], params={"LowerThreshold": 0.55}),
        item("item_0006", "VolumeBasedRegionRejectionFilter", [("item_0005", 1)],
             params={"LabelOutput": 1, "MinimumVolume": 5}),
        item("item_0007", "ImageWriter", [("item_0006", 1)], outputs=()))
    whole = _whole(path, {0: src}, str(tmp_path / "whole.tif"))
    res, _ = _blockwise(path, {0: src}, str(tmp_path / "b.ome.zarr"), client, block=(10, 13, 12))
    assert whole.max() > 5
    assert np.array_equal(res, whole)
    # a TIFF target is computed into the work folder, then streamed into the file
    from c3dseg.blockwise.executor import BlockwiseOptions, run_blockwise
    from c3dseg.runner.executor import Target

    out = str(tmp_path / "b.tif")
    run_blockwise(_plan(path), {0: src}, Target(out, True), BlockwiseOptions(block=(10, 13, 12), client=client))
    img = read_image(out)
    assert np.array_equal(img.data, whole) and img.spacing == pytest.approx((2.0, 0.5, 0.5))
    assert sorted(os.listdir(tmp_path)) == sorted(["b.ome.zarr", "b.tif", "generic.xml", "in.tif", "whole.tif"])
    # a label image in: volumes summed across blocks, kept labels renumbered in order
    from c3dseg.synthesis import voronoi_labels

    lab = voronoi_labels(SHAPE, 60, seed=4)
    lab[lab % 7 == 0] = 0
    lsrc = str(tmp_path / "labels.tif")
    write_image(lsrc, Image(lab, (1.0, 1.0, 1.0), {"is_label": True}))
    path = _pipeline(
        tmp_path, "labels", item("item_0001", "ImageReader", [("cmd", 0)], params={"KeepDataType": 1}),
        item("item_0002", "VolumeBasedRegionRejectionFilter", [("item_0001", 1)],
             params={"BinaryInput": 0, "LabelOutput": 1, "MinimumVolume": 500, "MaximumVolume": 1500}),
        item("item_0003", "ImageWriter", [("item_0002", 1)], outputs=()))
    whole = _whole(path, {0: lsrc}, str(tmp_path / "lwhole.tif"))
    res, _ = _blockwise(path, {0: lsrc}, str(tmp_path / "l.ome.zarr"), client, block=(10, 13, 12))
    assert 5 < whole.max() < len(np.unique(lab)) - 1
    assert np.array_equal(res, whole)


def test_region_properties_identical(tmp_path, client):
    """RegionPropertiesFilter: per-region sums from every block give the whole run's CSV (same
    text: integer sums, so the centroids agree to the last digit); cells cross block corners."""
    from c3dseg.blockwise.executor import BlockwiseOptions, run_blockwise
    from c3dseg.io import write_image
    from c3dseg.runner.executor import RunOptions, Target, execute
    from c3dseg.synthesis import voronoi_labels

    lab = voronoi_labels(SHAPE, 30, seed=8).astype(np.uint16)
    lab[lab % 5 == 0] = 0
    lab[lab == 7] = 900                          # sparse ids
    src = str(tmp_path / "labels.tif")
    write_image(src, Image(lab, (2.0, 0.5, 0.25), {"is_label": True}))
    path = _pipeline(tmp_path, "props", item("item_0001", "ImageReader", [("cmd", 0)], params={"KeepDataType": 1}),
                     item("item_0002", "RegionPropertiesFilter", [("item_0001", 1)],
                          outputs=(("image", 1), ("meta", 1)), params={"WriteResult": 1}))
    execute(_plan(path), {0: src}, Target(str(tmp_path / "whole"), False), RunOptions())
    run_blockwise(_plan(path), {0: src}, Target(str(tmp_path / "blocks"), False),
                  BlockwiseOptions(block=(7, 9, 10), client=client))
    [w] = list((tmp_path / "whole" / "item_0002_RegionPropertiesFilter").glob("*.csv"))
    [b] = list((tmp_path / "blocks" / "item_0002_RegionPropertiesFilter").glob("*.csv"))
    assert w.name == b.name
    text = w.read_text()
    assert len(text.splitlines()) == len(np.unique(lab))         # header + one row per cell
    assert any(r.startswith("900;") for r in text.splitlines())
    assert b.read_text() == text


@pytest.mark.parametrize("scale", ["adaptive", "axis", "3"])
def test_labels_to_flows_identical(tmp_path, client, scale):
    """LabelsToFlows (tanh): cell centroids/divisors summed across blocks, flows per block: the four
    channels equal the whole run's bit for bit; heat flows and the hull foreground are refused."""
    from c3dseg.blockwise.planner import plan_blocks
    from c3dseg.io import read_image, write_image
    from c3dseg.synthesis import voronoi_labels

    lab = voronoi_labels(SHAPE, 25, seed=6).astype(np.uint16)
    lab[lab % 4 == 0] = 0
    lab[lab == 5] = 3000                         # sparse ids
    src = str(tmp_path / "labels.tif")
    write_image(src, Image(lab, (2.0, 0.5, 0.5), {"is_label": True}))

    def pipe(name, **params):
        return _pipeline(
            tmp_path, name, item("item_0001", "ImageReader", [("cmd", 0)], params={"KeepDataType": 1}),
            item("item_0002", "LabelsToFlows", [("item_0001", 1)], params=params,
                 outputs=(("image", 1), ("image", 2), ("image", 3), ("image", 4))),
            item("item_0003", "ChannelMerger", [("item_0002", 1), ("item_0002", 2), ("item_0002", 3),
                                                ("item_0002", 4)]),
            item("item_0004", "ImageWriter", [("item_0003", 1)], outputs=()))

    path = pipe("flows", FlowScale=scale, FlowScaleInMicrometres=int(scale == "3"))
    from c3dseg.runner.executor import RunOptions, Target, execute

    execute(_plan(path), {0: src}, Target(str(tmp_path / "whole.tif"), True), RunOptions())
    whole = read_image(str(tmp_path / "whole.tif")).data
    res, opts = _blockwise(path, {0: src}, str(tmp_path / "flows.ome.zarr"), client, block=(7, 9, 10))
    assert opts.stats["grid"]["blocks"] > 40
    assert res.shape == whole.shape == (4,) + SHAPE and res.dtype == np.float32
    assert 0.5 < np.abs(whole[1:]).max() <= 1 and whole[0].sum() == (lab > 0).sum()
    np.testing.assert_array_equal(res, whole)
    for params, match in (({"FlowType": "heat"}, "FlowType=heat cannot be run blockwise"),
                          ({"ForegroundMode": "hull"}, "ForegroundMode=hull cannot be run blockwise")):
        with pytest.raises(PipelineError, match=match) as e:
            plan_blocks(_plan(pipe("refused", **params)))
        assert e.value.item == "item_0002"


# ---------------------------------------------------------------------------------------------
# planner
# ---------------------------------------------------------------------------------------------

def test_planner_halos_and_refusals(tmp_path):
    from c3dseg.blockwise.planner import check_block, plan_blocks

    path = _pipeline(
        tmp_path, "chain",
        item("item_0001", "ImageReader", [("cmd", 0)]),
        item("item_0002", "DiscreteGaussianImageFilter", [("item_0001", 1)], params={"Variance": 4.0}),
        item("item_0003", "DiscreteGaussianImageFilter", [("item_0002", 1)], params={"Variance": 4.0}),
        item("item_0004", "BinaryThresholdImageFilter", [("item_0003", 1)]),
        item("item_0005", "ImageWriter", [("item_0004", 1)], outputs=()))
    bp = plan_blocks(_plan(path), spacing=(2.0, 1.0, 1.0))
    one = bp.steps["item_0002"].halo
    assert one[0] < one[1] == one[2] > 0                  # physical variance: fewer voxels along coarse z
    assert bp.chain[("item_0003", 1)] == tuple(2 * h for h in one)      # halos add up along the chain
    assert bp.needed == bp.chain[("item_0004", 1)]
    with pytest.raises(PipelineError, match=r"smallest valid block size is " + ",".join(map(str, bp.needed))):
        check_block(bp, (4, 4, 4), (100, 100, 100))
    check_block(bp, bp.needed, (100, 100, 100))
    check_block(bp, (1, 1, 1), (1, 1, 1))                 # a tiny volume needs no more than itself
    bad = _pipeline(tmp_path, "bad", item("item_0001", "ImageReader", [("cmd", 0)]),
                    item("item_0002", "SeededWatershed", [("item_0001", 1)]),
                    item("item_0003", "ImageWriter", [("item_0002", 1)], outputs=()))
    with pytest.raises(PipelineError, match=r"item_0002 \(SeededWatershed\): SeededWatershed cannot be run "
                                            "blockwise"):
        plan_blocks(_plan(bad))
    linear = _pipeline(tmp_path, "linear", *_readers(),
                       item("item_0005", "FlowReconstructionFilter",
                            [("item_0001", 1), ("item_0002", 1), ("item_0003", 1), ("item_0004", 1)],
                            params=dict(RECON, Interpolation="linear")))
    with pytest.raises(PipelineError, match=r"linear\.xml: item_0005 \(FlowReconstructionFilter\).*"
                                            "Interpolation=linear cannot be run blockwise"):
        plan_blocks(_plan(linear))
    series = _pipeline(tmp_path, "series", item("item_0001", "ImageReader", [("cmd", 0)],
                                                params={"UseSeriesReader": 1}),
                       item("item_0002", "ImageWriter", [("item_0001", 1)], outputs=()))
    with pytest.raises(PipelineError, match="UseSeriesReader"):
        plan_blocks(_plan(series))


# ---------------------------------------------------------------------------------------------
# outputs, resume, faults
# ---------------------------------------------------------------------------------------------

def test_existing_output_resume_and_interruption(tmp_path, client, inputs, monkeypatch):
    from c3dseg.zarr_io import zarr_status

    zarr_in, tif_in = inputs
    path = _fused(tmp_path)
    whole = _whole(path, tif_in, str(tmp_path / "whole.tif"))
    out = str(tmp_path / "labels.ome.zarr")
    # an interrupted run: one block of the labelling pass fails every time
    with monkeypatch.context() as mp:
        inject(mp, "item_0005-label", "1_0_1", "fail", str(tmp_path / "fault"))
        with pytest.raises(ExecutionError, match="block 1_0_1 failed"):
            _blockwise(path, zarr_in, out, client, retries=0)
    assert zarr_status(out) is None or zarr_status(out)["status"] == "running"
    assert os.path.isdir(os.path.join(out, ".c3dseg-work"))
    # another pipeline (other blocks) must not take over the unfinished run
    with pytest.raises(PipelineError, match="unfinished blockwise run"):
        _blockwise(path, zarr_in, out, client, block=(22, 21, 22))
    # the same command resumes: the tracking pass is not run again
    res, opts = _blockwise(path, zarr_in, out, client)
    assert opts.stats["passes"]["item_0005-track"]["ran"] == 0
    assert 1 <= opts.stats["passes"]["item_0005-label"]["ran"] < 8
    assert np.array_equal(res, whole)
    assert zarr_status(out)["status"] == "complete" and not os.path.exists(os.path.join(out, ".c3dseg-work"))
    # a finished output is refused without --overwrite
    with pytest.raises(PipelineError, match="exists; add --overwrite"):
        _blockwise(path, zarr_in, out, client)
    res, _ = _blockwise(path, zarr_in, out, client, overwrite=True, zarr_format=2, n_levels=2)
    assert np.array_equal(res, whole) and os.path.exists(os.path.join(out, ".zattrs"))
    # inputs are never outputs
    with pytest.raises(PipelineError, match="input of this run"):
        _blockwise(path, zarr_in, zarr_in[0], client, overwrite=True)


def test_task_failing_once_is_retried(tmp_path, client, inputs, monkeypatch):
    zarr_in, tif_in = inputs
    path = _fused(tmp_path)
    whole = _whole(path, tif_in, str(tmp_path / "whole.tif"))
    marker = tmp_path / "fault"
    inject(monkeypatch, "item_0005-track", "0_1_1", "raise", str(marker))
    res, _ = _blockwise(path, zarr_in, str(tmp_path / "l.ome.zarr"), client)
    assert marker.exists()                       # it did fail once
    assert np.array_equal(res, whole)
    # without retries the same fault fails the run, naming the block
    marker.unlink()
    with pytest.raises(ExecutionError, match="block 0_1_1 failed in item_0005: track"):
        _blockwise(path, zarr_in, str(tmp_path / "l2.ome.zarr"), client, retries=0)


def test_scheduler_unreachable_writes_nothing(tmp_path, inputs):
    from c3dseg.blockwise.executor import BlockwiseOptions, run_blockwise
    from c3dseg.blockwise.runtime import ClusterOptions
    from c3dseg.runner.executor import Target

    zarr_in, _ = inputs
    out = str(tmp_path / "never.ome.zarr")
    opts = BlockwiseOptions(block=BLOCK, cluster=ClusterOptions(scheduler="tcp://127.0.0.1:9", connect_timeout=1))
    with pytest.raises(ExecutionError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        run_blockwise(_plan(_fused(tmp_path)), zarr_in, Target(out, True), opts)
    assert not os.path.exists(out)


def test_dying_worker_reruns_its_block(tmp_path, inputs, monkeypatch):
    """A local cluster of 2 processes; one worker dies in the middle of a block (os._exit): the
    scheduler reruns the block on a restarted worker and the labels are still identical."""
    from c3dseg.blockwise.executor import BlockwiseOptions, run_blockwise
    from c3dseg.blockwise.runtime import ClusterOptions
    from c3dseg.runner.executor import Target
    from c3dseg.zarr_io import open_volume

    zarr_in, tif_in = inputs
    path = _fused(tmp_path)
    whole = _whole(path, tif_in, str(tmp_path / "whole.tif"))
    out = str(tmp_path / "died.ome.zarr")
    marker = tmp_path / "died"
    inject(monkeypatch, "item_0005-track", "1_1_0", "exit", str(marker))
    opts = BlockwiseOptions(block=BLOCK, cluster=ClusterOptions(workers=2, memory_limit="1GiB"), keep_work=True,
                            report_memory=True)
    run_blockwise(_plan(path), zarr_in, Target(out, True), opts)
    assert marker.exists()                       # a worker did die in block 1_1_0
    assert len(opts.stats["worker_peak_bytes"]) == 2
    assert np.array_equal(open_volume(out).read(), whole)


def test_cli(tmp_path, inputs, capsys):
    from c3dseg.runner.cli import main
    from c3dseg.zarr_io import open_volume

    zarr_in, tif_in = inputs
    path = _fused(tmp_path)
    whole = _whole(path, tif_in, str(tmp_path / "whole.tif"))
    out = str(tmp_path / "cli.ome.zarr")
    ins = []
    for c in range(4):
        ins += ["-i", f"{c}={zarr_in[c]}"]
    assert main([path, "--blocks", ",".join(map(str, BLOCK)), "--workers", "1", "--memory-limit", "1GiB",
                 "--zarr-format", "2", "-o", out] + ins) == 0
    assert np.array_equal(open_volume(out).read(), whole)
    assert open_volume(out).meta["ngff_version"] == "0.4"
    err = capsys.readouterr().err
    assert "progress: item_0005: track" in err and "done: 1 output(s)" in err
    # an output folder: XPIWIT's layout with OME-Zarr stores, and the manifest
    folder = tmp_path / "outdir"
    assert main([path, "--blocks", ",".join(map(str, BLOCK)), "--workers", "1", "-q", "-o", str(folder) + "/"]
                + ins) == 0
    store = folder / "item_0005_FlowReconstructionFilter" / "p0_FlowReconstructionFilter_Out1.ome.zarr"
    assert np.array_equal(open_volume(str(store)).read(), whole)
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    assert [os.path.basename(f["path"]) for f in manifest["files"]] == [store.name]
    assert not (folder / ".c3dseg-work").exists()
    # the output exists now: exit 2 without --overwrite
    assert main([path, "--blocks", "21,21,22", "-o", out] + ins) == 2
    assert "add --overwrite" in capsys.readouterr().err
    # argument errors: exit 2, one line each
    assert main([path, "--workers", "2", "-o", str(tmp_path / "x.ome.zarr")] + ins) == 2
    assert "need" in capsys.readouterr().err
    assert main([path, "--blocks", "8,8", "-o", str(tmp_path / "x.ome.zarr")] + ins) == 2
    assert "expected three sizes" in capsys.readouterr().err
    assert main([path, "--blocks", "4", "-o", str(tmp_path / "x.ome.zarr")] + ins) == 2
    assert "smallest valid block size" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.ome.zarr")


def _conv_model(path):
    """A one-layer 3D conv "network" (4 outputs, tanh) with percentile normalisation metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (4, 1, 5, 5, 5)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], pads=[2] * 6), helper.make_node("Tanh", ["c"], ["output"])],
        "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, None, None, None])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4, None, None, None])],
        [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in {"size_divisor": "8", "in_channels": "1", "normalization": "percentile",
                 "norm_percentiles": "1,99.8"}.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(m, path)
    return path


class _CountingNetwork:
    """Wraps a loaded network and records the first voxel of every tile it predicts (test only)."""

    def __init__(self, net, calls):
        self._net, self._calls = net, calls

    def __getattr__(self, name):
        return getattr(self._net, name)

    def __call__(self, batch):
        for tile in batch:
            self._calls.append(tile.tobytes())
        return self._net(batch)


@pytest.mark.parametrize("filter_name, block", [("TorchModel", (16, 17, 23)), ("OnnxModel", (15, 20, 44))])
def test_network_predictions_identical(tmp_path, client, monkeypatch, filter_name, block):
    """Tiled prediction blockwise uses the whole volume's tile plan, normalisation and blending:
    the four output channels equal the whole-volume ones although blocks and tiles do not align,
    and every tile is predicted exactly once (blocks smaller than the tiles; blocks spanning x), with
    OnnxModel's test-time augmentation as well."""
    pytest.importorskip("onnx")
    from c3dseg.blockwise import globals as bglobals
    from c3dseg.io import read_image, write_image

    rng = np.random.default_rng(2)
    vol = (ndi.gaussian_filter(rng.random(SHAPE), 1.0) * 1000).astype(np.float32)
    src = str(tmp_path / "in.tif")
    write_image(src, Image(vol, (1.0, 1.0, 1.0)))
    model = _conv_model(str(tmp_path / "conv.onnx"))
    patch = {"ModelPath": model, "UseGPU": 0, "PatchDepth": 16, "PatchHeight": 24, "PatchWidth": 24}
    if filter_name == "TorchModel":
        net = [item("item_0002", "TorchModel", [("item_0001", 1)], params=dict(patch, PatchStride=0.75, BatchSize=2),
                    outputs=(("image", 1), ("image", 2), ("image", 3), ("image", 4)))]
    else:
        net = [item("item_0002", "OnnxModel", [("item_0001", 1)],
                    params=dict(patch, PatchOverlap=8, TestTimeAugmentation="xy")),
               item("item_0005", "TileMerger", [("item_0002", 1)], params={"Blending": "linear"},
                    outputs=(("image", 1), ("image", 2), ("image", 3), ("image", 4)))]
    src_id = "item_0002" if filter_name == "TorchModel" else "item_0005"
    path = _pipeline(
        tmp_path, "net", item("item_0001", "ImageReader", [("cmd", 0)]), *net,
        item("item_0003", "ChannelMerger", [(src_id, 1), (src_id, 2), (src_id, 3), (src_id, 4)]),
        item("item_0004", "ImageWriter", [("item_0003", 1)], outputs=()))
    from c3dseg.runner.executor import RunOptions, Target, execute

    execute(_plan(path), {0: src}, Target(str(tmp_path / "whole.tif"), True), RunOptions())
    whole = read_image(str(tmp_path / "whole.tif")).data
    calls = []
    real = bglobals._load_network
    monkeypatch.setattr(bglobals, "_load_network", lambda *a: _CountingNetwork(real(*a), calls))
    res, opts = _blockwise(path, {0: src}, str(tmp_path / "net.ome.zarr"), client, block=block)
    assert res.shape == whole.shape == (4,) + SHAPE
    assert np.abs(whole).max() > 0.1
    np.testing.assert_array_equal(res, whole)
    tiles = opts.stats["passes"]["item_0002-tiles"]["tiles"]
    runs = 4 if filter_name == "OnnxModel" else 1            # OnnxModel: mirrored in y, x and both
    assert tiles >= 8 and len(calls) == runs * tiles         # each tile of the plan predicted once...
    assert len(set(calls)) == len(calls)                     # ... and no tile twice


def test_feature_groups_bounded():
    """Cells handled by one block go in groups whose joint bounding box stays within the budget."""
    from c3dseg.blockwise.reconstruction import _groups

    rng = np.random.default_rng(0)
    n = 200
    lo = rng.integers(0, 100, (3, n))
    hi = lo + rng.integers(0, 12, (3, n))
    cells = np.concatenate([np.arange(1, n + 1)[None], np.zeros((1, n), np.int64), lo, hi])
    groups = list(_groups(cells, 4000))
    assert sorted(np.concatenate([g[0] for g in groups]).tolist()) == list(range(1, n + 1))
    for g in groups:
        assert np.all(np.diff(g[0]) > 0)
        box = np.prod(g[5:8].max(axis=1) - g[2:5].min(axis=1) + 1)
        assert box <= 4000 or g.shape[1] == 1
    assert len(groups) > 5

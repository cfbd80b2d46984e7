"""The predictor filters (OnnxModel, TileMerger, TorchModel) on tiny ONNX models."""

import logging
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from c3dseg.errors import C3DError, InputError  # noqa: E402
from c3dseg.filters.network import OnnxModel, TileMerger, TorchModel  # noqa: E402
from c3dseg.image import Image  # noqa: E402
from c3dseg.predict import FlipAveraged, OnnxNetwork, predict_volume  # noqa: E402
from c3dseg.tiling import TileStream  # noqa: E402

WEIGHTS = (1.0, 2.0, -1.0, 0.5)


def _save(model, path, metadata=None):
    if metadata:
        helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def conv_model(path, *, weights=WEIGHTS, kernel=1, in_shape=("N", 1, "Z", "Y", "X"), out_channels=None,
               metadata=None):
    """A Conv model (N, 1, Z, Y, X) -> (N, len(weights), Z, Y, X): output c = weights[c] * box filter."""
    oc = len(weights) if out_channels is None else out_channels
    nd = len(in_shape) - 2
    w = np.zeros((oc, 1) + (kernel,) * nd, np.float32)
    for c in range(oc):
        w[c] = weights[c % len(weights)] / kernel ** nd
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", oc] + list(in_shape[2:]))
    node = helper.make_node("Conv", ["input", "W"], ["output"], pads=[kernel // 2] * (2 * nd))
    graph = helper.make_graph([node], "conv", [x], [y], initializer=[numpy_helper.from_array(w, "W")])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path, metadata)


def _expected(vol):
    return np.stack([w * vol for w in WEIGHTS])


def _run_pair(path, vol, spacing=(2.0, 0.5, 0.5), **params):
    params = {"ModelPath": path, "UseGPU": 0, "MaxThreads": 1, **params}
    stream, = OnnxModel(params).run([Image(vol, spacing, {"basename": "v"})], [])[0]
    assert isinstance(stream, TileStream)
    outs, metas = TileMerger({}).run([stream], [])
    assert len(outs) == 4 and metas == []
    return stream, outs


def test_onnx_model_and_merger_pointwise_exact(tmp_path):
    path = conv_model(tmp_path / "m.onnx", metadata={"normalization": "none"})
    vol = np.random.default_rng(0).random((21, 37, 30), dtype=np.float32)
    stream, outs = _run_pair(path, vol, PatchDepth=16, PatchHeight=16, PatchWidth=24, PatchOverlap=4)
    assert stream.plan.n_tiles > 1
    for c, img in enumerate(outs):
        assert img.data.dtype == np.float32 and img.data.shape == vol.shape
        assert img.spacing == (2.0, 0.5, 0.5)
        np.testing.assert_allclose(img.data, WEIGHTS[c] * vol, rtol=1e-5, atol=1e-6)
    assert [o.meta["channel_name"] for o in outs] == ["foreground", "flow_z", "flow_y", "flow_x"]


def test_conv_tiled_equals_whole_with_crop_blending(tmp_path):
    path = conv_model(tmp_path / "box.onnx", kernel=3, metadata={"normalization": "none"})
    vol = np.random.default_rng(1).random((24, 40, 32), dtype=np.float32)  # multiples of 8: no padding
    net = OnnxNetwork(path, threads=1)
    whole = predict_volume(vol, net, tile_shape=(-1, -1, -1))
    tiled = predict_volume(vol, net, tile_shape=(16, 16, 16), overlap=4, blending="crop")
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-5)


def test_normalisation_from_model_metadata(tmp_path):
    path = conv_model(tmp_path / "m.onnx", metadata={"normalization": "percentile", "norm_percentiles": "0,100",
                                                   "flow_type": "heat"})
    vol = np.linspace(10, 20, 8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)
    stream, outs = _run_pair(path, vol)
    np.testing.assert_allclose(outs[0].data, (vol - 10) / 10, atol=1e-5)
    assert outs[0].meta["flow_type"] == "heat"
    assert stream.meta["model_metadata"]["norm_percentiles"] == "0,100"
    # the parameters override the metadata
    _, outs = _run_pair(path, vol, Normalization="none")
    np.testing.assert_allclose(outs[0].data, vol, rtol=1e-6)


def test_odd_tile_size_is_rounded_up_with_a_warning(tmp_path, caplog):
    path = conv_model(tmp_path / "m.onnx")
    vol = np.ones((30, 30, 30), np.float32)
    with caplog.at_level(logging.WARNING, logger="c3dseg"):
        stream, outs = _run_pair(path, vol, PatchDepth=13, PatchHeight=13, PatchWidth=13, PatchOverlap=2)
    assert "multiple of 8" in caplog.text and "PatchDepth=13" in caplog.text
    assert all(t % 8 == 0 for t in stream.plan.tile)
    np.testing.assert_allclose(outs[1].data, 2.0, rtol=1e-6)


def test_missing_model_file(tmp_path):
    with pytest.raises(InputError) as e:
        OnnxModel({"ModelPath": str(tmp_path / "nope.onnx")}).run([Image(np.zeros((8, 8, 8), np.float32))], [])
    assert "not found" in str(e.value) and e.value.key == "ModelPath"
    with pytest.raises(C3DError) as e:
        OnnxModel({}).run([Image(np.zeros((8, 8, 8), np.float32))], [])
    assert e.value.key == "ModelPath"


def test_relative_model_path_resolves_against_pipeline_folder(tmp_path):
    from c3dseg.filters.base import Context

    conv_model(tmp_path / "m.onnx")
    f = OnnxModel({"ModelPath": "m.onnx"}, Context(base_dir=str(tmp_path)))
    stream, = f.run([Image(np.ones((8, 8, 8), np.float32))], [])[0]
    assert stream.meta["model_path"] == str(tmp_path / "m.onnx")


def test_bad_models_name_the_model(tmp_path):
    vol = Image(np.zeros((8, 8, 8), np.float32))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model")
    two = conv_model(tmp_path / "two.onnx", weights=(1.0, 2.0))
    rank4 = conv_model(tmp_path / "rank4.onnx", in_shape=("N", 1, "Y", "X"))
    for path, words in [(garbage, "not a loadable ONNX model"), (two, "2 channels"), (rank4, "expected 5 axes")]:
        with pytest.raises(InputError) as e:
            OnnxModel({"ModelPath": str(path)}).run([vol], [])
        assert str(path) in str(e.value) and words in str(e.value)


def test_channel_mismatch(tmp_path):
    path = conv_model(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="1 input channel"):
        OnnxModel({"ModelPath": path}).run([Image(np.zeros((2, 8, 8, 8), np.float32))], [])


def _gradient_net(batch):
    """A mirror-equivariant stand-in: foreground = the input, flow along each axis = the input's
    central difference along it (mirroring the input mirrors the map and flips its sign)."""
    x = batch[:, 0].astype(np.float64)
    grads = [np.gradient(x, axis=a + 1) for a in range(3)]
    return np.stack([x] + grads, axis=1).astype(np.float32)


def test_flip_averaging_keeps_an_equivariant_network_and_cancels_a_bias():
    batch = np.random.default_rng(3).random((2, 1, 8, 9, 10), dtype=np.float32)
    plain = _gradient_net(batch)
    for axes in ((0, 1, 2), (1, 2)):
        np.testing.assert_allclose(FlipAveraged(_gradient_net, axes)(batch), plain, atol=1e-6)

    def biased(b):  # flows that point the same way wherever the cell lies: a bias, not a feature
        return _gradient_net(b) + np.array([0.0, 0.3, 0.2, 0.1], np.float32)[None, :, None, None, None]

    out = FlipAveraged(biased, (1, 2))(batch)
    np.testing.assert_allclose(out[:, 0], plain[:, 0], atol=1e-6)
    np.testing.assert_allclose(out[:, 1], plain[:, 1] + 0.3, atol=1e-6)   # z not mirrored: kept
    np.testing.assert_allclose(out[:, 2:], plain[:, 2:], atol=1e-6)        # y, x mirrored: cancelled
    calls = []
    FlipAveraged(lambda b: calls.append(b.copy()) or _gradient_net(b), (0, 1, 2))(batch)
    assert len(calls) == 8 and len({c.tobytes() for c in calls}) == 8
    with pytest.raises(ValueError, match="flip axes"):
        FlipAveraged(_gradient_net, (3,))


def test_onnx_model_test_time_augmentation(tmp_path):
    """A pointwise model mirrored and mirrored back gives the same foreground; its flows, which do
    not turn with the mirror, average out along every mirrored axis."""
    path = conv_model(tmp_path / "m.onnx", metadata={"normalization": "none"})
    vol = np.random.default_rng(0).random((21, 37, 30), dtype=np.float32)
    tiles = dict(PatchDepth=16, PatchHeight=16, PatchWidth=24, PatchOverlap=4)
    _, outs = _run_pair(path, vol, TestTimeAugmentation="xy", **tiles)
    np.testing.assert_allclose(outs[0].data, WEIGHTS[0] * vol, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[1].data, WEIGHTS[1] * vol, rtol=1e-5, atol=1e-6)
    assert np.abs(outs[2].data).max() < 1e-5 and np.abs(outs[3].data).max() < 1e-5
    _, outs = _run_pair(path, vol, TestTimeAugmentation="xyz", **tiles)
    np.testing.assert_allclose(outs[0].data, WEIGHTS[0] * vol, rtol=1e-5, atol=1e-6)
    assert max(np.abs(o.data).max() for o in outs[1:]) < 1e-5
    with pytest.raises(C3DError, match="TestTimeAugmentation"):
        _run_pair(path, vol, TestTimeAugmentation="z")


def test_merger_rejects_other_inputs_and_splits_prediction_images():
    with pytest.raises(InputError, match="tile stream"):
        TileMerger({}).run([Image(np.zeros((8, 8, 8), np.float32))], [])
    pred = np.random.default_rng(0).random((4, 5, 6, 7)).astype(np.float32)
    outs, _ = TileMerger({}).run([Image(pred, (1, 2, 3))], [])
    assert all(np.array_equal(o.data, pred[c]) for c, o in enumerate(outs))


def test_torch_model_runs_onnx_with_xpiwit_parameters(tmp_path):
    path = conv_model(tmp_path / "m.onnx", metadata={"normalization": "none"})
    vol = np.random.default_rng(2).random((20, 40, 40), dtype=np.float32)
    img = Image(vol, (1, 1, 1))
    params = {"NumInputChannels": "1", "UseGPU": "1", "PatchWidth": "32", "PatchHeight": "32", "PatchDepth": "16",
              "PatchStride": "0.5", "ModelPath": path, "MaxThreads": "-1", "Precision": "16"}
    outs, metas = TorchModel(params).run([img, img, img, img], [])
    assert len(outs) == 4
    for c, o in enumerate(outs):
        np.testing.assert_allclose(o.data, WEIGHTS[c] * vol, rtol=1e-5, atol=1e-6)


def test_torch_model_pt_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    pt = tmp_path / "Cellpose3D.pt"
    pt.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(InputError, match="needs torch"):
        TorchModel({"ModelPath": str(pt)}).run([Image(np.zeros((8, 8, 8), np.float32))], [])


def test_torch_model_runs_torchscript(tmp_path):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, 2 * x, -x, 0.5 * x], dim=1)

    path = tmp_path / "net.pt"
    with pytest.warns(DeprecationWarning):
        torch.jit.script(Net()).save(str(path))
    vol = np.random.default_rng(3).random((12, 20, 20), dtype=np.float32)
    outs, _ = TorchModel({"ModelPath": str(path), "UseGPU": 0, "PatchDepth": 8, "PatchWidth": 16,
                          "PatchHeight": 16}).run([Image(vol)], [])
    for c, o in enumerate(outs):
        np.testing.assert_allclose(o.data, WEIGHTS[c] * vol, rtol=1e-5, atol=1e-6)

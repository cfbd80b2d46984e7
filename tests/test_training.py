"""Training (torch): U-Net, loss, flow-correct augmentation, sampling, the loop, resume, export."""

import csv
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yaml")
pytest.importorskip("onnx")

from scipy import ndimage as ndi  # noqa: E402

from c3dseg.errors import C3DError, InputError  # noqa: E402
from c3dseg.image import Image  # noqa: E402
from c3dseg.io import write_image  # noqa: E402
from c3dseg.synthesis import voronoi_labels  # noqa: E402
from c3dseg.training.augment import Augmenter, faint_membranes  # noqa: E402
from c3dseg.training.data import (PatchSampler, data_summary, find_pairs, load_volume, make_targets,  # noqa: E402
                                  model_scale_diameter, read_pair_list, rescan_scale)
from c3dseg.training.losses import CellposeLoss  # noqa: E402
from c3dseg.training.train import resolve_config, train  # noqa: E402
from c3dseg.training.unet import InferenceModel, UNet3D, count_parameters  # noqa: E402

TANH = {"flow_type": "tanh", "flow_scale": "adaptive"}


def membrane_image(labels, seed=0):
    """A membrane stain derived from label boundaries (+ blur and noise)."""
    b = (ndi.maximum_filter(labels, 3) != ndi.minimum_filter(labels, 3)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(b, 0.8) * 200 + 20 + rng.normal(0, 4, labels.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for sub in ("images", "labels"):
        (root / sub).mkdir()
    for k in range(3):
        lab = voronoi_labels((24, 32, 32), 14, seed=k)
        lab[:, :, :3] = 0  # some background
        write_image(str(root / "images" / f"s{k}.tif"), Image(membrane_image(lab, k), (2.0, 1.0, 1.0)))
        write_image(str(root / "labels" / f"s{k}.tif"), Image(lab, (2.0, 1.0, 1.0), {"is_label": True}))
    return root


def test_unet_reference_size_and_outputs():
    net = UNet3D()
    assert count_parameters(net) == 1_980_980  # the reference code's network
    small = UNet3D(base_width=4, depth=2)
    x = torch.randn(2, 1, 16, 24, 8)
    y = small(x)
    assert y.shape == (2, 4, 16, 24, 8)
    assert y[:, 1:].abs().max() < 1
    p = InferenceModel(small)(x)
    assert p[:, 0].min() >= 0 and p[:, 0].max() <= 1
    torch.testing.assert_close(p[:, 1:], y[:, 1:])
    with pytest.raises(ValueError):
        UNet3D(base_width=3)


def test_loss_ignores_invalid_voxels_and_weights_background_flows():
    loss = CellposeLoss(fg_weight=1, dice_weight=0, flow_weight=1, background_flow_weight=0.0)
    target = torch.zeros(1, 4, 4, 4, 4)
    target[:, 0, :2] = 1
    target[:, 1:, :2] = 0.5
    pred = torch.zeros(1, 4, 4, 4, 4)
    pred[:, 0] = torch.where(target[:, 0] > 0, 20.0, -20.0)
    pred[:, 1:] = target[:, 1:]
    base, parts = loss(pred, target)
    assert float(base) < 1e-6
    bad = pred.clone()
    bad[:, 1:, 2:] = 0.9  # wrong flows in the background: weight 0
    assert float(loss(bad, target)[0]) < 1e-6
    bad[:, 1:, :1] = -1.0  # wrong flows in the foreground
    assert float(loss(bad, target)[1]["flow"]) > 0.1
    valid = torch.ones(1, 4, 4, 4, dtype=torch.bool)
    valid[:, :1] = False  # ... but only where the voxels are invalid
    assert float(loss(bad, target, valid)[0]) < 1e-6


def test_flips_and_permutations_equal_recomputed_flows():
    lab = voronoi_labels((20, 20, 20), 12, seed=3).astype(np.int32)
    tgt = make_targets(lab, TANH)
    aug = Augmenter({"flip": {"p": 1.0}, "permute": {"p": 1.0, "axes": "zyx"}})
    for seed in range(4):
        rng = np.random.default_rng(seed)
        img = lab.astype(np.float32)
        img2, tgt2, lab2, valid2 = aug.flip_permute(rng, img, tgt, lab, np.ones(lab.shape, bool), (1, 1, 1))
        assert not np.array_equal(lab2, lab)
        np.testing.assert_array_equal(img2, lab2.astype(np.float32))
        np.testing.assert_allclose(tgt2, make_targets(lab2, TANH), atol=1e-5)


def test_geometric_resampling_recomputes_targets(dataset):
    vol = load_volume(str(dataset / "images" / "s0.tif"), str(dataset / "labels" / "s0.tif"), targets_cfg=TANH)
    aug = Augmenter({"scale": {"p": 1.0}, "rotate": {"p": 1.0}, "elastic": {"p": 1.0}, "flip": {"p": 0.0},
                     "permute": {"p": 0.0}, **{k: {"p": 0.0} for k in ("intensity", "gamma", "illumination",
                                                                      "depth_attenuation", "membranes", "blur",
                                                                      "noise")}})
    s = PatchSampler([vol], (16, 16, 16), augmenter=aug, targets_cfg=TANH, context=8, seed=5)
    img, tgt, valid = s.sample(0)
    assert img.shape == (1, 16, 16, 16) and tgt.shape == (4, 16, 16, 16) and valid.shape == (16, 16, 16)
    assert np.all(np.abs(tgt[1:]) < 1) and set(np.unique(tgt[0])) <= {0.0, 1.0}
    assert np.all(tgt[:, ~valid] == 0)
    # nearest-neighbour labels: foreground target only where the source had cells
    geo = aug.draw_geometry(np.random.default_rng(1))
    im, lab, ok = geo.resample(vol.image, vol.labels, (0, 0, 0), (24, 32, 32), (20, 20, 20))
    assert set(np.unique(lab)) <= set(np.unique(vol.labels)) and lab.dtype == np.int32


def test_isotropic_resampling_to_a_cell_size_with_cache(dataset, tmp_path):
    args = (str(dataset / "images" / "s2.tif"), str(dataset / "labels" / "s2.tif"))
    rs = {"cell_diameter_voxels": 6, "max_shape": [16, 24, 24]}
    a = load_volume(*args, targets_cfg=TANH, resample_to=rs, cache_dir=str(tmp_path))
    assert all(n <= m for n, m in zip(a.labels.shape, rs["max_shape"])) and len(set(a.spacing)) == 1
    assert abs(np.median(a.cell_diameters_um) / a.spacing[0] - 6) < 1.5
    b = load_volume(*args, targets_cfg=TANH, resample_to=rs, cache_dir=str(tmp_path))  # from the cache
    np.testing.assert_array_equal(a.targets, b.targets)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    c = load_volume(*args, targets_cfg=TANH, resample_to=dict(rs, max_shape=[8, 8, 8]), cache_dir=str(tmp_path))
    assert c.labels.shape == (8, 8, 8)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # another setting, another entry


def test_random_crop_keeps_tissue_and_background_and_is_seeded(tmp_path):
    """crop: random centres the max_shape crop on a labelled voxel drawn per volume (seeded); the
    default (centre) stays on the cells' bounding box, as before."""
    lab = np.zeros((24, 96, 96), np.int32)
    lab[:, 8:88, 8:88] = voronoi_labels((24, 80, 80), 12, seed=4)  # tissue with a background rim
    for sub in ("i", "l"):
        (tmp_path / sub).mkdir()
    write_image(str(tmp_path / "i" / "a.tif"), Image(membrane_image(lab), (1.0, 1.0, 1.0)))
    write_image(str(tmp_path / "l" / "a.tif"), Image(lab, (1.0, 1.0, 1.0), {"is_label": True}))
    args = (str(tmp_path / "i" / "a.tif"), str(tmp_path / "l" / "a.tif"))
    d = float(np.median(np.cbrt(6 * np.bincount(lab.ravel())[1:] / np.pi)))
    rs = {"cell_diameter_voxels": d, "max_shape": [24, 40, 40]}
    centre = load_volume(*args, targets_cfg=TANH, resample_to=rs)
    assert centre.labels.shape == (24, 40, 40) and centre.labels.all()  # the middle of the tissue
    crops = [load_volume(*args, targets_cfg=TANH, resample_to=dict(rs, crop="random"), seed=k) for k in range(6)]
    assert all(c.labels.shape == (24, 40, 40) and c.labels.any() for c in crops)
    assert any((c.labels == 0).mean() > 0.05 for c in crops)  # some reach the background rim
    assert len({c.labels.tobytes() for c in crops}) > 1  # different volumes, different places
    again = load_volume(*args, targets_cfg=TANH, resample_to=dict(rs, crop="random"), seed=3)
    np.testing.assert_array_equal(again.labels, crops[3].labels)
    np.testing.assert_array_equal(again.image, crops[3].image)  # image and labels cropped alike
    with pytest.raises(C3DError, match="crop"):
        load_volume(*args, targets_cfg=TANH, resample_to=dict(rs, crop="corner"))


def test_model_scale_is_the_volumes_median_as_the_estimate_measures_it(dataset):
    """The scale stored in a model is the median over volumes of each volume's median cell (interior
    cells, before the training crop) in voxels of its training grid, whatever the crop; the median
    over the cropped cells (cut cells count smaller) is kept beside it as the pooled figure."""
    from c3dseg.io import read_image
    from c3dseg.synthesis import median_cell_diameter

    names = sorted(p.name for p in (dataset / "labels").glob("*.tif"))
    expected = []
    for n in names:
        img = read_image(str(dataset / "labels" / n))
        lab = img.data.astype(np.int64)
        iso = np.median(np.cbrt(6 * np.bincount(lab.ravel())[1:][np.bincount(lab.ravel())[1:] > 0]
                                * np.prod(img.spacing) / np.pi)) / 6
        expected.append(median_cell_diameter(lab, img.spacing) / iso)
        assert model_scale_diameter(lab, img.spacing, {"cell_diameter_voxels": 6})[1] == pytest.approx(expected[-1])
    summaries = []
    for max_shape in ([8, 8, 8], [24, 40, 40]):
        rs = {"cell_diameter_voxels": 6, "max_shape": max_shape}
        vols = [load_volume(str(dataset / "images" / n), str(dataset / "labels" / n), targets_cfg=TANH,
                            resample_to=rs) for n in names]
        summaries.append(data_summary(vols))
    for s in summaries:
        assert s["median_cell_diameter_voxels"] == pytest.approx(np.median(expected))
    assert summaries[0]["pooled_cell_diameter_voxels"] < summaries[1]["pooled_cell_diameter_voxels"]
    scan = rescan_scale([str(dataset / "labels" / n) for n in names], {"cell_diameter_voxels": 6})
    assert scan["median_cell_diameter_voxels"] == pytest.approx(np.median(expected))
    assert scan["rescanned_volumes"] == 3


def test_sampler_is_deterministic_per_patch_index(dataset):
    vol = load_volume(str(dataset / "images" / "s1.tif"), str(dataset / "labels" / "s1.tif"), targets_cfg=TANH)
    s = PatchSampler([vol], (16, 16, 16), augmenter=Augmenter(), targets_cfg=TANH, seed=7)
    a, b = s.sample(3), s.sample(3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(s.sample(4)[0], a[0])
    # a patch larger than the volume is padded and marked invalid there
    big = PatchSampler([vol], (32, 40, 40), seed=1).sample(0)
    assert big[0].shape == (1, 32, 40, 40) and 0 < big[2].mean() < 1


def test_faint_membranes_dims_only_interfaces():
    lab = voronoi_labels((16, 16, 16), 8, seed=1)
    img = membrane_image(lab)
    out = faint_membranes(img, lab, np.random.default_rng(0), fraction=1.0, faint=0.0)
    interior = ndi.maximum_filter(lab, 3) == ndi.minimum_filter(lab, 3)
    np.testing.assert_array_equal(out[interior], img[interior])
    assert out[~interior].mean() < img[~interior].mean()


def test_pairs_from_folders_and_csv(dataset, tmp_path):
    pairs = find_pairs(str(dataset / "images"), str(dataset / "labels"))
    assert [os.path.basename(a) for a, _ in pairs] == ["s0.tif", "s1.tif", "s2.tif"]
    lst = tmp_path / "list.csv"
    lst.write_text(f"image;label;spacing\n{pairs[0][0]};{pairs[0][1]};2 1 1\n")
    rows = read_pair_list(str(lst))
    assert rows == [(pairs[0][0], pairs[0][1], (2.0, 1.0, 1.0))]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        find_pairs(str(dataset / "images"), str(tmp_path / "empty"))


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(C3DError, match="sample_per_epoch"):
        resolve_config({"train": {"sample_per_epoch": 3}})
    with pytest.raises(C3DError, match="divisible by 8"):
        resolve_config({"train": {"patch_size": [20, 32, 32]}})
    with pytest.raises(C3DError, match="unknown augmentation"):
        resolve_config({"augment": {"rotation": {"p": 1}}})


def _config(dataset, out, steps):
    return {
        "seed": 3, "out": str(out), "threads": 1,
        "data": {"train": {"images": str(dataset / "images"), "labels": str(dataset / "labels")},
                 "val_fraction": 0.34},
        "model": {"base_width": 4, "depth": 2},
        "train": {"steps": steps, "patch_size": [16, 16, 16], "lr": 3e-3, "warmup_steps": 2, "log_every": 4,
                  "checkpoint_every": 8, "amp": "off", "prefetch": 1},
        "augment": {k: None for k in ("scale", "rotate", "elastic", "illumination", "membranes", "noise")},
        "validation": {"every": 12, "tile_size": [16, 32, 32], "reconstruct": {"n_iter": 20}},
    }


def test_training_lowers_loss_resumes_exports_and_predicts(dataset, tmp_path):
    from c3dseg.filters.network import OnnxModel, TileMerger
    from c3dseg.training.data import load_volumes, list_pairs

    out = tmp_path / "run"
    cfg = resolve_config(_config(dataset, out, 24))
    res = train(cfg, progress=False)
    assert res["steps"] == 24 and not res["interrupted"]
    for name in ("last.pt", "best.pt", "log.csv", "config.yaml", "model.onnx"):
        assert (out / name).is_file(), name
    cached = sorted((out / "cache").glob("*.npy"))
    assert len(cached) == 3  # targets of every volume, reused by --resume
    stamp = [c.stat().st_mtime_ns for c in cached]

    # the loss on fixed patches went down: trained vs the same initialisation untrained
    vols = load_volumes(list_pairs({"images": str(dataset / "images"), "labels": str(dataset / "labels")}),
                        norm_cfg=cfg["data"]["normalization"], targets_cfg=TANH)
    sampler = PatchSampler(vols, (16, 16, 16), targets_cfg=TANH, seed=99)
    batches = [sampler.batch(k, 2) for k in range(3)]
    loss_fn = CellposeLoss()
    torch.manual_seed(cfg["seed"])
    untrained = UNet3D(base_width=4, depth=2)
    trained = UNet3D(base_width=4, depth=2)
    trained.load_state_dict(torch.load(out / "last.pt", weights_only=False)["model"])

    def mean_loss(net):
        with torch.no_grad():
            return np.mean([float(loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y), torch.from_numpy(v))[0])
                            for x, y, v in batches])

    assert mean_loss(trained) < 0.9 * mean_loss(untrained)

    # resume continues at step 24 and the log holds every logged step once
    cfg2 = resolve_config(_config(dataset, out, 32))
    res2 = train(cfg2, resume=True, progress=False)
    assert res2["steps"] == 32
    assert [c.stat().st_mtime_ns for c in cached] == stamp  # read back, not recomputed
    with open(out / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows if r["loss"]]
    assert steps == [4, 8, 12, 16, 20, 24, 28, 32]
    val = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in val] == [12, 24, 32]  # every 12 steps and at the end
    assert all(r["val_ap50"] != "" and 0 <= float(r["val_dice"]) <= 1 for r in val)  # segmentation was scored

    # the exported model predicts through OnnxModel + TileMerger
    vol = membrane_image(voronoi_labels((20, 40, 36), 20, seed=9))
    stream, = OnnxModel({"ModelPath": res2["onnx"], "UseGPU": 0, "PatchDepth": 16, "PatchHeight": 24,
                         "PatchWidth": 24}).run([Image(vol, (2.0, 1.0, 1.0))], [])[0]
    assert stream.meta["model_metadata"]["flow_type"] == "tanh"
    assert stream.meta["model_metadata"]["spacing_um"] == "2,1,1"
    outs, _ = TileMerger({}).run([stream], [])
    assert [o.data.shape for o in outs] == [vol.shape] * 4
    assert 0 <= outs[0].data.min() and outs[0].data.max() <= 1
    assert np.abs(outs[1].data).max() < 1


def test_init_starts_from_a_checkpoints_weights(dataset, tmp_path):
    from c3dseg.training.cli import train_main
    from c3dseg.training.export import load_checkpoint

    src = tmp_path / "src"
    train(resolve_config(_config(dataset, src, 2)), progress=False)
    w0 = load_checkpoint(str(src / "last.pt"))["model"]
    # zero steps of training is not allowed; one step at a tiny learning rate moves the weights little
    c = _config(dataset, tmp_path / "ft", 1)
    c["train"].update(init=str(src / "last.pt"), lr=1e-9, warmup_steps=1)
    c["export"] = {"onnx": False}
    res = train(resolve_config(c), progress=False)
    ck = load_checkpoint(str(tmp_path / "ft" / "last.pt"))
    assert res["steps"] == 1 and ck["state"]["step"] == 1  # a new run: its own step count
    assert ck["state"]["init_steps"] == 2  # ... and the steps of the weights it started from
    from c3dseg.training.export import metadata_from_checkpoint

    meta = metadata_from_checkpoint(ck, 17)
    assert (meta["training_steps"], meta["init_training_steps"], meta["total_training_steps"]) == ("1", "2", "3")
    # a chain: fine-tuning the fine-tuned run counts all three runs
    c2 = _config(dataset, tmp_path / "ft2", 1)
    c2["train"].update(init=str(tmp_path / "ft" / "last.pt"))
    c2["export"] = {"onnx": False}
    train(resolve_config(c2), progress=False)
    assert metadata_from_checkpoint(load_checkpoint(str(tmp_path / "ft2" / "last.pt")), 17)["total_training_steps"] == "4"
    for k, v in w0.items():
        torch.testing.assert_close(ck["model"][k], v, atol=1e-5, rtol=0)
    fresh = _config(dataset, tmp_path / "fresh", 1)
    fresh["export"] = {"onnx": False}
    train(resolve_config(fresh), progress=False)
    other = load_checkpoint(str(tmp_path / "fresh" / "last.pt"))["model"]
    assert any(not torch.allclose(other[k], v) for k, v in w0.items())
    # errors: a missing file, another architecture
    with pytest.raises(C3DError, match="train.init"):
        resolve_config(dict(c, train=dict(c["train"], init=str(tmp_path / "nope.pt"))))
    wide = _config(dataset, tmp_path / "wide", 1)
    wide["model"] = {"base_width": 8, "depth": 2}
    wide["train"]["init"] = str(src / "last.pt")
    with pytest.raises(C3DError, match="train.init.*base_width"):
        train(resolve_config(wide), progress=False)
    assert not (tmp_path / "wide" / "last.pt").exists()
    import yaml

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(dataset, tmp_path / "cli", 1)))
    assert train_main([str(cfg_path), "--init", str(tmp_path / "nope.pt"), "-q"]) == 2


def test_export_parity_metadata_and_cli(dataset, tmp_path):
    from c3dseg.predict import OnnxNetwork
    from c3dseg.training.cli import export_main, train_main
    from c3dseg.training.export import export_onnx, load_checkpoint

    cfg_path = tmp_path / "c.yaml"
    import yaml

    c = _config(dataset, tmp_path / "run", 4)
    c["validation"]["every"] = 100
    c["export"] = {"onnx": False}
    cfg_path.write_text(yaml.safe_dump(c))
    assert train_main([str(cfg_path), "--steps", "2", "--no-progress", "-q"]) == 0
    assert load_checkpoint(str(tmp_path / "run"))["state"]["step"] == 2
    assert train_main([str(cfg_path), "--set", "train.nonsense=1", "-q"]) == 2

    r = export_onnx(str(tmp_path / "run" / "last.pt"), str(tmp_path / "m.onnx"))
    assert r["checked"] and r["max_abs_diff"] <= 1e-3
    net = OnnxNetwork(str(tmp_path / "m.onnx"))
    md = net.metadata
    for key in ("flow_type", "flow_scale", "channels", "patch_size", "spacing_um", "median_cell_diameter_um",
                "normalization", "norm_percentiles", "c3dseg_version", "opset", "size_divisor"):
        assert md.get(key), key
    assert md["channels"] == "foreground,flow_z,flow_y,flow_x" and md["patch_size"] == "16,16,16"
    # last.pt was validated at its final step 2: its own score, and the run's best beside it
    state = load_checkpoint(str(tmp_path / "run" / "last.pt"))["state"]
    assert state["validated_step"] == 2 and md["validation_score"] == f"{state['score']:.4f}"
    assert md["best_validation_score"] == f"{state['best']:.4f}" and md["best_validation_step"] == "2"
    assert net.size_divisor == 4
    y = net(np.random.default_rng(0).random((1, 1, 8, 12, 16), dtype=np.float32))
    assert y.shape == (1, 4, 8, 12, 16)
    assert export_main([str(tmp_path / "run"), "-o", str(tmp_path / "h.onnx"), "--fp16", "-q"]) == 0
    assert (tmp_path / "h.onnx").is_file()
    before = (tmp_path / "h.onnx").read_bytes()
    assert export_main([str(tmp_path / "run"), "-o", str(tmp_path / "h.onnx"), "-q"]) == 1  # exists
    assert (tmp_path / "h.onnx").read_bytes() == before
    assert export_main([str(tmp_path / "run"), "-o", str(tmp_path / "h.onnx"), "--overwrite", "-q"]) == 0
    assert export_main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.onnx"), "-q"]) == 1
    # --rescan-labels: a checkpoint trained at a cell scale gets its scale measured from label files
    assert export_main([str(tmp_path / "run"), "-o", str(tmp_path / "r.onnx"), "-q", "--rescan-labels",
                        str(dataset / "labels")]) == 2      # trained without resample_to: nothing to rescan
    assert not (tmp_path / "r.onnx").exists()
    ck = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    ck["data_info"] = dict(ck["data_info"], resample_to={"cell_diameter_voxels": 6}, median_cell_diameter_voxels=1.0)
    ck["data_info"].pop("pooled_cell_diameter_voxels", None)
    import torch

    torch.save(ck, str(tmp_path / "old.pt"))
    assert export_main([str(tmp_path / "old.pt"), "-o", str(tmp_path / "r.onnx"), "-q", "--rescan-labels",
                        str(dataset / "labels")]) == 0
    md = OnnxNetwork(str(tmp_path / "r.onnx")).metadata
    scan = rescan_scale(sorted(str(p) for p in (dataset / "labels").glob("*.tif")), {"cell_diameter_voxels": 6})
    assert float(md["median_cell_diameter_voxels"]) == pytest.approx(scan["median_cell_diameter_voxels"], rel=1e-3)
    assert md["pooled_cell_diameter_voxels"] == "1"
    assert export_main([str(tmp_path / "old.pt"), "-o", str(tmp_path / "r2.onnx"), "-q", "--rescan-labels",
                        str(tmp_path / "nowhere")]) != 0
    assert not (tmp_path / "r2.onnx").exists()

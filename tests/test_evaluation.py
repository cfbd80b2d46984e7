"""c3d-eval: file / folder matching, pooled metrics, border sections, JSON, plot, exit codes."""

import json

import numpy as np
import pytest

from c3dseg import evaluation as E
from c3dseg.image import Image
from c3dseg.io import write_image
from c3dseg.synthesis import voronoi_labels

SP = (2.0, 1.0, 1.0)


def _write(path, lab):
    write_image(str(path), Image(lab.astype(np.uint16), SP, {"is_label": True}), label=True)


@pytest.fixture
def data(tmp_path):
    gt = tmp_path / "gt"
    good = tmp_path / "good"
    bad = tmp_path / "bad"
    for d in (gt, good, bad):
        d.mkdir()
    for i in range(2):
        g = voronoi_labels((16, 40, 40), 25, seed=i)
        _write(gt / f"s{i}.tif", g)
        _write(good / f"s{i}.tif", g)
        p = g.copy()
        p[p == 2] = 3            # a merge
        p[:, :, :4] = 0          # a missed slab
        _write(bad / f"s{i}.tif", p)
    return tmp_path


def test_perfect_and_damaged_predictions(data, capsys):
    rc = E.main([str(data / "gt"), str(data / "good"), str(data / "bad"), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    good, bad = rep["predictions"]
    assert good["name"] == "good" and bad["name"] == "bad"
    s = good["summary"]["all"]
    assert s["files"] == 2 and s["n_gt"] == 50
    for k in ("mean_dice", "ap@0.5", "ap@0.75", "ap@0.9", "f1@0.5", "aji"):
        assert s[k] == pytest.approx(1.0)
    b = bad["summary"]["all"]
    assert b["mean_dice"] < 0.97 and b["ap@0.5"] < 1.0 and b["aji"] < 1.0
    # pooled counts equal the sum of the per-file counts
    assert b["tp@0.5"] == sum(f["metrics"]["tp@0.5"] for f in bad["files"])
    # sections: all = interior + border cells
    assert good["summary"]["interior"]["n_gt"] + good["summary"]["border"]["n_gt"] == 50


def test_pooled_dice_matches_metrics_module(data):
    from c3dseg.io import read_image
    from c3dseg.metrics import mean_cell_dice
    rep = E.run(str(data / "gt"), [str(data / "bad")])
    dice = []
    for i in range(2):
        g = read_image(data / "gt" / f"s{i}.tif").data
        p = read_image(data / "bad" / f"s{i}.tif").data
        dice.append(mean_cell_dice(g, p, return_per_cell=True)[1])
    assert rep["predictions"][0]["summary"]["all"]["mean_dice"] == pytest.approx(np.concatenate(dice).mean())


def test_table_plot_and_exclude_border(data, capsys, tmp_path):
    png = tmp_path / "plots" / "box.png"
    rc = E.main([str(data / "gt"), str(data / "bad"), "--plot", str(png), "--exclude-border"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "interior" in out and "border " not in out
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_files_and_name_matching_across_formats(data, tmp_path, capsys):
    other = tmp_path / "nrrd"
    other.mkdir()
    from c3dseg.io import read_image
    lab = read_image(data / "bad" / "s0.tif").data
    write_image(str(other / "s0.nrrd"), Image(lab, SP, {"is_label": True}), label=True)
    rc = E.main([str(data / "gt" / "s0.tif"), str(other), "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["predictions"][0]["files"][0]["name"] == "s0"
    assert E.main([str(data / "gt" / "s0.tif"), str(data / "good" / "s0.tif")]) == 0


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    return err[0]


def test_errors_exit_2(data, tmp_path, capsys):
    assert E.main([str(data / "gt"), str(tmp_path / "missing")]) == 2
    assert "missing" in _one_error_line(capsys)
    # a folder lacking one name
    part = tmp_path / "part"
    part.mkdir()
    _write(part / "s0.tif", voronoi_labels((16, 40, 40), 25, seed=0))
    assert E.main([str(data / "gt"), str(part)]) == 2
    assert "s1" in _one_error_line(capsys)
    # shape mismatch names the prediction file
    shp = tmp_path / "shape"
    shp.mkdir()
    for i in range(2):
        _write(shp / f"s{i}.tif", voronoi_labels((16, 40, 41), 25, seed=i))
    assert E.main([str(data / "gt"), str(shp)]) == 2
    assert "s0.tif" in _one_error_line(capsys)
    # folder vs file
    assert E.main([str(data / "gt"), str(data / "good" / "s0.tif")]) == 2
    _one_error_line(capsys)
    # non-integer labels
    flt = tmp_path / "flt.tif"
    write_image(str(flt), Image(np.full((16, 40, 40), 0.5, np.float32), SP))
    assert E.main([str(data / "gt" / "s0.tif"), str(flt)]) == 2
    assert "flt.tif" in _one_error_line(capsys)
    assert E.main([str(data / "gt"), str(data / "good"), "--plot", str(tmp_path / "x.jpg")]) == 2
    _one_error_line(capsys)


def test_errors_line_counts_the_damage(data, capsys):
    """--errors: the merge of cells 2 and 3 and the missed slab show up as such, pooled over files."""
    assert E.main([str(data / "gt"), str(data / "good"), str(data / "bad"), "--errors"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    good = next(x for x in lines if x.startswith("good: unmatched"))
    bad = next(x for x in lines if x.startswith("bad: unmatched"))
    assert good.startswith("good: unmatched at IoU 0.5: 0 of ") and "merged 0" in good
    import re
    merged = int(re.search(r"merged (\d+)", bad).group(1))
    assert merged >= 2 and "merge " in bad
    assert E.main([str(data / "gt"), str(data / "bad"), "--errors", "--per-file"]) == 0
    per_file = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  s") and "unmatched" in x]
    assert [x.split(":")[0] for x in per_file] == ["  s0", "  s1"]
    assert E.main([str(data / "gt"), str(data / "bad"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["predictions"][0]
    assert rep["errors"]["gt"]["merged"] == merged
    assert rep["errors"]["gt"]["cells"] == sum(f["metrics"]["errors"]["gt"]["cells"] for f in rep["files"])


def test_accuracy_benchmark_sums_the_errors_per_set(capsys):
    from bench_kit import load_benchmark

    acc = load_benchmark("accuracy")
    gt = np.zeros((4, 10, 30), np.int64)
    gt[:, :, :10], gt[:, :, 10:20], gt[:, :, 20:] = 1, 2, 3
    merged = np.zeros_like(gt)
    merged[:, :, :21] = 1                                           # 1 and 2 merged, 3 missed
    rows = [{"set": "val", "tanh_errors": acc.score(gt, g)[0]["errors"]} for g in (gt, merged)]
    acc.errors_table(rows, {"val": []}, ["tanh"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # GT cells 6, unmatched 3 (missed 1, merged 2, split 0, other 0); predicted 4, unmatched 1 (a merge)
    assert line == "| val | tanh | 6 | 3 | 1 | 2 | 0 | 0 | 4 | 1 | 0 | 1 | 0 | 0 |"

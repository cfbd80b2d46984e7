"""c3d-run's command line: exit codes, one-line errors, XPIWIT flags, outputs, batches."""

import json
import os

import numpy as np
import pytest

from c3dseg.runner.cli import main, read_stdin_args, translate_xpiwit, parse_inputs

import pipeline_kit as kit
from pipeline_kit import item, pipeline_xml


@pytest.fixture(autouse=True)
def toy_filters():
    kit.install_toy_filters()


def write_pipeline(tmp_path, *items, name="p.xml"):
    path = tmp_path / name
    path.write_bytes(pipeline_xml(*items))
    return str(path)


CHAIN = (item("item_0001", "TestNpyReader", [("cmd", 0)]),
         item("item_0002", "TestAdd", [("item_0001", 1)], params={"WriteResult": "1", "Precision": "32"}))


def one_line_error(capsys, code, expected_rc):
    assert code == expected_rc
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


def test_exit_2_for_a_bad_pipeline_with_one_line(tmp_path, capsys):
    p = write_pipeline(tmp_path, CHAIN[0], item("item_0002", "TestAdd", [("item_0001", 1)], params={"Value": "x"}))
    line = one_line_error(capsys, main([p, "-i", "a.npy"]), 2)
    assert line == "error: p.xml: item_0002 (TestAdd): Value: expected a number in [-100, 100], got 'x'"


def test_malformed_xml_gives_line_and_column(tmp_path, capsys):
    p = tmp_path / "bad.xml"
    p.write_text("<xpiwit>\n<pipeline>\n<item item_id='a'>\n</pipeline></xpiwit>")
    line = one_line_error(capsys, main([str(p), "--validate"]), 2)
    assert "bad.xml: line 4, column" in line and "malformed XML" in line


def test_validate_and_missing_input(tmp_path, capsys):
    p = write_pipeline(tmp_path, *CHAIN)
    assert main([p, "--validate"]) == 0
    assert "item_0001 -> item_0002" in capsys.readouterr().out
    line = one_line_error(capsys, main([p, "-i", str(tmp_path / "nope.npy")]), 2)
    assert "file not found" in line and "nope.npy" in line
    line = one_line_error(capsys, main([p]), 2)
    assert "command-line input 0" in line


def test_bad_arguments_exit_2(capsys):
    assert main(["--frobnicate"]) == 2
    assert main(["no_such_pipeline_name"]) == 2
    assert main(["--set", "oops", "x.xml"]) == 2


def test_runtime_failure_exit_1(tmp_path, capsys):
    np.save(tmp_path / "neg.npy", -np.ones((2, 2, 2), np.float32))
    p = write_pipeline(tmp_path, CHAIN[0], item("item_0002", "TestFail", [("item_0001", 1)],
                                                params={"WriteResult": "1"}))
    line = one_line_error(capsys, main([p, "-i", str(tmp_path / "neg.npy"), "-o", str(tmp_path / "o.tif")]), 1)
    assert "item_0002 (TestFail)" in line and "negative value" in line
    assert not (tmp_path / "o.tif").exists()


def test_single_file_output_and_overwrite(tmp_path, capsys):
    import tifffile
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    p = write_pipeline(tmp_path, *CHAIN)
    out = tmp_path / "result.tif"
    assert main([p, "-i", str(tmp_path / "a.npy"), "-o", str(out), "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a.npy", "p.xml", "result.tif"]  # exactly that file
    assert tifffile.imread(out).max() == 1.0
    line = one_line_error(capsys, main([p, "-i", str(tmp_path / "a.npy"), "-o", str(out)]), 2)
    assert "exists" in line and "--overwrite" in line
    assert main([p, "-i", str(tmp_path / "a.npy"), "-o", str(out), "--overwrite", "--set", "TestAdd.Value=3",
                 "-q"]) == 0
    assert tifffile.imread(out).max() == 3.0


def test_folder_output_manifest_batch_skip_and_failure(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    import tifffile
    for k in range(3):
        tifffile.imwrite(data / f"s{k}.tif", np.full((2, 2, 2), k, np.float32))
    tifffile.imwrite(data / "s9.tif", -np.ones((2, 2, 2), np.float32))
    p = write_pipeline(tmp_path, CHAIN[0], item("item_0002", "TestFail", [("item_0001", 1)],
                                                params={"WriteResult": "1", "Precision": "32"}))
    out = tmp_path / "out"
    rc = main([p, "-i", str(data), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "s9.tif" in err and "3 processed" in err and "1 failed" in err
    folder = out / "item_0002_TestFail"
    assert sorted(os.listdir(folder)) == ["s0_TestFail_Out1.tif", "s1_TestFail_Out1.tif", "s2_TestFail_Out1.tif"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) == 3 and len(manifest["failures"]) == 1
    stamp = os.path.getmtime(folder / "s0_TestFail_Out1.tif")
    rc = main([p, "-i", str(data), "-o", str(out)])
    err = capsys.readouterr().err
    assert "3 skipped" in err and os.path.getmtime(folder / "s0_TestFail_Out1.tif") == stamp


def test_xpiwit_argument_file_on_stdin(tmp_path, xpiwit_fixture):
    args = read_stdin_args(open(xpiwit_fixture("Cellpose3D.txt")))
    assert args[:2] == ["--output", "C:/Users/stegmaier/Downloads/Processing/"]
    assert args[-1] == "--end"
    ours = translate_xpiwit(args)
    assert ours[0] == "D:/Programming/XPIWITPipelines/Cellpose3D/Cellpose3D.xml"
    assert "-i" in ours and ours[ours.index("-i") + 1] == "0=D:/Programming/XPIWITPipelines/Data/SyntheticMembranes.tif"
    assert ours[ours.index("-o") + 1] == "C:/Users/stegmaier/Downloads/Processing/"


def test_xpiwit_command_line_runs(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    p = write_pipeline(tmp_path, *CHAIN)
    rc = main(["--output", str(tmp_path / "res") + "/", "--input", f"0, {tmp_path / 'a.npy'}, 3, float", "--xml", p,
               "--seed", "0", "--lockfile", "off", "--subfolder", "filterid, filtername", "--outputformat",
               "imagename, filtername", "--end"])
    assert rc == 0
    assert (tmp_path / "res" / "item_0002_TestAdd" / "a_TestAdd_Out1.tif").exists()


def test_parse_inputs():
    assert parse_inputs(["a.tif", "b.tif"]) == {0: "a.tif", 1: "b.tif"}
    assert parse_inputs(["1=b.tif", "0=a=b.tif"]) == {1: "b.tif", 0: "a=b.tif"}


def test_list_and_describe(capsys):
    assert main(["--list-filters"]) == 0
    assert "TestAdd" in capsys.readouterr().out
    assert main(["--describe", "TestAdd"]) == 0
    out = capsys.readouterr().out
    assert "Value (double, default 1.0; a number in [-100, 100])" in out and "WriteResult" in out
    assert main(["--describe", "TestAd"]) == 2
    assert "did you mean TestAdd" in capsys.readouterr().err


@pytest.mark.parametrize("flag, peak", [("-v", False), ("-vv", True)])
def test_verbose_logs_item_times_and_vv_peak_memory(tmp_path, capsys, flag, peak):
    """-v logs each item's time without tracing memory (tracemalloc slows the run);
    -vv adds each item's peak memory."""
    p = write_pipeline(tmp_path, *CHAIN)
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
    assert main([p, "-i", str(tmp_path / "a.npy"), "-o", str(tmp_path / "r.tif"), flag]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "item_0002 TestAdd:" in line]
    assert len(lines) == 1 and " s" in lines[0]
    assert ("MiB allocated" in lines[0]) == peak


def test_set_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    """A relative path typed with --set is the user's file (current folder), not one beside the
    pipeline; paths in the XML stay relative to the XML's folder."""
    import shutil

    from c3dseg.runner.cli import find_pipeline
    from c3dseg.runner.pipeline import Pipeline
    from c3dseg.runner.plan import build_plan

    seg = find_pipeline("segment")
    model = os.path.join(os.path.dirname(seg), "..", "models", "tanh.onnx")
    shutil.copy(model, tmp_path / "mine.onnx")
    monkeypatch.chdir(tmp_path)
    plan = build_plan(Pipeline.load(seg), overrides=[("OnnxModel", "ModelPath", "mine.onnx")])
    step = next(s for s in plan.steps if s.item.name == "OnnxModel")
    assert step.params["ModelPath"] == str(tmp_path / "mine.onnx")
    plan = build_plan(Pipeline.load(seg))
    step = next(s for s in plan.steps if s.item.name == "OnnxModel")
    assert not os.path.isabs(step.params["ModelPath"])      # resolved against the XML's folder when run

"""benchmarks/postprocess.py: variants of a default pipeline on annotated stacks, the network run once."""

import pytest

from c3dseg import synthesis as S

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bench():
    from bench_kit import load_benchmark

    return load_benchmark("postprocess")


def test_parse_variant(bench):
    assert bench.parse_variant("base:") == ("base", [])
    assert bench.parse_variant("z:ResampleToModelScale.Zoom=1.1,item_0009.MinRadiusVoxels=3") == \
        ("z", [("ResampleToModelScale", "Zoom", "1.1"), ("item_0009", "MinRadiusVoxels", "3")])
    for bad in ("nocolon", "x:Zoom=1", "x:A.B"):
        with pytest.raises(SystemExit):
            bench.parse_variant(bad)


def test_variants_apply_and_the_network_runs_once(bench, tmp_path, capsys, monkeypatch):
    easy = {"photons": 300.0, "faint_wall_fraction": 0.0, "speck_density": 0.0, "cell_diameter_vox": 10.0,
            "tissue": "full", "anisotropy": 1.0}
    img, lab, sp, _ = S.make_sample(easy, 2, shape=(24, 48, 48))
    S.write_pair(str(tmp_path), "one", img, lab, sp)
    calls = []
    merge = bench._merge
    monkeypatch.setattr(bench, "_merge", lambda *a: calls.append(1) or merge(*a))
    bench.main([str(tmp_path), "base:", "none:InstanceSizeFilter.MinRadiusVoxels=100"])
    out = capsys.readouterr().out
    base = float(out.split("base ")[1].split("/")[0])
    none = float(out.split("none ")[1].split("/")[0])
    assert base > 0.5 and none == 0.0          # the second variant's size filter removes every cell
    assert len(calls) == 1                      # one network run for both variants
    assert "Dice higher/lower than base on 0/1" in out

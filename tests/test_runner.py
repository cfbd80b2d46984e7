"""The XML model, validation, ordering and the executor (with toy filters)."""

import os
import weakref

import numpy as np
import pytest

from c3dseg.errors import C3DError, PipelineError
from c3dseg.filters.base import Filter, Port, register, registry, unregister
from c3dseg.runner.executor import RunOptions, Target, execute
from c3dseg.runner.pipeline import Pipeline
from c3dseg.runner.plan import build_plan

import pipeline_kit as kit
from pipeline_kit import item, pipeline_xml


@pytest.fixture(autouse=True)
def toy_filters():
    kit.install_toy_filters()
    kit.LOG.clear()
    yield


def plan_of(*items, **kw):
    return build_plan(Pipeline.from_bytes(pipeline_xml(*items), "t.xml"), **kw)


# -- the fixture -------------------------------------------------------------------------------

def test_fixture_round_trip_is_byte_identical(xpiwit_fixture, tmp_path):
    path = xpiwit_fixture("Cellpose3D.xml")
    original = open(path, "rb").read()
    p = Pipeline.load(path)
    assert p.to_bytes() == original
    out = tmp_path / "copy.xml"
    p.save(str(out))
    assert out.read_bytes() == original
    # items in file order, not execution order; gaps and any order are fine
    assert [i.item_id for i in p.items][:3] == ["item_0009", "item_0001", "item_0007"]


def test_fixture_validation_names_exactly_the_missing_filters(xpiwit_fixture):
    path = xpiwit_fixture("Cellpose3D.xml")
    p = Pipeline.load(path)
    missing = sorted({i.name for i in p.items} - set(registry()))
    with pytest.raises(PipelineError) as e:
        build_plan(p)
    msg = str(e.value)
    if missing:
        assert msg.startswith("Cellpose3D.xml: unknown filter")
        named = {part.split(" (")[0].strip() for part in msg.split(":", 2)[2].split(";")}
        assert named == set(missing)
    else:  # all filters exist: the only problem is the absent model file, reported as such
        assert "ModelPath" in msg and "file not found" in msg and "item_0002" in msg


def test_set_changes_only_that_value_on_write_back(xpiwit_fixture):
    path = xpiwit_fixture("Cellpose3D.xml")
    original = open(path, "rb").read().decode()
    p = Pipeline.load(path)
    it = p.find_items("GradientVectorFlowTrackingImageFilter")[0]
    p.set_param(it, "NumIterations", "40")
    new = p.to_bytes().decode()
    diff = [(a, b) for a, b in zip(original.splitlines(), new.splitlines()) if a != b]
    assert len(diff) == 1 and 'value="40"' in diff[0][1] and 'value="25"' in diff[0][0]
    assert len(original.splitlines()) == len(new.splitlines())


def test_write_back_keeps_unknown_elements_attributes_comments_and_escaping():
    xml = (b'<?xml version="1.0" encoding="UTF-8"?>\n<xpiwit extra="1">\n    <!-- a comment -->\n    <pipeline>\n'
           b'        <item item_id="item_0003" custom="x"><name>TestAdd</name><description>a &amp; b &lt;c&gt;'
           b'</description><gui x="10" y="20"/>\n'
           b'<input number_images="1" number_meta="0"><image item_id_ref="item_0001" number_of_output="1" '
           b'type_number="7"/></input><output number_images="1" number_meta="0"><image number="1"/></output>'
           b'<arguments><parameter key="Value" value="2" type="1" description="x &gt; y"/>'
           b'<parameter key="Unknown" value="&quot;q&quot;" type="0"/></arguments></item>\n'
           b'        <item item_id="item_0001"><name>TestNpyReader</name><input number_images="1" number_meta="0">'
           b'<image item_id_ref="cmd" number_of_output="0"/></input></item>\n    </pipeline>\n</xpiwit>\n')
    p = Pipeline.from_bytes(xml)
    assert p.to_bytes() == xml
    assert p.items[0].params["Unknown"].value == '"q"'


# -- validation ---------------------------------------------------------------------------------

def test_items_in_any_order_with_gaps_run_in_dependency_order():
    plan = plan_of(item("item_0042", "TestAdd", [("item_0007", 1)]),
                   item("item_0007", "TestAdd", [("item_0002", 1)]),
                   item("item_0002", "TestNpyReader", [("cmd", 0)]))
    assert [s.item.item_id for s in plan.steps] == ["item_0002", "item_0007", "item_0042"]
    assert plan.cmd_indices == [0]


def test_cycle_is_rejected_naming_its_items():
    with pytest.raises(PipelineError, match=r"cycle: .*item_0003.*item_0004.*item_0003") as e:
        plan_of(item("item_0001", "TestNpyReader", [("cmd", 0)]),
                item("item_0003", "TestAdd", [("item_0004", 1)]),
                item("item_0004", "TestAdd", [("item_0003", 1)]))
    assert e.value.exit_code == 2


@pytest.mark.parametrize("items, pattern", [
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]), item("item_0002", "TestAdd", [("item_0009", 1)])],
     r"item_0002 \(TestAdd\): image input 1.*missing item 'item_0009'"),
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]), item("item_0002", "TestAdd", [("item_0001", 2)])],
     r"has 1 image output, number_of_output=2 does not exist"),
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]),
      item("item_0002", "TestStats", [("item_0001", 1)]),
      item("item_0003", "TestAdd", [("item_0001", 1)], metas=[("item_0002", 1)])],
     r"TestAdd takes 0 meta inputs"),
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]),
      item("item_0002", "TestAdd", [("item_0001", 1), ("item_0001", 1), ("item_0001", 1)])],
     r"TestAdd takes 1 to 2 image inputs, the pipeline connects 3"),
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]), item("item_0002", "TestAdd", [("cmd", 0)])],
     r"only a reader can take a command-line input"),
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]),
      item("item_0002", "TestAdd", [("item_0001", 1)], params={"Value": "abc"})],
     r"item_0002 \(TestAdd\): Value: expected a number in \[-100, 100\], got 'abc'"),
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]),
      item("item_0002", "TestAdd", [("item_0001", 1)], params={"Value": "1000"})],
     r"Value: expected a number in"),
    ([item("item_0001", "TestNpyReader", [("cmd", 0)]), item("item_0002", "TestAdd", [("item_0001", 1)]),
      item("item_0002", "TestAdd", [("item_0001", 1)])],
     r"duplicate item_id"),
    ([item("item_0001", "TestNpyReder", [("cmd", 0)])], r"unknown filter: TestNpyReder \(item_0001\) "
                                                         r"\(did you mean TestNpyReader"),
])
def test_invalid_pipelines_are_rejected_before_running(items, pattern):
    with pytest.raises(PipelineError, match=pattern) as e:
        plan_of(*items)
    assert e.value.exit_code == 2
    assert kit.LOG == []  # nothing ran
    assert "\n" not in str(e.value)


def test_meta_ports_connect_by_kind():
    plan = plan_of(item("item_0001", "TestNpyReader", [("cmd", 0)]),
                   item("item_0002", "TestStats", [("item_0001", 1)], outputs=[("image", 1), ("meta", 1)]))
    assert plan.consumers == {("item_0001", "image", 1): 1}


def test_unknown_parameter_warns_and_strict_rejects():
    items = [item("item_0001", "TestNpyReader", [("cmd", 0)]),
             item("item_0002", "TestAdd", [("item_0001", 1)], params={"Valeu": "3"})]
    plan = plan_of(*items)
    assert len(plan.warnings) == 1 and "Valeu: unknown parameter" in plan.warnings[0]
    assert "did you mean Value" in plan.warnings[0]
    with pytest.raises(PipelineError, match="Valeu"):
        plan_of(*items, strict=True)


def test_set_overrides_by_item_id_or_unique_filter_name():
    items = [item("item_0001", "TestNpyReader", [("cmd", 0)]),
             item("item_0002", "TestAdd", [("item_0001", 1)]),
             item("item_0003", "TestAdd", [("item_0002", 1)])]
    plan = plan_of(*items, overrides=[("item_0003", "Value", "5")])
    assert plan.step("item_0003").params["Value"] == 5.0
    assert plan.step("item_0002").params["Value"] == 1.0
    with pytest.raises(PipelineError, match="used by several items"):
        plan_of(*items, overrides=[("TestAdd", "Value", "5")])
    plan = plan_of(*items, overrides=[("TestNpyReader", "MaxThreads", "2")])
    assert plan.step("item_0001").params["MaxThreads"] == 2
    with pytest.raises(PipelineError, match="unknown parameter"):
        plan_of(*items, overrides=[("item_0002", "Nope", "1")])
    with pytest.raises(PipelineError, match="Value: expected"):
        plan_of(*items, overrides=[("item_0002", "Value", "x")])


def test_duplicate_filter_names_are_an_error():
    class Other(Filter):
        name = "TestAdd"
        outputs = (Port("image", "x"),)
    with pytest.raises(PipelineError, match="duplicate filter name 'TestAdd'"):
        register(Other)


def test_common_parameters_are_accepted_on_every_filter():
    for cls in registry().values():
        keys = {p.key for p in cls.all_params()}
        assert {"WriteResult", "WriteMetaData", "MaxThreads", "Compression", "Precision"} <= keys, cls.name


# -- execution ------------------------------------------------------------------------------------

def test_intermediates_are_freed_after_their_last_consumer(tmp_path):
    refs = {}

    class Probe(Filter):
        name = "TestProbe"
        inputs = (Port("image", "a"),)
        outputs = (Port("image", "a"),)

        def run(self, images, metas):
            refs[self.ctx.item_id] = weakref.ref(images[0])
            alive = {k: r() is not None for k, r in refs.items()}
            kit.LOG.append((self.ctx.item_id, alive))
            return [images[0].derive(images[0].data + 1)], []

    register(Probe)
    try:
        np.save(tmp_path / "a.npy", np.zeros((2, 3, 4), np.float32))
        plan = plan_of(item("item_0001", "TestNpyReader", [("cmd", 0)]),
                       item("item_0002", "TestProbe", [("item_0001", 1)]),
                       item("item_0003", "TestProbe", [("item_0002", 1)]),
                       item("item_0004", "TestProbe", [("item_0003", 1)]))
        execute(plan, {0: str(tmp_path / "a.npy")}, Target(str(tmp_path / "out"), False), RunOptions())
        last = kit.LOG[-1]
        assert last[0] == "item_0004"
        # when item 4 runs, the reader's output (consumed by item 2 only) is gone
        assert last[1]["item_0002"] is False and last[1]["item_0004"] is True
    finally:
        unregister("TestProbe")


def test_write_result_uses_xpiwit_layout_and_meta_csv(tmp_path):
    np.save(tmp_path / "stack.npy", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    plan = plan_of(item("item_0001", "TestNpyReader", [("cmd", 0)]),
                   item("item_0005", "TestStats", [("item_0001", 1)], outputs=[("image", 1), ("meta", 1)],
                        params={"WriteResult": "1", "Precision": "32"}))
    out = tmp_path / "out"
    written = execute(plan, {0: str(tmp_path / "stack.npy")}, Target(str(out), False), RunOptions())
    img = out / "item_0005_TestStats" / "stack_TestStats_Out1.tif"
    csv = out / "item_0005_TestStats" / "stack_TestStats_Meta1.csv"
    assert {w.path for w in written} == {str(img), str(csv)}
    import tifffile
    np.testing.assert_array_equal(tifffile.imread(img), np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    lines = csv.read_text().splitlines()
    assert lines[0] == "sum;max" and [float(v) for v in lines[1].split(";")] == [276.0, 23.0]


def test_filter_failure_names_item_and_filter(tmp_path):
    np.save(tmp_path / "neg.npy", -np.ones((2, 2, 2), np.float32))
    plan = plan_of(item("item_0001", "TestNpyReader", [("cmd", 0)]),
                   item("item_0002", "TestFail", [("item_0001", 1)], params={"WriteResult": "1"}))
    with pytest.raises(C3DError, match=r"t.xml: item_0002 \(TestFail\): unexpected failure: RuntimeError: "
                                       r"negative value found") as e:
        execute(plan, {0: str(tmp_path / "neg.npy")}, Target(str(tmp_path / "o"), False), RunOptions())
    assert e.value.exit_code == 1
    assert not (tmp_path / "o" / "item_0002_TestFail").exists() or \
        not any((tmp_path / "o" / "item_0002_TestFail").iterdir())

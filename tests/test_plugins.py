"""Third-party filters through the entry-point group ``c3dseg.filters``: a real package is built,
installed into a temporary folder and used in a pipeline."""

import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import c3dseg.filters.base as base


PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "c3dseg-plugin-demo"
version = "0.0.1"

[project.entry-points."c3dseg.filters"]
demo = "c3dseg_plugin_demo"
"""

MODULE = '''
from c3dseg.filters.base import Filter, Port, register
from c3dseg.schemas import Param


@register
class DemoScale(Filter):
    name = "DemoScale"
    description = "Multiplies by Factor (plugin demo)."
    inputs = (Port("image", "image"),)
    outputs = (Port("image", "scaled"),)
    params = (Param("Factor", "double", 2.0, "Multiplier"),)

    def run(self, images, metas):
        return [images[0].derive(images[0].data * self.p["Factor"])], []
'''


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "c3dseg_plugin_demo").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "c3dseg_plugin_demo" / "__init__.py").write_text(MODULE)
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
           str(target), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"could not build the plugin package: {r.stderr.strip()[-300:]}")
    monkeypatch.syspath_prepend(str(target))
    importlib.invalidate_caches()
    base.registry()  # built-ins loaded first: modules import once, so they could not register again later
    saved = dict(base._REGISTRY), base._LOADED
    base._LOADED = False
    yield target
    base._REGISTRY.clear()
    base._REGISTRY.update(saved[0])
    base._LOADED = saved[1]
    sys.modules.pop("c3dseg_plugin_demo", None)


def test_plugin_filter_is_found_and_runs(installed_plugin, tmp_path):
    from c3dseg.runner.cli import main
    import pipeline_kit as kit
    from pipeline_kit import item, pipeline_xml

    reg = base.registry()
    assert "DemoScale" in reg and reg["DemoScale"].__module__ == "c3dseg_plugin_demo"
    kit.install_toy_filters()
    np.save(tmp_path / "a.npy", np.ones((2, 2, 2), np.float32))
    p = tmp_path / "p.xml"
    p.write_bytes(pipeline_xml(item("item_0001", "TestNpyReader", [("cmd", 0)]),
                               item("item_0002", "DemoScale", [("item_0001", 1)],
                                    params={"Factor": "5", "WriteResult": "1", "Precision": "32"})))
    assert main([str(p), "-i", str(tmp_path / "a.npy"), "-o", str(tmp_path / "o.tif"), "-q"]) == 0
    import tifffile
    assert tifffile.imread(tmp_path / "o.tif").max() == 5.0


def test_broken_plugin_does_not_break_the_tool(tmp_path, monkeypatch, caplog):
    class EP:
        name, value = "broken", "nope_module:thing"

        def load(self):
            raise ImportError("No module named nope_module")

    import logging

    monkeypatch.setattr(logging.getLogger("c3dseg"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="c3dseg")
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group=None: [EP()])
    base._load_entry_points()
    assert "plugin broken" in caplog.text

"""XSD and catalogue generated from the filter declarations."""

import glob
import os

import pytest
from lxml import etree

from c3dseg.filters.base import registry
from c3dseg.runner.cli import main, shipped_pipelines_dir
from c3dseg.runner.pipeline import Pipeline
from c3dseg.schemas.catalog import build_catalog
from c3dseg.schemas.xsd import build_xsd

SHIPPED = sorted(glob.glob(os.path.join(shipped_pipelines_dir(), "*.xml")))


def schema(version="1.0"):
    return etree.XMLSchema(build_xsd(version)) if version == "1.0" else None


def test_xsd_constrains_filter_names_and_keys():
    s = schema()
    name = sorted(registry())[0]
    good = (f'<xpiwit><pipeline><item item_id="item_0001"><name>{name}</name><arguments>'
            f'<parameter key="WriteResult" value="0" type="3"/></arguments></item></pipeline></xpiwit>')
    assert s.validate(etree.fromstring(good)), s.error_log
    assert not s.validate(etree.fromstring(good.replace(name, "NoSuchFilter")))
    assert not s.validate(etree.fromstring(good.replace('key="WriteResult"', 'key="NoSuchKey"')))
    assert not s.validate(etree.fromstring(good.replace('type="3"', 'type="7"')))


def test_xsd11_constrains_keys_and_value_types_per_filter():
    xmlschema = pytest.importorskip("xmlschema")
    s = xmlschema.XMLSchema11(etree.tostring(build_xsd("1.1")).decode())
    reg = registry()
    # a filter and a key that belongs to another filter only
    own = {n: {p.key for p in c.all_params()} for n, c in reg.items()}
    name, foreign = None, None
    for n in sorted(reg):
        others = set().union(*(own[m] for m in reg if m != n)) - own[n]
        if others:
            name, foreign = n, sorted(others)[0]
            break
    assert name is not None
    base = (f'<xpiwit><pipeline><item item_id="item_0001"><name>{name}</name><arguments>'
            f'<parameter key="{{key}}" value="{{value}}" type="2"/></arguments></item></pipeline></xpiwit>')
    assert s.is_valid(base.format(key="MaxThreads", value="4"))
    assert not s.is_valid(base.format(key="MaxThreads", value="four"))
    assert not s.is_valid(base.format(key=foreign, value="1"))


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_pipelines_reference_and_satisfy_the_schema(path):
    doc = etree.parse(path)
    loc = doc.getroot().get("{http://www.w3.org/2001/XMLSchema-instance}noNamespaceSchemaLocation")
    assert loc == "c3dseg.xsd"
    s = schema()
    assert s.validate(doc), s.error_log
    xmlschema = pytest.importorskip("xmlschema")
    s11 = xmlschema.XMLSchema11(etree.tostring(build_xsd("1.1")).decode())
    s11.validate(etree.tostring(doc).decode())


def test_shipped_xsd_is_up_to_date():
    """pipelines/c3dseg.xsd is what `c3d-run --schema` writes now (regenerate it when filters change)."""
    shipped = os.path.join(shipped_pipelines_dir(), "c3dseg.xsd")
    assert os.path.exists(shipped)
    builtin = {n: c for n, c in registry().items() if c.__module__.startswith("c3dseg.")}
    new = etree.tostring(build_xsd("1.0", builtin), pretty_print=True, xml_declaration=True,
                         encoding="UTF-8").decode()
    old = open(shipped, "rb").read().decode()
    import difflib
    diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=1))
    assert not diff, "regenerate with c3d-run --schema c3dseg/pipelines/c3dseg.xsd:\n" + "\n".join(diff[:20])


def test_catalog_items_are_ready_to_paste(tmp_path):
    cat = build_catalog().getroot()
    filters = cat.findall("filter")
    assert {f.get("name") for f in filters} == set(registry())
    items = "".join(etree.tostring(f.find("item"), encoding="unicode") for f in filters)
    xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<xpiwit><pipeline>{items}</pipeline></xpiwit>\n'
    p = Pipeline.from_bytes(xml.encode())
    for it in p.items:
        cls = registry()[it.name]
        assert set(it.params) == {s.key for s in cls.all_params()}
        assert cls.resolve_params({k: e.value for k, e in it.params.items()}, strict=True) == \
            cls.resolve_params({})
    assert etree.XMLSchema(build_xsd()).validate(etree.fromstring(xml.encode()))


def test_cli_writes_schema_and_catalog(tmp_path):
    assert main(["--schema", str(tmp_path / "s.xsd"), "--catalog", str(tmp_path / "c.xml")]) == 0
    etree.XMLSchema(etree.parse(str(tmp_path / "s.xsd")))
    assert etree.parse(str(tmp_path / "c.xml")).getroot().tag == "catalog"

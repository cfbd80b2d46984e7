"""Helpers for tests: build XPIWIT XML pipelines from short descriptions, and toy filters."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

import numpy as np

from c3dseg.filters.base import Filter, Port, register, registry
from c3dseg.image import Image, MetaTable
from c3dseg.schemas import Param


def item(item_id, name, inputs=(), outputs=(("image", 1),), params=None, metas=()):
    """XML of one item.  ``inputs``: list of (source, number) image refs (source "cmd" for readers);
    ``metas``: meta refs; ``outputs``: list of (kind, number)."""
    ins = "".join(
        f'<image item_id_ref="{s}" number_of_output="{n}"' + ("" if s == "cmd" else ' type_number="2"') + "/>"
        for s, n in inputs)
    ins += "".join(f'<meta item_id_ref="{s}" number_of_output="{n}" type_number="2"/>' for s, n in metas)
    outs = "".join(f'<{k} number="{n}"/>' for k, n in outputs)
    args = "".join(f"<parameter key={quoteattr(k)} value={quoteattr(str(v))} type=\"0\"/>"
                   for k, v in (params or {}).items())
    return (f'<item item_id="{item_id}"><name>{name}</name><description>test</description>'
            f'<input number_images="{len(inputs)}" number_meta="{len(metas)}">{ins}</input>'
            f'<output number_images="{sum(k == "image" for k, _ in outputs)}" '
            f'number_meta="{sum(k == "meta" for k, _ in outputs)}">{outs}</output>'
            f"<arguments>{args}</arguments></item>")


def pipeline_xml(*items) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<xpiwit><pipeline>' + "".join(items)
            + "</pipeline></xpiwit>\n").encode()


# -- toy filters (registered once, names prefixed "Test") -----------------------------------------
LOG: list[str] = []


class TestNpyReader(Filter):
    name = "TestNpyReader"
    description = "Reads a .npy file (tests)."
    is_reader = True
    inputs = (Port("image", "path"),)
    outputs = (Port("image", "image"),)

    def run(self, images, metas):
        LOG.append(self.ctx.item_id)
        path = images[0]
        if path.endswith(".npy"):
            data = np.load(path)
        else:
            import tifffile
            data = tifffile.imread(path)
        return [Image(data, (2.0, 1.0, 1.0), {"basename": "x", "source": path})], []


class TestAdd(Filter):
    name = "TestAdd"
    description = "Adds Value (tests)."
    inputs = (Port("image", "a"), Port("image", "b", optional=True))
    outputs = (Port("image", "sum"),)
    params = (Param("Value", "double", 1.0, "Added value", min=-100, max=100),)

    def run(self, images, metas):
        LOG.append(self.ctx.item_id)
        data = images[0].data.astype(np.float32) + self.p["Value"]
        if len(images) > 1:
            data = data + images[1].data
        return [images[0].derive(data)], []


class TestStats(Filter):
    name = "TestStats"
    description = "Image and a meta table of its sum (tests)."
    inputs = (Port("image", "a"),)
    outputs = (Port("image", "same"), Port("meta", "stats"))

    def run(self, images, metas):
        LOG.append(self.ctx.item_id)
        return [images[0]], [MetaTable(["sum", "max"], [[float(images[0].data.sum()), float(images[0].data.max())]])]


class TestFail(Filter):
    name = "TestFail"
    description = "Fails when the image holds a negative value (tests)."
    inputs = (Port("image", "a"),)
    outputs = (Port("image", "same"),)

    def run(self, images, metas):
        if images[0].data.min() < 0:
            raise RuntimeError("negative value found")
        return [images[0]], []


def install_toy_filters():
    reg = registry()
    for cls in (TestNpyReader, TestAdd, TestStats, TestFail):
        if cls.name not in reg:
            register(cls)

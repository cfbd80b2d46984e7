"""The filter catalogue: every registered filter as a ready-to-paste XPIWIT ``<item>``.

``<catalog>`` holds one ``<filter>`` per filter; its ``<item>`` child is exactly what goes into a
pipeline (all parameters with defaults, types and descriptions; inputs left unconnected:
``item_id_ref=""``, readers connected to command-line input 0), and its ``<ports>`` and
``<constraints>`` children give a node-editor GUI the port names and the parameter ranges, choices
and units.
"""

from __future__ import annotations

from lxml import etree

from .. import __version__
from ..filters.base import registry


def build_catalog() -> etree._ElementTree:
    reg = registry()
    root = etree.Element("catalog", generator=f"c3dseg {__version__}")
    root.text = "\n    "
    for n, name in enumerate(sorted(reg), 1):
        cls = reg[name]
        f = etree.SubElement(root, "filter", name=name, category=cls.category)
        item = etree.SubElement(f, "item", item_id=f"item_{n:04d}")
        etree.SubElement(item, "name").text = name
        etree.SubElement(item, "description").text = cls.description
        ins = cls.inputs
        inp = etree.SubElement(item, "input", number_images=str(sum(p.kind == "image" for p in ins)),
                               number_meta=str(sum(p.kind == "meta" for p in ins)))
        for k, port in enumerate(ins):
            if cls.is_reader and k == 0:
                etree.SubElement(inp, port.kind, item_id_ref="cmd", number_of_output="0")
            else:
                etree.SubElement(inp, port.kind, item_id_ref="", number_of_output="1", type_number="2")
        outs = cls.outputs
        out = etree.SubElement(item, "output", number_images=str(sum(p.kind == "image" for p in outs)),
                               number_meta=str(sum(p.kind == "meta" for p in outs)))
        counters = {"image": 0, "meta": 0}
        for port in outs:
            counters[port.kind] += 1
            etree.SubElement(out, port.kind, number=str(counters[port.kind]))
        args = etree.SubElement(item, "arguments")
        cons = etree.SubElement(f, "constraints")
        for spec in cls.all_params():
            etree.SubElement(args, "parameter", key=spec.key, value=spec.format(spec.default),
                             type=str(spec.type_code), description=spec.description)
            c = etree.SubElement(cons, "parameter", key=spec.key, type=spec.type)
            if spec.min is not None:
                c.set("min", repr(spec.min))
            if spec.max is not None:
                c.set("max", repr(spec.max))
            if spec.choices:
                c.set("choices", "|".join(spec.choices))
            if spec.allow:
                c.set("also", "|".join(str(a) for a in spec.allow))
            if spec.unit:
                c.set("unit", spec.unit)
            if spec.path:
                c.set("path", "1")
        ports = etree.SubElement(f, "ports")
        for direction, plist in (("input", ins), ("output", outs)):
            counters = {"image": 0, "meta": 0}
            for port in plist:
                counters[port.kind] += 1
                etree.SubElement(ports, direction, kind=port.kind, number=str(counters[port.kind]), name=port.name,
                                 optional="1" if port.optional else "0", description=port.description)
    etree.indent(root, space="    ")
    return root.getroottree()


def write_catalog(path: str) -> None:
    from ..io_atomic import atomic_write_bytes

    atomic_write_bytes(path, etree.tostring(build_catalog(), pretty_print=True, xml_declaration=True,
                                            encoding="UTF-8"))

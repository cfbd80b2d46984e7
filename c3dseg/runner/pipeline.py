"""The XPIWIT XML pipeline model: parse, inspect, edit and write back losslessly.

The model keeps the parsed lxml tree and reads from it, so writing back preserves item order,
unknown elements and attributes (``type_number``), comments, parameter order and XML escaping.
Edits (``set_param``) change the tree in place.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from lxml import etree

from ..errors import PipelineError

XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'


@dataclass
class Ref:
    """One input port's connection: ``<image item_id_ref=... number_of_output=... type_number=.../>``."""

    kind: str            # "image" | "meta"
    port: int            # 1-based port number among inputs of this kind
    source: str          # referenced item id, or "cmd"
    output: int          # 1-based output number; for "cmd", the 0-based command-line input index
    line: int | None = None

    @property
    def is_cmd(self) -> bool:
        return self.source == "cmd"


@dataclass
class ParamEntry:
    key: str
    value: str
    type: int | None
    description: str | None
    element: etree._Element = field(repr=False, default=None)


@dataclass
class Item:
    item_id: str
    name: str
    description: str
    inputs: list[Ref]
    outputs: dict[str, int]            # kind -> number of declared outputs
    params: dict[str, ParamEntry]
    element: etree._Element = field(repr=False, default=None)
    line: int | None = None

    def input_refs(self, kind: str) -> list[Ref]:
        return [r for r in self.inputs if r.kind == kind]


class Pipeline:
    """A parsed pipeline file.  ``items`` are in document order (not execution order)."""

    def __init__(self, tree: etree._ElementTree, path: str | None = None, *, had_declaration=True,
                 trailing_newline=True):
        self.tree = tree
        self.path = path
        self.had_declaration = had_declaration
        self.trailing_newline = trailing_newline
        self.items: list[Item] = []
        self._parse_items()

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "Pipeline":
        """Parse a pipeline file.  Raises :class:`PipelineError` (exit 2) with line and column."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise PipelineError("pipeline file not found", file=path) from None
        except OSError as e:
            raise PipelineError(f"cannot read pipeline file: {e.strerror}", file=path) from None
        return cls.from_bytes(data, path)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | None = None) -> "Pipeline":
        name = path or "<string>"
        parser = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True,
                                 huge_tree=False, load_dtd=False)
        try:
            root = etree.fromstring(data, parser)
        except etree.XMLSyntaxError as e:
            line, col = (e.position if getattr(e, "position", None) else (e.lineno, 0))
            msg = e.msg if hasattr(e, "msg") and e.msg else str(e)
            msg = re.sub(r",? line \d+, column \d+$", "", msg.strip())
            raise PipelineError(f"line {line}, column {col}: malformed XML: {msg}", file=name) from None
        except ValueError as e:
            raise PipelineError(f"malformed XML: {e}", file=name) from None
        tree = root.getroottree()
        stripped = data.lstrip()
        return cls(tree, path, had_declaration=stripped.startswith(b"<?xml"),
                   trailing_newline=data.endswith(b"\n"))

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else "<pipeline>"

    @property
    def base_dir(self) -> str:
        """Folder that relative paths in the pipeline resolve against (symlinks resolved)."""
        if not self.path:
            return os.getcwd()
        return os.path.dirname(os.path.realpath(self.path))

    def _err(self, msg, **kw) -> PipelineError:
        return PipelineError(msg, file=self.name, **kw)

    def _parse_items(self) -> None:
        root = self.tree.getroot()
        if not isinstance(root.tag, str) or root.tag != "xpiwit":
            raise self._err(f"line {root.sourceline}: root element must be <xpiwit>, got <{root.tag}>")
        pipes = [c for c in root if isinstance(c.tag, str) and c.tag == "pipeline"]
        if len(pipes) != 1:
            raise self._err(f"<xpiwit> must hold exactly one <pipeline>, found {len(pipes)}")
        seen = {}
        for el in pipes[0]:
            if not isinstance(el.tag, str):
                continue  # comments, processing instructions
            if el.tag != "item":
                continue  # unknown elements are kept (written back) but ignored
            item = self._parse_item(el)
            if item.item_id in seen:
                raise self._err(f"line {el.sourceline}: duplicate item_id (also on line {seen[item.item_id]})",
                                item=item.item_id)
            seen[item.item_id] = el.sourceline
            self.items.append(item)

    def _parse_item(self, el) -> Item:
        item_id = el.get("item_id")
        if not item_id:
            raise self._err(f"line {el.sourceline}: <item> without item_id attribute")
        name_el = el.find("name")
        if name_el is None or not (name_el.text or "").strip():
            raise self._err(f"line {el.sourceline}: item has no <name>", item=item_id)
        name = name_el.text.strip()
        desc_el = el.find("description")
        inputs: list[Ref] = []
        inp = el.find("input")
        if inp is not None:
            counters = {"image": 0, "meta": 0}
            for r in inp:
                if not isinstance(r.tag, str) or r.tag not in counters:
                    continue
                counters[r.tag] += 1
                src = r.get("item_id_ref")
                num = r.get("number_of_output")
                if src is None or num is None:
                    raise self._err(f"line {r.sourceline}: <{r.tag}> input needs item_id_ref and number_of_output",
                                    item=item_id, filter=name)
                try:
                    n = int(num.strip())
                except ValueError:
                    raise self._err(f"line {r.sourceline}: number_of_output must be an integer, got {num!r}",
                                    item=item_id, filter=name) from None
                inputs.append(Ref(r.tag, counters[r.tag], src.strip(), n, r.sourceline))
        outputs = {"image": 0, "meta": 0}
        out = el.find("output")
        if out is not None:
            for o in out:
                if isinstance(o.tag, str) and o.tag in outputs:
                    outputs[o.tag] += 1
        params: dict[str, ParamEntry] = {}
        args = el.find("arguments")
        if args is not None:
            for p in args:
                if not isinstance(p.tag, str) or p.tag != "parameter":
                    continue
                key = p.get("key")
                if not key:
                    raise self._err(f"line {p.sourceline}: <parameter> without key", item=item_id, filter=name)
                t = p.get("type")
                try:
                    tcode = int(t) if t is not None else None
                except ValueError:
                    raise self._err(f"line {p.sourceline}: parameter type must be 0-3, got {t!r}",
                                    item=item_id, filter=name, key=key) from None
                if tcode is not None and tcode not in (0, 1, 2, 3):
                    raise self._err(f"line {p.sourceline}: parameter type must be 0-3, got {t!r}",
                                    item=item_id, filter=name, key=key)
                if key in params:
                    raise self._err(f"line {p.sourceline}: parameter given twice", item=item_id, filter=name, key=key)
                params[key] = ParamEntry(key, p.get("value", ""), tcode, p.get("description"), p)
        return Item(item_id, name, (desc_el.text or "") if desc_el is not None else "", inputs, outputs, params,
                    el, el.sourceline)

    # -- access and edits -------------------------------------------------------------------------
    def item(self, item_id: str) -> Item | None:
        for it in self.items:
            if it.item_id == item_id:
                return it
        return None

    def find_items(self, ref: str) -> list[Item]:
        """Items matching an item id (``item_0007`` or ``7``) or a filter name."""
        hits = [it for it in self.items if it.item_id == ref]
        if not hits and ref.isdigit():
            hits = [it for it in self.items if _id_number(it.item_id) == int(ref)]
        if not hits:
            hits = [it for it in self.items if it.name == ref]
        return hits

    def set_param(self, item: Item, key: str, value: str, *, type_code: int | None = None,
                  description: str | None = None) -> None:
        """Set a parameter's value (string) in the tree; adds the element when missing."""
        entry = item.params.get(key)
        if entry is not None:
            entry.element.set("value", value)
            entry.value = value
            return
        args = item.element.find("arguments")
        if args is None:
            args = etree.SubElement(item.element, "arguments")
        p = etree.SubElement(args, "parameter")
        p.set("key", key)
        p.set("value", value)
        if type_code is not None:
            p.set("type", str(type_code))
        if description:
            p.set("description", description)
        _indent_new(args)
        item.params[key] = ParamEntry(key, value, type_code, description, p)

    # -- writing ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        body = etree.tostring(self.tree.getroot(), encoding="unicode")
        text = (XML_DECLARATION if self.had_declaration else "") + body
        if self.trailing_newline:
            text += "\n"
        return text.encode("utf-8")

    def save(self, path: str) -> None:
        from ..io_atomic import atomic_write_bytes

        atomic_write_bytes(path, self.to_bytes())


def _id_number(item_id: str) -> int | None:
    """XPIWIT strips the ``item_`` prefix and parses the rest as an integer."""
    s = item_id[5:] if item_id.startswith("item_") else item_id
    try:
        return int(s)
    except ValueError:
        return None


def _indent_new(args) -> None:
    """Give a newly appended <parameter> the indentation of its siblings."""
    kids = [c for c in args if isinstance(c.tag, str)]
    if len(kids) >= 2:
        prev, new = kids[-2], kids[-1]
        new.tail = prev.tail      # the closing indentation moves to the new last child
        prev.tail = args.text     # the previous last child now indents like the first

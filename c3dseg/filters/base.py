"""Filter base class, ports and the registry.

A filter is a class with a declaration (name, ports, parameters) and a :meth:`Filter.run` method::

    from c3dseg.filters.base import Filter, Port, register
    from c3dseg.schemas import Param

    @register
    class InvertIntensity(Filter):
        name = "InvertIntensityImageFilter"
        description = "Inverts intensities: max - value."
        category = "ImageFilter"
        inputs = (Port("image", "image", "Input image"),)
        outputs = (Port("image", "image", "Inverted image"),)
        params = (Param("Maximum", "double", 1.0, "Value that maps to 0."),)

        def run(self, images, metas):
            img = images[0]
            return [img.derive(self.p["Maximum"] - img.data)], []

Third-party packages register filters through the entry-point group ``c3dseg.filters``: the entry
point names a module (its import registers filters with :func:`register`) or a callable returning
filter classes.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, ClassVar, Sequence

from ..errors import C3DError, ParameterError, PipelineError
from ..image import Image, MetaTable
from ..schemas.params import COMMON_KEYS, Param, common_params

log = logging.getLogger("c3dseg")

ENTRY_POINT_GROUP = "c3dseg.filters"

# Modules of the filters that ship with c3dseg; imported lazily by :func:`registry`.
BUILTIN_MODULES = (
    "c3dseg.filters.io",
    "c3dseg.filters.intensity",
    "c3dseg.filters.morphology",
    "c3dseg.filters.channels",
    "c3dseg.filters.flows",
    "c3dseg.filters.instances",
    "c3dseg.filters.network",
    "c3dseg.filters.segmentation",
    "c3dseg.filters.scale",
)


@dataclass(frozen=True)
class Port:
    """An input or output port: ``kind`` is ``"image"`` or ``"meta"``."""

    kind: str
    name: str
    description: str = ""
    optional: bool = False

    def __post_init__(self):
        if self.kind not in ("image", "meta"):
            raise ValueError(f"port kind must be 'image' or 'meta', got {self.kind!r}")


@dataclass
class Context:
    """What a running filter may know about its run (no XML, no CLI)."""

    item_id: str = ""
    pipeline_file: str | None = None
    base_dir: str = "."
    threads: int = 0
    progress: bool = False
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def thread_count(self, max_threads: int = -1) -> int:
        """Threads to use given an item's MaxThreads (-1 = all) and the run's --threads."""
        n = os.cpu_count() or 1
        if self.threads and self.threads > 0:
            n = min(n, self.threads)
        if max_threads and max_threads > 0:
            n = min(n, max_threads)
        return max(1, n)


def resolve_relative(value: str, base_dir: str) -> str:
    """``value`` relative to ``base_dir``; absolute paths (POSIX, ``~``, Windows ``D:/``) unchanged."""
    if not value:
        return value
    value = os.path.expanduser(value)
    if os.path.isabs(value) or re.match(r"^[A-Za-z]:[/\\\\]", value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


class Filter:  # noqa: D101 - documented below
    """Base class of all filters.  Subclasses set the class attributes and implement :meth:`run`.

    Class attributes
    ----------------
    name : str            the XML ``<name>`` (unique in the registry)
    description : str     one sentence
    category : str        "ImageFilter", "Reader", "Writer", "Network", "Other" ...
    inputs, outputs :     tuples of :class:`Port`, in XPIWIT port order (images and metas are
                          numbered separately, both 1-based)
    params :              tuple of :class:`~c3dseg.schemas.Param` (the common XPIWIT parameters
                          are added automatically)
    is_reader :           image input 1 is a command-line path (``item_id_ref="cmd"``)
    is_writer :           writes files itself (``run`` returns no outputs)
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    category: ClassVar[str] = "Other"
    inputs: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[Port, ...]] = ()
    params: ClassVar[tuple[Param, ...]] = ()
    is_reader: ClassVar[bool] = False
    is_writer: ClassVar[bool] = False
    #: How the filter can be cut into blocks for volumes larger than memory (issue: Dask runner):
    #: "pointwise" (each voxel alone), "local" (needs a halo: see :meth:`halo`), "global" (needs a
    #: reduction across blocks; the filter provides its own blockwise implementation), "resample"
    #: (changes the voxel grid: its blockwise implementation works out the output grid and writes
    #: it block by block; downstream steps run on that grid), or None (cannot be cut: the
    #: blockwise runner refuses the pipeline with a clear message).
    blockwise: ClassVar[str | None] = None

    def __init__(self, params: dict[str, Any] | None = None, context: Context | None = None):
        self.ctx = context or Context()
        self.p = self.resolve_params(params or {})

    # -- declaration helpers ------------------------------------------------------------------
    @classmethod
    def all_params(cls) -> tuple[Param, ...]:
        own = {p.key for p in cls.params}
        return tuple(p for p in common_params() if p.key not in own) + tuple(cls.params)

    @classmethod
    def param_spec(cls, key: str) -> Param | None:
        for p in cls.all_params():
            if p.key == key:
                return p
        return None

    @classmethod
    def ports(cls, direction: str, kind: str) -> tuple[Port, ...]:
        ports = cls.inputs if direction == "input" else cls.outputs
        return tuple(p for p in ports if p.kind == kind)

    @classmethod
    def resolve_params(cls, given: dict[str, Any], *, strict: bool = False,
                       unknown: list[str] | None = None) -> dict[str, Any]:
        """Typed values for every declared parameter: given ones parsed, missing ones defaulted.

        Unknown keys are collected in ``unknown`` (a warning for the caller) or, with ``strict``,
        raise :class:`ParameterError`.
        """
        out: dict[str, Any] = {}
        specs = {p.key: p for p in cls.all_params()}
        for key, value in given.items():
            spec = specs.get(key)
            if spec is None:
                if strict:
                    raise ParameterError(f"unknown parameter (known: {', '.join(specs)})",
                                         key=key, filter=cls.name)
                if unknown is not None:
                    unknown.append(key)
                continue
            try:
                out[key] = spec.parse(value)
            except ParameterError as e:
                raise e.located(filter=cls.name)
        for key, spec in specs.items():
            out.setdefault(key, spec.default)
        cls.check_params(out)
        return out

    @classmethod
    def check_params(cls, p: dict[str, Any]) -> None:
        """Cross-parameter checks; raise :class:`ParameterError` with ``key`` set.  Override."""
        if p.get("Precision") not in (8, 16, 32):
            raise ParameterError(f"expected 8, 16 or 32, got {p.get('Precision')!r}", key="Precision",
                                 filter=cls.name)

    def resolve_path(self, value: str) -> str:
        """A path parameter relative to the pipeline file's folder (absolute paths unchanged)."""
        return resolve_relative(value, self.ctx.base_dir)

    def threads(self) -> int:
        return self.ctx.thread_count(self.p.get("MaxThreads", -1))

    def halo(self, spacing=(1.0, 1.0, 1.0)) -> tuple[int, int, int]:
        """Context in voxels (z, y, x) a ``"local"`` filter needs around a block, from its parameters."""
        return (0, 0, 0)

    # -- the work -----------------------------------------------------------------------------
    def run(self, images: list[Image], metas: list[MetaTable]) -> tuple[list[Image], list[MetaTable]]:
        """Process inputs (in port order) and return ``(images, metas)`` in output port order."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        """Text for ``c3d-run --describe NAME``."""
        lines = [f"{cls.name}  [{cls.category}]", f"  {cls.description}", ""]
        for direction, ports in (("inputs", cls.inputs), ("outputs", cls.outputs)):
            lines.append(f"  {direction}:")
            if not ports:
                lines.append("    (none)")
            counters = {"image": 0, "meta": 0}
            for port in ports:
                counters[port.kind] += 1
                opt = " (optional)" if port.optional else ""
                lines.append(f"    {port.kind}{counters[port.kind]}  {port.name}{opt}: {port.description}")
        lines.append("  parameters:")
        for p in cls.all_params():
            unit = f" [{p.unit}]" if p.unit else ""
            common = "  (common)" if p.key in COMMON_KEYS and p not in cls.params else ""
            lines.append(f"    {p.key} ({p.type}, default {p.format(p.default)!s}; {p.range_text()}){unit}{common}")
            lines.append(f"        {p.description}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Filter]] = {}
_LOADED = False


def register(cls: type[Filter]) -> type[Filter]:
    """Class decorator: add a filter to the registry.  A second filter of the same name is an error."""
    if not cls.name:
        raise PipelineError(f"filter class {cls.__qualname__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        if f"{other.__module__}.{other.__qualname__}" == f"{cls.__module__}.{cls.__qualname__}":
            _REGISTRY[cls.name] = cls  # the same class re-imported (e.g. module reload)
            return cls
        raise PipelineError(
            f"duplicate filter name {cls.name!r}: {cls.__module__}.{cls.__qualname__} and "
            f"{other.__module__}.{other.__qualname__}")
    _validate_declaration(cls)
    _REGISTRY[cls.name] = cls
    return cls


def _validate_declaration(cls: type[Filter]) -> None:
    keys = [p.key for p in cls.params]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise PipelineError(f"filter {cls.name}: parameters declared twice: {sorted(dup)}")
    for p in cls.params:
        try:
            p.parse(p.format(p.default)) if p.default is not None else None
        except C3DError as e:
            raise PipelineError(f"filter {cls.name}: default of {p.key} is invalid: {e.message}")


def unregister(name: str) -> None:
    """Remove a filter (tests)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the tool down
            log.warning("plugin %s (%s) could not be loaded: %s", ep.name, ep.value, e)
            continue
        if callable(obj) and not isinstance(obj, type):
            classes = obj()
            for c in classes or ():
                register(c)
        elif isinstance(obj, type) and issubclass(obj, Filter):
            register(obj)


def registry() -> dict[str, type[Filter]]:
    """All registered filters by name (built-ins and plugins loaded on first use)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in BUILTIN_MODULES:
            try:
                import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:
                    raise
        _load_entry_points()
    return _REGISTRY


def get_filter(name: str) -> type[Filter] | None:
    return registry().get(name)

"""Typed parameter declarations.

A filter declares each parameter once (:class:`Param`); validation, ``--describe``, the XSD and
the catalogue are all derived from that declaration.  XPIWIT stores every value as a string with a
type code: 0 string, 1 double, 2 int, 3 bool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ParameterError

#: XPIWIT's type codes (``AlgAbstractFilter.h``: 0=string, 1=double, 2=int, 3=bool).
TYPE_CODES = {"string": 0, "double": 1, "int": 2, "bool": 3}
CODE_TYPES = {v: k for k, v in TYPE_CODES.items()}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One parameter of a filter.

    Parameters
    ----------
    key : str
        The XML key (XPIWIT spelling, CamelCase).
    type : {"string", "double", "int", "bool"}
    default : any
        The value used when the XML does not give one (already of the right Python type).
    description : str
        One sentence; shown in ``--describe``, the catalogue and the XSD documentation.
    min, max : float, optional
        Inclusive bounds for numbers.
    choices : tuple of str, optional
        Allowed values for strings (compared case-insensitively, returned as declared).
    unit : str, optional
        ``"voxels"``, ``"um"``, ``"iterations"``, ... (shown in ``--describe``).
    path : bool
        A file path: relative values resolve against the pipeline file's folder.
    exists : bool
        An input file that must exist (checked when the pipeline is validated; empty = not given).
    allow : tuple, optional
        Extra special values accepted besides the range (e.g. ``-1`` meaning "automatic").
    """

    key: str
    type: str
    default: Any
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    unit: str | None = None
    path: bool = False
    exists: bool = False
    allow: tuple = ()

    def __post_init__(self):
        if self.type not in TYPE_CODES:
            raise ValueError(f"parameter {self.key}: unknown type {self.type!r}")

    @property
    def type_code(self) -> int:
        return TYPE_CODES[self.type]

    def range_text(self) -> str:
        """Human readable constraint, e.g. ``an integer >= 1``."""
        noun = {"string": "a string", "double": "a number", "int": "an integer", "bool": "0 or 1"}[self.type]
        if self.choices:
            return "one of " + "|".join(self.choices)
        if self.min is not None and self.max is not None:
            noun += f" in [{_num(self.min)}, {_num(self.max)}]"
        elif self.min is not None:
            noun += f" >= {_num(self.min)}"
        elif self.max is not None:
            noun += f" <= {_num(self.max)}"
        if self.allow:
            noun += " (or " + ", ".join(_num(a) for a in self.allow) + ")"
        return noun

    def parse(self, text: Any) -> Any:
        """Convert an XML string (or a Python value) into the declared type and check it.

        Raises :class:`ParameterError` (key filled in) when the value does not fit.
        """
        raw = text
        try:
            value = self._convert(text)
        except (TypeError, ValueError):
            raise ParameterError(f"expected {self.range_text()}, got {raw!r}", key=self.key) from None
        if self.type in ("int", "double"):
            if value in self.allow:
                return value
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise ParameterError(f"expected {self.range_text()}, got {raw!r}", key=self.key)
        if self.choices:
            for c in self.choices:
                if c.lower() == str(value).lower():
                    return c
            raise ParameterError(f"expected {self.range_text()}, got {raw!r}", key=self.key)
        return value

    def _convert(self, text: Any) -> Any:
        if self.type == "string":
            return "" if text is None else str(text)
        if isinstance(text, str):
            text = text.strip()
        if self.type == "bool":
            if isinstance(text, bool):
                return text
            s = str(text).lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(text)
        if self.type == "int":
            if isinstance(text, bool):
                raise ValueError(text)
            if isinstance(text, (int,)):
                return int(text)
            f = float(text)
            if not math.isfinite(f) or f != int(f):
                raise ValueError(text)
            return int(f)
        # double
        if isinstance(text, bool):
            raise ValueError(text)
        f = float(text)
        if not math.isfinite(f):
            raise ValueError(text)
        return f

    def format(self, value: Any) -> str:
        """The XML string of a value (bools as 0/1, as XPIWIT writes them)."""
        if self.type == "bool":
            return "1" if value else "0"
        if self.type == "double":
            return _num(float(value))
        return str(value)


def _num(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v)) if abs(v) >= 1e6 else repr(v)
    return repr(v) if isinstance(v, float) else str(v)


def common_params() -> tuple[Param, ...]:
    """The five parameters XPIWIT repeats on every item; every filter accepts and honours them."""
    return (
        Param("WriteResult", "bool", False, "Write output to disk"),
        Param("WriteMetaData", "bool", True, "Write meta data to disk"),
        Param("MaxThreads", "int", -1,
              "Define the maximum number of concurrent threads. Setting it to -1 uses all available cores (default).",
              min=1, allow=(-1,)),
        Param("Compression", "bool", True, "If set to 1, compression is used for file saving."),
        Param("Precision", "int", 16,
              "Switch between uint8 and uint16 result image types (32: float32; labels stay integer).",
              choices=None, min=8, max=32),
    )


COMMON_KEYS = tuple(p.key for p in common_params())

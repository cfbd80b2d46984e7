"""The data that flows between filters: an :class:`Image` (array + spacing + metadata) and a
:class:`MetaTable` (a named-column table, written as semicolon-separated CSV)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np


@dataclass
class Image:
    """A 3D image (ZYX) or a multi-channel image (CZYX) with its voxel spacing.

    Parameters
    ----------
    data : ndarray
        ``(Z, Y, X)`` or ``(C, Z, Y, X)``.
    spacing : tuple of 3 floats
        Voxel size along (z, y, x) in micrometres.
    meta : dict
        Free metadata that travels with the image: ``source`` (path read from), ``basename``
        (file name without extension, used to name outputs), ``is_label`` (bool), ``unit``,
        ``channel_names`` (list, for CZYX), model metadata, ...
    """

    data: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) != 3:
            raise ValueError(f"spacing must have 3 values (z, y, x), got {self.spacing}")

    @property
    def is_multichannel(self) -> bool:
        return self.data.ndim == 4

    @property
    def shape3d(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[-3:])

    @property
    def basename(self) -> str:
        return self.meta.get("basename", "image")

    def derive(self, data: np.ndarray, **meta_updates) -> "Image":
        """A new image on the same grid (spacing and metadata copied) with other data."""
        meta = dict(self.meta)
        meta.update(meta_updates)
        return replace(self, data=data, meta=meta)


@dataclass
class MetaTable:
    """A table of named columns; XPIWIT's meta outputs.  Written as ``;``-CSV with a header."""

    columns: list[str]
    rows: np.ndarray | Sequence[Sequence[Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.columns = list(self.columns)
        rows = self.rows
        if isinstance(rows, np.ndarray):
            rows = np.atleast_2d(rows) if rows.size else np.zeros((0, len(self.columns)))
            if rows.shape[1] != len(self.columns):
                raise ValueError(f"{rows.shape[1]} columns of data for {len(self.columns)} names")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> np.ndarray:
        i = self.columns.index(name)
        return np.asarray([r[i] for r in self.rows])

    def to_csv(self) -> str:
        def fmt(v):
            if isinstance(v, (float, np.floating)):
                return repr(float(v)) if np.isfinite(v) else str(float(v))
            if isinstance(v, (np.integer,)):
                return str(int(v))
            return str(v)

        lines = [";".join(self.columns)]
        lines += [";".join(fmt(v) for v in row) for row in self.rows]
        return "\n".join(lines) + "\n"

"""Lazy images of a blockwise run and their evaluation over a region, inside a worker.

A value is either :class:`Stored` (a zarr array or an input file, read region by region) or
:class:`Derived` (an output of a *node*: a pointwise/local filter, or a function, applied to other
values).  :func:`evaluate` computes any set of values over a region: it reads the stored leaves
over the region grown by the largest halo summed along the chain, runs each node once on that
grown region (the ordinary whole-image filter code), and crops.  The result on the region is
exact whenever every node's declared halo covers what it reads, because an artificial edge of the
grown region is then farther from the region than any node looks.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import C3DError, ExecutionError
from ..image import Image
from .grid import Region, Triple


@dataclass(eq=False)
class Stored:
    """An image on disk.  ``kind``: ``"array"`` (a zarr array: (Z, Y, X) or (C, Z, Y, X)) or
    ``"volume"`` (an input file opened with :func:`c3dseg.zarr_io.open_volume`)."""

    path: str
    kind: str
    shape3d: Triple
    dtype: str
    channels: int | None = None
    spacing: tuple = (1.0, 1.0, 1.0)
    meta: dict = field(default_factory=dict)
    level: int = 0
    channel: int | None = None

    def read(self, region: Region | tuple) -> np.ndarray:
        sl = region.slices if isinstance(region, Region) else tuple(region)
        if self.kind == "volume":
            return _volume(self.path, self.level, self.channel).read(sl)
        arr = _array(self.path)
        key = sl if self.channels is None else (slice(None),) + sl
        return np.asarray(arr[key])


@functools.lru_cache(maxsize=32)
def _volume(path: str, level: int, channel):
    from ..zarr_io import open_volume

    return open_volume(path, level=level, channel=channel)


def _array(path: str):
    import zarr

    return zarr.open_array(path, mode="r")


class RegionLeaf(Stored):
    """A pseudo-leaf whose 'data' is the evaluated region itself: a node function taking it learns
    where it runs (e.g. to look up stored per-block results)."""

    def __init__(self, shape3d, spacing=(1.0, 1.0, 1.0)):
        super().__init__(path="", kind="region", shape3d=tuple(shape3d), dtype="i8", spacing=tuple(spacing))

    def read(self, region):
        return region


@dataclass(eq=False)
class Node:
    """A computation on values: ``op`` ``"filter"`` (a registered filter class, run with
    ``params``) or ``"func"`` (``func(*arrays, **kwargs)`` returning one array or a list)."""

    op: str
    inputs: list
    halo: Triple = (0, 0, 0)
    filter_name: str = ""
    params: dict = field(default_factory=dict)
    func: Callable | None = None
    kwargs: dict = field(default_factory=dict)
    item_id: str = ""
    base_dir: str = "."
    spacing: tuple = (1.0, 1.0, 1.0)
    metas: list = field(default_factory=list)        # meta dicts of the input images
    expensive: bool = False                          # worth storing rather than recomputing (a network)


@dataclass(eq=False)
class Derived:
    """Output ``output`` (1-based) of ``node``."""

    node: Node
    output: int = 1
    spacing: tuple = (1.0, 1.0, 1.0)
    meta: dict = field(default_factory=dict)


Value = Stored | Derived


def chain_halo(value) -> Triple:
    """Context (z, y, x) a value needs around a region: the largest halo sum down to its leaves."""
    if isinstance(value, Stored):
        return (0, 0, 0)
    node = value.node
    below = [chain_halo(v) for v in node.inputs if v is not None and not isinstance(v, str)]
    m = tuple(max(h[a] for h in below) if below else 0 for a in range(3))
    return tuple(a + b for a, b in zip(node.halo, m))


def leaves(value) -> list[Stored]:
    if isinstance(value, Stored):
        return [value]
    out = []
    for v in value.node.inputs:
        if v is not None and not isinstance(v, str):
            out += leaves(v)
    return out


def nodes_of(value) -> list[Node]:
    if isinstance(value, Stored):
        return []
    out = []
    for v in value.node.inputs:
        if v is not None and not isinstance(v, str):
            out += nodes_of(v)
    return out + [value.node]


def reads_values(node) -> bool:
    """A node that reads other values itself (kwargs holding lazy values, e.g. a tiled network)."""
    return any(isinstance(v, (Stored, Derived)) for v in node.kwargs.values())


def is_cheap(value) -> bool:
    """Stored, or only pointwise functions over stored values (re-evaluating it is cheap)."""
    return all(n.op == "func" and not any(n.halo) and not n.expensive and not reads_values(n)
               for n in nodes_of(value))


def evaluate(values: Sequence, lo: Sequence[int], hi: Sequence[int], shape3d: Sequence[int]) -> list[np.ndarray]:
    """The arrays of ``values`` over the box ``[lo, hi)`` of a volume of ``shape3d`` (worker side)."""
    halo = [0, 0, 0]
    for v in values:
        h = chain_halo(v)
        halo = [max(a, b) for a, b in zip(halo, h)]
    glo = tuple(max(0, a - h) for a, h in zip(lo, halo))
    ghi = tuple(min(s, b + h) for b, h, s in zip(hi, halo, shape3d))
    grown = Region(glo, ghi, tuple(lo), tuple(hi))
    cache: dict[int, list] = {}
    out = []
    for v in values:
        data = _eval(v, grown, cache)
        if data is None:
            out.append(None)
            continue
        out.append(np.ascontiguousarray(data[(Ellipsis,) + grown.crop]))
    return out


def _eval(value, region: Region, cache: dict):
    if isinstance(value, Stored):
        key = id(value)
        if key not in cache:
            cache[key] = [value.read(region)]
        return cache[key][0]
    node = value.node
    key = id(node)
    if key not in cache:
        arrays = [(_eval(v, region, cache) if (v is not None and not isinstance(v, str)) else v)
                  for v in node.inputs]
        cache[key] = _run_node(node, arrays, region)
    res = cache[key]
    if value.output > len(res):
        raise ExecutionError(f"{node.filter_name or node.op} returned {len(res)} images, output {value.output} "
                             "is missing", item=node.item_id or None, filter=node.filter_name or None)
    return res[value.output - 1]


def _run_node(node: Node, arrays: list, region: Region) -> list:
    if node.op == "func":
        r = node.func(*arrays, **node.kwargs)
        return list(r) if isinstance(r, (list, tuple)) else [r]
    from ..filters.base import Context, get_filter

    cls = get_filter(node.filter_name)
    if cls is None:
        raise ExecutionError(f"filter {node.filter_name} is not registered in this worker "
                             "(is the plugin installed on the workers?)", item=node.item_id or None)
    ctx = Context(item_id=node.item_id, base_dir=node.base_dir, threads=1, progress=False,
                  extra={"blockwise_region": (region.lo, region.hi)})
    images = []
    for k, a in enumerate(arrays):
        if a is None or isinstance(a, str):
            images.append(a)
            continue
        meta = dict(node.metas[k]) if k < len(node.metas) and node.metas[k] else {}
        images.append(a if not isinstance(a, np.ndarray) else Image(a, node.spacing, meta))
    try:
        flt = cls(node.params, ctx)
        outs, _ = flt.run(images, [])
    except C3DError as e:
        raise e.located(item=node.item_id or None, filter=node.filter_name)
    res = []
    for o in outs:
        res.append(o.data if isinstance(o, Image) else o)
    return res


def block_task(block, targets: Sequence, out_paths: Sequence[str], shape3d, dtypes: Sequence[str]):
    """Dask task: evaluate ``targets`` on the block's core and write each into its zarr array."""
    import zarr

    arrays = evaluate(targets, block.start, block.stop, shape3d)
    for data, path, dt in zip(arrays, out_paths, dtypes):
        arr = zarr.open_array(path, mode="r+")
        data = _cast(data, np.dtype(dt), path)
        key = block.core if data.ndim == 3 else (slice(None),) + block.core
        arr[key] = data
    return None


def probe_task(targets: Sequence, lo, hi, shape3d) -> list[tuple[str, tuple]]:
    """Dask task: dtype and shape of each target over a small region (to create the stores)."""
    arrays = evaluate(targets, lo, hi, shape3d)
    out = []
    for a in arrays:
        if not isinstance(a, np.ndarray):
            raise ExecutionError(f"a blockwise filter produced {type(a).__name__}, not an image")
        out.append((a.dtype.str, tuple(a.shape)))
    return out


def _cast(data: np.ndarray, dt: np.dtype, path: str) -> np.ndarray:
    if data.dtype == dt:
        return data
    if dt.kind in "iu" and data.dtype.kind in "iub":
        info = np.iinfo(dt)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ExecutionError(f"a block holds values outside {dt} ({data.min()}..{data.max()}); "
                                 "the first block decided the type", file=os.path.basename(path))
    elif dt.kind in "iu" and data.dtype.kind == "f":
        raise ExecutionError(f"a block is {data.dtype}, the first block was {dt}", file=os.path.basename(path))
    return data.astype(dt)


# ---------------------------------------------------------------------------------------------
# functions used as nodes (top level: picklable)
# ---------------------------------------------------------------------------------------------

def map_range(data: np.ndarray, lo, hi) -> np.ndarray:
    """float32 ``(data - lo) / (hi - lo)`` with per-channel lo/hi for (C, Z, Y, X) data; hi <= lo -> 0
    (the ImageReader's mapping, with global extrema)."""
    if data.ndim == 4 and np.ndim(lo) == 1:
        return np.stack([map_range(c, l_, h_) for c, l_, h_ in zip(data, lo, hi)])
    out = np.array(data, dtype=np.float32, copy=True)
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        out.fill(0)
        return out
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def apply_lut(data: np.ndarray, lut_path: str, dtype: str) -> np.ndarray:
    """``lut[data]`` with a lookup table saved as .npy (cached per worker process)."""
    from .components import load_table

    lut = load_table(lut_path)
    return lut[data].astype(dtype, copy=False)

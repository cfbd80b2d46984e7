"""Tiled prediction: tile planning, reflect-padded tile extraction, blending weights and a
streaming accumulator.

A network that cannot take a whole volume at once is applied to overlapping tiles and the tile
predictions are blended into whole output images.  This module holds the pure-numpy half of that
(no model, no onnxruntime, no torch):

* :func:`plan_tiles` chooses a regular grid of equally sized tiles that covers the volume with at
  least the requested overlap, and *shrinks* the tiles to the smallest size (a multiple of the
  network's size divisor) that still does so.  Redundancy (network voxels computed / output voxels)
  therefore stays close to ``(S + (n - 1) * overlap) / S`` per axis instead of the reference code's
  ~5x or XPIWIT's ~8x.
* :func:`extract_tile` cuts one tile from a volume, reflect-padding where the tile reaches past the
  volume (only on axes the volume is smaller than the tile; any size works, even 1 voxel).
* :meth:`TilePlan.axis_weights` gives separable blending weights that fade towards tile borders
  shared with a neighbouring tile (never at the volume's own border) and sum to exactly one over
  the tiles on every voxel (a partition of unity per axis, hence in 3D).  Because of that the
  accumulator needs no weight-sum volume: the output arrays *are* the accumulators.
* :class:`TileAccumulator` adds tile predictions into the output as they arrive, so memory holds
  the outputs and one batch of tiles, never all tiles.
* :class:`TileStream` is the lazy object passed from the ``OnnxModel`` filter to ``TileMerger``.

Arrays are ZYX; a tile prediction is ``(C, Tz, Ty, Tx)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

log = logging.getLogger("c3dseg")

#: Blending profiles accepted by :meth:`TilePlan.axis_weights`.
BLENDINGS = ("cosine", "linear", "gaussian", "uniform", "crop")

_EPS = 1e-6  # weight floor: every voxel keeps a positive weight in every tile covering it


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (and >= ``multiple``)."""
    multiple = max(1, int(multiple))
    return max(multiple, int(math.ceil(int(n) / multiple)) * multiple)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TilePlan`.

    Attributes
    ----------
    index : tuple of 3 ints
        Grid position (i, j, k) along z, y, x.
    start : tuple of 3 ints
        Tile origin in volume coordinates (may be negative when the tile is padded).
    volume_slices : tuple of 3 slices
        The part of the volume the tile covers.
    tile_slices : tuple of 3 slices
        The same region in tile coordinates.
    """

    index: tuple[int, int, int]
    start: tuple[int, int, int]
    volume_slices: tuple[slice, slice, slice]
    tile_slices: tuple[slice, slice, slice]


@dataclass(frozen=True)
class TilePlan:
    """A regular grid of equally sized tiles covering a volume.

    Attributes
    ----------
    shape : tuple of 3 ints
        Volume shape (Z, Y, X).
    tile : tuple of 3 ints
        Tile shape (Tz, Ty, Tx), each a multiple of the size divisor.
    starts : tuple of 3 tuples of ints
        Tile origins per axis; the grid is their Cartesian product.
    overlap : tuple of 3 ints
        The overlap that was requested per axis (the actual overlap is at least this, where
        there is more than one tile).
    """

    shape: tuple[int, int, int]
    tile: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    overlap: tuple[int, int, int] = (0, 0, 0)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Number of tiles along z, y, x."""
        return tuple(len(s) for s in self.starts)

    @property
    def n_tiles(self) -> int:
        return int(np.prod(self.grid))

    @property
    def redundancy(self) -> float:
        """Network voxels computed per output voxel (1.0 = no overlap, no padding)."""
        return float(self.n_tiles * np.prod(self.tile, dtype=np.float64) /
                     np.prod(self.shape, dtype=np.float64))

    def tiles(self) -> Iterator[Tile]:
        """All tiles, z-major order."""
        for i, sz in enumerate(self.starts[0]):
            for j, sy in enumerate(self.starts[1]):
                for k, sx in enumerate(self.starts[2]):
                    yield self.tile_at((i, j, k))

    def tile_at(self, index: Sequence[int]) -> Tile:
        start = tuple(int(self.starts[a][index[a]]) for a in range(3))
        vol, til = [], []
        for a in range(3):
            lo = max(start[a], 0)
            hi = min(start[a] + self.tile[a], self.shape[a])
            vol.append(slice(lo, hi))
            til.append(slice(lo - start[a], hi - start[a]))
        return Tile(tuple(int(i) for i in index), start, tuple(vol), tuple(til))

    def __len__(self) -> int:
        return self.n_tiles

    def axis_weights(self, blending: str = "cosine") -> list[list[np.ndarray]]:
        """Normalised 1D blending weights per axis and tile.

        Parameters
        ----------
        blending : {"cosine", "linear", "gaussian", "uniform", "crop"}
            Profile of the weights:

            - ``cosine`` (default): raised-cosine ramps across each overlap shared with a
              neighbour, 1 elsewhere (smooth, fades to ~0 at shared tile borders);
            - ``linear``: linear ramps across the overlaps (the reference code's tent);
            - ``gaussian``: a Gaussian over the whole tile, sigma = tile / 8 (nnU-Net style);
            - ``uniform``: plain average of all tiles covering a voxel;
            - ``crop``: each voxel from the tile whose border is farthest (hard seams).

        Returns
        -------
        weights : list of 3 lists of float32 arrays
            ``weights[a][i]`` has length ``tile[a]``: the weight of tile ``i`` along axis ``a``,
            zero outside the volume.  For every voxel the weights of the tiles covering it sum
            to 1 (per axis, hence also for the 3D products).
        """
        if blending not in BLENDINGS:
            raise ValueError(f"blending must be one of {', '.join(BLENDINGS)}, got {blending!r}")
        out = []
        for a in range(3):
            out.append(_axis_weights(self.shape[a], self.tile[a], self.starts[a], blending))
        return out


def _ramp(u: np.ndarray, blending: str) -> np.ndarray:
    """Weight profile for relative positions u in (0, 1] across an overlap (1 = inside)."""
    if blending == "linear":
        return u
    if blending == "cosine":
        return 0.5 - 0.5 * np.cos(np.pi * u)
    if blending == "crop":
        return (u >= 0.5).astype(np.float64)
    return np.ones_like(u)  # uniform


def _axis_weights(size: int, tile: int, starts: Sequence[int], blending: str) -> list[np.ndarray]:
    starts = [int(s) for s in starts]
    n = len(starts)
    t = np.arange(tile, dtype=np.float64)
    raw = []
    for i, s in enumerate(starts):
        if blending == "gaussian":
            sigma = tile / 8.0
            w = np.exp(-0.5 * ((t + 0.5 - tile / 2.0) / sigma) ** 2)
        else:
            w = np.ones(tile)
            if i > 0:  # left neighbour shares [s, prev_end)
                ov = min(starts[i - 1] + tile - s, tile)
                if ov > 0:
                    u = np.minimum((t + 0.5) / ov, 1.0)
                    w = np.minimum(w, _ramp(u, blending))
            if i < n - 1:  # right neighbour shares [next_start, s + tile)
                ov = min(s + tile - starts[i + 1], tile)
                if ov > 0:
                    u = np.minimum((tile - t - 0.5) / ov, 1.0)
                    w = np.minimum(w, _ramp(u, blending))
        w = np.maximum(w, _EPS)
        pos = s + np.arange(tile)
        w[(pos < 0) | (pos >= size)] = 0.0
        raw.append(w)
    total = np.zeros(size, dtype=np.float64)
    for s, w in zip(starts, raw):
        lo, hi = max(s, 0), min(s + tile, size)
        total[lo:hi] += w[lo - s:hi - s]
    out = []
    for s, w in zip(starts, raw):
        lo, hi = max(s, 0), min(s + tile, size)
        wn = np.zeros(tile, dtype=np.float64)
        wn[lo - s:hi - s] = w[lo - s:hi - s] / total[lo:hi]
        out.append(wn.astype(np.float32))
    return out


def _plan_axis(size: int, tile: int, overlap: int, multiple: int, shrink: bool) -> tuple[int, list[int]]:
    size = int(size)
    if size < 1:
        raise ValueError(f"volume axes must have at least 1 voxel, got {size}")
    if tile is None or tile <= 0 or tile >= size:
        t = round_up(size, multiple)
        return t, [-((t - size) // 2)]  # one tile, padding split over both ends
    t = round_up(tile, multiple)
    if t >= size:
        t2 = round_up(size, multiple)
        return t2, [-((t2 - size) // 2)]
    ov = int(max(0, min(overlap, t - multiple)))
    n = int(math.ceil((size - ov) / (t - ov)))  # >= 2 since t < size
    if shrink:  # the smallest tile that keeps n tiles and the overlap (never larger than t)
        t = min(t, round_up(int(math.ceil((size + (n - 1) * ov) / n)), multiple))
    starts = np.round(np.linspace(0, size - t, n)).astype(int).tolist()
    return t, starts


def plan_tiles(shape: Sequence[int], tile_shape: Sequence[int | None], overlap: int | Sequence[int] = 16, *,
               multiple: int | Sequence[int] = 8, shrink: bool = True) -> TilePlan:
    """Plan a grid of overlapping tiles over a volume.

    Parameters
    ----------
    shape : tuple of 3 ints
        Volume shape (Z, Y, X), voxels.
    tile_shape : tuple of 3 ints
        Largest tile (Tz, Ty, Tx), voxels; ``-1``, ``0`` or ``None`` on an axis = the whole axis.
        Sizes that are not a multiple of ``multiple`` are rounded up.
    overlap : int or tuple of 3 ints
        Minimum overlap between neighbouring tiles, voxels (default 16).  Capped at
        ``tile - multiple``.
    multiple : int or tuple of 3 ints
        Every tile side is a multiple of this (8 for a U-Net with 3 stride-2 levels).
    shrink : bool
        Shrink tiles to the smallest multiple of ``multiple`` that keeps the tile count and the
        overlap (default True; lowers redundancy without adding tiles).

    Returns
    -------
    TilePlan
        Tiles are evenly spread from the volume's first voxel to its last; a volume smaller than
        a tile along an axis gets one tile there, centred, with the rest reflect-padded.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 axes (Z, Y, X), got {shape}")
    tile_shape = tuple(tile_shape)
    if len(tile_shape) != 3:
        raise ValueError(f"tile_shape must have 3 values, got {tile_shape}")
    ov = (int(overlap),) * 3 if np.isscalar(overlap) else tuple(int(o) for o in overlap)
    mult = (int(multiple),) * 3 if np.isscalar(multiple) else tuple(int(m) for m in multiple)
    if any(o < 0 for o in ov):
        raise ValueError(f"overlap must be >= 0, got {ov}")
    tiles, starts = [], []
    for a in range(3):
        t, s = _plan_axis(shape[a], None if tile_shape[a] is None else int(tile_shape[a]), ov[a], mult[a],
                          shrink)
        tiles.append(t)
        starts.append(tuple(s))
    return TilePlan(shape, tuple(tiles), tuple(starts), ov)


def stride_to_overlap(tile: int, stride: float) -> int:
    """XPIWIT's ``PatchStride``: absolute (> 1, voxels) or relative to the tile (<= 1) -> overlap."""
    if stride <= 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    step = stride * tile if stride <= 1 else stride
    return int(max(0, round(tile - step)))


def extract_tile(volume: np.ndarray, start: Sequence[int], tile: Sequence[int], *,
                 mode: str = "reflect") -> np.ndarray:
    """Cut a tile from a volume, padding where it reaches outside.

    Parameters
    ----------
    volume : ndarray (..., Z, Y, X)
        Leading (channel) axes are kept.
    start : tuple of 3 ints
        Tile origin, voxels (may be negative).
    tile : tuple of 3 ints
        Tile shape.
    mode : str
        ``numpy.pad`` mode for the outside part (default ``reflect``; works for any size, a
        1-voxel axis is repeated).

    Returns
    -------
    ndarray (..., Tz, Ty, Tx)
        A view when no padding is needed, else a padded copy.
    """
    lead = volume.ndim - 3
    sl, pads = [], []
    for a in range(3):
        size = volume.shape[lead + a]
        lo = max(int(start[a]), 0)
        hi = min(int(start[a]) + int(tile[a]), size)
        if hi <= lo:
            raise ValueError(f"tile at {tuple(start)} of shape {tuple(tile)} misses the volume {volume.shape}")
        sl.append(slice(lo, hi))
        pads.append((lo - int(start[a]), int(start[a]) + int(tile[a]) - hi))
    part = volume[(Ellipsis, *sl)]
    if any(p != (0, 0) for p in pads):
        part = np.pad(part, [(0, 0)] * lead + pads, mode=mode)
    return part


class TileAccumulator:
    """Blends tile predictions into output arrays as they arrive.

    The weights are normalised per axis (:meth:`TilePlan.axis_weights`), so the output needs no
    separate weight sum: memory is the ``(C, Z, Y, X)`` output plus one tile's weight.

    Parameters
    ----------
    plan : TilePlan
    channels : int
        Channels of each tile prediction.
    blending : str
        See :meth:`TilePlan.axis_weights`.
    dtype : numpy dtype
        Output type (float32).
    out : ndarray (C, Z, Y, X), optional
        Preallocated output (zeroed here).
    """

    def __init__(self, plan: TilePlan, channels: int, blending: str = "cosine", dtype=np.float32,
                 out: np.ndarray | None = None):
        self.plan = plan
        self.channels = int(channels)
        self.weights = plan.axis_weights(blending)
        shape = (self.channels, *plan.shape)
        if out is None:
            out = np.zeros(shape, dtype=dtype)
        else:
            if out.shape != shape:
                raise ValueError(f"out has shape {out.shape}, expected {shape}")
            out[...] = 0
        self.out = out
        self.count = 0

    def add(self, index: Sequence[int], pred: np.ndarray) -> None:
        """Add the prediction ``(C, Tz, Ty, Tx)`` of the tile at grid position ``index``."""
        tile = self.plan.tile_at(index)
        pred = np.asarray(pred)
        if pred.shape != (self.channels, *self.plan.tile):
            raise ValueError(f"tile prediction has shape {pred.shape}, expected "
                             f"{(self.channels, *self.plan.tile)}")
        wz, wy, wx = (self.weights[a][tile.index[a]][tile.tile_slices[a]] for a in range(3))
        w = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
        region = self.out[(slice(None), *tile.volume_slices)]
        region += pred[(slice(None), *tile.tile_slices)] * w
        self.count += 1

    def result(self) -> np.ndarray:
        """The blended ``(C, Z, Y, X)`` output (complete once every tile was added)."""
        if self.count < self.plan.n_tiles:
            log.warning("tile accumulator: %d of %d tiles were added", self.count, self.plan.n_tiles)
        return self.out


def iter_tile_batches(volume: np.ndarray, plan: TilePlan, batch_size: int = 1, *,
                      transform: Callable[[np.ndarray], np.ndarray] | None = None,
                      mode: str = "reflect") -> Iterator[tuple[list[tuple[int, int, int]], np.ndarray]]:
    """Yield ``(indices, batch)`` with ``batch`` of shape ``(B, C, Tz, Ty, Tx)`` float32.

    ``volume`` is ``(Z, Y, X)`` (one channel is added) or ``(C, Z, Y, X)``.  ``transform`` is
    applied to each extracted tile (e.g. intensity normalisation), so the volume is never copied
    whole.
    """
    if volume.ndim == 3:
        volume = volume[None]
    if volume.shape[1:] != plan.shape:
        raise ValueError(f"volume shape {volume.shape[1:]} does not match the plan {plan.shape}")
    batch_size = max(1, int(batch_size))
    idx, tiles = [], []
    for tile in plan.tiles():
        t = extract_tile(volume, tile.start, plan.tile, mode=mode)
        t = np.asarray(transform(t) if transform is not None else t, dtype=np.float32)
        idx.append(tile.index)
        tiles.append(t)
        if len(tiles) == batch_size:
            yield idx, np.stack(tiles)
            idx, tiles = [], []
    if tiles:
        yield idx, np.stack(tiles)


def predict_tiled(volume: np.ndarray, predict: Callable[[np.ndarray], np.ndarray], plan: TilePlan, *,
                  channels: int, batch_size: int = 1, blending: str = "cosine",
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  progress: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """Apply ``predict`` (``(B, Cin, T...) -> (B, C, T...)``) over the tiles of a plan and blend.

    Returns the ``(C, Z, Y, X)`` float32 blended prediction.  Memory: the output and one batch.
    """
    def produce():
        for idx, batch in iter_tile_batches(volume, plan, batch_size, transform=transform):
            yield idx, np.asarray(predict(batch))

    return TileStream(plan, channels, produce, progress=progress).merge(blending, out=out)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="tile", leave=False)


@dataclass
class TileStream:
    """Lazy tile predictions of one volume: what ``OnnxModel`` outputs and ``TileMerger`` blends.

    Iterating yields ``(indices, predictions)`` batches: ``indices`` a list of grid positions,
    ``predictions`` an array ``(B, C, Tz, Ty, Tx)``.  The network runs while iterating, one
    batch at a time, so nothing holds all tiles.  Iterating again runs the network again.

    Attributes
    ----------
    plan : TilePlan
    channels : int
        Channels per prediction (4: foreground, flow z, flow y, flow x).
    produce : callable
        ``produce() -> iterator of (indices, predictions)``.
    spacing : tuple of 3 floats
        Voxel size (z, y, x) in um of the volume.
    meta : dict
        The input image's metadata plus the model's (``model_metadata``).
    channel_names : list of str
    """

    plan: TilePlan
    channels: int
    produce: Callable[[], Iterable[tuple[list, np.ndarray]]]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    progress: bool = False
    _runs: int = 0

    @property
    def shape3d(self) -> tuple[int, int, int]:
        return self.plan.shape

    @property
    def basename(self) -> str:
        return self.meta.get("basename", "image")

    @property
    def data(self):
        """A tile stream has no array: a filter other than TileMerger that reads ``.data`` gets a
        clear error instead of an AttributeError."""
        from .errors import InputError

        raise InputError("this input is the tile stream of an OnnxModel, not an image: connect the OnnxModel "
                         "to a TileMerger and use the TileMerger's outputs")

    def __iter__(self):
        if self._runs:
            log.warning("tile stream iterated again: the network runs again")
        self._runs += 1
        return iter(self.produce())

    def merge(self, blending: str = "cosine", out: np.ndarray | None = None) -> np.ndarray:
        """Blend all tiles into a ``(C, Z, Y, X)`` float32 array."""
        acc = TileAccumulator(self.plan, self.channels, blending, out=out)
        bar = _progress(self.progress, total=self.plan.n_tiles, desc="tiles")
        for idx, preds in self:
            if preds.ndim != 5 or preds.shape[0] != len(idx):
                raise ValueError(f"tile batch of shape {preds.shape} for {len(idx)} tiles")
            for i, p in zip(idx, preds):
                acc.add(i, p)
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return acc.result()

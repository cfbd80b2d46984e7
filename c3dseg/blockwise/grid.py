"""The block grid: a volume cut into core blocks, each read with a halo of context.

A block's *core* is the part of the volume it is responsible for (cores tile the volume without
overlap, the last ones along an axis may be smaller); its *region* is the core grown by a halo
and clipped to the volume.  A computation that needs ``h`` voxels of context is exact on the
core when it runs on the region: at an artificial edge the halo holds the real neighbours, at a
true edge of the volume the region stops where the whole-volume computation stops too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

Triple = tuple[int, int, int]


def as_triple(value, name: str = "value") -> Triple:
    """An int or 3 ints (z, y, x) as a tuple of 3 non-negative ints."""
    if np.isscalar(value):
        value = (value,) * 3
    t = tuple(int(v) for v in value)
    if len(t) != 3 or any(v < 0 for v in t):
        raise ValueError(f"{name} must be 3 non-negative ints (z, y, x), got {value!r}")
    return t


@dataclass(frozen=True)
class Block:
    """One block: ``index`` in the grid, ``start``/``stop`` of its core (global voxel coords)."""

    index: Triple
    start: Triple
    stop: Triple

    @property
    def shape(self) -> Triple:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def core(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def name(self) -> str:
        return "_".join(str(i) for i in self.index)

    def region(self, halo: Sequence[int], shape: Sequence[int]) -> "Region":
        """The core grown by ``halo`` (z, y, x) and clipped to a volume of ``shape``."""
        lo = tuple(max(0, a - h) for a, h in zip(self.start, halo))
        hi = tuple(min(s, b + h) for b, h, s in zip(self.stop, halo, shape))
        return Region(lo, hi, self.start, self.stop)


@dataclass(frozen=True)
class Region:
    """A read region ``[lo, hi)`` around a core ``[start, stop)`` (global voxel coordinates)."""

    lo: Triple
    hi: Triple
    start: Triple
    stop: Triple

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))

    @property
    def shape(self) -> Triple:
        return tuple(b - a for a, b in zip(self.lo, self.hi))

    @property
    def crop(self) -> tuple[slice, slice, slice]:
        """The core inside an array of the region."""
        return tuple(slice(s - lo, e - lo) for s, e, lo in zip(self.start, self.stop, self.lo))


class BlockGrid:
    """A volume of ``shape`` (Z, Y, X) cut into blocks of ``block`` (z, y, x) voxels."""

    def __init__(self, shape: Sequence[int], block: Sequence[int]):
        self.shape = as_triple(shape, "shape")
        block = as_triple(block, "block")
        if any(b <= 0 for b in block):
            raise ValueError(f"block sizes must be >= 1, got {block}")
        self.block = tuple(min(b, s) for b, s in zip(block, self.shape))
        self.counts = tuple(-(-s // b) for s, b in zip(self.shape, self.block))

    def __len__(self) -> int:
        return int(np.prod(self.counts))

    def __iter__(self) -> Iterator[Block]:
        for idx in itertools.product(*(range(n) for n in self.counts)):
            yield self[idx]

    def __getitem__(self, idx: Sequence[int]) -> Block:
        idx = tuple(int(i) for i in idx)
        start = tuple(i * b for i, b in zip(idx, self.block))
        stop = tuple(min(a + b, s) for a, b, s in zip(start, self.block, self.shape))
        return Block(idx, start, stop)

    def blocks_touching(self, lo: Sequence[int], hi: Sequence[int]) -> list[Block]:
        """Blocks whose cores intersect the box ``[lo, hi)`` (clipped to the volume)."""
        rng = []
        for a, b, bs, s, n in zip(lo, hi, self.block, self.shape, self.counts):
            a, b = max(0, a), min(s, b)
            if b <= a:
                return []
            rng.append(range(a // bs, min(n, (b - 1) // bs + 1)))
        return [self[i] for i in itertools.product(*rng)]

    def block_of(self, coords: np.ndarray) -> np.ndarray:
        """Flat block number of voxel coordinates ``(3, K)``."""
        c = np.asarray(coords)
        idx = [c[a] // self.block[a] for a in range(3)]
        return np.ravel_multi_index(tuple(idx), self.counts)

    def flat(self, index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(index), self.counts))

    def __repr__(self) -> str:
        return f"BlockGrid(shape={self.shape}, block={self.block}, counts={self.counts})"

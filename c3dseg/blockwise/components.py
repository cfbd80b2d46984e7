"""Exact connected components of a binary mask that is cut into blocks.

Labelling a binary mask block by block and joining the pieces that touch across block borders is
exact (unlike joining *cells* by contact, see ``peers.md`` section 4): two voxels of a binary mask
are in one component exactly when a chain of adjacent mask voxels joins them, and every such chain
that crosses a block border passes through a pair of adjacent voxels on the two sides.

Three steps:

1. per block (a Dask pass): label the core of the mask (``scipy.ndimage.label``), store the local
   labels (uint32) in a work array, and return for each local component its first voxel (the
   smallest global linear index), its voxel count and a flag (e.g. "holds an end point");
2. per block: read the local labels of the core grown by one voxel and list the pairs of local
   components adjacent across the block's faces, edges and corners (6- or 26-connectivity);
3. in the client: join the pairs (``scipy.sparse.csgraph.connected_components``), then number the
   joined components 1..N by their first voxel, which is the order in which ``ndimage.label``
   numbers the components of the whole mask: the labels are identical, not just equivalent.

Memory: a worker holds one block (plus a one-voxel shell); the client holds one row per local
component and per adjacent pair, never voxels.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

from .grid import Block, BlockGrid, Region

STRUCT26 = np.ones((3, 3, 3), bool)
STRUCT6 = ndi.generate_binary_structure(3, 1)


def _structure(fully_connected: bool) -> np.ndarray:
    return STRUCT26 if fully_connected else STRUCT6


@dataclass
class LocalComponents:
    """Summary of one block's local components (index k-1 for local label k)."""

    n: int
    first: np.ndarray     # (n,) int64: smallest global linear index
    size: np.ndarray      # (n,) int64
    flag: np.ndarray      # (n,) bool


def _open_array(path: str, mode: str = "r"):
    import zarr

    return zarr.open_array(path, mode=mode)


def create_block_array(path: str, grid: BlockGrid, dtype, channels: int | None = None):
    """A work zarr array (v3) with one chunk per block; reused when it exists with the same layout."""
    import zarr

    shape = grid.shape if channels is None else (channels,) + grid.shape
    chunks = grid.block if channels is None else (1,) + grid.block
    if os.path.exists(os.path.join(path, "zarr.json")):
        try:
            a = zarr.open_array(path, mode="r+")
            if tuple(a.shape) == tuple(shape) and tuple(a.chunks) == tuple(chunks) and a.dtype == np.dtype(dtype):
                return a
        except Exception:
            pass
    return zarr.create_array(path, shape=shape, chunks=chunks, dtype=np.dtype(dtype), fill_value=0,
                             overwrite=True, zarr_format=3)


# ---------------------------------------------------------------------------------------------
# step 1: local labels
# ---------------------------------------------------------------------------------------------

def label_core(block: Block, mask_fn: Callable, labels_path: str, shape, fully_connected: bool) -> LocalComponents:
    """Dask task: label ``mask_fn(block)`` (the block core's mask, or ``(mask, flags)``)."""
    out = mask_fn(block)
    mask, flags = out if isinstance(out, tuple) else (out, None)
    mask = np.asarray(mask, bool)
    if mask.shape != block.shape:
        raise ValueError(f"mask of block {block.name} has shape {mask.shape}, expected {block.shape}")
    lab, n = ndi.label(mask, _structure(fully_connected))
    lab = lab.astype(np.uint32, copy=False)
    arr = _open_array(labels_path, "r+")
    arr[block.core] = lab
    flat = lab.reshape(-1)
    nz = np.flatnonzero(flat)
    vals = flat[nz]
    size = np.bincount(vals, minlength=n + 1)[1:].astype(np.int64)
    # ndimage.label numbers components in order of first appearance: first voxel = first index of each value
    first_local = np.full(n, -1, np.int64)
    if n:
        _, pos = np.unique(vals, return_index=True)
        first_local = nz[pos].astype(np.int64)
    first = _local_to_global(first_local, block, shape)
    if flags is not None:
        f = np.bincount(vals, weights=np.asarray(flags, bool).reshape(-1)[nz], minlength=n + 1)[1:] > 0
    else:
        f = np.ones(n, bool)
    return LocalComponents(int(n), first, size, f)


def _local_to_global(lin: np.ndarray, block: Block, shape) -> np.ndarray:
    if lin.size == 0:
        return lin.astype(np.int64)
    c = np.unravel_index(lin, block.shape)
    g = tuple(ci.astype(np.int64) + s for ci, s in zip(c, block.start))
    return np.ravel_multi_index(g, shape).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# step 2: adjacent pairs across block borders
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _load_npy(path: str, mtime: float) -> np.ndarray:
    return np.load(path, mmap_mode="r")   # memory-mapped: a worker holds only the pages it touches


def save_table(path: str, arr) -> str:
    """Write a .npy table atomically (a new file, renamed into place): workers that memory-mapped
    an earlier version keep reading that one."""
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, np.asarray(arr))
    os.replace(tmp, path)
    return path


def load_table(path: str) -> np.ndarray:
    """A .npy table, memory-mapped and cached per worker process (keyed by path and modification
    time): tables with one row per cell do not count against a worker's memory as a whole."""
    return _load_npy(path, os.path.getmtime(path))


def node_ids(local: np.ndarray, region: Region, grid: BlockGrid, offsets: np.ndarray) -> np.ndarray:
    """Global node ids (int64; -1 where ``local`` is 0) of local labels read over ``region``:
    node = offsets[block of the voxel] + local - 1."""
    per_axis = [np.arange(lo, hi) // b for lo, hi, b in zip(region.lo, region.hi, grid.block)]
    bz, by, bx = np.meshgrid(*per_axis, indexing="ij", sparse=True)
    flat_block = (bz * grid.counts[1] + by) * grid.counts[2] + bx
    out = offsets[flat_block] + local.astype(np.int64) - 1
    out[local == 0] = -1
    return out


def border_pairs(block: Block, labels_path: str, offsets_path: str, grid: BlockGrid,
                 fully_connected: bool) -> np.ndarray:
    """Dask task: pairs (node, node) of components adjacent across this block's border, (K, 2)."""
    offsets = load_table(offsets_path)
    region = block.region((1, 1, 1), grid.shape)
    arr = _open_array(labels_path, "r")
    local = np.asarray(arr[region.slices])
    nodes = node_ids(local, region, grid, offsets)
    crop = region.crop
    core = nodes[crop]
    pairs = []
    struct = _structure(fully_connected)
    inside = np.zeros(nodes.shape, bool)
    inside[crop] = True
    for off in np.argwhere(struct) - 1:
        if not off.any():
            continue
        # neighbour of core voxel p is p + off; keep those outside the core (inside the region)
        src_sl, dst_sl = [], []
        ok = True
        for a in range(3):
            lo, hi = crop[a].start, crop[a].stop
            n_lo, n_hi = lo + off[a], hi + off[a]
            n_lo_c, n_hi_c = max(0, n_lo), min(nodes.shape[a], n_hi)
            if n_hi_c <= n_lo_c:
                ok = False
                break
            src_sl.append(slice(n_lo_c - off[a] - lo, n_hi_c - off[a] - lo))
            dst_sl.append(slice(n_lo_c, n_hi_c))
        if not ok:
            continue
        a_ = core[tuple(src_sl)]
        b_ = nodes[tuple(dst_sl)]
        # only neighbours outside the core
        sel = (a_ >= 0) & (b_ >= 0) & ~inside[tuple(dst_sl)]
        if sel.any():
            pairs.append(np.stack([a_[sel], b_[sel]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    p = np.concatenate(pairs)
    p.sort(axis=1)
    return np.unique(p, axis=0)


# ---------------------------------------------------------------------------------------------
# step 3: join and number
# ---------------------------------------------------------------------------------------------

@dataclass
class Components:
    """The result: local labels in ``labels_path``, ``offsets`` (per flat block), the node ->
    global id table in ``lookup_path`` (0 = not selected) and per global id tables."""

    labels_path: str
    offsets_path: str
    lookup_path: str
    n: int
    size: np.ndarray      # (n + 1,) int64, index = global id
    first: np.ndarray     # (n + 1,) int64


def label_components_blockwise(rt, name: str, mask_fn: Callable, *, fully_connected: bool = True,
                               select: Callable | None = None) -> Components:
    """Connected components of a blockwise mask, numbered like ``ndimage.label`` on the whole.

    Parameters
    ----------
    rt : Runtime
    name : str
        Prefix of the passes and work files (resume key).
    mask_fn : callable ``block -> mask`` or ``block -> (mask, flags)``
        The core's mask (bool, the core's shape); picklable.  ``flags`` marks voxels; a component
        is flagged when any of its voxels is.
    select : callable ``(size, flag) -> bool array``, optional
        Which joined components get a label (default: all); the others map to 0.  The selected ones
        are numbered 1..N in order of their first voxel.

    Returns
    -------
    Components
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    grid = rt.grid
    labels_path = rt.path("arrays", f"{name}-local.zarr")
    create_block_array(labels_path, grid, np.uint32)
    parts = rt.run_pass(f"{name}-label", label_core, mask_fn, labels_path, grid.shape, fully_connected,
                        desc=f"{name}: label blocks")
    blocks = list(grid)
    counts = np.array([parts[b.index].n for b in blocks], np.int64)
    offsets = np.zeros(len(blocks), np.int64)
    offsets[1:] = np.cumsum(counts)[:-1]
    total = int(counts.sum())
    offsets_path = rt.path("tables", f"{name}-offsets.npy")
    save_table(offsets_path, offsets)
    pairs = rt.run_pass(f"{name}-join", border_pairs, labels_path, offsets_path, grid, fully_connected,
                        desc=f"{name}: join borders")
    edges = [p for p in pairs.values() if len(p)]
    first = np.concatenate([parts[b.index].first for b in blocks]) if total else np.zeros(0, np.int64)
    size = np.concatenate([parts[b.index].size for b in blocks]) if total else np.zeros(0, np.int64)
    flag = np.concatenate([parts[b.index].flag for b in blocks]) if total else np.zeros(0, bool)
    if edges and total:
        e = np.concatenate(edges)
        g = coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(total, total))
        ncomp, comp = connected_components(g, directed=False)
    else:
        ncomp, comp = total, np.arange(total)
    m_first = np.full(ncomp, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(m_first, comp, first)
    m_size = np.bincount(comp, weights=size, minlength=ncomp).astype(np.int64)
    m_flag = np.bincount(comp, weights=flag.astype(np.int64), minlength=ncomp) > 0
    keep = np.ones(ncomp, bool) if select is None else np.asarray(select(m_size, m_flag), bool)
    order = np.flatnonzero(keep)
    order = order[np.argsort(m_first[order], kind="stable")]
    gid = np.zeros(ncomp, np.int64)
    gid[order] = np.arange(1, len(order) + 1)
    lookup = gid[comp] if total else np.zeros(0, np.int64)
    lookup_path = rt.path("tables", f"{name}-lookup.npy")
    save_table(lookup_path, lookup)
    n = len(order)
    g_size = np.zeros(n + 1, np.int64)
    g_size[1:] = m_size[order]
    g_first = np.full(n + 1, -1, np.int64)
    g_first[1:] = m_first[order]
    return Components(labels_path, offsets_path, lookup_path, n, g_size, g_first)


def global_labels(region: Region, comps: Components, grid: BlockGrid) -> np.ndarray:
    """Global component ids (int64, 0 = none) over ``region`` (any region, e.g. core + halo)."""
    local = np.asarray(_open_array(comps.labels_path, "r")[region.slices])
    nodes = node_ids(local, region, grid, load_table(comps.offsets_path))
    lookup = load_table(comps.lookup_path)
    out = np.zeros(nodes.shape, np.int64)
    sel = nodes >= 0
    out[sel] = lookup[nodes[sel]]
    return out

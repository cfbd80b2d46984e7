"""Run a validated pipeline blockwise on Dask: the counterpart of :func:`c3dseg.runner.executor.execute`.

Outputs
-------
* ``-o labels.ome.zarr`` (or ``.zarr``): the single final image, written block by block as OME-Zarr
  (zarr v3 + NGFF 0.5 by default, v2 + NGFF 0.4 with ``zarr_format=2``), chunks = blocks;
* ``-o labels.tif`` (any other image extension): computed as above into the work folder, then
  streamed into the file one slab of blocks at a time;
* ``-o DIR``: XPIWIT's layout with ``.ome.zarr`` stores instead of ``.tif`` files.

While a run is going, every output store has ``c3dseg.status = "running"`` and the work folder
(``<output>/.c3dseg-work`` for a store, ``DIR/.c3dseg-work`` for a folder,
``<file>.c3dseg-work`` for a TIFF) holds the run's fingerprint (pipeline, inputs, blocks), the
intermediate arrays and one completion record per block and pass.  Rerunning the same command
resumes; an existing output is otherwise refused unless ``overwrite``.  When the run completes the
status becomes ``"complete"`` and the work folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__
from ..errors import C3DError, ExecutionError, InputError, PipelineError
from ..filters.base import Context, get_filter, resolve_relative
from ..image import Image, MetaTable
from .grid import BlockGrid, Region, as_triple
from .planner import BlockPlan, check_block, plan_blocks
from .runtime import ClusterOptions, Runtime, close_client, open_client, worker_peak_memory
from .values import Derived, Node, Stored, block_task, chain_halo, map_range, probe_task

log = logging.getLogger("c3dseg")

WORK_DIR = ".c3dseg-work"


@dataclass
class BlockwiseOptions:
    """Options of a blockwise run (the CLI's ``--blocks``, ``--workers``, ``--scheduler``,
    ``--memory-limit``, ``--overwrite``)."""

    block: tuple = (128, 256, 256)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    overwrite: bool = False
    progress: bool | str = False
    zarr_format: int = 3
    n_levels: int = 1
    keep_work: bool = False
    retries: int = 2
    client: Any = None                  # an existing distributed.Client (Python API)
    report_memory: bool = False         # log the workers' peak memory at the end
    protected: tuple = ()
    stats: dict = field(default_factory=dict)


@dataclass
class Output:
    item_id: str
    kind: str           # "image" | "meta" | "writer"
    number: int
    path: str


# ---------------------------------------------------------------------------------------------
# environment given to global implementations
# ---------------------------------------------------------------------------------------------

class Env:
    """What a global filter implementation may use: the runtime (passes), the grid, the volume's
    spacing, materialisation of lazy values and one-block probes.

    A run may change its voxel grid (resampling steps): ``rt``, ``grid``, ``shape`` and
    ``spacing`` are those of the *current* grid, which the executor sets to the grid of each
    step's inputs before the step runs (:meth:`use`); every grid is cut with the same block size.
    """

    def __init__(self, rt: Runtime, spacing, base_dir: str, pipeline_name: str, block=None):
        self.rt = rt
        self.grid = rt.grid
        self.shape = rt.grid.shape
        self.spacing = tuple(spacing)
        self.base_dir = base_dir
        self.pipeline_name = pipeline_name
        self.plan = None                      # the runner's plan (set by run_blockwise)
        self.bp: BlockPlan | None = None      # the block plan for the readers' spacing (set by run_blockwise)
        self.block = as_triple(block if block is not None else rt.grid.block, "block")
        self._runtimes = {tuple(self.shape): rt}
        self._plans: dict[tuple, BlockPlan] = {}
        self._stored: dict[int, tuple] = {}   # id(lazy value) -> (value, its stored copy)
        #: run-level "the image has no cells" (EstimateCellDiameter or ResampleToModelScale found no
        #: tissue): every label image the run writes is empty, as the whole-volume label filters
        #: return, whatever steps lie between (meta does not survive every blockwise step)
        self.no_cells = False

    def stored_copy(self, value):
        """The stored copy of ``value`` when one was materialised already, else ``value``."""
        hit = self._stored.get(id(value))
        return hit[1] if hit is not None and hit[0] is value else value

    def block_plan(self) -> BlockPlan | None:
        """The block plan with the halos of the current grid's spacing (physical halos, e.g. a
        Gaussian's, span another number of voxels on a resampled grid)."""
        if self.plan is None:
            return self.bp
        key = tuple(round(float(s), 12) for s in self.spacing)
        if key not in self._plans:
            self._plans[key] = plan_blocks(self.plan, self.spacing)
        return self._plans[key]

    # -- grids ---------------------------------------------------------------------------------
    def use(self, shape, spacing=None) -> None:
        """Make the grid of ``shape`` (Z, Y, X) the current one (created on first use)."""
        shape = as_triple(shape, "shape")
        rt = self._runtimes.get(shape)
        if rt is None:
            first = next(iter(self._runtimes.values()))
            rt = Runtime(first.client, BlockGrid(shape, self.block), first.work_dir, progress=first.progress,
                         retries=first.retries)
            rt.stats = first.stats            # one table of passes for the whole run
            self._runtimes[shape] = rt
        self.rt, self.grid, self.shape = rt, rt.grid, shape
        if spacing is not None:
            self.spacing = tuple(float(s) for s in spacing)

    def use_value(self, value) -> None:
        """Make the grid ``value`` lives on the current one."""
        from .values import leaves

        lv = leaves(value)
        if lv:
            self.use(lv[0].shape3d, getattr(value, "spacing", None))

    def enter_grid(self, shape, spacing, item_id: str) -> None:
        """Switch to the output grid of resampling step ``item_id``, after checking that the block
        size covers the context the passes on that grid read (the error names the smallest
        valid size)."""
        self.use(shape, spacing)
        bp = self.block_plan()
        if bp is not None:
            seg = bp.segments.get(item_id, 0)
            check_block(bp, self.block, shape, self.pipeline_name, segment=seg,
                        where=f"on the grid {item_id} resamples to ({','.join(map(str, shape))} voxels)")

    @property
    def grids(self) -> dict:
        return {s: rt.grid for s, rt in self._runtimes.items()}

    # -- lazy values ---------------------------------------------------------------------------
    def probe(self, values) -> list[tuple[np.dtype, tuple]]:
        """dtype and leading shape (channels) of values, from a small region of the first block."""
        b = self.grid[(0, 0, 0)]
        hi = tuple(min(s, a + 24) for a, s in zip(b.start, b.stop))
        out = self.rt.gather_small(probe_task, list(values), b.start, hi, self.shape)
        return [(np.dtype(dt), shp[:-3]) for dt, shp in out]

    def materialise(self, value, name: str) -> Stored:
        """A stored (zarr, one chunk per block) copy of ``value`` in the work folder."""
        return self.materialise_all([value], [name])[0]

    def materialise_all(self, values, names) -> list:
        """Stored copies of several values in one pass (outputs of one node are computed once)."""
        from .components import create_block_array

        out = [self.stored_copy(v) for v in values]       # stored once per run (e.g. network outputs)
        todo = [(k, v, n) for k, (v, n) in enumerate(zip(out, names)) if not isinstance(v, Stored)]
        if not todo:
            return out
        infos = self.probe([v for _, v, _ in todo])
        paths, dts = [], []
        for (k, v, n), (dt, lead) in zip(todo, infos):
            channels = lead[0] if lead else None
            path = self.rt.path("arrays", f"{n}.zarr")
            create_block_array(path, self.grid, dt, channels)
            paths.append(path)
            dts.append(dt.str)
            out[k] = Stored(path, "array", self.shape, dt.str, channels, v.spacing, dict(v.meta))
        label = todo[0][2] if len(todo) == 1 else f"{todo[0][2]}+{len(todo) - 1}"
        self.rt.run_pass(f"write-{label}", block_task, [v for _, v, _ in todo], paths, self.shape, dts,
                         collect=False, desc=f"{label}: write blocks")
        for k, v, _ in todo:
            self._stored[id(v)] = (v, out[k])
        return out

    def node(self, op: str, inputs: list, *, halo=(0, 0, 0), func=None, kwargs=None, filter_name="",
             params=None, item_id="", meta=None, n_outputs=1, expensive=False) -> list[Derived]:
        """Lazy outputs of a new node (pointwise/local)."""
        first = next((v for v in inputs if v is not None and not isinstance(v, str)), None)
        spacing = first.spacing if first is not None else self.spacing
        base_meta = dict(first.meta) if first is not None else {}
        if meta:
            base_meta.update(meta)
        nd = Node(op, list(inputs), as_triple(halo, "halo"), filter_name, dict(params or {}), func,
                  dict(kwargs or {}), item_id, self.base_dir, spacing,
                  [dict(v.meta) if (v is not None and not isinstance(v, str)) else None for v in inputs],
                  expensive=expensive or (op == "filter" and getattr(get_filter(filter_name), "category", "") == "Network"))
        return [Derived(nd, k, spacing, dict(base_meta)) for k in range(1, n_outputs + 1)]

    def reduce(self, name: str, fn, *args, **kwargs) -> dict:
        """Run ``fn(block, *args, **kwargs)`` on every block; ``{block.index: result}``."""
        return self.rt.run_pass(name, fn, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def _work_dir(target, outputs: list[Output]) -> str:
    from ..zarr_io import is_zarr_path

    if not target.is_file:
        return os.path.join(target.path, WORK_DIR)
    if is_zarr_path(target.path):
        return os.path.join(target.path, WORK_DIR)
    return target.path + WORK_DIR


def plan_block_outputs(plan, inputs: dict[int, str], target) -> list[Output]:
    """Every output of the run (paths known before it starts).  In an output folder, images are
    OME-Zarr stores (``..._Out1.ome.zarr``, ``<basename>.ome.zarr``) instead of TIFF files; a
    single output file and writers with their own FileName keep their format."""
    from ..runner.executor import plan_outputs

    folder = None if target.is_file else os.path.abspath(target.path)
    out = []
    for p in plan_outputs(plan, inputs, target):
        path = p.path
        inside = folder is not None and os.path.abspath(path).startswith(folder + os.sep)
        if inside and p.kind in ("image", "writer"):
            low = path.lower()
            for ext in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
                if low.endswith(ext):
                    path = path[: -len(ext)] + ".ome.zarr"
                    break
        out.append(Output(p.item_id, p.kind, p.number, path))
    return out


def fingerprint(plan, inputs: dict[int, str], block, zarr_format: int, n_levels: int) -> dict:
    """What identifies a run for resuming: pipeline (with --set values), inputs, blocks, version."""
    def stat(p):
        p = os.path.abspath(p)
        probe = p
        for name in ("zarr.json", ".zattrs", ".zarray", ".zgroup"):
            if os.path.isfile(os.path.join(p, name)):
                probe = os.path.join(p, name)
                break
        try:
            st = os.stat(probe)
            return [p, st.st_size, int(st.st_mtime)]
        except OSError:
            return [p, None, None]

    h = hashlib.sha256(plan.pipeline.to_bytes()).hexdigest()
    return {"c3dseg": __version__, "pipeline": h, "inputs": {str(k): stat(v) for k, v in sorted(inputs.items())},
            "blocks": list(block), "zarr_format": zarr_format, "levels": n_levels}


def _check_outputs(outputs: list[Output], work_dir: str, fp: dict, overwrite: bool, protected) -> str:
    """"fresh" | "resume"; raises when an output exists and is not our unfinished run."""
    prot = {os.path.realpath(p) for p in protected}
    for o in outputs:
        if os.path.realpath(o.path) in prot:
            raise PipelineError(f"output {o.path} is an input of this run; refusing to overwrite it", item=o.item_id)
    run_file = os.path.join(work_dir, "run.json")
    if os.path.isfile(run_file) and not overwrite:
        try:
            with open(run_file) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old == fp:
            return "resume"
        raise PipelineError(f"{os.path.dirname(work_dir) if work_dir.endswith(WORK_DIR) else work_dir} holds an "
                            "unfinished blockwise run of another pipeline, input or block size; rerun that command "
                            "to finish it, or add --overwrite to start over")
    existing = [o.path for o in outputs if os.path.exists(o.path)]
    if existing and not overwrite:
        raise PipelineError(f"output {existing[0]} exists; add --overwrite to replace it")
    return "fresh"


def run_blockwise(plan, inputs: dict[int, str], target, opts: BlockwiseOptions) -> list[Output]:
    """Run ``plan`` on ``inputs`` blockwise; returns the outputs written.

    Raises
    ------
    PipelineError
        The pipeline cannot be cut, the block is too small, or an output exists (exit 2).
    ExecutionError / InputError
        The scheduler cannot be reached (nothing written), an input cannot be read, a block fails.
    """
    file = plan.pipeline.name
    for idx in plan.cmd_indices:
        if idx not in inputs:
            raise PipelineError(f"the pipeline reads command-line input {idx}, but none was given "
                                f"(use -i {idx}=PATH)", file=file)
    # 1. sources (lazy) and the grid
    sources = _open_sources(plan, inputs)
    shapes = {s.shape3d for s in sources.values()}
    if not sources:
        raise PipelineError("a blockwise run needs at least one reader of a command-line input", file=file)
    if len(shapes) > 1:
        raise InputError("blockwise runs need inputs of one shape; got " +
                         ", ".join(f"{os.path.basename(s.path)} {s.shape3d}" for s in sources.values()))
    shape = shapes.pop()
    first_reader = next(iter(sources.values()))
    spacing = first_reader.spacing
    block = as_triple(opts.block, "block")
    bp = plan_blocks(plan, spacing)
    check_block(bp, block, shape, file)
    grid = BlockGrid(shape, block)
    outputs = plan_block_outputs(plan, inputs, target)
    if not [o for o in outputs if o.kind in ("image", "writer")]:
        raise PipelineError("the pipeline writes no image (no ImageWriter, no WriteResult=1)", file=file)
    work_dir = _work_dir(target, outputs)
    fp = fingerprint(plan, inputs, grid.block, opts.zarr_format, opts.n_levels)
    mode = _check_outputs(outputs, work_dir, fp, opts.overwrite, tuple(opts.protected) + tuple(inputs.values()))

    # 2. the cluster, before anything is written
    client, cluster = (opts.client, None) if opts.client is not None else open_client(opts.cluster)
    t0 = time.perf_counter()
    try:
        if mode == "fresh":
            for o in outputs:
                if os.path.exists(o.path):
                    from ..zarr_io import remove_store

                    remove_store(o.path)
            if os.path.exists(work_dir):
                shutil.rmtree(work_dir)
        if target.is_file:
            os.makedirs(os.path.dirname(os.path.abspath(target.path)) or ".", exist_ok=True)
        else:
            os.makedirs(target.path, exist_ok=True)
        os.makedirs(work_dir, exist_ok=True)
        with open(os.path.join(work_dir, "run.json"), "w") as f:
            json.dump(fp, f, indent=1)
        log.info("blockwise: volume %s, blocks %s (%d), halo %s, %s", shape, grid.block, len(grid), bp.needed,
                 "resuming" if mode == "resume" else "starting")
        rt = Runtime(client, grid, work_dir, progress=opts.progress, retries=opts.retries)
        env = Env(rt, spacing, plan.pipeline.base_dir, file, block=block)
        env.plan = plan
        env.bp = bp
        env._plans[tuple(round(float(s), 12) for s in spacing)] = bp
        written = _walk(plan, bp, env, sources, outputs, opts, target)
        if opts.report_memory or log.isEnabledFor(logging.INFO):
            try:
                peaks = worker_peak_memory(client)
                opts.stats["worker_peak_bytes"] = peaks
                log.info("blockwise: worker peak memory: " +
                         ", ".join(f"{v / 2**20:.0f} MiB" for v in peaks.values()))
            except Exception:  # pragma: no cover - informative only
                pass
        opts.stats["passes"] = dict(rt.stats)
        opts.stats["seconds"] = time.perf_counter() - t0
        opts.stats["grid"] = {"shape": shape, "block": grid.block, "blocks": len(grid), "halo": bp.needed}
        opts.stats["grids"] = [{"shape": s, "block": g.block, "blocks": len(g)} for s, g in env.grids.items()]
        if not opts.keep_work:
            shutil.rmtree(work_dir, ignore_errors=True)
        return written
    finally:
        if opts.client is None:
            close_client(client, cluster)


def _open_sources(plan, inputs) -> dict[str, Stored]:
    """One lazy source per reader item (spacing as the ImageReader would set it)."""
    from ..zarr_io import open_volume

    out = {}
    for step in plan.steps:
        if not step.cls.is_reader:
            continue
        it = step.item
        refs = [r for r in it.input_refs("image") if r.is_cmd]
        if not refs:
            continue
        path = inputs[refs[0].output]
        ch = step.params.get("Channel", -1)
        try:
            vol = open_volume(path, channel=ch if ch is not None and ch >= 0 else None)
        except C3DError as e:
            raise e.located(item=it.item_id, filter=it.name)
        spacing = vol.spacing
        try:
            flt = step.cls(step.params, Context(item_id=it.item_id, base_dir=plan.pipeline.base_dir))
            probe = Image(np.zeros((1, 1, 1), np.uint8), vol.spacing, dict(vol.meta))
            if hasattr(flt, "_spacing"):
                spacing = tuple(flt._spacing(probe))
        except C3DError:
            pass
        meta = dict(vol.meta)
        meta.setdefault("basename", os.path.basename(path))
        out[it.item_id] = Stored(os.path.abspath(path), "volume", vol.shape3d, vol.dtype.str,
                                 vol.shape[0] if vol.is_multichannel else None, tuple(spacing), meta, 0,
                                 ch if ch is not None and ch >= 0 else None)
    return out


def _minmax_task(block, src: Stored):
    data = src.read(block.core)
    if data.ndim == 4:
        return [(float(c.min()), float(c.max())) for c in data.astype(np.float32, copy=False)]
    d = data.astype(np.float32, copy=False)
    return [(float(d.min()), float(d.max()))]


def _walk(plan, bp: BlockPlan, env: Env, sources, outputs: list[Output], opts, target) -> list[Output]:
    values: dict[tuple[str, str, int], Any] = {}
    by_item: dict[str, list[Output]] = {}
    for o in outputs:
        by_item.setdefault(o.item_id, []).append(o)
    written: list[Output] = []
    finals: list[tuple[Output, Any]] = []
    for step in plan.steps:
        it = step.item
        info = bp.steps[it.item_id]
        imgs, metas = [], []
        for r in it.inputs:
            if r.is_cmd:
                continue
            v = values.get((r.source, r.kind, r.output))
            (imgs if r.kind == "image" else metas).append(v)
        n_img = len(step.cls.ports("output", "image"))
        try:
            if info.mode == "reader":
                env.use(sources[it.item_id].shape3d, sources[it.item_id].spacing)
            elif info.mode in ("global", "resample"):
                # values stored by an earlier step (network outputs) are read, not recomputed
                imgs = [env.stored_copy(v) if v is not None else v for v in imgs]
                _use_input_grid(env, imgs, info.mode)
                imgs = _store_expensive(env, it.item_id, imgs)
            else:
                _use_input_grid(env, imgs, info.mode)
            if info.mode == "reader":
                outs, out_metas = [_reader_value(step, sources[it.item_id], env)], []
            elif info.mode == "writer":
                outs, out_metas = [], []
                for o in by_item.get(it.item_id, []):
                    if o.kind == "writer":
                        finals.append((o, imgs[0]))
            elif info.mode in ("pointwise", "local"):
                halo = env.block_plan().steps[it.item_id].halo      # in voxels of the current grid
                outs = env.node("filter", imgs, halo=halo, filter_name=it.name, params=step.params,
                                item_id=it.item_id, meta={"is_label": False}, n_outputs=n_img)
                out_metas = []
            else:
                outs, out_metas = info.impl(env, step, imgs, metas)
        except C3DError as e:
            raise e.located(file=plan.pipeline.name, item=it.item_id, filter=it.name)
        for k, v in enumerate(outs, 1):
            values[(it.item_id, "image", k)] = v
        for k, m in enumerate(out_metas, 1):
            values[(it.item_id, "meta", k)] = m
        for o in by_item.get(it.item_id, []):
            if o.kind == "image":
                finals.append((o, values.get((it.item_id, "image", o.number))))
            elif o.kind == "meta":
                m = values.get((it.item_id, "meta", o.number))
                if isinstance(m, MetaTable):
                    from ..io import write_table

                    write_table(o.path, m)
                    written.append(o)
                else:
                    log.debug("%s: meta output %d is per block in blockwise runs; not written", it.item_id, o.number)
    for o, v in finals:
        if v is None:
            continue
        try:
            env.use_value(v)
            _write_output(env, o, v, opts, target)
        except C3DError as e:
            raise e.located(file=plan.pipeline.name, item=o.item_id)
        written.append(o)
    return written


def _use_input_grid(env: Env, imgs: list, mode: str) -> None:
    """Switch ``env`` to the grid of a step's image inputs; inputs on different grids are refused
    (except by resampling steps, whose reference input may lie on another grid)."""
    from .values import leaves

    vals = [v for v in imgs if v is not None and not isinstance(v, str) and leaves(v)]
    if not vals:
        return
    if mode != "resample":
        shapes = {tuple(leaves(v)[0].shape3d) for v in vals}
        if len(shapes) > 1:
            raise PipelineError("its input images lie on different voxel grids (" +
                                ", ".join(",".join(map(str, s)) for s in sorted(shapes)) +
                                "); resample one onto the other's grid first (ResampleImageFilter with a reference)")
    env.use_value(vals[0])


def _store_expensive(env: Env, item_id: str, imgs: list) -> list:
    """Inputs of a global step whose chain holds an expensive node (a network) are stored first, all
    in one pass (the network runs once per block for all of them), so that this step and later ones
    read them instead of predicting again per pass."""
    from .values import is_cheap

    todo, seen = [], set()
    for v in imgs:
        if isinstance(v, Derived) and id(v) not in seen and not is_cheap(v):
            seen.add(id(v))
            todo.append(v)
    if not todo:
        return imgs
    env.materialise_all(todo, [f"{item_id}-in{k + 1}" for k in range(len(todo))])
    return [env.stored_copy(v) if v is not None else v for v in imgs]


def _reader_value(step, src: Stored, env: Env):
    p = step.params
    if p.get("KeepDataType"):
        return src
    lo, hi = p.get("InputMinimumValue", -1.0), p.get("InputMaximumValue", -1.0)
    if lo == -1 or hi == -1:
        res = env.reduce(f"{step.item.item_id}-minmax", _minmax_task, src, desc=f"{step.item.item_id}: extrema")
        per = list(res.values())
        n = len(per[0])
        mins = [min(r[c][0] for r in per) for c in range(n)]
        maxs = [max(r[c][1] for r in per) for c in range(n)]
        if src.channels is not None:
            lo_v = mins if lo == -1 else [lo] * n
            hi_v = maxs if hi == -1 else [hi] * n
        else:
            lo_v = mins[0] if lo == -1 else lo
            hi_v = maxs[0] if hi == -1 else hi
    else:
        lo_v, hi_v = lo, hi
    out, = env.node("func", [src], func=map_range, kwargs={"lo": lo_v, "hi": hi_v}, item_id=step.item.item_id,
                    meta={"is_label": False})
    return out


def _write_output(env: Env, o: Output, value, opts: BlockwiseOptions, target) -> None:
    from ..zarr_io import create_zarr, finish_zarr, is_zarr_path, set_status, zarr_status
    from .components import create_block_array

    if not isinstance(value, (Stored, Derived)):
        raise ExecutionError(f"output {o.number} is not an image ({type(value).__name__}); it cannot be written")
    (dt, lead), = env.probe([value]) if not (isinstance(value, Derived) and value.meta.get("dtype_fixed")) \
        else [(np.dtype(value.meta["dtype_fixed"]), value.meta.get("lead", ()))]
    is_label = bool(value.meta.get("is_label"))
    if is_label and env.no_cells:
        value, = env.node("func", [value], func=np.zeros_like, item_id=o.item_id, meta=dict(value.meta))
    shape = tuple(lead) + env.shape
    name = value.meta.get("basename") or os.path.basename(o.path)
    key = f"out-{o.item_id}-{o.kind}{o.number}"
    if is_zarr_path(o.path):
        arr_path = os.path.join(o.path, "0")
        status = zarr_status(o.path) if os.path.isdir(o.path) else None
        reuse = False
        if status and status.get("status") == "running" and os.path.isdir(arr_path):
            import zarr

            a = zarr.open_array(arr_path, mode="r")
            reuse = tuple(a.shape) == shape and a.dtype == dt
        if not reuse:
            if os.path.exists(o.path):
                # keep our own work folder when it lives inside this store
                keep = os.path.join(o.path, WORK_DIR)
                for entry in os.listdir(o.path):
                    full = os.path.join(o.path, entry)
                    if full != keep:
                        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
                # rewrite the group metadata in place
                import zarr

                g = zarr.open_group(o.path, mode="a", zarr_format=opts.zarr_format)
                kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if opts.zarr_format == 2 else {}
                g.create_array("0", shape=shape, chunks=((1,) * len(lead)) + env.grid.block, dtype=dt, fill_value=0,
                               overwrite=True, **kw)
                from ..zarr_io import _group_attrs, _level_factors

                g.attrs.update(_group_attrs(value.spacing, _level_factors(value.spacing, opts.n_levels), len(shape),
                                            name, opts.zarr_format, is_label, "running",
                                            value.meta.get("channel_names") if lead else None, None))
            else:
                create_zarr(o.path, shape, dt, spacing=value.spacing, chunks=env.grid.block,
                            zarr_format=opts.zarr_format, n_levels=opts.n_levels, is_label=is_label,
                            channel_names=value.meta.get("channel_names") if lead else None, name=name,
                            status="running")
        env.rt.run_pass(key, block_task, [value], [arr_path], env.shape, [dt.str], collect=False,
                        desc=f"{o.item_id}: write {os.path.basename(o.path)}")
        finish_zarr(o.path, opts.n_levels, status="complete")
        return
    # another format: compute into the work folder, then stream into the file
    arr_path = env.rt.path("arrays", f"{key}.zarr")
    create_block_array(arr_path, env.grid, dt, lead[0] if lead else None)
    env.rt.run_pass(key, block_task, [value], [arr_path], env.shape, [dt.str], collect=False,
                    desc=f"{o.item_id}: compute {os.path.basename(o.path)}")
    _stream_to_file(arr_path, o.path, value, dt, is_label, env, protect=opts.protected)


def _stream_to_file(arr_path: str, path: str, value, dt, is_label: bool, env: Env, protect=()) -> None:
    """Write a (blockwise computed) zarr array into a TIFF, one z-slab of blocks at a time."""
    import tifffile
    import zarr

    from ..io_atomic import atomic_path

    low = path.lower()
    if not low.endswith((".tif", ".tiff")):
        # small enough formats: read whole (NRRD / NIfTI / MHA have no streaming writer)
        from ..io import write_image

        data = np.asarray(zarr.open_array(arr_path, mode="r")[...])
        write_image(path, Image(data, value.spacing, dict(value.meta, is_label=is_label)), protect=protect,
                    label=is_label)
        return
    arr = zarr.open_array(arr_path, mode="r")
    if is_label and dt.kind in "iu":
        from ..labels import label_dtype

        top = 0
        for z0 in range(0, env.shape[0], env.grid.block[0]):
            top = max(top, int(np.asarray(arr[z0:z0 + env.grid.block[0]]).max(initial=0)))
        dt = np.dtype(label_dtype(top))
    sz, sy, sx = value.spacing
    ome = low.endswith((".ome.tif", ".ome.tiff"))
    meta = {"axes": "ZYX", "spacing": sz, "unit": "um"} if not ome else {
        "axes": "ZYX", "PhysicalSizeX": sx, "PhysicalSizeY": sy, "PhysicalSizeZ": sz}

    def planes():
        for z0 in range(0, env.shape[0], env.grid.block[0]):
            slab = np.asarray(arr[z0:min(env.shape[0], z0 + env.grid.block[0])]).astype(dt, copy=False)
            for plane in slab:
                yield plane

    if arr.ndim != 3:
        raise ExecutionError("multi-channel blockwise outputs can only be written as OME-Zarr", file=path)
    with atomic_path(path) as tmp:
        kw = dict(imagej=not ome and dt != np.uint32, ome=ome, resolution=(1.0 / sx, 1.0 / sy), metadata=meta,
                  compression="zlib", shape=env.shape, dtype=dt)
        if dt == np.uint32 and not ome:
            kw["imagej"] = False
            kw["metadata"] = None
            kw["description"] = f"ImageJ=1.11a\nimages={env.shape[0]}\nslices={env.shape[0]}\nunit=micron\nspacing={sz}\n"
        tifffile.imwrite(tmp, data=planes(), **kw)

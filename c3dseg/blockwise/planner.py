"""The block planner: from each filter's declaration, how a pipeline is cut into blocks.

Every filter class declares ``blockwise`` (see :class:`c3dseg.filters.base.Filter`):

``"pointwise"``  each output voxel depends on the same input voxel only (halo 0);
``"local"``      it depends on a neighbourhood: :meth:`Filter.halo` gives its radius in voxels
                 (z, y, x) from the filter's parameters and the image spacing;
``"global"``     it needs a reduction across blocks (a minimum, a histogram, connected
                 components, per-cell tables ...): a blockwise implementation exists for it
                 (:mod:`c3dseg.blockwise.globals`, or a ``run_blockwise`` method on the class);
                 its ``halo`` is the context its own block passes read (e.g. the tracking reach);
``"resample"``   it changes the voxel grid (:mod:`c3dseg.blockwise.resample`): its output grid is
                 worked out from the parameters and metadata when the run gets there, the output
                 is written block by block into the work folder on that grid, and the steps
                 downstream run on the new grid (same block size);
``None``         it cannot be cut: the planner refuses the pipeline, naming the item.

Grids: every step belongs to a *grid segment*: the readers' grid is segment 0, each resampling
step starts a new segment (or returns to the segment of its reference input), other steps live on
the segment of their first image input.  Block sizes are checked per segment: segment 0 before
the run starts, the others when their shape is known (right after the resampling step has worked
it out, before anything is written on it).

Readers and writers are the run's sources and sinks.  Pointwise and local filters between two
materialised images (an input, the input of a global filter, an output) are fused: each block is
read once with the *sum* of their halos along the chain (the largest such sum over parallel
branches) and every filter runs on that grown block.  The block size must be at least the largest
halo any pass reads, per axis (smaller blocks would read more context than they compute); the
error names the smallest valid size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PipelineError
from ..filters.base import Context, Filter
from .grid import Triple, as_triple

MODES = ("pointwise", "local", "global", "resample")

#: what to do instead, for filters that cannot be cut (filter name -> hint)
HINTS: dict[str, str] = {}


@dataclass
class StepInfo:
    item_id: str
    name: str
    mode: str                    # "reader" | "writer" | "pointwise" | "local" | "global"
    halo: Triple = (0, 0, 0)
    impl: Any = None             # global implementation (callable)


@dataclass
class BlockPlan:
    """What the executor needs: per step its mode/halo/implementation, the halo every pass reads,
    and the smallest valid block size."""

    steps: dict[str, StepInfo]
    chain: dict[tuple[str, int], Triple]    # (item, image output) -> context read since the last stored image
    needed: Triple                          # largest context any pass on the readers' grid reads
    reasons: dict[int, str] = field(default_factory=dict)   # axis -> what needs that much
    segments: dict[str, int] = field(default_factory=dict)  # item -> grid segment (0: the readers' grid)
    segment_needed: dict[int, Triple] = field(default_factory=dict)
    segment_reasons: dict[int, dict[int, str]] = field(default_factory=dict)

    def needed_on(self, segment: int = 0) -> Triple:
        if segment == 0 and not self.segment_needed:
            return self.needed
        return self.segment_needed.get(segment, (0, 0, 0))

    def smallest_block(self, shape: Triple, segment: int = 0) -> Triple:
        return tuple(max(1, min(n, s)) for n, s in zip(self.needed_on(segment), shape))


def _step_mode(step) -> str:
    cls = step.cls
    if cls.is_reader:
        return "reader"
    if cls.is_writer:
        return "writer"
    mode = getattr(cls, "blockwise", None)
    if mode is None and global_impl(cls) is not None:
        return "global"          # c3dseg.blockwise knows how to cut it (declaration not on the class yet)
    return mode or "none"


def global_impl(cls: type[Filter]):
    """The blockwise implementation of a ``"global"`` filter, or None."""
    own = getattr(cls, "run_blockwise", None)
    if own is not None:
        return own
    from .globals import GLOBAL_IMPLS

    return GLOBAL_IMPLS.get(cls.name)


def plan_blocks(plan, spacing=(1.0, 1.0, 1.0), block=None, shape=None) -> BlockPlan:
    """Check that ``plan`` (a runner :class:`~c3dseg.runner.plan.Plan`) can run blockwise.

    Parameters
    ----------
    spacing : (z, y, x) um
        Voxel spacing of the input (physical halos, e.g. a Gaussian's, depend on it).
    block, shape : 3 ints, optional
        Block size and volume shape: when both are given, a block smaller than the halo it needs
        raises, naming the smallest valid size.

    Raises
    ------
    PipelineError
        An item that cannot be cut (naming it), a global filter without a blockwise
        implementation, a meta output consumed downstream, or too small a block.
    """
    file = plan.pipeline.name
    infos: dict[str, StepInfo] = {}
    for step in plan.steps:
        it = step.item
        mode = _step_mode(step)
        if mode == "none" or mode not in MODES + ("reader", "writer"):
            hint = HINTS.get(it.name, "run without --blocks")
            raise PipelineError(f"{it.name} cannot be run blockwise (the filter declares no way to cut it into "
                                f"blocks); {hint}", file=file, item=it.item_id, filter=it.name)
        info = StepInfo(it.item_id, it.name, mode)
        if mode == "reader":
            if step.params.get("UseSeriesReader"):
                raise PipelineError("the series reader cannot stream blocks; convert the series to OME-Zarr or "
                                    "a TIFF stack first", file=file, item=it.item_id, filter=it.name,
                                    key="UseSeriesReader")
        elif mode == "resample":
            # reads whatever box of its input an output block maps to: no block-size constraint
            info.impl = global_impl(step.cls)
            if info.impl is None:
                raise PipelineError(f"{it.name} changes the voxel grid and has no blockwise implementation; run "
                                    "without --blocks", file=file, item=it.item_id, filter=it.name)
        elif mode in ("local", "global", "pointwise"):
            try:
                flt = step.cls(step.params, Context(item_id=it.item_id, base_dir=plan.pipeline.base_dir))
                h = as_triple(flt.halo(tuple(spacing)) if mode != "pointwise" else 0, "halo")
                if mode == "global" and not any(h):
                    from .globals import GLOBAL_HALOS

                    if it.name in GLOBAL_HALOS:
                        h = as_triple(GLOBAL_HALOS[it.name](step.params, tuple(spacing)), "halo")
            except PipelineError as e:
                raise e.located(file=file, item=it.item_id, filter=it.name)
            except Exception as e:
                raise PipelineError(f"cannot work out the block halo: {type(e).__name__}: {e}", file=file,
                                    item=it.item_id, filter=it.name) from None
            info.halo = h
            if mode == "global":
                info.impl = global_impl(step.cls)
                if info.impl is None:
                    raise PipelineError(f"{it.name} needs a reduction across blocks and has no blockwise "
                                        "implementation; run without --blocks", file=file, item=it.item_id,
                                        filter=it.name)
        infos[it.item_id] = info
        # meta outputs of pointwise/local filters are per block: nobody may consume them
        if mode in ("pointwise", "local") and step.cls.ports("output", "meta"):
            for key, n in plan.consumers.items():
                if key[0] == it.item_id and key[1] == "meta" and n:
                    raise PipelineError("its meta output is used by another item, but blockwise runs compute "
                                        "it per block; run without --blocks", file=file, item=it.item_id,
                                        filter=it.name)

    # context read by each fused pass: sum of halos since the last stored image, per grid segment
    chain: dict[tuple[str, int], Triple] = {}
    segments: dict[str, int] = {}
    seg_needed: dict[int, list[int]] = {0: [0, 0, 0]}
    seg_reasons: dict[int, dict[int, str]] = {0: {}}

    def bump(h, why, seg):
        need = seg_needed.setdefault(seg, [0, 0, 0])
        why_ = seg_reasons.setdefault(seg, {})
        for a in range(3):
            if h[a] > need[a]:
                need[a] = h[a]
                why_[a] = why

    for step in plan.steps:
        it = step.item
        info = infos[it.item_id]
        n_out = len(step.cls.ports("output", "image"))
        refs = [r for r in it.input_refs("image") if not r.is_cmd]
        if info.mode == "reader" or not refs:
            seg = 0
        elif info.mode == "resample":
            seg = segments.get(refs[1].source, 0) if len(refs) > 1 else max(seg_needed) + 1
        else:
            seg = segments.get(refs[0].source, 0)
        segments[it.item_id] = seg
        seg_needed.setdefault(seg, [0, 0, 0])
        if info.mode in ("reader", "global", "resample"):
            for k in range(1, n_out + 1):
                chain[(it.item_id, k)] = (0, 0, 0)
            if info.mode == "global":
                bump(info.halo, f"{it.item_id} ({it.name})", seg)
            continue
        below = [chain.get((r.source, r.output), (0, 0, 0)) for r in refs]
        m = tuple(max((b[a] for b in below), default=0) for a in range(3))
        h = tuple(x + y for x, y in zip(info.halo, m))
        for k in range(1, max(1, n_out) + 1):
            chain[(it.item_id, k)] = h
        if any(h):
            bump(h, f"the chain ending at {it.item_id} ({it.name})", seg)
    bp = BlockPlan(infos, chain, tuple(seg_needed[0]), dict(seg_reasons.get(0, {})), segments,
                   {k: tuple(v) for k, v in seg_needed.items()}, seg_reasons)
    if block is not None and shape is not None:
        check_block(bp, block, shape, file)
    return bp


def check_block(bp: BlockPlan, block, shape, file=None, segment: int = 0, where: str = "") -> None:
    """Raise when ``block`` is smaller than the context the passes on grid ``segment`` (of
    ``shape``) read; ``where`` names that grid in the message (e.g. "on the grid of item_0003")."""
    block = as_triple(block, "block")
    shape = as_triple(shape, "shape")
    if any(b <= 0 for b in block):
        raise PipelineError(f"--blocks {','.join(map(str, block))}: sizes must be >= 1", file=file)
    needed = bp.needed_on(segment)
    reasons = bp.reasons if segment == 0 and not bp.segment_reasons else bp.segment_reasons.get(segment, {})
    small = [a for a in range(3) if block[a] < min(needed[a], shape[a])]
    if small:
        need = bp.smallest_block(shape, segment)
        why = "; ".join(f"{'zyx'[a]}: {needed[a]} for {reasons.get(a, '?')}" for a in small)
        at = f" {where}" if where else ""
        raise PipelineError(f"--blocks {','.join(map(str, block))} is smaller than the halo it needs{at} ({why}); "
                            f"the smallest valid block size is {','.join(map(str, need))}", file=file)

"""The block planner: from each filter's declaration, how a pipeline is cut into blocks.

Every filter class declares ``blockwise`` (see :class:`c3dseg.filters.base.Filter`):

``"pointwise"``  each output voxel depends on the same input voxel only (halo 0);
``"local"``      it depends on a neighbourhood: :meth:`Filter.halo` gives its radius in voxels
                 (z, y, x) from the filter's parameters and the image spacing;
``"global"``     it needs a reduction across blocks (a minimum, a histogram, connected
                 components, per-cell tables ...): a blockwise implementation exists for it
                 (:mod:`c3dseg.blockwise.globals`, or a ``run_blockwise`` method on the class);
                 its ``halo`` is the context its own block passes read (e.g. the tracking reach);
``None``         it cannot be cut: the planner refuses the pipeline, naming the item.

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

MODES = ("pointwise", "local", "global")

#: what to do instead, for filters that cannot be cut
HINTS = {
    "ResampleImageFilter": "blockwise runs keep one voxel grid: resample the stack beforehand (a whole-volume "
                           "run, or the tool that wrote it), then drop the resampling items",
    "ResampleToModelScale": "blockwise runs keep one voxel grid: bring the stack to the model's scale beforehand "
                            "and drop ResampleToModelScale and the ResampleImageFilter that undoes it",
}


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
    needed: Triple                          # largest context any pass reads
    reasons: dict[int, str] = field(default_factory=dict)   # axis -> what needs that much

    def smallest_block(self, shape: Triple) -> Triple:
        return tuple(max(1, min(n, s)) for n, s in zip(self.needed, shape))


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
        elif mode in ("local", "global", "pointwise"):
            try:
                flt = step.cls(step.params, Context(item_id=it.item_id, base_dir=plan.pipeline.base_dir))
                h = as_triple(flt.halo(tuple(spacing)) if mode != "pointwise" else 0, "halo")
                if mode == "global" and not any(h):
                    from .globals import GLOBAL_HALOS

                    if it.name in GLOBAL_HALOS:
                        h = as_triple(GLOBAL_HALOS[it.name](step.params, tuple(spacing)), "halo")
            except PipelineError:
                raise
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

    # context read by each fused pass: sum of halos since the last stored image
    chain: dict[tuple[str, int], Triple] = {}
    needed = [0, 0, 0]
    reasons: dict[int, str] = {}

    def bump(h, why):
        for a in range(3):
            if h[a] > needed[a]:
                needed[a] = h[a]
                reasons[a] = why

    for step in plan.steps:
        it = step.item
        info = infos[it.item_id]
        n_out = len(step.cls.ports("output", "image"))
        if info.mode in ("reader", "global"):
            for k in range(1, n_out + 1):
                chain[(it.item_id, k)] = (0, 0, 0)
            if info.mode == "global":
                bump(info.halo, f"{it.item_id} ({it.name})")
            continue
        below = [chain.get((r.source, r.output), (0, 0, 0)) for r in it.input_refs("image") if not r.is_cmd]
        m = tuple(max((b[a] for b in below), default=0) for a in range(3))
        h = tuple(x + y for x, y in zip(info.halo, m))
        for k in range(1, max(1, n_out) + 1):
            chain[(it.item_id, k)] = h
        if any(h):
            bump(h, f"the chain ending at {it.item_id} ({it.name})")
    bp = BlockPlan(infos, chain, tuple(needed), reasons)
    if block is not None and shape is not None:
        check_block(bp, block, shape, file)
    return bp


def check_block(bp: BlockPlan, block, shape, file=None) -> None:
    block = as_triple(block, "block")
    shape = as_triple(shape, "shape")
    if any(b <= 0 for b in block):
        raise PipelineError(f"--blocks {','.join(map(str, block))}: sizes must be >= 1", file=file)
    small = [a for a in range(3) if block[a] < min(bp.needed[a], shape[a])]
    if small:
        need = bp.smallest_block(shape)
        why = "; ".join(f"{'zyx'[a]}: {bp.needed[a]} for {bp.reasons.get(a, '?')}" for a in small)
        raise PipelineError(f"--blocks {','.join(map(str, block))} is smaller than the halo it needs ({why}); "
                            f"the smallest valid block size is {','.join(map(str, need))}", file=file)

"""Volumes larger than memory: XML pipelines run block by block on Dask.

* :mod:`~c3dseg.blockwise.grid`: blocks, cores, halos;
* :mod:`~c3dseg.blockwise.planner`: how a pipeline is cut, from each filter's declaration;
* :mod:`~c3dseg.blockwise.runtime`: the Dask cluster, passes over blocks, completion records, resume;
* :mod:`~c3dseg.blockwise.values`: lazy images and their evaluation over a region;
* :mod:`~c3dseg.blockwise.components`: exact connected components across blocks;
* :mod:`~c3dseg.blockwise.globals` and :mod:`~c3dseg.blockwise.reconstruction`: filters that need
  reductions across blocks (extrema, percentiles, components, flow tracking, per-cell tables);
* :mod:`~c3dseg.blockwise.executor`: :func:`run_blockwise`, the counterpart of the runner's
  whole-volume executor; :mod:`~c3dseg.blockwise.cli`: the ``c3d-run`` flags.
"""

from .grid import Block, BlockGrid, Region
from .planner import BlockPlan, plan_blocks

__all__ = ["Block", "BlockGrid", "Region", "BlockPlan", "plan_blocks", "run_blockwise", "BlockwiseOptions",
           "ClusterOptions", "add_blockwise_arguments"]


def __getattr__(name):  # dask is imported only when a blockwise run needs it
    if name in ("run_blockwise", "BlockwiseOptions"):
        from . import executor

        return getattr(executor, name)
    if name == "ClusterOptions":
        from .runtime import ClusterOptions

        return ClusterOptions
    if name == "add_blockwise_arguments":
        from .cli import add_blockwise_arguments

        return add_blockwise_arguments
    raise AttributeError(name)

"""``c3d-run`` flags for blockwise runs (``--blocks``, ``--workers``, ``--scheduler``, ``--memory-limit``).

The runner's CLI calls :func:`add_blockwise_arguments` from its parser and hands off to
:func:`run_blockwise_cli` when ``--blocks`` is given.  Nothing here imports dask until a run starts.

Examples::

    c3d-run segment.xml -i stack.ome.zarr -o labels.ome.zarr --blocks 128,512,512
    c3d-run segment.xml -i stack.tif -o labels.ome.zarr --blocks 96 --workers 2 --memory-limit 4GiB
    c3d-run segment.xml -i /shared/stack.ome.zarr -o /shared/labels.ome.zarr --blocks 128,512,512 \\
        --scheduler tcp://10.0.0.5:8786

On SLURM (dask-jobqueue, ``pip install dask-jobqueue``), start the scheduler and workers with a few
lines of Python and point ``--scheduler`` at it (inputs and outputs on a shared file system)::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=4, processes=4, memory="32GB", walltime="04:00:00",
                           job_extra_directives=["--partition=cpu"])
    cluster.scale(jobs=8)                 # 8 jobs x 4 workers
    print(cluster.scheduler_address)      # tcp://...:PORT -> c3d-run ... --scheduler tcp://...:PORT
    input("press Enter to stop the cluster")

or from Python: ``run_blockwise(plan, inputs, target, BlockwiseOptions(client=Client(cluster)))``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from ..errors import PipelineError

log = logging.getLogger("c3dseg")


def add_blockwise_arguments(parser) -> None:
    """Add the blockwise flags to ``c3d-run``'s argument parser."""
    g = parser.add_argument_group("volumes larger than memory (blockwise on Dask)")
    g.add_argument("--blocks", metavar="Z,Y,X",
                   help="run blockwise with blocks of this size in voxels (one number: a cube); outputs are "
                        "OME-Zarr (-o x.ome.zarr, or .ome.zarr stores in an output folder) or a streamed TIFF")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local Dask workers (processes, one thread each; default: one per core)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="use a running Dask scheduler (tcp://HOST:PORT, e.g. from dask-jobqueue's SLURMCluster) "
                        "instead of a local cluster; workers must see the same paths")
    g.add_argument("--memory-limit", metavar="SIZE",
                   help="memory limit per local worker (e.g. 4GiB); a worker past it is restarted and its "
                        "blocks rerun")
    g.add_argument("--zarr-format", type=int, choices=(2, 3), default=3,
                   help="OME-Zarr outputs: zarr v3 with NGFF 0.5 (default) or v2 with NGFF 0.4")
    g.add_argument("--levels", type=int, default=1, metavar="N",
                   help="multiscale levels written in OME-Zarr outputs (default 1: full resolution only)")


def parse_blocks(text: str) -> tuple[int, int, int]:
    """``"128,512,512"`` -> (128, 512, 512); ``"96"`` -> (96, 96, 96)."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise PipelineError(f"--blocks {text!r}: expected Z,Y,X (integers), e.g. 128,512,512") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or any(v < 1 for v in vals):
        raise PipelineError(f"--blocks {text!r}: expected three sizes >= 1 (Z,Y,X) or one for a cube")
    return tuple(vals)


def wants_blockwise(args) -> bool:
    used = [f for f, v in (("--workers", args.workers), ("--scheduler", args.scheduler),
                           ("--memory-limit", args.memory_limit)) if v not in (None, "")]
    if used and not args.blocks:
        raise PipelineError(f"{', '.join(used)} need{'s' if len(used) == 1 else ''} --blocks Z,Y,X "
                            "(blockwise runs)")
    return bool(args.blocks)


def run_blockwise_cli(args, plan, pipeline_path: str, runs: list[dict], target) -> int:
    """The blockwise branch of ``c3d-run``: one run per input set, exit code."""
    from .executor import BlockwiseOptions, run_blockwise
    from .runtime import ClusterOptions, parse_memory

    block = parse_blocks(args.blocks)
    out = args.output or ""
    if out and not out.endswith(("/", os.sep)) and out.lower().endswith(".zarr"):
        target = type(target)(out, True)       # an OME-Zarr store is one output, not a folder
    if args.workers is not None and args.workers < 1:
        raise PipelineError("--workers must be >= 1")
    if args.scheduler and (args.workers is not None or args.memory_limit):
        raise PipelineError("--scheduler uses the workers of that cluster; drop --workers/--memory-limit")
    if args.levels < 1:
        raise PipelineError("--levels must be >= 1")
    parse_memory(args.memory_limit)
    if target.is_file and len(runs) > 1:
        raise PipelineError(f"-o {target.path}: {len(runs)} inputs need an output folder")
    cluster = ClusterOptions(workers=args.workers or 0, memory_limit=args.memory_limit, scheduler=args.scheduler)
    progress = False if args.quiet else (True if sys.stderr.isatty() else "plain")
    failures = 0
    entries = []
    for run_inputs in runs:
        opts = BlockwiseOptions(block=block, cluster=cluster, overwrite=args.overwrite, progress=progress,
                                zarr_format=args.zarr_format, n_levels=args.levels,
                                protected=tuple(run_inputs.values()))
        t0 = time.perf_counter()
        written = run_blockwise(plan, run_inputs, target, opts)
        if not target.is_file:
            from ..runner.cli import _entry

            entries += [_entry(p, run_inputs) for p in written]
        if not args.quiet:
            g = opts.stats.get("grid", {})
            peaks = opts.stats.get("worker_peak_bytes") or {}
            peak = f", worker peak memory {max(peaks.values()) / 2**20:.0f} MiB" if peaks else ""
            print(f"done: {len(written)} output(s) in {time.perf_counter() - t0:.1f} s, volume "
                  f"{'x'.join(map(str, g.get('shape', ())))}, {g.get('blocks', '?')} blocks of "
                  f"{'x'.join(map(str, g.get('block', ())))}{peak}; output: {target.path}", file=sys.stderr)
    if not target.is_file:
        from ..runner.cli import _write_manifest

        _write_manifest(target.path, pipeline_path, entries, [])
    return 1 if failures else 0

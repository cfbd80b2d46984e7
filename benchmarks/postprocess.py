"""Post-processing settings of a default pipeline, compared on annotated stacks with the network run
once per stack and grid.

    python benchmarks/postprocess.py DIR [--pipeline segment|segment_heat] NAME:ITEM.KEY=VALUE[,ITEM.KEY=VALUE...] ...

``DIR`` holds ``images/`` and ``labels/`` matched by name (``c3d-synth`` writes that layout).  Each
``NAME:...`` is a variant: the pipeline with those ``c3d-run --set`` values (``NAME:`` alone: as
shipped); the first is the reference the others are counted against.  The network's output
(``TileMerger``) is kept in memory per (stack, model, grid), so variants that change only what
follows it cost seconds; a variant that changes the grid (``ResampleToModelScale.Zoom``) runs the
network once more.  Prints mean per-cell Dice / AP@0.5 and seconds per stack and variant, then per
variant the means, the interior-cell Dice and on how many stacks Dice is higher / lower than the
reference's by more than 0.002.  Example (the sweep behind segment.xml's settings, README "Zoom")::

    python benchmarks/postprocess.py tune12 base: sig0:FlowSmoothingFilter.Sigma=0 \\
        minr3:InstanceSizeFilter.MinRadiusVoxels=3 close2:SinkClusteringFilter.ClosingRadius=2
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import c3dseg.filters.network as network  # noqa: E402
from c3dseg.io import read_image  # noqa: E402
from c3dseg.metrics import evaluate  # noqa: E402
from c3dseg.runner.cli import find_pipeline  # noqa: E402
from c3dseg.runner.executor import RunOptions, Target, execute  # noqa: E402
from c3dseg.runner.pipeline import Pipeline  # noqa: E402
from c3dseg.runner.plan import build_plan  # noqa: E402

_CACHE: dict = {}
_merge = network.TileMerger.run


def _cached_merge(self, images, metas):
    """TileMerger.run, kept per (stack, model, grid spacing): the network runs once for each."""
    s = images[0]
    meta = getattr(s, "meta", {})
    key = (meta.get("basename"), meta.get("model_path"), tuple(np.round(getattr(s, "spacing", ()), 6)),
           self.p["Blending"])
    if key not in _CACHE:
        if len(_CACHE) >= 4:              # one stack at a time: keep a few grids, not every stack's
            _CACHE.clear()
        _CACHE[key] = _merge(self, images, metas)[0]
    return [copy.copy(i) for i in _CACHE[key]], []


def parse_variant(spec):
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise SystemExit(f"variant {spec!r}: expected NAME:ITEM.KEY=VALUE[,ITEM.KEY=VALUE...] or NAME:")
    sets = []
    for kv in filter(None, rest.split(",")):
        key, eq, value = kv.partition("=")
        item, dot, param = key.rpartition(".")
        if not eq or not dot:
            raise SystemExit(f"variant {spec!r}: {kv!r} is not ITEM.KEY=VALUE")
        sets.append((item, param, value))
    return name, sets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", metavar="DIR", help="images/ and labels/ matched by name")
    ap.add_argument("variants", metavar="NAME:ITEM.KEY=VALUE,...", nargs="+")
    ap.add_argument("--pipeline", default="segment", help="segment (tanh) or segment_heat")
    a = ap.parse_args(argv)
    variants = [parse_variant(v) for v in a.variants]
    pipe = find_pipeline(a.pipeline)
    images = sorted(glob.glob(os.path.join(a.folder, "images", "*.tif")))
    if not images:
        ap.error(f"{a.folder}: no images/*.tif")
    network.TileMerger.run = _cached_merge
    out = os.path.join(tempfile.mkdtemp(prefix="c3d_post_"), "labels.tif")
    scores = {name: [] for name, _ in variants}
    try:
        for path in images:
            gt = read_image(os.path.join(a.folder, "labels", os.path.basename(path))).data
            line = os.path.basename(path)[:-4]
            for name, sets in variants:
                t0 = time.perf_counter()
                execute(build_plan(Pipeline.load(pipe), overrides=sets), {0: path}, Target(out, True), RunOptions())
                r = evaluate(gt, read_image(out).data)
                scores[name].append((r["mean_dice"], r["ap@0.5"], r["interior"]["mean_dice"]))
                line += f" | {name} {r['mean_dice']:.3f}/{r['ap@0.5']:.3f} {time.perf_counter() - t0:.0f} s"
            print(line, flush=True)
    finally:
        network.TileMerger.run = _merge
    ref = np.array(scores[variants[0][0]])
    print(f"means over {len(images)} stacks (Dice / AP@0.5 per stack above):")
    for name, _ in variants:
        s = np.array(scores[name])
        print(f"{name:16s} Dice {s[:, 0].mean():.4f}  AP@0.5 {s[:, 1].mean():.4f}  interior Dice {s[:, 2].mean():.4f}  "
              f"Dice higher/lower than {variants[0][0]} on {int((s[:, 0] > ref[:, 0] + 0.002).sum())}/"
              f"{int((s[:, 0] < ref[:, 0] - 0.002).sum())}", flush=True)


if __name__ == "__main__":
    main()

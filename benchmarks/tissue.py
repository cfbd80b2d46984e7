"""The tissue filter's settings against its absence, on a folder of image/label pairs.

    c3d-synth -o DIR -n 10 --seed 500 --preset train     # fresh training-preset volumes (not 0-199)
    python benchmarks/tissue.py DIR [--pipeline pipelines/segment.xml] [--set ITEM.KEY=VALUE ...]

Each image is segmented once by ``c3d-run PIPELINE`` with the tissue filter off
(``item_0015.MinOverlap=0``: the labels before it, on the input grid); then every setting of
:data:`SETTINGS` (WallContrast, Reach, MinOverlap) is applied to those labels exactly as the
pipeline's last filters do (:func:`c3dseg.tissue.tissue_mask_image` with the diameter
``EstimateCellDiameter`` finds, then :func:`c3dseg.reconstruction.filter_by_foreground_overlap`),
and scored against the labels with :func:`c3dseg.metrics.evaluate`.  Prints per volume the change
of AP@0.5 / mean per-cell Dice for each setting, then the means and how many volumes lost Dice.
Everything printed is measured here.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from c3dseg.diameter import estimate_cell_diameter  # noqa: E402
from c3dseg.io import read_image  # noqa: E402
from c3dseg.metrics import evaluate  # noqa: E402
from c3dseg.reconstruction import filter_by_foreground_overlap  # noqa: E402
from c3dseg.tissue import tissue_mask_image  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: (WallContrast, Reach, MinOverlap) settings compared; the first is segment.xml's
SETTINGS = [(2.5, 0.75, 0.5), (3.0, 0.75, 0.5), (2.0, 0.75, 0.5), (3.0, 1.0, 0.5), (2.0, 1.0, 0.5),
            (3.0, 1.5, 0.5), (3.0, 0.75, 0.25), (3.0, 0.75, 0.75)]
#: the item of segment.xml / segment_heat.xml that applies the tissue mask
TISSUE_ITEM = "item_0015"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="folder with images/ and labels/ (c3d-synth output)")
    ap.add_argument("--pipeline", default=os.path.join(HERE, "..", "pipelines", "segment.xml"))
    ap.add_argument("--set", action="append", default=[], metavar="ITEM.KEY=VALUE",
                    help="passed to c3d-run (e.g. another model)")
    a = ap.parse_args(argv)
    images = sorted(glob.glob(os.path.join(a.data, "images", "*.tif")))
    if not images:
        ap.error(f"no images in {os.path.join(a.data, 'images')}")
    base, res = [], {v: [] for v in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for f in images:
            name = os.path.basename(f)
            out = os.path.join(tmp, name)
            cmd = ["c3d-run", a.pipeline, "-i", f, "-o", out, "-q", "--set", f"{TISSUE_ITEM}.MinOverlap=0"]
            for s in a.set:
                cmd += ["--set", s]
            subprocess.run(cmd, check=True)
            labels = read_image(out).data
            truth = read_image(os.path.join(a.data, "labels", name)).data
            img = read_image(f)
            d = estimate_cell_diameter(img.data, img.spacing)
            r0 = evaluate(truth, labels)
            base.append((r0["ap@0.5"], r0["mean_dice"]))
            line = f"{name}  without {r0['ap@0.5']:.3f} / {r0['mean_dice']:.3f}"
            for v in SETTINGS:
                mask = tissue_mask_image(img.data, img.spacing, d, wall_contrast=v[0], reach=v[1])
                r = evaluate(truth, filter_by_foreground_overlap(labels, mask, min_overlap=v[2]))
                res[v].append((r["ap@0.5"], r["mean_dice"]))
                line += f"  {v[0]:g}/{v[1]:g}/{v[2]:g}: {r['ap@0.5'] - r0['ap@0.5']:+.3f} / {r['mean_dice'] - r0['mean_dice']:+.3f}"
            print(line, flush=True)
    b = np.array(base)
    print(f"{len(images)} volumes; AP@0.5 / mean per-cell Dice; settings WallContrast/Reach/MinOverlap")
    print(f"without the tissue filter: {b[:, 0].mean():.4f} / {b[:, 1].mean():.4f}")
    for v in SETTINGS:
        r = np.array(res[v])
        lost = int(np.sum(b[:, 1] - r[:, 1] > 0.002))
        print(f"{v[0]:g}/{v[1]:g}/{v[2]:g}: {r[:, 0].mean():.4f} / {r[:, 1].mean():.4f}, "
              f"volumes whose Dice fell by more than 0.002: {lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

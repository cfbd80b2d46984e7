"""Tiled inference benchmark: onnxruntime vs torch eager, tile redundancy, memory growth.

Everything printed is measured in this run:

1. Speed: the same U-Net (the paper's, 1.98 M parameters, random weights unless --checkpoint),
   the same volume, the same tiles (OnnxModel's default settings) and the same number of threads,
   through c3dseg's tiled predictor: onnxruntime (float32) vs torch eager (float32,
   inference_mode); torch bfloat16 autocast is printed for information.  Voxels per second are
   output voxels / wall time (best of --repeat).
2. Redundancy (network voxels computed / output voxels) of the default tiling for several volume
   shapes, next to XPIWIT's stride 0.5 patches and the reference code's tiler, computed from
   their tiling rules.
3. Memory: peak resident memory added by a prediction (onnxruntime, default settings, uint16
   input) for a volume and one 8x larger, each in a fresh process, against the size of the
   float32 outputs (4 channels).

Run: ``python benchmarks/inference.py`` (about 3 minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DEFAULT_TILE = (128, 192, 192)   # OnnxModel's PatchDepth, PatchHeight, PatchWidth defaults
DEFAULT_OVERLAP = 16             # OnnxModel's PatchOverlap default


def membrane_volume(shape, seed=0):
    """A membrane-like uint16 test volume (Voronoi cell walls, blur, noise)."""
    from scipy import ndimage as ndi

    from c3dseg.synthesis import voronoi_labels

    small = tuple(max(8, s // 2) for s in shape)
    lab = voronoi_labels(small, max(8, int(np.prod(small) / 4000)), seed=seed)
    lab = ndi.zoom(lab, [s / m for s, m in zip(shape, small)], order=0, grid_mode=True, mode="nearest")
    walls = (ndi.maximum_filter(lab, 3) != ndi.minimum_filter(lab, 3)).astype(np.float32)
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(walls, 1.0) * 2000 + 300 + rng.normal(0, 50, shape)
    return np.clip(img, 0, 65535).astype(np.uint16)


def make_checkpoint(path=None):
    import torch

    from c3dseg.training.unet import UNet3D

    if path:
        from c3dseg.training.export import load_checkpoint

        return load_checkpoint(path)
    torch.manual_seed(0)
    net = UNet3D()
    return {"format": "c3dseg-checkpoint", "model": net.state_dict(), "model_config": net.config, "state": {},
            "data_info": {"normalization": {"mode": "percentile", "lower": 1.0, "upper": 99.8}}}


def bench_speed(args, tmp):
    import torch

    from c3dseg.normalisation import apply_range, percentile_range
    from c3dseg.predict import OnnxNetwork, predict_volume
    from c3dseg.tiling import plan_tiles, predict_tiled
    from c3dseg.training.export import export_onnx, model_from_checkpoint
    from c3dseg.training.unet import InferenceModel, count_parameters

    torch.set_num_threads(args.threads)
    ck = make_checkpoint(args.checkpoint)
    onnx_path = os.path.join(tmp, "model.onnx")
    exp = export_onnx(ck, onnx_path)
    net = InferenceModel(model_from_checkpoint(ck)).eval()
    ort_net = OnnxNetwork(onnx_path, threads=args.threads)
    shape = args.shape
    vol = membrane_volume(shape)
    plan = plan_tiles(shape, DEFAULT_TILE, DEFAULT_OVERLAP, multiple=8)
    lo, hi = percentile_range(vol, 1.0, 99.8)

    def norm(t):
        return apply_range(t, lo, hi)

    def torch_fn(amp):
        def run(batch):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return net(torch.from_numpy(batch)).float().numpy()
        return run

    runs = {
        "onnxruntime float32": lambda: predict_volume(vol, ort_net, tile_shape=DEFAULT_TILE, overlap=DEFAULT_OVERLAP),
        "torch eager float32": lambda: predict_tiled(vol, torch_fn(False), plan, channels=4, transform=norm),
        "torch eager bfloat16 (info)": lambda: predict_tiled(vol, torch_fn(True), plan, channels=4, transform=norm),
    }
    times, outs = {}, {}
    for _ in range(args.repeat):  # interleaved repeats: other load hits every runtime alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name] = min(times.get(name, math.inf), time.perf_counter() - t0)
    nvox = float(np.prod(shape))
    print(f"== speed: {count_parameters(net)} parameters, volume {'x'.join(map(str, shape))} (ZYX), "
          f"{plan.n_tiles} tile(s) of {'x'.join(map(str, plan.tile))}, {args.threads} threads, "
          f"best of {args.repeat}")
    print(f"   export parity: max |onnxruntime - torch| = {exp['max_abs_diff']:.2e} (opset {exp['metadata']['opset']})")
    for name, t in times.items():
        print(f"   {name:30s} {t:8.2f} s   {nvox / t / 1e6:7.3f} M voxels/s")
    ratio = times["torch eager float32"] / times["onnxruntime float32"]
    print(f"   onnxruntime / torch eager (float32) speed ratio: {ratio:.2f}x (target >= 1.3x)")
    d = float(np.max(np.abs(outs["onnxruntime float32"] - outs["torch eager float32"])))
    print(f"   max |onnxruntime - torch| over the whole volume: {d:.2e}")
    whole = predict_volume(vol, ort_net, tile_shape=(-1, -1, -1))
    tiled = predict_volume(vol, ort_net, tile_shape=(shape[0] // 2, shape[1] // 2, shape[2] // 2),
                           overlap=DEFAULT_OVERLAP)
    print(f"   tiling error ({'trained' if args.checkpoint else 'random'} weights; tiles of half the volume vs the "
          f"whole volume at once): max |diff| = "
          f"{float(np.max(np.abs(tiled - whole))):.3e}, mean |diff| = {float(np.mean(np.abs(tiled - whole))):.3e}")
    return onnx_path


def reference_tiler_redundancy(shape, patch=(64, 128, 128), overlap=(8, 16, 16), crop=(8, 32, 32)):
    """The Cellpose3D reference tiler: starts k*s - O - C for k < ceil((D + O + C) / s), s = P - O - 2C."""
    r = 1.0
    for d, p, o, c in zip(shape, patch, overlap, crop):
        s = p - o - 2 * c
        r *= math.ceil((d + o + c) / s) * p / d
    return r


def bench_redundancy():
    from c3dseg.tiling import plan_tiles, stride_to_overlap

    print(f"== tile redundancy (network voxels / output voxels); default = OnnxModel tiles up to "
          f"{'x'.join(map(str, DEFAULT_TILE))}, overlap {DEFAULT_OVERLAP}")
    print(f"   {'volume (ZYX)':>16s} {'default':>9s} {'XPIWIT 64x256x256 s0.5':>24s} {'reference tiler':>16s}")
    xp_tile = (64, 256, 256)
    for shape in [(64, 128, 128), (100, 512, 512), (139, 512, 512), (64, 256, 256), (200, 1024, 1024)]:
        ours = plan_tiles(shape, DEFAULT_TILE, DEFAULT_OVERLAP).redundancy
        xp = plan_tiles(shape, xp_tile, tuple(stride_to_overlap(t, 0.5) for t in xp_tile), shrink=False).redundancy
        ref = reference_tiler_redundancy(shape)
        print(f"   {'x'.join(map(str, shape)):>16s} {ours:9.2f} {xp:24.2f} {ref:16.2f}")


_MEM_CHILD = r"""
import json, os, sys, numpy as np
sys.path.insert(0, {root!r})
from benchmarks.inference import membrane_volume
from c3dseg.predict import OnnxNetwork, predict_volume
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
shape = tuple({shape!r})
vol = membrane_volume(shape)
net = OnnxNetwork({model!r}, threads={threads})
net(np.zeros((1, 1, 8, 8, 8), np.float32))
with open('/proc/self/clear_refs', 'w') as fh:
    fh.write('5')  # reset the peak (VmHWM) to the current resident size
base = status('VmRSS')
out = predict_volume(vol, net, tile_shape={tile!r}, overlap={overlap})
peak = status('VmHWM')
print(json.dumps({{"added": peak - base, "output": out.nbytes}}))
"""


def bench_memory(args, model):
    root = os.path.dirname(HERE)
    small = args.mem_shape
    big = tuple(2 * s for s in small)
    tile = args.mem_tile
    res = {}
    for shape in (small, big):
        code = _MEM_CHILD.format(root=root, shape=list(shape), model=model, threads=args.threads,
                                 tile=tile, overlap=DEFAULT_OVERLAP)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr)
            raise SystemExit("memory child failed")
        res[shape] = json.loads(p.stdout.strip().splitlines()[-1])
    mb = 2 ** 20
    from c3dseg.tiling import plan_tiles

    print(f"== peak memory added by a prediction (onnxruntime, tiles up to {'x'.join(map(str, tile))}, uint16 input, "
          f"fresh process each)")
    for shape, r in res.items():
        plan = plan_tiles(shape, tile, DEFAULT_OVERLAP)
        print(f"   {'x'.join(map(str, shape)):>14s}: +{r['added'] / mb:8.1f} MiB peak, outputs {r['output'] / mb:8.1f} MiB,"
              f" {plan.n_tiles} tile(s) of {'x'.join(map(str, plan.tile))} "
              f"({(r['added'] - r['output']) / np.prod(plan.tile):.0f} B per tile voxel besides the outputs)")
    growth = res[big]["added"] - res[small]["added"]
    out_growth = res[big]["output"] - res[small]["output"]
    verdict = "within" if growth <= out_growth else "ABOVE"
    print(f"   the 8x larger volume adds {growth / mb:+.1f} MiB of peak memory while its outputs are "
          f"{out_growth / mb:.1f} MiB larger: {verdict} the target (no more than the outputs' growth)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volumes (about 1 minute)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--checkpoint", help="a c3d-train checkpoint instead of random weights")
    args = ap.parse_args(argv)
    args.shape = (48, 96, 96) if args.quick else (64, 256, 256)
    # the small volume is exactly one tile; the 8x larger one is cut into tiles no larger
    args.mem_tile = (32, 64, 64) if args.quick else DEFAULT_TILE
    args.mem_shape = args.mem_tile
    import onnxruntime
    import torch

    print(f"c3dseg inference benchmark: onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    bench_redundancy()
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_speed(args, tmp)
        bench_memory(args, model)


if __name__ == "__main__":
    main()

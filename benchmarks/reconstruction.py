"""Flows from labels and instance reconstruction: c3dseg against Cellpose 4 (CPU), same volumes.

    python benchmarks/reconstruction.py            # 128^3 (~240 cells) and 192^3 (~800 cells)
    python benchmarks/reconstruction.py --quick    # 64^3 and 96^3, a minute or two

Our side runs in this process; Cellpose runs in the benchmark environment ``.venv-bench``
(``../shared/reference/peers.md`` section 1.2 says how to make it) as a subprocess on the same
label volumes, saved to a temporary folder.  Each tool computes its own flows from the labels:
ours with :func:`c3dseg.flows.tanh_flows` / :func:`c3dseg.flows.heat_flows`, Cellpose with
``dynamics.masks_to_flows_gpu_3d`` (default iterations); each reconstructs from its own flows:
ours with :func:`c3dseg.reconstruction.reconstruct` (the paper's parameters), Cellpose with
``dynamics.compute_masks(do_3D=True, niter=200, flow_threshold=0)`` on ``dP = 5 x flows`` and
the foreground as cellprob (threshold 0.5).  Noise: Gaussian, sigma 0.3, added to each flow
channel (same recipe, seed 0).  Accuracy is scored by :mod:`c3dseg.metrics` for both tools
(Cellpose's own ``metrics.average_precision`` is printed beside ours as a cross-check).

Printed: a table with both tools side by side and the ratios.  Timings are the best of
``--repeat`` runs for our side and one run for Cellpose's (minutes each); nothing here is typed
by hand.  If the benchmark environment is missing, only our side is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from c3dseg.flows import heat_flows, tanh_flows  # noqa: E402
from c3dseg.metrics import average_precision, mean_cell_dice  # noqa: E402
from c3dseg.reconstruction import reconstruct  # noqa: E402
from c3dseg.synthesis import voronoi_labels  # noqa: E402

NOISE_SIGMA = 0.3
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_PEER = os.path.join(ROOT, ".venv-bench", "bin", "python")

# Runs inside .venv-bench.  argv: mode (flows | masks), input .npy, output prefix, [noisy 0/1, smooth]
PEER_SCRIPT = r'''
import json, os, resource, sys, time, types
import numpy as np
for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
             "torchvision.transforms._functional_tensor"):
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
sys.modules["torchvision.transforms"]._functional_tensor = sys.modules["torchvision.transforms._functional_tensor"]
import torch
torch.set_num_threads(int(os.environ.get("PEER_THREADS", "2")))
import cellpose
from cellpose import dynamics, metrics
cpu = torch.device("cpu")
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")

if mode == "flows":
    labels = np.load(src)
    t = time.perf_counter()
    flows = dynamics.masks_to_flows_gpu_3d(labels, device=cpu)
    dt = time.perf_counter() - t
    np.save(out + "_flows.npy", np.asarray(flows, np.float32))
    print(json.dumps({"time": dt, "version": cellpose.version if hasattr(cellpose, "version") else "?"}))
else:
    noisy, smooth = sys.argv[4] == "1", float(sys.argv[5])
    labels = np.load(src)
    flows = np.load(out + "_flows.npy")
    if noisy:
        flows = flows + np.random.default_rng(0).normal(0, %(sigma)r, flows.shape).astype(np.float32)
    if smooth > 0:
        from scipy.ndimage import gaussian_filter
        flows = np.stack([gaussian_filter(c, smooth) for c in flows]).astype(np.float32)
    dP = (5.0 * flows).astype(np.float32)
    cellprob = (labels > 0).astype(np.float32)
    base = rss_mb()
    t = time.perf_counter()
    masks = dynamics.compute_masks(dP, cellprob, niter=200, cellprob_threshold=0.5, flow_threshold=0.0,
                                   do_3D=True, min_size=-1, device=cpu)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    masks = np.asarray(masks)
    np.save(out + "_masks.npy", masks)
    # cellpose.metrics counts cells as len(unique) - 1, assuming a background voxel: pad one in
    pad = lambda a: np.pad(a.astype(np.int32), 1)
    ap = metrics.average_precision([pad(labels)], [pad(masks)], threshold=[0.5])[0]
    print(json.dumps({"time": dt, "peak_rss_mb": peak, "base_rss_mb": base,
                      "cellpose_ap50": float(np.ravel(ap)[0])}))
''' % {"sigma": NOISE_SIGMA}


# ---------------------------------------------------------------------------------------------

def best_time(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def score(gt, pred):
    ap = average_precision(gt, pred, (0.5, 0.75))[0]
    return {"ap50": float(ap[0]), "ap75": float(ap[1]), "dice": mean_cell_dice(gt, pred)}


def peak_ratio(fn, input_bytes):
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / input_bytes


def our_side(labels, repeat):
    res = {}
    fg = (labels > 0).astype(np.float32)
    t, tf = best_time(lambda: tanh_flows(labels), repeat)
    res["tanh_flows_s"] = t
    t, hf = best_time(lambda: heat_flows(labels), 1)
    res["heat_flows_s"] = t
    rng = np.random.default_rng(0)
    noise = rng.normal(0, NOISE_SIGMA, (3,) + labels.shape).astype(np.float32)
    for name, flows in (("tanh", tf), ("heat", hf)):
        t, rec = best_time(lambda: reconstruct(fg, flows, flow_type=name), repeat)
        res[f"{name}_rec_s"] = t
        res[f"{name}_clean"] = score(labels, rec)
        rec = reconstruct(fg, flows + noise, flow_type=name)
        res[f"{name}_noisy"] = score(labels, rec)
        inputs = fg.nbytes + flows.nbytes
        res[f"{name}_peak_ratio"] = peak_ratio(lambda: reconstruct(fg, flows, flow_type=name), inputs)
    res["inputs_mb"] = 16 * labels.size / 2 ** 20
    return res


def peer_side(peer, labels, tmp, tag):
    script = os.path.join(tmp, "peer.py")
    with open(script, "w") as f:
        f.write(PEER_SCRIPT)
    src = os.path.join(tmp, f"{tag}_labels.npy")
    np.save(src, labels.astype(np.int32))
    prefix = os.path.join(tmp, tag)

    def call(*args):
        r = subprocess.run([peer, script, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"Cellpose run failed: {r.stderr.strip().splitlines()[-1:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    res = {"flows_s": call("flows", src, prefix)["time"]}
    for key, noisy, smooth in (("clean", 0, 0.0), ("noisy", 1, 0.0), ("noisy_smooth", 1, 1.0)):
        out = call("masks", src, prefix, str(noisy), str(smooth))
        masks = np.load(prefix + "_masks.npy")
        res[key] = score(labels, masks)
        res[key]["cellpose_ap50"] = out["cellpose_ap50"]
        if key == "clean":
            res["rec_s"] = out["time"]
            res["peak_ratio"] = (out["peak_rss_mb"] - out["base_rss_mb"]) / (16 * labels.size / 2 ** 20)
    return res


def peer_available(peer):
    if not os.path.exists(peer):
        return False, f"{peer} not found"
    r = subprocess.run([peer, "-c", "import cellpose, torch, fastremap"], capture_output=True, text=True)
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


# ---------------------------------------------------------------------------------------------

def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small volumes (64^3, 96^3)")
    ap.add_argument("--peer-python", default=DEFAULT_PEER, help="python of the Cellpose environment")
    ap.add_argument("--no-peer", action="store_true", help="our side only")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing of our side (best taken)")
    args = ap.parse_args(argv)

    if args.quick:
        volumes = [((64,) * 3, 30), ((96,) * 3, 100)]
        scaling = [((96,) * 3, 25), ((96,) * 3, 500)]
    else:
        volumes = [((128,) * 3, 240), ((192,) * 3, 800)]
        scaling = [((160,) * 3, 100), ((160,) * 3, 2000)]
    have_peer, why = (False, "--no-peer") if args.no_peer else peer_available(args.peer_python)
    print(f"c3dseg reconstruction benchmark; numpy {np.__version__}; {os.cpu_count()} CPU cores")
    print("Cellpose: " + ("dynamics from " + args.peer_python if have_peer else f"absent ({why}); our side only"))
    print()

    with tempfile.TemporaryDirectory() as tmp:
        for shape, n in volumes:
            labels = voronoi_labels(shape, n, seed=0)
            tag = "x".join(map(str, shape))
            print(f"== {tag}, {int(labels.max())} cells (dense Voronoi), {labels.size / 1e6:.1f} M voxels ==")
            ours = our_side(labels, args.repeat)
            peer = None
            if have_peer:
                try:
                    peer = peer_side(args.peer_python, labels, tmp, tag)
                except RuntimeError as e:
                    print(f"  Cellpose failed: {e}")
            p = peer or {}
            rows = [("measure", "c3dseg tanh", "c3dseg heat", "Cellpose", "ratio (target)")]
            for key, label in (("clean", "round trip"), ("noisy", f"noise {NOISE_SIGMA}")):
                for m, mname in (("ap50", "AP@0.5"), ("ap75", "AP@0.75"), ("dice", "mean Dice")):
                    rows.append((f"{label} {mname}", fmt(ours[f"tanh_{key}"][m]), fmt(ours[f"heat_{key}"][m]),
                                 fmt(p.get(key, {}).get(m)), ">= 0.99" if key == "clean" else
                                 ("AP >= Cellpose's" if m == "ap50" else "")))
            if peer:
                rows.append((f"noise {NOISE_SIGMA} + Cellpose smoothing sigma 1, AP@0.5", "", "",
                             fmt(p["noisy_smooth"]["ap50"]), ""))
                rows.append(("Cellpose AP@0.5 by cellpose.metrics (clean / noisy)", "", "",
                             f"{p['clean']['cellpose_ap50']:.3f} / {p['noisy']['cellpose_ap50']:.3f}", ""))
            rows.append(("flows from labels [s]", fmt(ours["tanh_flows_s"], ".2f"), fmt(ours["heat_flows_s"], ".2f"),
                         fmt(p.get("flows_s"), ".1f"),
                         (f"tanh {p['flows_s'] / ours['tanh_flows_s']:.0f}x (>= 100), heat "
                          f"{p['flows_s'] / ours['heat_flows_s']:.1f}x (>= 10)") if peer else ""))
            rows.append(("reconstruction [s]", fmt(ours["tanh_rec_s"], ".2f"), fmt(ours["heat_rec_s"], ".2f"),
                         fmt(p.get("rec_s"), ".1f"),
                         (f"tanh {p['rec_s'] / ours['tanh_rec_s']:.1f}x, heat {p['rec_s'] / ours['heat_rec_s']:.1f}x"
                          " (>= 10)") if peer else ""))
            rows.append(("reconstruction peak memory / float32 inputs", fmt(ours["tanh_peak_ratio"], ".2f"),
                         fmt(ours["heat_peak_ratio"], ".2f"), fmt(p.get("peak_ratio"), ".1f"), "<= 2"))
            print_table(rows)
            print(f"  (float32 inputs: foreground + 3 flows = {ours['inputs_mb']:.0f} MB; ours: tracemalloc peak; "
                  "Cellpose: peak RSS growth during compute_masks)")
            print()

        print("== cost against the number of cells (tanh flows, reconstruction) ==")
        times = []
        for shape, n in scaling:
            labels = voronoi_labels(shape, n, seed=1)
            fg = (labels > 0).astype(np.float32)
            flows = tanh_flows(labels)
            t, rec = best_time(lambda: reconstruct(fg, flows), args.repeat)
            times.append(t)
            print(f"  {'x'.join(map(str, shape))}, {int(labels.max())} cells: {t:.2f} s, "
                  f"AP@0.5 {score(labels, rec)['ap50']:.3f}")
        print(f"  time ratio many/few cells: {times[1] / times[0]:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()

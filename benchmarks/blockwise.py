"""Blockwise runs on Dask against whole-volume runs, measured in the same run.

    nice python benchmarks/blockwise.py [--quick] [--model MODEL.onnx] [--memory-limit 640MiB]

Prints, with the volume and block sizes of each part:

1. **Exactness** of the blockwise reconstruction (FlowReconstructionFilter pipeline) against
   :func:`c3dseg.reconstruction.reconstruct` on the whole volume, on noisy tanh flows of a dense
   Voronoi tissue cut into blocks whose corners lie inside cells: identical partition (equal up to
   renumbering) and identical numbers.  The peer: each block reconstructed alone (with the same
   halo) and the labels joined by face contact, the rule of Cellpose's distributed mode (re-implemented
   here), scored by AP@0.5 against the whole-volume labels.
2. **The full pipeline with a network** (ImageReader -> TorchModel -> threshold ->
   FlowReconstructionFilter), whole vs blockwise: AP@0.5 and mean per-cell Dice between the two
   label images.  ``--model`` takes an ONNX model exported by c3d-export; without one, the model
   shipped in ``c3dseg/models/`` is used, else a tiny untrained network built here (what is measured
   is then only the agreement of tiled prediction across block borders, not segmentation quality).
3. **Memory**: a reconstruction-only pipeline on a volume whose float32 flows are 4x a worker's
   memory limit, 2 local workers; each worker's peak resident memory is printed against the limit.
4. **Speed-up**: the same blockwise reconstruction with 2 workers vs 1 (2-core machine), clusters
   started beforehand.
5. **segment.xml** (the default pipeline: diameter estimate, resampling to the model's scale, network,
   tracking, instance filters, back to the input grid), whole vs blockwise on a c3d-synth stack
   (``--segment-shape``, ``--segment-blocks``): the grids the run used, AP@0.5 and mean per-cell
   Dice between the two label images, and both times.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c3dseg.image import Image  # noqa: E402

MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def noisy_prediction(labels, rng, noise=0.15):
    """Foreground and tanh flows of ``labels`` with Gaussian noise (a stand-in for a network)."""
    from c3dseg.flows import labels_to_prediction

    pred = labels_to_prediction(labels)
    pred[1:] += rng.normal(0, noise, pred[1:].shape).astype(np.float32)
    pred[0] = np.clip(pred[0] + rng.normal(0, 0.2, labels.shape), 0, 1).astype(np.float32)
    return pred


def lattice_seeds(shape, spacing_vox, seed=0):
    """Seeds on a jittered cubic lattice (cell centres), (K, 3) float."""
    rng = np.random.default_rng(seed)
    axes = [np.arange(spacing_vox / 2, s + spacing_vox, spacing_vox) for s in shape]
    g = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return g + rng.uniform(-0.3, 0.3, g.shape) * spacing_vox


def synthetic_block(block, seeds, paths, noise, seed):
    """Dask task: foreground and noisy flows (pointing away from the nearest seed) of one block,
    written to the four zarr arrays ``paths``: a Voronoi tissue of any size, made block by block."""
    import zarr
    from scipy.spatial import cKDTree

    tree = cKDTree(seeds)
    zz, yy, xx = np.meshgrid(*[np.arange(a, b) for a, b in zip(block.start, block.stop)], indexing="ij")
    pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1).astype(np.float64)
    _, nearest = tree.query(pts)
    c = seeds[nearest]
    rng = np.random.default_rng([seed] + list(block.index))
    fg = np.ones(block.shape, np.float32)
    fg[zz % 97 < 3] = 0          # a few background sheets
    zarr.open_array(paths[0], mode="r+")[block.core] = fg
    for a in range(3):
        f = np.tanh((pts[:, a] - c[:, a]) / 3.0).reshape(block.shape).astype(np.float32)
        f += rng.normal(0, noise, f.shape).astype(np.float32)
        f[fg == 0] = 0
        zarr.open_array(paths[a + 1], mode="r+")[block.core] = f
    return None


def make_synthetic_inputs(client, folder, shape, block, cell=12.0, noise=0.1, seed=0):
    """Four OME-Zarr inputs (foreground, flow z, y, x) of ``shape`` written blockwise by ``client``."""
    from c3dseg.blockwise.grid import BlockGrid
    from c3dseg.blockwise.runtime import Runtime
    from c3dseg.zarr_io import create_zarr

    from c3dseg.zarr_io import open_volume

    paths = [os.path.join(folder, f"{name}.ome.zarr") for name in ("fg", "fz", "fy", "fx")]
    marker = os.path.join(folder, f"inputs-{'x'.join(map(str, shape))}-{seed}.done")
    if os.path.exists(marker) and all(os.path.isdir(p) and open_volume(p).shape == tuple(shape) for p in paths):
        return paths                      # made by an earlier run with --work
    for p in paths:
        create_zarr(p, shape, np.float32, chunks=block, overwrite=True)
    grid = BlockGrid(shape, block)
    rt = Runtime(client, grid, os.path.join(folder, "gen-work"))
    seeds = lattice_seeds(shape, cell, seed)
    rt.run_pass("gen", synthetic_block, seeds, [p + "/0" for p in paths], noise, seed, collect=False)
    shutil.rmtree(os.path.join(folder, "gen-work"), ignore_errors=True)
    open(marker, "w").close()
    return paths


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------

def reconstruction_xml(params: dict, n_inputs=4) -> bytes:
    from xml.sax.saxutils import quoteattr

    def item(iid, name, inputs, params):
        ins = "".join(f'<image item_id_ref="{s}" number_of_output="{n}"/>' for s, n in inputs)
        args = "".join(f'<parameter key={quoteattr(k)} value={quoteattr(str(v))} type="0"/>' for k, v in params.items())
        return (f'<item item_id="{iid}"><name>{name}</name><description/><input number_images="{len(inputs)}" '
                f'number_meta="0">{ins}</input><output number_images="1" number_meta="0"><image number="1"/>'
                f'</output><arguments>{args}</arguments></item>')

    items = [item(f"item_000{c + 1}", "ImageReader", [("cmd", c)], {"KeepDataType": 1}) for c in range(n_inputs)]
    items.append(item("item_0005", "FlowReconstructionFilter", [(f"item_000{c + 1}", 1) for c in range(4)],
                      dict(params, WriteResult=1)))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<xpiwit><pipeline>' + "".join(items) +
            "</pipeline></xpiwit>\n").encode()


def network_xml(model: str, params: dict, patch=(64, 64, 64)) -> bytes:
    from xml.sax.saxutils import quoteattr

    def item(iid, name, inputs, params, n_out=1):
        ins = "".join(f'<image item_id_ref="{s}" number_of_output="{n}"/>' for s, n in inputs)
        outs = "".join(f'<image number="{k}"/>' for k in range(1, n_out + 1))
        args = "".join(f'<parameter key={quoteattr(k)} value={quoteattr(str(v))} type="0"/>' for k, v in params.items())
        return (f'<item item_id="{iid}"><name>{name}</name><description/><input number_images="{len(inputs)}" '
                f'number_meta="0">{ins}</input><output number_images="{n_out}" number_meta="0">{outs}</output>'
                f'<arguments>{args}</arguments></item>')

    items = [
        item("item_0001", "ImageReader", [("cmd", 0)], {}),
        item("item_0002", "TorchModel", [("item_0001", 1)],
             {"ModelPath": model, "UseGPU": 0, "PatchDepth": patch[0], "PatchHeight": patch[1],
              "PatchWidth": patch[2], "PatchStride": 0.75}, n_out=4),
        item("item_0005", "FlowReconstructionFilter", [("item_0002", 1), ("item_0002", 2), ("item_0002", 3),
                                                       ("item_0002", 4)], dict(params, WriteResult=1)),
    ]
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<xpiwit><pipeline>' + "".join(items) +
            "</pipeline></xpiwit>\n").encode()


def load_plan(xml: bytes, folder: str, name: str):
    from c3dseg.runner.pipeline import Pipeline
    from c3dseg.runner.plan import build_plan

    path = os.path.join(folder, name + ".xml")
    with open(path, "wb") as f:
        f.write(xml)
    return build_plan(Pipeline.load(path))


def run_block(plan, inputs, out, block, client, **kw):
    from c3dseg.blockwise.executor import BlockwiseOptions, run_blockwise
    from c3dseg.runner.executor import Target
    from c3dseg.zarr_io import open_volume

    # an unfinished run of the same command in --work resumes; anything else is replaced
    unfinished = os.path.isdir(os.path.join(out, ".c3dseg-work"))
    opts = BlockwiseOptions(block=block, client=client, overwrite=not unfinished, report_memory=True, **kw)
    t0 = time.perf_counter()
    run_blockwise(plan, inputs, Target(out, True), opts)
    dt = time.perf_counter() - t0
    return open_volume(out), opts, dt


def cluster(workers, memory_limit=None):
    from c3dseg.blockwise.runtime import ClusterOptions, open_client

    return open_client(ClusterOptions(workers=workers, memory_limit=memory_limit))


def ap50(ref, other) -> float:
    from c3dseg.metrics import average_precision

    return float(average_precision(ref, other, thresholds=(0.5,))[0][0])


def same_partition(a, b) -> bool:
    """Equal up to renumbering: a one-to-one correspondence of the labels, background to background."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0].astype(np.int64), b[b > 0].astype(np.int64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


# ---------------------------------------------------------------------------------------------
# the peer: blocks alone, joined by face contact
# ---------------------------------------------------------------------------------------------

def face_merge(pred, block, halo, kw):
    """Each block reconstructed alone on its core grown by ``halo`` (cropped back), ids made unique,
    then labels that still touch across a block face after shrinking each face's labels by one pixel
    in the face plane are joined (connected components of the contact graph): the merge rule of
    Cellpose's distributed mode, re-implemented here for the comparison."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from c3dseg.blockwise.grid import BlockGrid
    from c3dseg.reconstruction import reconstruct

    shape = pred.shape[1:]
    grid = BlockGrid(shape, block)
    out = np.zeros(shape, np.int64)
    offset = 0
    for b in grid:
        r = b.region(halo, shape)
        lab = reconstruct(pred[0][r.slices], pred[1:][(slice(None),) + r.slices], **kw)[r.crop].astype(np.int64)
        lab[lab > 0] += offset
        offset = max(offset, int(lab.max()))
        out[b.core] = lab
    def shrink(plane):
        """Labels eroded by one pixel in the plane (a pixel keeps its label when its 4 neighbours share it)."""
        keep = plane > 0
        p = np.pad(plane, 1, mode="edge")
        for sl in ((slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1)),
                   (slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None))):
            keep &= p[sl] == plane
        return np.where(keep, plane, 0)

    edges = []
    for a in range(3):
        for cut in range(grid.block[a], shape[a], grid.block[a]):
            lo = shrink(np.take(out, cut - 1, axis=a))
            hi = shrink(np.take(out, cut, axis=a))
            m = (lo > 0) & (hi > 0)
            edges.append(np.stack([lo[m], hi[m]], 1))
    e = np.unique(np.concatenate(edges), axis=0) if edges else np.zeros((0, 2), np.int64)
    n = offset + 1
    g = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    comp = comp + 1
    comp[0] = 0
    return comp[out]


# ---------------------------------------------------------------------------------------------
# the parts
# ---------------------------------------------------------------------------------------------

def part_exactness(work, client, quick):
    from c3dseg.reconstruction import reconstruct
    from c3dseg.synthesis import voronoi_labels
    from c3dseg.zarr_io import write_zarr

    shape = (48, 96, 96) if quick else (96, 160, 160)
    n_cells = 120 if quick else 700
    lab = voronoi_labels(shape, n_cells, seed=11)
    lab[:, :4] = 0
    pred = noisy_prediction(lab, np.random.default_rng(11))
    params = {"StepSize": 2, "NumIterations": 20, "ClosingRadius": 2, "MinRadiusVoxels": 2, "MaxRadiusVoxels": 30}
    kw = dict(step=2.0, n_iter=20, closing_radius=2, min_radius_voxels=2.0, max_radius_voxels=30.0)
    t0 = time.perf_counter()
    whole = reconstruct(pred[0], pred[1:], **kw)
    t_whole = time.perf_counter() - t0
    inputs = {c: write_zarr(os.path.join(work, f"ex{c}.ome.zarr"), Image(pred[c]), chunks=(32, 64, 64))
              for c in range(4)}
    plan = load_plan(reconstruction_xml(params), work, "exact")
    print(f"1. exactness: volume {'x'.join(map(str, shape))}, {int(whole.max())} cells (whole-volume run "
          f"{t_whole:.1f} s)")
    for block in ([s // 2 for s in shape], [s // 3 + 5 for s in shape]):
        vol, opts, dt = run_block(plan, inputs, os.path.join(work, "exact.ome.zarr"), tuple(block), client)
        res = vol.read()
        g = opts.stats["grid"]
        peer = face_merge(pred, tuple(block), g["halo"], kw)
        ap_peer = ap50(whole, peer)
        print(f"   blocks {'x'.join(map(str, g['block']))} ({g['blocks']}): identical partition "
              f"{same_partition(res, whole)}, identical labels {np.array_equal(res, whole)}, "
              f"{int(res.max())} cells, {dt:.1f} s; peer (blocks alone + face merge): {int(len(np.unique(peer)) - 1)} "
              f"cells, AP@0.5 vs whole {ap_peer:.3f}")


def handcrafted_model(path, spacing, sigma=1.5, gain=20.0, tissue=0.05):
    """A fixed-weight convolutional "network" in ONNX that segments membrane images without
    training: flows = tanh(gain * grad(G_sigma * image)) (membranes are bright, so the gradient of
    the blurred image points away from the cell centres), foreground = sigmoid(40 * (G_4sigma * image
    - tissue)).  sigma in voxels along y/x (z scaled by the spacing).  Its receptive field is as wide
    as a real U-Net's, so tiles and blocks matter as they do for a trained model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ratio = spacing[1] / spacing[0]
    nodes, inits = [], []

    def gauss1d(s):
        r = max(1, int(math.ceil(3 * s)))
        t = np.arange(-r, r + 1, dtype=np.float64)
        k = np.exp(-0.5 * (t / max(s, 1e-3)) ** 2)
        return (k / k.sum()).astype(np.float32), r

    def blur(src, s_yx, tag):
        out = src
        for a, s in enumerate((s_yx * ratio, s_yx, s_yx)):
            k, r = gauss1d(s)
            shape = [1, 1, 1, 1, 1]
            shape[2 + a] = len(k)
            inits.append(numpy_helper.from_array(k.reshape(shape), f"{tag}k{a}"))
            pads = [0, 0, 0, 0, 0, 0]
            pads[a] = pads[3 + a] = r
            nodes.append(helper.make_node("Conv", [out, f"{tag}k{a}"], [f"{tag}{a}"], pads=pads))
            out = f"{tag}{a}"
        return out

    b = blur("input", sigma, "b")
    grad = np.zeros((3, 1, 3, 3, 3), np.float32)
    grad[0, 0, 2, 1, 1], grad[0, 0, 0, 1, 1] = 0.5, -0.5
    grad[1, 0, 1, 2, 1], grad[1, 0, 1, 0, 1] = 0.5, -0.5
    grad[2, 0, 1, 1, 2], grad[2, 0, 1, 1, 0] = 0.5, -0.5
    inits.append(numpy_helper.from_array(grad * np.float32(gain), "grad"))
    nodes.append(helper.make_node("Conv", [b, "grad"], ["g"], pads=[1] * 6))
    nodes.append(helper.make_node("Tanh", ["g"], ["flows"]))
    t = blur("input", 4 * sigma, "f")
    inits += [numpy_helper.from_array(np.array(tissue, np.float32), "thr"),
              numpy_helper.from_array(np.array(40.0, np.float32), "sharp")]
    nodes += [helper.make_node("Sub", [t, "thr"], ["t1"]), helper.make_node("Mul", ["t1", "sharp"], ["t2"]),
              helper.make_node("Sigmoid", ["t2"], ["fg"]),
              helper.make_node("Concat", ["fg", "flows"], ["output"], axis=1)]
    g = helper.make_graph(nodes, "handcrafted", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                               [None, 1, None, None, None])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 4, None, None, None])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in {"channels": "foreground,flow_z,flow_y,flow_x", "size_divisor": "8", "in_channels": "1",
                 "foreground_activation": "sigmoid", "normalization": "percentile", "norm_percentiles": "1,99.8",
                 "flow_type": "tanh"}.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.save(m, path)
    return path


def part_network(work, client, model, quick):
    from c3dseg.io import read_image, write_image
    from c3dseg.metrics import mean_cell_dice
    from c3dseg.runner.executor import RunOptions, Target, execute
    from c3dseg.synthesis import make_sample

    shape = (48, 96, 96) if quick else (64, 256, 256)
    img, gt, spacing, _ = make_sample("validation", seed=3, shape=shape)
    src = os.path.join(work, "sample.tif")
    write_image(src, Image(img, spacing))
    if model is None:
        shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "c3dseg", "models")
        cands = sorted((f for f in os.listdir(shipped) if f.endswith(".onnx")), key=lambda f: (f != "tanh.onnx", f)) \
            if os.path.isdir(shipped) else []
        model = os.path.join(shipped, cands[0]) if cands else \
            handcrafted_model(os.path.join(work, "handcrafted.onnx"), spacing)
        kind = "shipped model" if cands else "no trained model here: a hand-made fixed-weight conv model"
    else:
        kind = "given model"
    params = {"StepSize": 2, "NumIterations": 30, "ClosingRadius": 2, "MinRadiusVoxels": 2, "MaxRadiusVoxels": 40,
              "MaxFlowError": -1}
    plan = load_plan(network_xml(os.path.abspath(model), params), work, "network")
    t0 = time.perf_counter()
    execute(plan, {0: src}, Target(os.path.join(work, "net_whole.tif"), True), RunOptions(overwrite=True))
    t_whole = time.perf_counter() - t0
    whole = read_image(os.path.join(work, "net_whole.tif")).data
    block = (shape[0], shape[1] // 2, shape[2] // 2)       # blocks of 2 x 2 tiles: cells cross block faces
    plan = load_plan(network_xml(os.path.abspath(model), params), work, "network")
    vol, opts, dt = run_block(plan, {0: src}, os.path.join(work, "net.ome.zarr"), block, client)
    res = vol.read()
    ap = ap50(whole, res)
    dice = float(mean_cell_dice(whole, res))
    g = opts.stats["grid"]
    print(f"2. network pipeline ({kind}: {os.path.basename(model)}): volume {'x'.join(map(str, shape))}, blocks "
          f"{'x'.join(map(str, g['block']))} ({g['blocks']}, halo {'x'.join(map(str, g['halo']))}); whole "
          f"{int(whole.max())} cells in {t_whole:.1f} s, blockwise {int(res.max())} cells in {dt:.1f} s; "
          f"blockwise vs whole: AP@0.5 {ap:.4f}, mean cell Dice {dice:.4f} (against the true cells: whole "
          f"AP@0.5 {ap50(gt, whole):.3f}, blockwise {ap50(gt, res):.3f})")


def part_memory(work, limit, quick):
    from c3dseg.blockwise.runtime import close_client, parse_memory

    lim = parse_memory(limit)
    flows_bytes = 4 * lim
    n = flows_bytes / 12.0                     # 3 float32 channels
    yx = int(round((n / 0.5) ** (1 / 3) / 32)) * 32
    z = int(math.ceil(n / (yx * yx) / 16)) * 16
    shape = (z, yx, yx)
    block = (48, 96, 96)
    client, cl = cluster(2, limit)
    try:
        before = set(client.scheduler_info()["workers"])
        t0 = time.perf_counter()
        paths = make_synthetic_inputs(client, work, shape, block)
        t_gen = time.perf_counter() - t0
        params = {"StepSize": 2, "NumIterations": 15, "ClosingRadius": 2, "MinRadiusVoxels": 2, "MaxRadiusVoxels": 20,
                  "SmoothingSigma": 1}
        plan = load_plan(reconstruction_xml(params), work, "memory")
        vol, opts, dt = run_block(plan, dict(enumerate(paths)), os.path.join(work, "mem.ome.zarr"), block, client)
        after = set(client.scheduler_info()["workers"])
        peaks = opts.stats.get("worker_peak_bytes", {})
        labels = int(vol.read((slice(0, block[0]), slice(None), slice(None))).max())
    finally:
        close_client(client, cl)
    flows_gib = 12.0 * np.prod(shape) / 2 ** 30
    print(f"3. memory: volume {'x'.join(map(str, shape))} ({np.prod(shape) / 1e6:.0f} M voxels), float32 flows "
          f"{flows_gib:.2f} GiB = {12.0 * np.prod(shape) / lim:.1f} x the worker limit {lim / MiB:.0f} MiB; blocks "
          f"{'x'.join(map(str, block))} ({opts.stats['grid']['blocks']}); inputs written in {t_gen:.0f} s, "
          f"reconstruction {dt:.0f} s; workers restarted: {len(before - after)}")
    for w, p in sorted(peaks.items()):
        print(f"   worker {w}: peak {p / MiB:.0f} MiB ({100 * p / lim:.0f} % of the limit) "
              f"{'under' if p < lim else 'OVER'} the limit")


def part_speedup(work, quick):
    from c3dseg.blockwise.runtime import close_client

    shape = (64, 192, 192) if quick else (96, 256, 256)
    block = (48, 96, 96) if quick else (48, 64, 128)      # 16 blocks: the two workers stay busy to the end
    params = {"StepSize": 2, "NumIterations": 15, "ClosingRadius": 2, "MinRadiusVoxels": 2, "MaxRadiusVoxels": 20,
              "SmoothingSigma": 1}
    times = {}
    results = {}
    for workers in (1, 2):
        client, cl = cluster(workers)
        try:
            if workers == 1:
                paths = make_synthetic_inputs(client, work, shape, block, seed=5)
            plan = load_plan(reconstruction_xml(params), work, "speed")
            best = math.inf
            for _ in range(2):
                vol, opts, dt = run_block(plan, dict(enumerate(paths)), os.path.join(work, f"speed{workers}.ome.zarr"),
                                          block, client)
                best = min(best, dt)
            times[workers] = best
            results[workers] = vol.read()
        finally:
            close_client(client, cl)
    print(f"4. speed-up (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): volume "
          f"{'x'.join(map(str, shape))}, blocks {'x'.join(map(str, block))} "
          f"({opts.stats['grid']['blocks']}); 1 worker {times[1]:.1f} s, 2 workers {times[2]:.1f} s: "
          f"{times[1] / times[2]:.2f}x (same labels: {np.array_equal(results[1], results[2])})")


def part_segment(work, client, shape, block):
    from c3dseg.io import read_image, write_image
    from c3dseg.metrics import mean_cell_dice
    from c3dseg.runner.executor import RunOptions, Target, execute
    from c3dseg.runner.pipeline import Pipeline
    from c3dseg.runner.plan import build_plan
    from c3dseg.synthesis import make_sample

    img, gt, spacing, _ = make_sample("validation", seed=5, shape=shape)
    src = os.path.join(work, "segment_in.tif")
    write_image(src, Image(img.astype(np.uint16), spacing))
    xml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "c3dseg", "pipelines",
                       "segment.xml")
    t0 = time.perf_counter()
    execute(build_plan(Pipeline.load(xml)), {0: src}, Target(os.path.join(work, "seg_whole.tif"), True),
            RunOptions(overwrite=True))
    t_whole = time.perf_counter() - t0
    whole = read_image(os.path.join(work, "seg_whole.tif")).data
    vol, opts, dt = run_block(build_plan(Pipeline.load(xml)), {0: src}, os.path.join(work, "seg.ome.zarr"), block,
                              client)
    res = vol.read()
    grids = "; ".join(f"{'x'.join(map(str, g['shape']))} in {g['blocks']} blocks" for g in opts.stats["grids"])
    print(f"5. segment.xml: volume {'x'.join(map(str, shape))}, blocks {'x'.join(map(str, block))} (grids: {grids}); "
          f"whole {int(whole.max())} cells in {t_whole:.1f} s, blockwise {int(res.max())} cells in {dt:.1f} s; "
          f"blockwise vs whole: AP@0.5 {ap50(whole, res):.4f}, mean cell Dice {float(mean_cell_dice(whole, res)):.4f}, "
          f"identical labels: {bool(np.array_equal(whole, res))}")
    slow = sorted(opts.stats["passes"].items(), key=lambda kv: -kv[1]["seconds"])[:3]
    print("   slowest passes: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in slow))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller volumes (a smoke run)")
    ap.add_argument("--model", help="ONNX model for part 2 (default: shipped model, else a tiny untrained one)")
    ap.add_argument("--memory-limit", default="640MiB", help="worker memory limit of part 3")
    ap.add_argument("--parts", default="12345", help="which parts to run")
    ap.add_argument("--work", help="work folder (default: a temporary one, removed)")
    ap.add_argument("--segment-shape", default="64,256,256", help="Z,Y,X of the stack of part 5")
    ap.add_argument("--segment-blocks", default="32,128,128", help="blocks of part 5")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="c3d-blockwise-")
    os.makedirs(work, exist_ok=True)
    print(f"c3dseg blockwise benchmark ({os.cpu_count()} cores, load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    try:
        if "1" in args.parts or "2" in args.parts or "5" in args.parts:
            from c3dseg.blockwise.runtime import close_client

            client, cl = cluster(2)
            try:
                if "1" in args.parts:
                    part_exactness(work, client, args.quick)
                if "2" in args.parts:
                    part_network(work, client, args.model, args.quick)
                if "5" in args.parts:
                    shape = tuple(int(v) for v in args.segment_shape.split(","))
                    block = tuple(int(v) for v in args.segment_blocks.split(","))
                    if args.quick:
                        shape, block = (32, 96, 96), (24, 48, 48)
                    part_segment(work, client, shape, block)
            finally:
                close_client(client, cl)
        if "3" in args.parts:
            part_memory(work, args.memory_limit, args.quick)
        if "4" in args.parts:
            part_speedup(work, args.quick)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

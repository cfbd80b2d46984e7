"""Generic filters and image I/O against their peers, on the same input in the same run.

    nice python benchmarks/generic_filters.py [--shape 96 192 192] [--cells 400] [--repeat 3]

Prints, per task, our time, the peer's time, the ratio peer/ours (> 1: we are faster) and a
check that both agree:

- DiscreteGaussian (variance 1 um^2, anisotropic spacing) vs ``SimpleITK.DiscreteGaussian``
  (both single-threaded);
- region properties (volume, centroid, bounding box) vs ``skimage.measure.regionprops``;
- volume-based region rejection vs ``skimage.morphology.remove_small_objects`` + relabelling;
- resampling to isotropic spacing (linear) vs ``skimage.transform.resize``;
- ImageJ TIFF write (zlib, atomic, calibrated) and read vs bare ``tifffile.imwrite`` / ``imread``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c3dseg.image import Image  # noqa: E402
from c3dseg.intensity import discrete_gaussian  # noqa: E402
from c3dseg.io import read_image, write_image  # noqa: E402
from c3dseg.regions import filter_by_volume, region_properties  # noqa: E402
from c3dseg.resampling import output_shape, resample  # noqa: E402
from c3dseg.synthesis import voronoi_labels  # noqa: E402


def best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def report(task, ours, peer, check):
    print(f"{task:<38s} ours {ours * 1e3:9.1f} ms   peer {peer * 1e3:9.1f} ms   "
          f"peer/ours {peer / ours:6.2f}   {check}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 192, 192))
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import SimpleITK as sitk
    import tifffile
    from skimage.measure import regionprops
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import relabel_sequential
    from skimage.transform import resize

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    shape = tuple(args.shape)
    spacing = (2.0, 0.5, 0.5)
    rng = np.random.default_rng(0)
    labels = voronoi_labels(shape, args.cells, seed=0, spacing=spacing)
    image = (rng.random(shape, dtype=np.float32) + (labels % 7).astype(np.float32))
    print(f"volume {shape} (z, y, x), spacing {spacing} um, {int(labels.max())} cells, "
          f"repeat {args.repeat}, best time")

    # discrete Gaussian
    t_ours, ours = best(lambda: discrete_gaussian(image, 1.0, spacing), args.repeat)
    ref = sitk.GetImageFromArray(image)
    ref.SetSpacing(spacing[::-1])
    t_peer, peer = best(lambda: sitk.GetArrayFromImage(
        sitk.DiscreteGaussian(ref, [1.0] * 3, 32, 0.01, True)), args.repeat)
    report("DiscreteGaussian vs SimpleITK", t_ours, t_peer,
           f"max |diff| {np.abs(ours - peer).max():.2e}")

    # region properties
    t_ours, props = best(lambda: region_properties(labels, spacing), args.repeat)
    t_peer, rp = best(lambda: [(r.label, r.area, r.centroid, r.bbox) for r in regionprops(labels)],
                      args.repeat)
    same = (np.array_equal(props["label"], [r[0] for r in rp])
            and np.array_equal(props["volume"], [r[1] for r in rp])
            and np.allclose(props["centroid_z"], [r[2][0] for r in rp])
            and np.array_equal(props["bbox_x_max"], [r[3][5] - 1 for r in rp]))
    report("region properties vs regionprops", t_ours, t_peer, f"identical: {same}")

    # volume rejection (labels in, labels out)
    min_vol = int(np.median(np.bincount(labels.ravel())[1:]))
    t_ours, kept = best(lambda: filter_by_volume(labels, min_vol), args.repeat)
    t_peer, kept_peer = best(lambda: relabel_sequential(
        remove_small_objects(labels, max_size=min_vol - 1))[0], args.repeat)
    report("volume rejection vs remove_small", t_ours, t_peer,
           f"identical: {np.array_equal(kept, kept_peer)}")

    # resampling to isotropic
    target = output_shape(shape, spacing, new_spacing=(0.5, 0.5, 0.5))
    t_ours, res = best(lambda: resample(image, spacing, target, order=1)[0], args.repeat)
    t_peer, res_peer = best(lambda: resize(image, target, order=1, mode="edge", anti_aliasing=False,
                                           preserve_range=True).astype(np.float32), args.repeat)
    report("resample (linear) vs skimage resize", t_ours, t_peer,
           f"max |diff| {np.abs(res - res_peer).max():.2e}")

    # I/O
    with tempfile.TemporaryDirectory() as d:
        lab16 = labels.astype(np.uint16)
        img = Image(lab16, spacing, {"is_label": True})
        p_ours, p_peer = os.path.join(d, "ours.tif"), os.path.join(d, "peer.tif")
        t_ours, _ = best(lambda: write_image(p_ours, img, compression=True), args.repeat)
        t_peer, _ = best(lambda: tifffile.imwrite(
            p_peer, lab16, imagej=True, compression="zlib", photometric="minisblack",
            resolution=(2.0, 2.0), metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"}),
            args.repeat)
        report("write ImageJ TIFF (zlib) vs tifffile", t_ours, t_peer,
               f"sizes {os.path.getsize(p_ours)} / {os.path.getsize(p_peer)} bytes")
        t_ours, back = best(lambda: read_image(p_ours), args.repeat)
        t_peer, back_peer = best(lambda: tifffile.imread(p_peer), args.repeat)
        report("read ImageJ TIFF vs tifffile", t_ours, t_peer,
               f"identical: {np.array_equal(back.data, back_peer)}, spacing {back.spacing}")


if __name__ == "__main__":
    main()

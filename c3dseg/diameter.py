"""Median cell diameter from a membrane image alone.

:func:`estimate_cell_diameter` reads a central block of the stack (``max_voxels``) and, inside
it, measures a window of :data:`PASS1_VOXELS` voxels placed where the image has the most wall-like
structure (:func:`structured_centre`: tissue that fills only part of the field is measured, not
the background around it).  It checks that the window has structure at all
(:func:`structure_to_noise`: a constant or noise-only stack has no cells and gives NaN), then
measures the cells a seeded watershed finds (:func:`c3dseg.watershed.seeded_watershed`) in two
passes: the first on that window with light smoothing (one lateral voxel); the second with the
smoothing scaled to the first estimate (``smoothing`` x the diameter), on the block downscaled
laterally by the integer factor that leaves cells about :data:`TARGET_VOXELS` across (large
cells: fewer voxels, less noise) and cropped to :data:`PASS2_VOXELS` voxels around the same
centre, so the cost is a few seconds at most whatever the stack's size.  Seeds are
the basins deeper than a multiple of the image's own noise level, which makes the count
insensitive to the signal-to-noise ratio.  The median equivalent-sphere diameter of the interior
regions is corrected by a small linear model in log space (:data:`FIT_FILE`, fitted by
``benchmarks/diameter.py --fit`` on ``c3d-synth`` training volumes, never the validation seeds):
the second pass runs the watershed at three seed depths (:data:`H_FACTORS`: 1, 2 and 4 times the
noise), and the estimate is the median at depth 2 times ``exp(w0 + w1 * log(m4 / m1) + w2 *
log(m1 / voxel))``.  ``m4 / m1`` measures how many cells the deeper seeds merge (walls the
watershed barely sees: the median over-estimates), ``m1 / voxel`` the cells' size in lateral
voxels of the input (small cells merge, large ones split).  The correction factor is clipped to
[:data:`MIN_CORRECTION`, :data:`MAX_CORRECTION`].  ``c3d-fit-diameter``
(:mod:`c3dseg.diameter_fit`) fits the same model to a user's annotated stacks
(EstimateCellDiameter ``CorrectionFile``).

Optional refinement with a network (``model``, :func:`refine_with_network`, like Cellpose's
two-pass size estimate): a central crop of at most :data:`REFINE_EDGE` voxels a side is resampled
to the model's training scale implied by the current estimate, segmented by the network and the
flow reconstruction (the settings of ``segment.xml``), and the median diameter of its interior
cells is measured; that measurement becomes the scale of a second network pass.  The refined value
is kept only when the network measures the cells rather than echoing the scale it is shown: a
network that has learnt only its training size finds cells of that size at any scale (the
measurement grows in proportion to the scale assumed).  The ratio of the log changes of the two
measurements and of the two scales (:data:`REFINE_MAX_SLOPE`) tells them apart; otherwise the
classical estimate stands.

Measured (``benchmarks/diameter.py``; README): 36/40 validation volumes within 20 % (the central
window and single calibration factor used before: 32/40), 12/12 stacks of
``benchmarks/othergen.py``.  Known
weakness: cells only ~7-12 voxels across with coarse z-steps or few photons merge in groups at
every seed depth and are still over-estimated by up to ~1.4x.  A per-slice (planar) measurement of the widest
sections was tried and was worse; so were lower percentiles or the mode of the region diameters
instead of the median, and a third watershed pass at the second pass's scale.

What was tried and measured (``benchmarks/diameter.py``, validation volumes of ``c3d-synth``):
the peak of the radially averaged power spectrum / autocorrelation of the membrane image (drowned
by the tissue outline and illumination: no usable peak), a scale-space LoG blob measure (noise and
background blobs dominate), morphological granulometry (background dominated), and the
watershed measure kept here.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import warnings

import numpy as np

from .errors import InputError
from .watershed import (_kernel_l2, noise_sigma, normalise_percentiles, region_diameters, seeded_watershed,
                        smooth_physical)

__all__ = ["estimate_cell_diameter", "refine_with_network", "structure_to_noise", "load_fit", "FIT_FILE"]

#: The fitted correction (JSON: ``features``, ``coefficients`` [w0, w1, w2] and how they were made),
#: written by ``benchmarks/diameter.py --fit DIR --write FILE``.
FIT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "diameter_fit.json")

#: Features of the correction, in the order of ``coefficients[1:]`` (see :func:`features`).
FEATURES = ("log_m4_over_m1", "log_m1_voxels")

#: Seed depths (units of the noise left after smoothing) of the second pass's three watersheds;
#: the median at the middle one is the measurement the correction scales.
H_FACTORS = (1.0, 2.0, 4.0)

#: Bounds of the correction factor (guards against extrapolating far outside the fitted range).
MIN_CORRECTION = 0.5
MAX_CORRECTION = 2.0

#: Pass 1 over-counts cells (light smoothing); its median times this factor chooses the second
#: pass's smoothing and lateral downscale (the calibration factor of the earlier single-measure
#: estimator, fitted on training seeds 0-39).
PASS1_FACTOR = 0.8722

#: Second-pass smoothing sigma as a fraction of the first estimate.
SMOOTHING = 0.1

#: Seed depth (units of the noise left after smoothing) of the first pass.
H_FACTOR = 2.0

#: Voxels measured by the first pass (native resolution, light smoothing).
PASS1_VOXELS = 300_000

#: Voxels measured by the second pass (after the lateral downscale).
PASS2_VOXELS = 400_000

#: The second pass downscales laterally by the largest integer factor that leaves the first
#: estimate at least this many voxels across (cells are >= ~7 voxels: small cells keep full
#: resolution).
TARGET_VOXELS = 10.0

#: Images whose :func:`structure_to_noise` is below this hold no cells (pure noise gives ~1.1; the
#: ``c3d-synth`` training volumes measured 5 (4.9 photons at a wall peak) to 150+; the benchmark
#: prints the lowest).
MIN_STRUCTURE = 2.0

#: Edge (voxels of the model's grid) of the central crop the network refinement segments.
REFINE_EDGE = 64

#: The refinement is kept only when the network's measurement changes by less than this fraction
#: of a change of the scale it is shown (in logs): 0 for a network that measures the cells whatever
#: the scale, 1 for one that echoes the scale.
REFINE_MAX_SLOPE = 0.5

#: Fewest interior cells a network pass must find for its median to count.
REFINE_MIN_CELLS = 5

#: Reconstruction settings of the refinement passes: those of ``segment.xml``.
REFINE_RECONSTRUCTION = {"fg_threshold": 0.5, "smoothing_sigma": 1.0, "step": 4.0, "n_iter": 100,
                         "closing_radius": 3, "min_radius_voxels": 2.5, "max_radius_voxels": 100.0,
                         "min_overlap": 0.2, "max_flow_error": 0.8, "min_axis_ratio": 0.1}


def block_shape(shape, max_voxels):
    """The shape of a block of at most about ``max_voxels`` voxels cut from an array of ``shape``:
    the lateral axes shrink first (the z extent is kept where possible: cells must stay whole along
    z), none below 16 voxels."""
    shape = np.array(shape, dtype=np.float64)
    if np.prod(shape) <= max_voxels:
        return tuple(int(n) for n in shape)
    f = math.sqrt(max_voxels / np.prod(shape))
    target = shape.copy()
    target[1:] = np.maximum(np.floor(shape[1:] * f), 16)
    if np.prod(target) > max_voxels:
        target[0] = max(16, math.floor(max_voxels / (target[1] * target[2])))
    return tuple(int(n) for n in np.minimum(target, shape))


def block_at(data, max_voxels, centre=None):
    """The block of :func:`block_shape` centred on ``centre`` (voxel coordinates; default the
    array's centre), shifted to lie inside the array."""
    target = block_shape(data.shape, max_voxels)
    if target == tuple(data.shape):
        return data
    if centre is None:
        start = [(n - t) // 2 for n, t in zip(data.shape, target)]
    else:
        start = [min(max(0, int(round(c - t / 2))), n - t) for c, n, t in zip(centre, data.shape, target)]
    return data[tuple(slice(a, a + t) for a, t in zip(start, target))]


def central_block(data, max_voxels):
    """The central block of :func:`block_shape` (the array itself when it is small enough)."""
    return block_at(data, max_voxels)


#: Candidate window positions per axis that :func:`structured_centre` compares.
WINDOW_POSITIONS = 5

#: :func:`structured_centre`: tissue is where the local wall energy exceeds this fraction of its
#: 99th percentile; windows whose tissue fraction is within :data:`TISSUE_TIE` of the best count
#: as equal (the most central of them is measured).
TISSUE_LEVEL = 0.1
TISSUE_TIE = 0.1


def structured_centre(block, spacing, max_voxels):
    """Centre (voxel coordinates of ``block``) of the window of :func:`block_shape` ``(block.shape,
    max_voxels)`` that holds the most tissue, among :data:`WINDOW_POSITIONS` evenly spaced positions
    per cropped axis; of the windows within :data:`TISSUE_TIE` of the most, the one nearest the
    block's centre.  Tissue is where the local mean square of a difference of Gaussians (0.5 and 1.5
    voxels on a 2x laterally downscaled copy; walls raise it, smooth background does not) exceeds
    :data:`TISSUE_LEVEL` times its 99th percentile.  A stack whose tissue fills only part of the
    field is so measured on tissue rather than on noise, and one full of tissue in its middle, as
    before.  The block's centre when it is small enough to be measured whole."""
    from scipy import ndimage

    target = block_shape(block.shape, max_voxels)
    centre = np.array(block.shape, dtype=np.float64) / 2
    if target == tuple(block.shape):
        return tuple(float(c) for c in centre)
    f = 2 if min(block.shape[1:]) >= 64 else 1
    b = _downscale_lateral(block, f)        # (a linear intensity change scales every value alike)
    sx = float(spacing[2]) * f
    sig = [0.5 * sx / float(spacing[0]), 0.5, 0.5]
    dog = ndimage.gaussian_filter(b, sig) - ndimage.gaussian_filter(b, [3 * v for v in sig])
    local = ndimage.uniform_filter(dog * dog, [max(1, round(4 * sx / float(spacing[0]))), 4, 4])
    tissue = (local > TISSUE_LEVEL * np.percentile(local, 99)).astype(np.float64)
    counts = np.pad(np.cumsum(np.cumsum(np.cumsum(tissue, 0), 1), 2), ((1, 0),) * 3)
    win = [target[0], max(1, target[1] // f), max(1, target[2] // f)]
    starts = [np.unique(np.linspace(0, n - w, WINDOW_POSITIONS).round().astype(int)) for n, w in zip(b.shape, win)]
    rows = []
    for z, y, x in itertools.product(*starts):
        z1, y1, x1 = z + win[0], y + win[1], x + win[2]
        n = (counts[z1, y1, x1] - counts[z, y1, x1] - counts[z1, y, x1] - counts[z1, y1, x]
             + counts[z, y, x1] + counts[z, y1, x] + counts[z1, y, x] - counts[z, y, x])
        c = np.array([z + win[0] / 2, (y + win[1] / 2) * f, (x + win[2] / 2) * f])
        rows.append((n / float(np.prod(win)), float(np.sum((c - centre) ** 2)), c))
    best = max(r[0] for r in rows)
    chosen = min((r for r in rows if r[0] >= best - TISSUE_TIE), key=lambda r: r[1])
    return tuple(float(v) for v in chosen[2])


def _downscale_lateral(data, f):
    """Mean over ``f`` x ``f`` lateral voxel blocks (the z axis is kept; trailing voxels dropped)."""
    if f <= 1:
        return np.asarray(data, np.float32)
    z, y, x = data.shape
    y, x = y - y % f, x - x % f
    a = np.asarray(data[:, :y, :x], np.float32).reshape(z, y // f, f, x // f, f)
    return a.mean(axis=(2, 4), dtype=np.float32)


def structure_to_noise(data, spacing) -> float:
    """How far a stack is from featureless: standard deviation of the image smoothed with a sigma
    of two lateral voxels, over the standard deviation that its own voxel noise
    (:func:`c3dseg.watershed.noise_sigma`) leaves after that smoothing.  Pure noise (any level,
    white) gives about 1, a constant image 0, membrane-stained tissue tens (the lowest of the
    training volumes of ``c3d-synth``: see :data:`MIN_STRUCTURE`)."""
    x = normalise_percentiles(data)
    if not x.any():
        return 0.0
    g, sv = smooth_physical(x, spacing, 2.0 * float(spacing[2]))
    noise = noise_sigma(x) * _kernel_l2(sv)
    sd = float(g.std())
    if noise <= 0:
        return math.inf if sd > 0 else 0.0
    return sd / noise


def estimate_cell_diameter(image, spacing=(1.0, 1.0, 1.0), *, max_voxels=4_000_000,
                           fit=None, model=None, return_details=False):
    """Median equivalent-sphere cell diameter (um) of a membrane-stained stack.

    Parameters
    ----------
    image : ndarray (Z, Y, X)
        Membrane image (bright walls on darker cells), any numeric type.
    spacing : tuple of 3 floats
        (z, y, x) voxel size in um.
    max_voxels : int
        Only the central block of about this many voxels (laterally cropped first) is read.  The
        cost does not grow with it: the first pass measures a central part of
        :data:`PASS1_VOXELS` voxels; the second the block downscaled laterally by an integer
        factor that brings the first estimate to about :data:`TARGET_VOXELS` voxels across,
        cropped to :data:`PASS2_VOXELS` voxels.
    fit : dict or "none", optional
        The correction (``{"coefficients": [w0, w1, w2]}``, see :func:`load_fit`); default the
        packaged :data:`FIT_FILE`.  "none": the raw median of the second pass, uncorrected (what
        ``benchmarks/diameter.py --fit`` measures).
    model : str or :class:`c3dseg.predict.OnnxNetwork`, optional
        An ONNX model (``c3d-export``, with ``median_cell_diameter_voxels`` metadata): the classical
        estimate is refined with it (:func:`refine_with_network`) on the central block.  None or
        "": classical only.
    return_details : bool
        Also return a dict: ``passes`` (list of (smoothing_um, h, regions, median_um)),
        ``block_shape`` (the block read), ``centre`` (the measured windows' centre in the block,
        :func:`structured_centre`), ``downscale`` (lateral factor of the second pass),
        ``structure`` (:func:`structure_to_noise`) and ``empty`` (True when the image holds no
        cells: constant, pure noise or too few regions), ``medians`` (um: the second pass's medians
        at the seed depths :data:`H_FACTORS`), ``features`` (:data:`FEATURES`; NaN when a median is
        missing), ``correction`` (the factor applied), ``regions`` (regions behind the median
        used), ``classical`` (the estimate before any
        refinement) and, with ``model``, ``refine`` (see :func:`refine_with_network`).

    Returns
    -------
    float
        Diameter in um; NaN when the image holds no cells (featureless: structure-to-noise
        below :data:`MIN_STRUCTURE`, or fewer than 3 regions).
    """
    data = np.asarray(image)
    if data.ndim != 3:
        raise InputError(f"estimate_cell_diameter needs a 3D (Z, Y, X) image, got shape {data.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be 3 positive numbers (z, y, x) in um, got {spacing}")
    coefficients = None if isinstance(fit, str) and fit == "none" else (fit or load_fit())["coefficients"]
    block = central_block(data, int(max_voxels))
    details = {"passes": [], "block_shape": tuple(block.shape), "downscale": 1, "structure": 0.0,
               "empty": True, "classical": float("nan"), "medians": (), "features": (), "correction": 1.0,
               "regions": 0, "centre": ()}

    def done(value):
        details["empty"] = not math.isfinite(value)
        return (value, details) if return_details else value

    details["centre"] = centre = structured_centre(block, spacing, PASS1_VOXELS)
    first = block_at(block, PASS1_VOXELS, centre)
    details["structure"] = structure = structure_to_noise(first, spacing)
    if not structure >= MIN_STRUCTURE:
        return done(float("nan"))
    # pass 1: light smoothing (one lateral voxel), native resolution
    med = _measure(first, spacing, None, details["passes"])
    if not math.isfinite(med):
        return done(float("nan"))
    # pass 2: smoothing scaled to the first estimate, on a grid where cells are ~TARGET_VOXELS across,
    # at three seed depths
    f = max(1, int(med * PASS1_FACTOR / spacing[2] / TARGET_VOXELS))
    details["downscale"] = f
    second = block_at(_downscale_lateral(block, f), PASS2_VOXELS, (centre[0], centre[1] / f, centre[2] / f))
    sp2 = (spacing[0], spacing[1] * f, spacing[2] * f)
    details["medians"] = m1, m2, m4 = tuple(_measure(second, sp2, med, details["passes"], h_factor=h)
                                            for h in H_FACTORS)
    details["features"] = feats = features(m1, m4, spacing)
    details["regions"] = details["passes"][2][2]
    if not math.isfinite(m2):
        d = med * PASS1_FACTOR                      # too few regions at the second pass's scale
        details["regions"] = details["passes"][0][2]
    elif coefficients is None:
        d = m2
    elif all(math.isfinite(v) for v in feats):
        w = [float(c) for c in coefficients]
        details["correction"] = c = min(MAX_CORRECTION, max(MIN_CORRECTION, math.exp(
            w[0] + sum(wi * v for wi, v in zip(w[1:], feats)))))
        d = m2 * c
    else:
        d = m2 * PASS1_FACTOR
    details["classical"] = d
    if model is not None and model != "":
        d, details["refine"] = refine_with_network(block, spacing, d, model)
    return done(d)


def features(m1, m4, spacing):
    """The correction's features (:data:`FEATURES`) from the second pass's medians (um) at seed
    depths 1 and 4 and the input's spacing: ``log(m4 / m1)`` and ``log(m1 / spacing_x)``."""
    if not (math.isfinite(m1) and math.isfinite(m4) and m1 > 0 and m4 > 0):
        return (float("nan"), float("nan"))
    return (math.log(m4 / m1), math.log(m1 / float(spacing[2])))


@functools.lru_cache(maxsize=8)
def _read_fit(path):
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            fit = json.load(fh)
        coefficients = [float(c) for c in fit["coefficients"]]
        names = tuple(fit["features"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a diameter fit ({exc})") from None
    if names != FEATURES or len(coefficients) != len(FEATURES) + 1:
        raise InputError(f"{path}: features {list(names)} with {len(coefficients)} coefficients; expected "
                         f"{list(FEATURES)} and {len(FEATURES) + 1}")
    return {**fit, "coefficients": coefficients}


def load_fit(path=None):
    """The correction of the estimate: a dict with ``features`` (:data:`FEATURES`),
    ``coefficients`` [w0, w1, w2] and the provenance ``benchmarks/diameter.py --fit`` records
    (command, volumes, measured accuracy), read from ``path`` (default :data:`FIT_FILE`)."""
    return _read_fit(os.fspath(path or FIT_FILE))


def _network(model):
    """An :class:`~c3dseg.predict.OnnxNetwork` for a path (kept open for the next call); anything
    else is taken as a network already (``metadata``, ``flow_type``, ``(B, C, Z, Y, X)`` call)."""
    if isinstance(model, (str, os.PathLike)):
        return _cached_network(os.fspath(model))
    return model


@functools.lru_cache(maxsize=4)
def _cached_network(path):
    from .predict import OnnxNetwork

    return OnnxNetwork(path, threads=1)


def model_diameter_voxels(net) -> float:
    """``median_cell_diameter_voxels`` of a model's metadata (InputError naming it when missing)."""
    try:
        value = float(net.metadata.get("median_cell_diameter_voxels", ""))
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"model {net.name} has no median_cell_diameter_voxels metadata (not exported by "
                         "c3d-export?); the diameter refinement needs it", key="ModelPath")
    return value


def network_diameter(block, spacing, diameter_um, model, *, edge=REFINE_EDGE):
    """Median diameter (um) of the interior cells the network finds in the central crop of
    ``block`` when the cells are taken to be ``diameter_um`` across: the crop (at most ``edge``
    voxels a side on the model's grid) is resampled linearly to the isotropic spacing
    ``diameter_um / median_cell_diameter_voxels``, normalised as the model's metadata say,
    predicted in one tile and reconstructed with :data:`REFINE_RECONSTRUCTION`.  Returns
    ``(median_um, cells)``; the median is NaN below :data:`REFINE_MIN_CELLS` interior cells."""
    from .predict import predict_volume
    from .reconstruction import reconstruct
    from .resampling import output_shape, resample

    net = _network(model)
    iso = float(diameter_um) / model_diameter_voxels(net)
    ext = [min(int(n), max(1, math.ceil(edge * iso / s))) for n, s in zip(block.shape, spacing)]
    lo = [(int(n) - e) // 2 for n, e in zip(block.shape, ext)]
    crop = np.asarray(block[tuple(slice(a, a + e) for a, e in zip(lo, ext))], np.float32)
    shape = tuple(min(edge, m) for m in output_shape(crop.shape, spacing, new_spacing=(iso,) * 3))
    data, sp = resample(crop, spacing, shape, order=1)
    y = predict_volume(data, net, tile_shape=(edge,) * 3, overlap=0)
    scale = net.metadata.get("flow_scale", "adaptive")
    try:
        scale = float(scale)
    except ValueError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = reconstruct(y[0], y[1:], flow_type=net.flow_type, flow_scale=scale, **REFINE_RECONSTRUCTION)
    d = region_diameters(labels, sp)
    return (float(np.median(d)) if len(d) >= REFINE_MIN_CELLS else float("nan")), int(len(d))


def refine_with_network(block, spacing, d0, model, *, edge=REFINE_EDGE):
    """Refine the estimate ``d0`` (um) with a network: ``d1`` = :func:`network_diameter` at the
    scale ``d0``, ``d2`` = the same at the scale ``d1``.  ``d2`` is returned when the network
    measured cells (at least :data:`REFINE_MIN_CELLS` in both passes) and its measurement does not
    echo the scale it is shown: the slope ``log(d2 / d1) / log(d1 / d0)`` is at most
    :data:`REFINE_MAX_SLOPE` (when ``d1`` is within 5 % of ``d0`` the network agrees with the scale
    and ``d1`` is returned after one pass).  Otherwise ``d0`` stands.

    Returns ``(diameter_um, info)`` with info ``{"passes": [(scale_um, median_um, cells), ...],
    "slope": float, "accepted": bool}``."""
    spacing = tuple(float(s) for s in spacing)
    info = {"passes": [], "slope": float("nan"), "accepted": False}
    if not (math.isfinite(d0) and d0 > 0):
        return d0, info
    d1, n1 = network_diameter(block, spacing, d0, model, edge=edge)
    info["passes"].append((float(d0), d1, n1))
    if not math.isfinite(d1):
        return d0, info
    if abs(math.log(d1 / d0)) <= math.log(1.05):
        info["accepted"] = True
        info["slope"] = 0.0
        return d1, info
    d2, n2 = network_diameter(block, spacing, d1, model, edge=edge)
    info["passes"].append((d1, d2, n2))
    if not math.isfinite(d2):
        return d0, info
    info["slope"] = slope = math.log(d2 / d1) / math.log(d1 / d0)
    if slope <= REFINE_MAX_SLOPE:
        info["accepted"] = True
        return d2, info
    return d0, info


def _measure(block, spacing, diameter, passes, h_factor=H_FACTOR):
    """Median diameter (um) of the interior regions of a seeded watershed (NaN below 3 regions);
    appends (smoothing_um, h, regions, median_um) to ``passes``."""
    labels, info = seeded_watershed(block, spacing, diameter_um=diameter, smoothing=SMOOTHING,
                                    h_factor=h_factor, background="auto-regions", return_info=True)
    d = region_diameters(labels, spacing)
    med = float(np.median(d)) if len(d) >= 3 else float("nan")
    passes.append((info["sigma_um"], info["h"], int(len(d)), med))
    return med

"""Flow targets of a label image blockwise: ``LabelsToFlows`` with tanh flows, exactly.

The tanh flow of a voxel depends on its own label and on two numbers of its cell: the centroid
and the divisor (from the cell's size, or its bounding box).  Those are global reductions, so
the filter runs in two steps:

1. one pass: :func:`c3dseg.regions.region_sums` of every block (voxel count, *integer* sums of
   the coordinates, bounding box), merged: the centroids are the same float64 numbers as the
   whole-volume :func:`c3dseg.flows.cell_statistics` gives (sums of integers are exact);
2. per block (lazy, pointwise): :func:`c3dseg.flows.iter_tanh_box` with those tables and the
   block's origin, the same arithmetic as :func:`c3dseg.flows.tanh_flows` on the whole volume.

Not cut (the planner refuses them, naming the parameter):

* ``FlowType=heat``: each cell's flows come from a diffusion solved over the whole cell (a
  conjugate-gradient solve whose iterates depend on every voxel of the cell); a block would
  need a halo as large as the largest cell and, for an exact result, the same global solve;
* ``ForegroundMode=hull``: the convex hull of all cells is a global shape (it could be cut as
  row extrema -> one hull -> a per-block test, but that is not implemented yet).
"""

from __future__ import annotations

import numpy as np

from ..errors import PipelineError
from .components import load_table, save_table
from .globals import register_global
from .values import RegionLeaf, evaluate


def refusal(params) -> str | None:
    """Why a LabelsToFlows item cannot run blockwise (None: it can)."""
    if params.get("FlowType", "tanh") != "tanh":
        return ("FlowType=heat cannot be run blockwise: heat flows solve a diffusion over each whole cell; "
                "use FlowType=tanh or run without --blocks")
    if params.get("ForegroundMode", "union") != "union":
        return ("ForegroundMode=hull cannot be run blockwise (the convex hull of all cells is global); use "
                "ForegroundMode=union or run without --blocks")
    return None


def check_blockwise(params, item_id=None, filter_name="LabelsToFlows") -> None:
    why = refusal(params)
    if why:
        key = "FlowType" if why.startswith("FlowType") else "ForegroundMode"
        raise PipelineError(why, item=item_id, filter=filter_name, key=key)


def _sums_task(block, labels_value, shape):
    from ..labels import check_labels
    from ..regions import region_sums

    lab = check_labels(np.asarray(evaluate([labels_value], block.start, block.stop, shape)[0]), "labels")
    return region_sums(lab, origin=block.start)


def cell_stats_blockwise(env, name: str, labels_value) -> tuple[np.ndarray, dict]:
    """Cell ids (increasing) and :func:`c3dseg.flows.cell_statistics`-shaped tables over them
    (entry 0 = background, entry k = ``ids[k - 1]``), summed across blocks."""
    from ..regions import merge_region_sums

    parts = env.reduce(f"{name}-cells", _sums_task, labels_value, env.shape, desc=f"{name}: cell statistics")
    m = merge_region_sums(parts.values())
    k = len(m["label"])
    size = np.zeros(k + 1, np.int64)
    size[1:] = m["volume"]
    cen = np.zeros((3, k + 1))
    lo = np.full((3, k + 1), -1, np.int64)
    hi = np.full((3, k + 1), -1, np.int64)
    if k:
        cen[:, 1:] = m["sum"] / m["volume"][None]
        lo[:, 1:], hi[:, 1:] = m["lo"], m["hi"]
    return m["label"], {"size": size, "centroid": cen, "lo": lo, "hi": hi}


def tanh_targets_region(region, labels, *, ids_path: str, centroid_path: str, inv_path: str):
    """Node function: foreground and the three tanh flows (float32) of a region of the labels."""
    from ..flows import iter_tanh_box
    from ..labels import check_labels

    lab = check_labels(np.asarray(labels), "labels")
    ids = load_table(ids_path)
    d = lab.astype(np.int64, copy=False)
    index = np.zeros(d.shape, np.int64)
    if len(ids):
        pos = np.clip(np.searchsorted(ids, d), 0, len(ids) - 1)
        hit = (ids[pos] == d) & (d > 0)
        index[hit] = pos[hit] + 1
    out = np.empty((4,) + d.shape, np.float32)
    out[0] = d > 0
    for _ in iter_tanh_box(index, load_table(centroid_path), load_table(inv_path), region.lo, out=out[1:]):
        pass
    return [out[0], out[1], out[2], out[3]]


@register_global("LabelsToFlows")
def _labels_to_flows_impl(env, step, images, metas):
    from ..filters.flows import parse_flow_scale
    from ..flows import tanh_tables

    p = step.params
    item = step.item.item_id
    check_blockwise(p, item)
    labels = images[0]
    scale = parse_flow_scale(p["FlowScale"])
    spacing = labels.spacing if (p["FlowScaleInMicrometres"] and not isinstance(scale, str)) else None
    ids, stats = cell_stats_blockwise(env, item, labels)
    centroid, inv = tanh_tables(stats, scale, spacing)
    paths = {k: env.rt.path("tables", f"{item}-{k}.npy") for k in ("ids", "centroid", "inv")}
    save_table(paths["ids"], ids)
    save_table(paths["centroid"], centroid)
    save_table(paths["inv"], inv)
    names = ("foreground", "flow_z", "flow_y", "flow_x")
    outs = env.node("func", [RegionLeaf(env.shape, labels.spacing), labels], func=tanh_targets_region,
                    kwargs={f"{k}_path": v for k, v in paths.items()}, item_id=item, n_outputs=4,
                    meta=dict(labels.meta, is_label=False))
    for o, n in zip(outs, names):
        o.meta["channel_name"] = n
    return outs, []

"""What the reconstruction alone can reach on the validation volumes: the ground-truth targets
(foreground and flows, exactly as training makes them) reconstructed with the validation settings
of a training config, and optionally a checkpoint's prediction beside them.

    python benchmarks/ceiling.py [--config configs/tanh.yaml] [--n 4] [--checkpoint runs/tanh/last.pt] [--swap]
                                 [--by-size]

Prints AP@0.5 and mean per-cell Dice per volume for all ground-truth cells and for the interior
ones (touching no face of the volume): a network cannot beat the ground-truth row, and the gap
between the rows says how much is the network's.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from c3dseg.metrics import evaluate, mean_cell_dice, overlap_table  # noqa: E402
from c3dseg.reconstruction import reconstruct  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "tanh.yaml"))
    ap.add_argument("--n", type=int, default=4, help="validation volumes of the config")
    ap.add_argument("--checkpoint", default=None, help="also score this checkpoint's prediction")
    ap.add_argument("--swap", action="store_true",
                    help="with --checkpoint, also reconstruct the network's foreground with the true flows and "
                         "the true foreground with the network's flows (which output holds the error)")
    ap.add_argument("--by-size", action="store_true",
                    help="also print the mean per-cell Dice of interior cells by size (equivalent-sphere "
                         "diameter in voxels at the training scale), pooled over the volumes")
    a = ap.parse_args()

    from c3dseg.training.data import data_summary, load_volumes
    from c3dseg.training.train import _collect_pairs, _reconstruct_kwargs, predict_torch, resolve_config

    cfg = resolve_config(yaml.safe_load(open(a.config)), os.path.dirname(os.path.abspath(a.config)))
    d = cfg["data"]
    pairs = _collect_pairs(d["val"], cfg["_base_dir"])[: a.n]
    vols = load_volumes(pairs, norm_cfg=d["normalization"], targets_cfg=cfg["targets"], resample_to=d["resample_to"])
    summary = data_summary(vols)
    summary["median_cell_radius_voxels"] = summary["median_cell_diameter_voxels"] / 2
    kw = _reconstruct_kwargs(cfg, summary)
    model = None
    if a.checkpoint:
        import torch

        from c3dseg.training.unet import build_unet

        ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
        model = build_unet(ck["config"]["model"])
        model.load_state_dict(ck["model"])
    print(f"reconstruction settings: {kw}")
    print("| volume | shape | source | AP@0.5 all | Dice all | AP@0.5 interior | Dice interior | interior / border cells |")
    print("|---|---|---|---|---|---|---|---|")
    by_size = {}
    for v in vols:
        t = v.targets.astype(np.float32)
        sources = [("ground truth", t)]
        if model is not None:
            net = predict_torch(model, v.image, tile_size=cfg["validation"]["tile_size"],
                                overlap=int(cfg["validation"]["overlap"]), device="cpu")
            sources.append(("network", net))
            if a.swap:
                sources.append(("network foreground + true flows", np.concatenate([net[:1], t[1:]])))
                sources.append(("true foreground + network flows", np.concatenate([t[:1], net[1:]])))
        for name, pred in sources:
            labels = reconstruct(pred[0], pred[1:], **kw)
            if a.by_size:
                table = overlap_table(v.labels, labels)
                _, dice = mean_cell_dice(table, None, return_per_cell=True)
                inner = ~table.gt_border
                deq = (6.0 * table.gt_sizes[inner] / np.pi) ** (1.0 / 3.0)
                by_size.setdefault(name, []).append(np.stack([deq, dice[inner]]))
            r = evaluate(v.labels, labels)
            i, b = r["interior"], r["touching_border"]
            print(f"| {v.name} | {'x'.join(map(str, v.image.shape))} | {name} | {r['ap@0.5']:.3f} | "
                  f"{r['mean_dice']:.3f} | {i['ap@0.5']:.3f} | {i['mean_dice']:.3f} | {i['n_gt']} / {b['n_gt']} |",
                  flush=True)

    if by_size:
        edges = (0, 6, 9, 12, 15, 20, np.inf)
        print("\nInterior cells by size (equivalent-sphere diameter, voxels at the training scale): "
              "mean per-cell Dice (cells)")
        print("| source | " + " | ".join(f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">= {lo:g}"
                                        for lo, hi in zip(edges[:-1], edges[1:])) + " |")
        print("|---" * len(edges) + "|")
        for name, parts in by_size.items():
            deq, dice = np.concatenate(parts, axis=1)
            cells = []
            for lo, hi in zip(edges[:-1], edges[1:]):
                sel = (deq >= lo) & (deq < hi)
                cells.append(f"{dice[sel].mean():.3f} ({sel.sum()})" if sel.any() else "-")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Training loss: foreground (BCE with logits + optional soft Dice) + masked MSE on the flows.

``loss = fg_weight * BCE + dice_weight * (1 - Dice) + flow_weight * MSE_flows``

* BCE and Dice compare the foreground logit (channel 0) with the {0, 1} target, over valid voxels.
* The flow MSE (channels 1-3, tanh outputs vs targets) is weighted per voxel by
  ``target_fg + background_flow_weight * (1 - target_fg)`` (the reference code weighted the
  background by 0.01: the background's flows are not used by the reconstruction) and averaged by
  the weight sum.
* ``valid`` (False where a patch was padded or resampled from outside its volume) removes voxels
  from every term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULTS = {"fg_weight": 1.0, "dice_weight": 0.5, "flow_weight": 5.0, "background_flow_weight": 0.01}


def merge_config(config: dict | None) -> dict:
    out = dict(DEFAULTS)
    for k, v in (config or {}).items():
        if k not in out:
            raise ValueError(f"unknown loss setting {k!r} (known: {', '.join(out)})")
        out[k] = float(v)
        if out[k] < 0:
            raise ValueError(f"loss setting {k} must be >= 0, got {v}")
    return out


class CellposeLoss(torch.nn.Module):
    """See the module docstring.  ``forward(pred, target, valid=None) -> (total, parts dict)``.

    ``pred``: ``(N, 4, Z, Y, X)`` from :class:`~c3dseg.training.unet.UNet3D` (logit, 3 tanh flows);
    ``target``: ``(N, 4, Z, Y, X)``; ``valid``: ``(N, Z, Y, X)`` bool or None.
    """

    def __init__(self, fg_weight: float = 1.0, dice_weight: float = 0.5, flow_weight: float = 5.0,
                 background_flow_weight: float = 0.01):
        super().__init__()
        self.fg_weight = fg_weight
        self.dice_weight = dice_weight
        self.flow_weight = flow_weight
        self.bg_flow_weight = background_flow_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None):
        pred = pred.float()
        target = target.float()
        logit, flows = pred[:, 0], pred[:, 1:]
        fg, tflows = target[:, 0], target[:, 1:]
        v = torch.ones_like(fg) if valid is None else valid.to(fg.dtype)
        nv = v.sum().clamp_min(1.0)
        parts = {}
        bce = (F.binary_cross_entropy_with_logits(logit, fg, reduction="none") * v).sum() / nv
        parts["bce"] = bce
        total = self.fg_weight * bce
        if self.dice_weight > 0:
            p = torch.sigmoid(logit) * v
            inter = (p * fg).sum()
            dice = (2 * inter + 1.0) / (p.sum() + (fg * v).sum() + 1.0)
            parts["dice"] = 1.0 - dice
            total = total + self.dice_weight * parts["dice"]
        w = (fg + self.bg_flow_weight * (1.0 - fg)) * v
        se = ((flows - tflows) ** 2).mean(dim=1)
        mse = (se * w).sum() / w.sum().clamp_min(1.0)
        parts["flow"] = mse
        total = total + self.flow_weight * mse
        parts["total"] = total
        return total, parts

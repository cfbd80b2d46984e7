"""The 3D U-Net of Cellpose3D (Eschweiler et al.), configurable in width and depth.

With the defaults (``base_width=16, depth=3``) the layer table is the reference code's
(`models/UNet3D.py`, see ``cellpose3d-reference.md`` section 2): strided 4^3 convolutions for
downsampling, instance norm (PyTorch defaults) and LeakyReLU(0.2) after every convolution except
in the first level (``norm_first_level=False``) and the 1x1 head, transposed-convolution
upsampling, and 1,980,980 parameters.  Two deliberate changes (reference section 9, item 8):

* channel 0 (foreground) is a *logit* (trained with BCE), not a tanh;
* channels 1..3 (flows along z, y, x) go through tanh.

:class:`InferenceModel` wraps a network for export: sigmoid on channel 0, so the exported model
outputs the foreground probability in [0, 1] next to the three flows.

Input sizes must be divisible by ``2 ** depth`` (8 by default).
"""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (instance, batch, group, none)")


class ConvAct(nn.Sequential):
    """Convolution (+ norm) + LeakyReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1,
                 norm: str = "instance", slope: float = 0.2):
        super().__init__(nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding),
                         _norm(norm, cout), nn.LeakyReLU(slope, inplace=True))


class UpAct(nn.Sequential):
    """Transposed convolution x2 (+ norm + act), then a 1x1 convolution (+ norm + act)."""

    def __init__(self, channels: int, norm: str = "instance", slope: float = 0.2):
        super().__init__(nn.ConvTranspose3d(channels, channels, 3, stride=2, padding=1, output_padding=1),
                         _norm(norm, channels), nn.LeakyReLU(slope, inplace=True),
                         ConvAct(channels, channels, kernel=1, padding=0, norm=norm, slope=slope))


class UNet3D(nn.Module):
    """3D U-Net predicting foreground (logit) and three flows (tanh).

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a membrane stain).
    out_channels : int
        Output channels; channel 0 is the foreground logit, the others get ``tanh`` (4).
    base_width : int
        Channels of the first level; level ``l`` has ``base_width * 2**l`` (16).
    depth : int
        Number of stride-2 downsamplings (3); inputs must be divisible by ``2**depth``.
    norm : {"instance", "batch", "group", "none"}
        Normalisation after convolutions (instance).
    norm_first_level : bool
        Normalise in the first level too (False, as the reference code).
    slope : float
        LeakyReLU negative slope (0.2).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 4, base_width: int = 16, depth: int = 3,
                 norm: str = "instance", norm_first_level: bool = False, slope: float = 0.2):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        if base_width < 2 or base_width % 2:
            raise ValueError("base_width must be an even number >= 2")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_width=base_width,
                           depth=depth, norm=norm, norm_first_level=norm_first_level, slope=slope)
        self.depth = depth
        n0 = norm if norm_first_level else "none"
        w = [base_width * 2 ** level for level in range(depth + 1)]
        self.enc = nn.ModuleList([nn.Sequential(ConvAct(in_channels, base_width // 2, norm=n0, slope=slope),
                                                ConvAct(base_width // 2, base_width, norm=n0, slope=slope))])
        self.down = nn.ModuleList()
        for level in range(1, depth + 1):
            nd = n0 if level == 1 else norm
            self.down.append(ConvAct(w[level - 1], w[level - 1], kernel=4, stride=2, padding=1, norm=nd,
                                     slope=slope))
            self.enc.append(nn.Sequential(ConvAct(w[level - 1], w[level - 1], norm=norm, slope=slope),
                                          ConvAct(w[level - 1], w[level], norm=norm, slope=slope)))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in range(depth, 0, -1):
            cin = w[level] if level == depth else w[level]  # decoder output of the level below has w[level]
            self.up.append(UpAct(cin, norm=norm, slope=slope))
            self.dec.append(nn.Sequential(ConvAct(cin + w[level - 1], w[level - 1], norm=norm, slope=slope),
                                          ConvAct(w[level - 1], w[level - 1], norm=norm, slope=slope)))
        self.head = nn.Sequential(ConvAct(base_width, base_width, norm=norm, slope=slope),
                                  ConvAct(base_width, base_width, norm=norm, slope=slope),
                                  nn.Conv3d(base_width, out_channels, 1))

    @property
    def size_divisor(self) -> int:
        return 2 ** self.depth

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Head output before activations."""
        skips = []
        h = self.enc[0](x)
        for level in range(1, self.depth + 1):
            skips.append(h)
            h = self.enc[level](self.down[level - 1](h))
        for up, dec in zip(self.up, self.dec):
            h = up(h)
            h = dec(torch.cat([h, skips.pop()], dim=1))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, Cin, Z, Y, X) -> (N, Cout, Z, Y, X)``: channel 0 a logit, the others in (-1, 1)."""
        y = self.forward_raw(x)
        return torch.cat([y[:, :1], torch.tanh(y[:, 1:])], dim=1)


class InferenceModel(nn.Module):
    """A trained network for deployment: foreground probability (sigmoid) + flows (tanh)."""

    def __init__(self, net: UNet3D):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net.forward_raw(x)
        return torch.cat([torch.sigmoid(y[:, :1]), torch.tanh(y[:, 1:])], dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_unet(config: dict | None = None) -> UNet3D:
    """A :class:`UNet3D` from a config dict (unknown keys are an error)."""
    config = dict(config or {})
    allowed = {"in_channels", "out_channels", "base_width", "depth", "norm", "norm_first_level", "slope"}
    bad = set(config) - allowed
    if bad:
        raise ValueError(f"unknown model setting(s): {', '.join(sorted(bad))} (known: {', '.join(sorted(allowed))})")
    return UNet3D(**config)

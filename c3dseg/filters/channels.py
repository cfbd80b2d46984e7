"""Channel filters: split a multi-channel (C, Z, Y, X) image into single channels, and merge
single-channel images into one multi-channel image."""

from __future__ import annotations

import numpy as np

from ..errors import ExecutionError
from ..image import Image
from ..schemas.params import Param
from .base import Filter, Port, register

_MAX = 4


@register
class ChannelSplitter(Filter):
    """Image outputs 1..4 are channels 1..4 of the input.  Outputs past the channel count are
    empty; the runner reports a consumer of such an output as an error naming it."""

    name = "ChannelSplitter"
    description = "Splits a multi-channel image into its channels (outputs 1..4 = channels 1..4)."
    category = "ImageFilter"
    blockwise = "pointwise"
    inputs = (Port("image", "image", "Multi-channel (C, Z, Y, X) image (a 3D image is channel 1)"),)
    outputs = tuple(Port("image", f"channel{k}", f"Channel {k}") for k in range(1, _MAX + 1))

    def run(self, images, metas):
        img = images[0]
        data = img.data if img.is_multichannel else img.data[None]
        names = img.meta.get("channel_names") or [None] * data.shape[0]
        if data.shape[0] > _MAX:
            raise ExecutionError(f"the image has {data.shape[0]} channels; at most {_MAX} can be split",
                                 item=self.ctx.item_id or None, filter=self.name)
        outs = []
        for k in range(_MAX):
            if k < data.shape[0]:
                meta_updates = {"channel_names": None, "channel": k,
                                "channel_name": names[k] if k < len(names) else None}
                outs.append(img.derive(data[k], **meta_updates))
            else:
                outs.append(None)
        return outs, []


@register
class ChannelMerger(Filter):
    """Stacks image inputs 1..4 (2..4 optional) into one (C, Z, Y, X) image with the spacing and
    metadata of input 1.  Multi-channel inputs contribute all their channels."""

    name = "ChannelMerger"
    description = "Merges up to four images into one multi-channel image."
    category = "ImageFilter"
    blockwise = "pointwise"
    inputs = (Port("image", "channel1", "Channel 1"),) + tuple(
        Port("image", f"channel{k}", f"Channel {k}", optional=True) for k in range(2, _MAX + 1))
    outputs = (Port("image", "image", "Multi-channel (C, Z, Y, X) image"),)
    params = (
        Param("ChannelNames", "string", "",
              "Comma-separated channel names (optional; as many as channels)."),
    )

    def run(self, images, metas):
        given = [im for im in images if im is not None]
        if not given:
            raise ExecutionError("no input image", item=self.ctx.item_id or None, filter=self.name)
        first = given[0]
        parts, names = [], []
        for k, im in enumerate(given, 1):
            if not isinstance(im, Image):
                raise ExecutionError(f"input {k} is not an image", item=self.ctx.item_id or None,
                                     filter=self.name)
            if im.shape3d != first.shape3d:
                raise ExecutionError(f"input {k} has shape {im.shape3d}, input 1 {first.shape3d}: "
                                     "resample first", item=self.ctx.item_id or None, filter=self.name)
            data = im.data if im.is_multichannel else im.data[None]
            parts.append(data)
            own = im.meta.get("channel_names") if im.is_multichannel else [im.meta.get("channel_name")]
            names += list(own) if own and len(own) == data.shape[0] else [None] * data.shape[0]
        dtype = np.result_type(*[p.dtype for p in parts])
        out = np.concatenate([p.astype(dtype, copy=False) for p in parts])
        given_names = [s.strip() for s in self.p["ChannelNames"].split(",")] \
            if self.p["ChannelNames"].strip() else None
        if given_names is not None:
            if len(given_names) != out.shape[0]:
                raise ExecutionError(f"{len(given_names)} names for {out.shape[0]} channels",
                                     item=self.ctx.item_id or None, filter=self.name,
                                     key="ChannelNames")
            names = given_names
        meta = dict(first.meta)
        meta.update(channel_names=names if any(n for n in names) else None, is_label=False)
        meta.pop("channel", None)
        meta.pop("channel_name", None)
        return [Image(out, first.spacing, meta)], []

"""Writes pipelines/segment.xml and pipelines/segment_heat.xml from the filter declarations.

Every item lists all of its filter's parameters with their descriptions (as the XPIWIT GUI saves
pipelines); the values that differ from the defaults are set below.  Run after changing a filter:

    python scripts/make_segment_pipelines.py
"""

from __future__ import annotations

import os
import sys

from lxml import etree

from c3dseg.filters.base import registry
from c3dseg.filters.scale import model_cell_diameter_voxels

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "c3dseg", "pipelines")
XSI = "http://www.w3.org/2001/XMLSchema-instance"

#: EstimateCellDiameter refines its estimate with the pipeline's model (ModelPath) when True.  Off:
#: with the models shipped before 2026-12-01 the refinement made the estimate worse
#: (benchmarks/diameter.py --model c3dseg/models/tanh.onnx: validation 26/40 within 20 %, classical
#: 32/40).  With the model scale fixed (2026-12-01) it is better on validation (34/40) and mixed out of
#: distribution (15/20 vs 14/20 within 20 %, median error 8.6 % vs 7.3 %), but it lowers the
#: segmentation accuracy (benchmarks/accuracy.py --variant tanh-refine tanh
#: EstimateCellDiameter.ModelPath=../models/tanh.onnx: validation Dice 0.612 -> 0.571).
REFINE_DIAMETER = False

#: InstanceSizeFilter's MinRadiusVoxels as a fraction of the model's median cell diameter in voxels
#: (its metadata) times the Zoom: cells under ~0.4x the median diameter go (0.2 x 19.78 x 1.1 = 4.4 for
#: the shipped tanh model); the filter works on the model's grid, so the threshold follows its scale.
MIN_RADIUS_FRACTION = 0.2

#: ResampleToModelScale's Zoom per flow type: the cells are shown this many times larger than the
#: model's training diameter.  Chosen on 12 training-preset volumes the models never saw
#: (c3d-synth -o tune12 -n 12 --seed 5000 --preset train), never on the validation seeds, as the
#: largest mean per-cell Dice among 1.0, 1.1, 1.2 (1.35) whose AP@0.5 stays within 0.005 of 1.0's:
#: tanh 1.1 (Dice 0.613 -> 0.631, AP@0.5 0.506 -> 0.504; at 1.2 0.644 but AP@0.5 0.493), heat 1.2
#: (0.601 -> 0.644, AP@0.5 0.486 -> 0.503).  Small cells gain most; large ones start to split.  The
#: network's time grows with Zoom cubed (1.33x, 1.73x).  README "Default models" has the figures.
ZOOM = {"tanh": 1.1, "heat": 1.2}

#: Cells with less than this fraction of their voxels in the TissueMask (the voxels near visible
#: walls) are removed: the networks also find "cells" in the noisy, empty surround of a specimen.
TISSUE_OVERLAP = 0.5


def item(n, name, inputs=(), values=None, description=None):
    """``inputs``: (source item number or "cmd", output number) per image port."""
    cls = registry()[name]
    values = dict(values or {})
    it = etree.Element("item", item_id=f"item_{n:04d}")
    etree.SubElement(it, "name").text = name
    etree.SubElement(it, "description").text = description or cls.description
    inp = etree.SubElement(it, "input", number_images=str(len(inputs)), number_meta="0")
    for src, out in inputs:
        if src == "cmd":
            etree.SubElement(inp, "image", item_id_ref="cmd", number_of_output=str(out))
        else:
            etree.SubElement(inp, "image", item_id_ref=f"item_{src:04d}", number_of_output=str(out),
                             type_number="2")
    n_img = len(cls.ports("output", "image"))
    out = etree.SubElement(it, "output", number_images=str(n_img), number_meta=str(len(cls.ports("output", "meta"))))
    for k in range(1, n_img + 1):
        etree.SubElement(out, "image", number=str(k))
    for k in range(1, len(cls.ports("output", "meta")) + 1):
        etree.SubElement(out, "meta", number=str(k))
    args = etree.SubElement(it, "arguments")
    for spec in cls.all_params():
        v = values.pop(spec.key, spec.default)
        etree.SubElement(args, "parameter", key=spec.key, value=spec.format(spec.parse(v)),
                         type=str(spec.type_code), description=spec.description)
    if values:
        raise SystemExit(f"{name}: unknown parameters {sorted(values)}")
    return it


def segment(flow_type: str, model: str) -> etree._Element:
    model_path = f"../models/{model}"
    zoom = ZOOM[flow_type]
    # cells on the model's grid are zoom x the model's diameter across: the size threshold follows
    min_radius = round(MIN_RADIUS_FRACTION * zoom * model_cell_diameter_voxels(os.path.join(OUT, model_path)), 1)
    items = [
        item(1, "ImageReader", [("cmd", 0)], {"DefaultInput": "../data/sample.tif"},
             "Reads the stack (the bundled sample when no -i is given)"),
        item(2, "EstimateCellDiameter", [(1, 1)],
             {"WriteMetaData": False, "ModelPath": model_path if REFINE_DIAMETER else ""}) if "EstimateCellDiameter" in registry() else None,
        item(3, "ResampleToModelScale", [(2 if "EstimateCellDiameter" in registry() else 1, 1)],
             {"ModelPath": model_path, "Zoom": zoom}),
        item(4, "OnnxModel", [(3, 1)], {"ModelPath": model_path}),
        item(5, "TileMerger", [(4, 1)], {}),
        item(6, "FlowSmoothingFilter", [(5, 1), (5, 2), (5, 3), (5, 4)], {"Sigma": 1.0, "ForegroundThreshold": 0.5}),
        item(7, "FlowTrackingFilter", [(6, 1), (6, 2), (6, 3), (6, 4), (5, 2), (5, 3), (5, 4)],
             {"StepSize": 4.0, "NumIterations": 100}),
        item(8, "SinkClusteringFilter", [(7, 1)], {"ClosingRadius": 3}),
        item(9, "InstanceSizeFilter", [(8, 1)], {"MinRadiusVoxels": min_radius, "MaxRadiusVoxels": 100.0}),
        item(10, "InstanceForegroundOverlapFilter", [(9, 1), (6, 1)], {"MinOverlap": 0.2}),
        item(11, "InstanceFlowErrorFilter", [(10, 1), (5, 2), (5, 3), (5, 4)],
             {"MaxFlowError": 0.8, "FlowType": flow_type}),
        item(12, "InstanceAxisRatioFilter", [(11, 1)], {"MinAxisRatio": 0.1}),
        item(13, "ResampleImageFilter", [(12, 1), (1, 1)], {"Interpolation": "nearest"},
             "Back onto the input's grid (reference = the image read)"),
        item(14, "TissueMask", [(2 if "EstimateCellDiameter" in registry() else 1, 1)], {},
             "Tissue versus the empty surround, from the image alone (walls brighter than their surroundings)"),
        item(15, "InstanceForegroundOverlapFilter", [(13, 1), (14, 1)], {"MinOverlap": TISSUE_OVERLAP},
             "Removes cells found in the empty surround (less than MinOverlap of them in the tissue)"),
        item(16, "RelabelConsecutiveFilter", [(15, 1)], {}),
        item(17, "ImageWriter", [(16, 1)], {"LabelImage": "1"},
             "Writes uint16 labels with the input's calibration (-o FILE, or DIR/<name>.tif)"),
    ]
    root = etree.Element("xpiwit", nsmap={"xsi": XSI})
    root.set(f"{{{XSI}}}noNamespaceSchemaLocation", "c3dseg.xsd")
    pipe = etree.SubElement(root, "pipeline")
    for it in items:
        if it is not None:
            pipe.append(it)
    etree.indent(root, space="    ")
    return root


def main():
    for name, flow, model in (("segment.xml", "tanh", "tanh.onnx"), ("segment_heat.xml", "heat", "heat.onnx")):
        root = segment(flow, model)
        text = '<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root, encoding="unicode") + "\n"
        path = os.path.join(OUT, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

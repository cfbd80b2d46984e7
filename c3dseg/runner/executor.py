"""Run a validated :class:`~c3dseg.runner.plan.Plan` on one set of command-line inputs.

Outputs (``-o``):

* a **file** (``labels.tif``): the pipeline's single final image goes exactly there: the input of its
  ``ImageWriter`` with an empty ``FileName``, or else the one image output of the items with
  ``WriteResult=1``.  Nothing else is written (the MorphoGraphX contract).
* a **folder**: XPIWIT's layout, ``<dir>/<item_id>_<Filter>/<basename>_<Filter>_Out<k>.tif`` for every
  item with ``WriteResult=1`` (meta outputs as ``..._Meta<k>.csv`` when ``WriteMetaData=1``), writers
  with an empty ``FileName`` write ``<dir>/<basename>.tif``, and ``manifest.json`` lists every file.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

from ..errors import C3DError, ExecutionError, PipelineError
from ..filters.base import Context, resolve_relative
from ..image import Image, MetaTable
from .plan import Plan, Step

log = logging.getLogger("c3dseg")

from ..io import image_format, strip_image_extension


@dataclass
class Target:
    """Where a run writes: a single file or a folder."""

    path: str
    is_file: bool

    @classmethod
    def from_arg(cls, path: str | None, default_dir: str = "c3d_output") -> "Target":
        if not path:
            return cls(default_dir, False)
        if path.endswith(("/", os.sep)) or os.path.isdir(path):
            return cls(path.rstrip("/\\") or "/", False)
        if image_format(path) is not None:
            return cls(path, True)
        return cls(path, False)


@dataclass
class Planned:
    item_id: str
    kind: str        # "image" | "meta" | "writer"
    number: int
    path: str


@dataclass
class RunOptions:
    overwrite: bool = False
    threads: int = 0
    progress: bool = False
    verbose: bool = False
    trace_memory: bool = False   # log each item's peak memory (tracemalloc: slows allocation-heavy items)
    seed: int | None = None
    protected: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def basename_for(inputs: dict[int, str]) -> str:
    if not inputs:
        return "result"
    first = inputs[min(inputs)]
    return strip_image_extension(os.path.normpath(first))


def plan_outputs(plan: Plan, inputs: dict[int, str], target: Target) -> list[Planned]:
    """Every file the run will write, known before it starts."""
    base = basename_for(inputs)
    writers = [s for s in plan.steps if s.cls.is_writer and not s.params.get("FileName")]
    named_writers = [s for s in plan.steps if s.cls.is_writer and s.params.get("FileName")]
    out: list[Planned] = []
    for s in named_writers:
        out.append(Planned(s.item.item_id, "writer", 1,
                           resolve_relative(s.params["FileName"], plan.pipeline.base_dir)))
    if target.is_file:
        if len(writers) > 1:
            raise PipelineError(f"-o {target.path}: the pipeline has {len(writers)} writers without a FileName; "
                                "give an output folder instead", file=plan.pipeline.name)
        if writers:
            out.append(Planned(writers[0].item.item_id, "writer", 1, target.path))
            return out
        results = [(s, k) for s in plan.steps if s.params.get("WriteResult")
                   for k in range(1, len(s.cls.ports("output", "image")) + 1)]
        if len(results) != 1:
            raise PipelineError(f"-o {target.path}: a single output file needs exactly one final image, the pipeline "
                                f"has {len(results)} (items with WriteResult=1 or an ImageWriter); give an output "
                                "folder instead", file=plan.pipeline.name)
        s, k = results[0]
        out.append(Planned(s.item.item_id, "image", k, target.path))
        return out
    for s in writers:
        ext = _writer_ext(s)
        name = base if len(writers) == 1 else f"{base}_{s.item.item_id}"
        out.append(Planned(s.item.item_id, "writer", 1, os.path.join(target.path, name + ext)))
    for s in plan.steps:
        folder = os.path.join(target.path, f"{s.item.item_id}_{s.item.name}")
        if s.params.get("WriteResult"):
            for k in range(1, len(s.cls.ports("output", "image")) + 1):
                out.append(Planned(s.item.item_id, "image", k,
                                   os.path.join(folder, f"{base}_{s.item.name}_Out{k}.tif")))
        if s.params.get("WriteMetaData"):
            for k in range(1, len(s.cls.ports("output", "meta")) + 1):
                out.append(Planned(s.item.item_id, "meta", k,
                                   os.path.join(folder, f"{base}_{s.item.name}_Meta{k}.csv")))
    return out


def _writer_ext(step: Step) -> str:
    fmt = str(step.params.get("Format", "") or "").lower().lstrip(".")
    if fmt in ("", "auto", "tif", "tiff"):
        return ".tif"
    return "." + fmt


def execute(plan: Plan, inputs: dict[int, str], target: Target, opts: RunOptions) -> list[Planned]:
    """Run the plan once.  Returns the files written.  Errors carry file, item and filter."""
    planned = plan_outputs(plan, inputs, target)
    for idx in plan.cmd_indices:
        if idx not in inputs:
            raise PipelineError(f"the pipeline reads command-line input {idx}, but none was given "
                                f"(use -i {idx}=PATH)", file=plan.pipeline.name)
    by_item: dict[str, list[Planned]] = {}
    for p in planned:
        by_item.setdefault(p.item_id, []).append(p)
    protected = tuple(os.path.realpath(p) for p in opts.protected)
    for p in planned:
        if os.path.realpath(p.path) in protected:
            raise PipelineError(f"output {p.path} is an input of this run; refusing to overwrite it",
                                file=plan.pipeline.name, item=p.item_id)

    from ..io import to_precision, write_image, write_table

    results: dict[tuple[str, str, int], Any] = {}
    remaining = dict(plan.consumers)
    written: list[Planned] = []
    n = len(plan.steps)
    for k, step in enumerate(plan.steps, 1):
        it = step.item
        ctx = Context(item_id=it.item_id, pipeline_file=plan.pipeline.path, base_dir=plan.pipeline.base_dir,
                      threads=opts.threads, progress=opts.progress, seed=opts.seed,
                      extra=dict(opts.extra, protected_paths=protected))
        writer_out = [p for p in by_item.get(it.item_id, []) if p.kind == "writer"]
        if writer_out:
            ctx.extra["output_path"] = writer_out[0].path
            os.makedirs(os.path.dirname(os.path.abspath(writer_out[0].path)), exist_ok=True)
        images, metas = [], []
        for r in it.inputs:
            if r.is_cmd:
                value = inputs[r.output]
            else:
                value = results.get((r.source, r.kind, r.output))
                if value is None:
                    raise ExecutionError(f"{r.kind} input {r.port}: {r.source} produced no {r.kind} output {r.output}",
                                         file=plan.pipeline.name, item=it.item_id, filter=it.name)
            (images if r.kind == "image" else metas).append(value)
        t0 = time.perf_counter()
        if opts.trace_memory:
            tracemalloc.start()
        try:
            flt = step.cls(step.params, ctx)
            out_images, out_metas = flt.run(images, metas)
        except C3DError as e:
            raise e.located(file=plan.pipeline.name, item=it.item_id, filter=it.name)
        except MemoryError:
            raise ExecutionError("out of memory", file=plan.pipeline.name, item=it.item_id, filter=it.name) from None
        except Exception as e:
            raise ExecutionError(f"unexpected failure: {type(e).__name__}: {e}", file=plan.pipeline.name,
                                 item=it.item_id, filter=it.name) from e
        finally:
            peak = None
            if opts.trace_memory:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        dt = time.perf_counter() - t0
        out_images, out_metas = list(out_images or []), list(out_metas or [])
        n_img, n_meta = len(step.cls.ports("output", "image")), len(step.cls.ports("output", "meta"))
        if len(out_images) != n_img or len(out_metas) != n_meta:
            raise ExecutionError(f"filter returned {len(out_images)} images and {len(out_metas)} metas, declared "
                                 f"{n_img} and {n_meta}", file=plan.pipeline.name, item=it.item_id, filter=it.name)
        for j, img in enumerate(out_images, 1):
            results[(it.item_id, "image", j)] = img
        for j, m in enumerate(out_metas, 1):
            results[(it.item_id, "meta", j)] = m
        written.extend(writer_out)
        for p in by_item.get(it.item_id, []):
            if p.kind == "writer":
                continue
            value = results.get((it.item_id, p.kind, p.number))
            if value is None:
                continue
            try:
                os.makedirs(os.path.dirname(os.path.abspath(p.path)), exist_ok=True)
                if p.kind == "image":
                    if not isinstance(value, Image):
                        raise ExecutionError(f"output {p.number} is not an image ({type(value).__name__}) and "
                                             "cannot be written; set WriteResult=0", key="WriteResult")
                    write_image(p.path, to_precision(value, step.params.get("Precision", 16)),
                                compression=bool(step.params.get("Compression", True)), protect=protected)
                else:
                    write_table(p.path, value)
            except C3DError as e:
                raise e.located(file=plan.pipeline.name, item=it.item_id, filter=it.name)
            except OSError as e:
                raise ExecutionError(f"cannot write {p.path}: {e.strerror or e}", file=plan.pipeline.name,
                                     item=it.item_id, filter=it.name) from None
            written.append(p)
        msg = f"[{k}/{n}] {it.item_id} {it.name}: {dt:.2f} s"
        if peak is not None:
            msg += f", peak {peak / 2**20:.1f} MiB allocated"
        log.info(msg)
        # free what no later item needs
        for r in it.inputs:
            if r.is_cmd:
                continue
            key = (r.source, r.kind, r.output)
            remaining[key] -= 1
            if remaining[key] == 0:
                results.pop(key, None)
        for key in [key for key in results if key[0] == it.item_id and key not in remaining]:
            results.pop(key)  # outputs nobody consumes (already written if asked)
        gc.collect(0)
    return written

"""Validation and ordering: turn a parsed :class:`Pipeline` into an executable :class:`Plan`.

Everything that can be checked without running is checked here, before any filter runs:
unknown filters (close names suggested), dangling references and output numbers, port counts and
kinds, parameter values, required files, and cycles (the items in the cycle are named).
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import C3DError, ParameterError, PipelineError
from ..filters.base import Filter, registry, resolve_relative
from .pipeline import Item, Pipeline, _id_number

log = logging.getLogger("c3dseg")


@dataclass
class Step:
    item: Item
    cls: type[Filter]
    params: dict[str, Any]


@dataclass
class Plan:
    pipeline: Pipeline
    steps: list[Step]                                  # topological order
    consumers: dict[tuple[str, str, int], int]         # (item, kind, output) -> number of consumers
    cmd_indices: list[int]                             # command-line inputs used (0-based)
    warnings: list[str] = field(default_factory=list)

    def step(self, item_id: str) -> Step:
        for s in self.steps:
            if s.item.item_id == item_id:
                return s
        raise KeyError(item_id)


def suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if not close:
        low = {k.lower(): k for k in known}
        close = [low[k] for k in difflib.get_close_matches(name.lower(), list(low), n=3, cutoff=0.5)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def build_plan(pipeline: Pipeline, *, strict: bool = False,
               overrides: list[tuple[str, str, str]] | None = None) -> Plan:
    """Validate ``pipeline`` and order its items.

    Parameters
    ----------
    strict : bool
        Unknown parameters are errors (default: a warning naming each).
    overrides : list of (item, key, value)
        ``--set`` values; ``item`` is an item id or a filter name that must be unique.

    Raises
    ------
    PipelineError
        The first problem found, or for unknown filters all of them in one message.
    """
    reg = registry()
    file = pipeline.name
    if not pipeline.items:
        raise PipelineError("the pipeline has no items", file=file)

    # 1. filters must exist: report all missing ones at once
    missing = [it for it in pipeline.items if it.name not in reg]
    if missing:
        names = []
        for it in missing:
            names.append(f"{it.name} ({it.item_id}){suggest(it.name, reg)}")
        raise PipelineError(f"unknown filter{'s' if len(missing) > 1 else ''}: " + "; ".join(names), file=file)

    # 2. --set overrides, applied to the tree so that a saved pipeline keeps them
    for ref, key, value in overrides or ():
        hits = pipeline.find_items(ref)
        if not hits:
            raise PipelineError(f"--set {ref}.{key}: no item with id or filter name {ref!r}"
                                f"{suggest(ref, [i.item_id for i in pipeline.items] + [i.name for i in pipeline.items])}",
                                file=file)
        if len(hits) > 1:
            raise PipelineError(f"--set {ref}.{key}: filter name {ref!r} is used by several items "
                                f"({', '.join(h.item_id for h in hits)}); use an item id", file=file)
        it = hits[0]
        spec = reg[it.name].param_spec(key)
        if spec is None:
            raise ParameterError(f"--set: unknown parameter{suggest(key, [p.key for p in reg[it.name].all_params()])}",
                                 file=file, item=it.item_id, filter=it.name, key=key)
        if spec.path and value and not os.path.isabs(os.path.expanduser(value)):
            # typed on the command line: relative to where the user is, not to the pipeline's folder
            value = os.path.abspath(os.path.expanduser(value))
        pipeline.set_param(it, key, value, type_code=spec.type_code, description=spec.description)

    # 3. parameters
    steps: dict[str, Step] = {}
    warnings: list[str] = []
    for it in pipeline.items:
        cls = reg[it.name]
        given = {k: e.value for k, e in it.params.items()}
        unknown: list[str] = []
        try:
            params = cls.resolve_params(given, strict=strict, unknown=unknown)
        except C3DError as e:
            raise PipelineError(e.message, file=file, item=it.item_id, filter=it.name, key=e.key) from None
        for key in unknown:
            msg = (f"{file}: {it.item_id} ({it.name}): {key}: unknown parameter, ignored"
                   f"{suggest(key, [p.key for p in cls.all_params()])}")
            warnings.append(msg)
        for spec in cls.all_params():
            if spec.exists and params.get(spec.key):
                path = resolve_relative(params[spec.key], pipeline.base_dir)
                if not os.path.isfile(path):
                    raise PipelineError(f"file not found: {params[spec.key]}"
                                        + (f" (resolved to {path})" if path != params[spec.key] else ""),
                                        file=file, item=it.item_id, filter=it.name, key=spec.key)
        steps[it.item_id] = Step(it, cls, params)

    # 4. connections
    consumers: dict[tuple[str, str, int], int] = {}
    cmd: set[int] = set()
    for it in pipeline.items:
        cls = reg[it.name]
        for kind in ("image", "meta"):
            refs = it.input_refs(kind)
            ports = cls.ports("input", kind)
            required = sum(1 for p in ports if not p.optional)
            if len(refs) < required or len(refs) > len(ports):
                want = f"{required}" if required == len(ports) else f"{required} to {len(ports)}"
                raise PipelineError(f"{it.name} takes {want} {kind} input{'s' if len(ports) != 1 else ''}, "
                                    f"the pipeline connects {len(refs)}", file=file, item=it.item_id, filter=it.name)
            for r in refs:
                where = f"{kind} input {r.port}" + (f" (line {r.line})" if r.line else "")
                if r.is_cmd:
                    if not cls.is_reader or kind != "image":
                        raise PipelineError(f"{where}: only a reader can take a command-line input (cmd)",
                                            file=file, item=it.item_id, filter=it.name)
                    if r.output < 0:
                        raise PipelineError(f"{where}: command-line input index must be >= 0, got {r.output}",
                                            file=file, item=it.item_id, filter=it.name)
                    cmd.add(r.output)
                    continue
                src = steps.get(r.source)
                if src is None:
                    raise PipelineError(f"{where}: refers to missing item {r.source!r}"
                                        f"{suggest(r.source, steps)}", file=file, item=it.item_id, filter=it.name)
                if cls.is_reader and kind == "image" and r.port == 1:
                    raise PipelineError(f"{where}: a reader's input must be a command-line input "
                                        f"(item_id_ref=\"cmd\"), not {r.source}",
                                        file=file, item=it.item_id, filter=it.name)
                n_out = len(src.cls.ports("output", kind))
                if not 1 <= r.output <= n_out:
                    other = "meta" if kind == "image" else "image"
                    hint = ""
                    if 1 <= r.output <= len(src.cls.ports("output", other)):
                        hint = f" (it has a {other} output {r.output}: port kind mismatch)"
                    raise PipelineError(f"{where}: {r.source} ({src.cls.name}) has {n_out} {kind} output"
                                        f"{'s' if n_out != 1 else ''}, number_of_output={r.output} does not exist"
                                        + hint, file=file, item=it.item_id, filter=it.name)
                key = (r.source, kind, r.output)
                consumers[key] = consumers.get(key, 0) + 1

    # 5. order (Kahn), cycles named
    order = _toposort(pipeline, steps, file)
    return Plan(pipeline, [steps[i] for i in order], consumers, sorted(cmd), warnings)


def _toposort(pipeline: Pipeline, steps: dict[str, Step], file: str) -> list[str]:
    deps = {iid: sorted({r.source for r in s.item.inputs if not r.is_cmd}) for iid, s in steps.items()}
    indeg = {iid: len(d) for iid, d in deps.items()}
    users: dict[str, list[str]] = {iid: [] for iid in steps}
    for iid, d in deps.items():
        for src in d:
            users[src].append(iid)
    # ready items in document order (then by numeric id) for a stable, readable order
    doc_index = {it.item_id: k for k, it in enumerate(pipeline.items)}
    key = lambda i: (_id_number(i) if _id_number(i) is not None else 1 << 30, doc_index[i])  # noqa: E731
    ready = sorted([i for i, n in indeg.items() if n == 0], key=key)
    order = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
                ready.sort(key=key)
    if len(order) < len(steps):
        cycle = _find_cycle({i: deps[i] for i in steps if i not in order})
        names = " -> ".join(f"{i} ({steps[i].item.name})" for i in cycle)
        raise PipelineError(f"the pipeline has a cycle: {names}", file=file)
    return order


def _find_cycle(deps: dict[str, list[str]]) -> list[str]:
    """One cycle among ``deps`` (every node there is on or behind a cycle)."""
    start = sorted(deps)[0]
    path, seen = [start], {start: 0}
    node = start
    while True:
        nxt = next(d for d in deps[node] if d in deps)
        if nxt in seen:
            cyc = path[seen[nxt]:]
            return cyc + [nxt]
        seen[nxt] = len(path)
        path.append(nxt)
        node = nxt


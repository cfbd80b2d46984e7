"""``c3d-run``: run, validate and describe XPIWIT-style XML pipelines.

Exit codes: 0 done, 2 invalid pipeline or arguments, 1 failure while running.
XPIWIT's own command line (``--xml``, ``--input "0, PATH, 3, float"``, ``--output DIR/``, ``--seed``,
``--lockfile``, ``--subfolder``, ``--outputformat``, ``--end``) works unchanged, also one argument
per line on standard input (``c3d-run < Cellpose3D.txt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from importlib import resources

from .. import __version__
from ..errors import C3DError, PipelineError
from ..io import strip_image_extension
from .executor import RunOptions, Target, execute, plan_outputs
from .pipeline import Pipeline
from .plan import build_plan, suggest

log = logging.getLogger("c3dseg")

XPIWIT_FLAGS = ("--xml", "--input", "--output", "--seed", "--lockfile", "--subfolder", "--outputformat", "--end")


class ArgError(PipelineError):
    """Bad command-line arguments (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise ArgError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="c3d-run", description="Run an XPIWIT-style XML pipeline of c3dseg filters.",
                epilog="Exit codes: 0 done, 2 invalid pipeline or arguments, 1 failure while running.")
    p.add_argument("pipeline", nargs="?", help="pipeline XML file, or the name of a shipped pipeline (e.g. segment)")
    p.add_argument("-i", "--input", dest="inputs", action="append", default=[], metavar="[IDX=]PATH",
                   help="command-line input (file or folder); repeat for inputs 0, 1, ... or give IDX=PATH")
    p.add_argument("-o", "--output", help="output file (.tif etc.: the single final image) or folder "
                                          "(XPIWIT layout + manifest.json); default ./c3d_output/")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="ITEM.KEY=VALUE",
                   help="override a parameter; ITEM is an item_id or a filter name used once")
    p.add_argument("--validate", action="store_true", help="check the pipeline (and --set values) and exit")
    p.add_argument("--strict", action="store_true", help="unknown parameters are errors, not warnings")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never inputs)")
    p.add_argument("--threads", type=int, default=0, help="limit threads for every item (default: all cores)")
    p.add_argument("--seed", type=int, default=None, help="random seed (XPIWIT --seed)")
    p.add_argument("--save-pipeline", metavar="FILE.xml", help="write the pipeline with the --set values applied")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log each item's time; -vv also its peak "
                                                                      "memory and debug messages; tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    p.add_argument("--list-filters", action="store_true", help="list the registered filters and exit")
    p.add_argument("--describe", metavar="FILTER", help="describe a filter's ports and parameters and exit")
    p.add_argument("--schema", metavar="FILE.xsd", help="write the pipeline XML Schema and exit")
    p.add_argument("--schema-version", choices=("1.0", "1.1"), default="1.0",
                   help="XSD 1.0 (default) or 1.1 (adds per-filter parameter keys and value types)")
    p.add_argument("--catalog", metavar="FILE.xml", help="write every filter as a ready-to-paste <item> and exit")
    p.add_argument("--version", action="version", version=f"c3dseg {__version__}")
    from ..blockwise.cli import add_blockwise_arguments  # --blocks, --workers, --scheduler, --memory-limit

    add_blockwise_arguments(p)
    return p


# -- XPIWIT compatibility ----------------------------------------------------------------------

def read_stdin_args(stream) -> list[str]:
    """XPIWIT's argument file: one ``--flag value`` per line, up to ``--end``."""
    args: list[str] = []
    for raw in stream:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        flag, _, value = line.partition(" ")
        args.append(flag)
        if flag == "--end":
            break
        if value.strip():
            args.append(value.strip())
    return args


def translate_xpiwit(argv: list[str]) -> list[str]:
    """Map XPIWIT's flags onto ours; other arguments pass through."""
    if not any(a in XPIWIT_FLAGS[:3] for a in argv):
        return argv
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--end":
            i += 1
            continue
        if a == "--xml":
            out.insert(0, _need(a, nxt))
        elif a == "--input":
            parts = [s.strip() for s in _need(a, nxt).split(",")]
            if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
                idx, path = parts[0], ",".join(parts[1:2])
                if len(parts) >= 3 and parts[2] not in ("", "3"):
                    raise ArgError(f"--input {nxt!r}: c3dseg processes 3D images (dimension 3), got {parts[2]}")
                out += ["-i", f"{idx}={path}"]
            else:
                out += ["-i", _need(a, nxt)]
        elif a == "--output":
            value = _need(a, nxt).split(",")[0].strip()
            out += ["-o", value if value.endswith(("/", "\\")) else value + "/"]
        elif a == "--seed":
            out += ["--seed", _need(a, nxt)]
        elif a in ("--lockfile", "--subfolder", "--outputformat"):
            value = _need(a, nxt)
            expected = {"--lockfile": "off", "--subfolder": "filterid, filtername",
                        "--outputformat": "imagename, filtername"}[a]
            if " ".join(value.replace(",", ", ").split()) != expected:
                log.warning("%s %r: only %r is supported; using it", a, value, expected)
        else:
            out.append(a)
            i += 1
            continue
        i += 2
    return out


def _need(flag, value):
    if value is None or (value.startswith("--") and value not in ("--",)):
        raise ArgError(f"{flag} needs a value")
    return value


# -- helpers -----------------------------------------------------------------------------------

def shipped_pipelines_dir() -> str:
    return str(resources.files("c3dseg") / "pipelines")


def find_pipeline(name: str) -> str:
    """A path, or the name of a shipped pipeline (``segment`` or ``segment.xml``)."""
    if os.path.exists(name):
        return name
    if os.sep not in name and "/" not in name:
        base = shipped_pipelines_dir()
        for cand in (name, name + ".xml"):
            path = os.path.join(base, cand)
            if os.path.isfile(path):
                return path
        shipped = sorted(strip_image_extension(f) for f in os.listdir(base) if f.endswith(".xml")) if os.path.isdir(base) else []
        raise ArgError(f"pipeline {name!r} not found (not a file, not a shipped pipeline; shipped: "
                       f"{', '.join(shipped) or 'none'}){suggest(name, shipped)}")
    raise ArgError(f"pipeline file not found: {name}")


def parse_inputs(values: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    nxt = 0
    for v in values:
        head, sep, tail = v.partition("=")
        if sep and head.strip().isdigit():
            idx, path = int(head), tail
        else:
            idx, path = nxt, v
        if idx in out:
            raise ArgError(f"-i: input {idx} given twice ({out[idx]} and {path})")
        out[idx] = path
        nxt = max(out) + 1
    return out


def parse_sets(values: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for v in values:
        lhs, sep, value = v.partition("=")
        item, dot, key = lhs.partition(".")
        if not sep or not dot or not item or not key:
            raise ArgError(f"--set {v!r}: expected ITEM.KEY=VALUE")
        out.append((item.strip(), key.strip(), value))
    return out


def expand_inputs(inputs: dict[int, str]) -> list[dict[int, str]]:
    """One dict per run: folders expand to their image files (sorted), several folders pair up."""
    from ..io import is_image_file

    folders = {i: p for i, p in inputs.items() if os.path.isdir(p) and not p.lower().rstrip("/").endswith(".zarr")}
    if not folders:
        return [dict(inputs)]
    listed = {}
    for i, p in folders.items():
        files = sorted(os.path.join(p, f) for f in os.listdir(p)
                       if not f.startswith(".") and is_image_file(os.path.join(p, f)))
        if not files:
            raise ArgError(f"input folder {p} holds no image files")
        listed[i] = files
    counts = {len(v) for v in listed.values()}
    if len(counts) > 1:
        raise ArgError("input folders hold different numbers of images: " +
                       ", ".join(f"{folders[i]} ({len(v)})" for i, v in listed.items()))
    runs = []
    for k in range(counts.pop()):
        d = dict(inputs)
        for i, files in listed.items():
            d[i] = files[k]
        runs.append(d)
    return runs


def default_inputs(plan, base_dir: str) -> dict[int, str]:
    """Readers may name a default input (``DefaultInput``, relative to the pipeline)."""
    from ..filters.base import resolve_relative

    out = {}
    for s in plan.steps:
        if s.cls.is_reader and s.params.get("DefaultInput"):
            for r in s.item.inputs:
                if r.is_cmd:
                    out[r.output] = resolve_relative(s.params["DefaultInput"], base_dir)
    return out


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))
    handler.addFilter(_LowerLevel())
    root = logging.getLogger("c3dseg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _LowerLevel(logging.Filter):
    def filter(self, record):
        record.levelname_lower = record.levelname.lower()
        return True


# -- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        if not argv and not sys.stdin.isatty():
            argv = read_stdin_args(sys.stdin)
    verbose = sum(a.count("v") for a in argv if a.startswith("-v") and set(a[1:]) == {"v"}) + \
        argv.count("--verbose")
    try:
        return _main(list(argv))
    except C3DError as e:
        print(f"error: {e}", file=sys.stderr)
        if verbose:
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(translate_xpiwit(argv))
    setup_logging(args.verbose, args.quiet)
    if args.threads < 0:
        raise ArgError("--threads must be >= 0")

    from ..filters.base import registry

    if args.list_filters:
        reg = registry()
        width = max(map(len, reg)) if reg else 10
        for name in sorted(reg):
            print(f"{name:<{width}}  {reg[name].category:<12}  {reg[name].description}")
        return 0
    if args.describe:
        cls = registry().get(args.describe)
        if cls is None:
            raise ArgError(f"--describe: unknown filter {args.describe!r}{suggest(args.describe, registry())}")
        print(cls.describe())
        return 0
    if args.schema or args.catalog:
        if args.schema:
            from ..schemas.xsd import write_xsd
            write_xsd(args.schema, args.schema_version)
            print(f"wrote {args.schema}")
        if args.catalog:
            from ..schemas.catalog import write_catalog
            write_catalog(args.catalog)
            print(f"wrote {args.catalog}")
        return 0
    if not args.pipeline:
        raise ArgError("no pipeline given (c3d-run PIPELINE.xml [-i INPUT] [-o OUTPUT]); see c3d-run --help")

    path = find_pipeline(args.pipeline)
    pipeline = Pipeline.load(path)
    plan = build_plan(pipeline, strict=args.strict, overrides=parse_sets(args.sets))
    for w in plan.warnings:
        log.warning(w)
    if args.save_pipeline:
        if os.path.realpath(args.save_pipeline) == os.path.realpath(path) and not args.overwrite:
            raise ArgError(f"--save-pipeline {args.save_pipeline}: that is the pipeline itself; add --overwrite")
        pipeline.save(args.save_pipeline)
        log.warning("wrote %s", args.save_pipeline) if not args.quiet else None
    if args.validate:
        if not args.quiet:
            print(f"ok: {pipeline.name}: {len(plan.steps)} items, order "
                  + " -> ".join(s.item.item_id for s in plan.steps))
        return 0

    inputs = parse_inputs(args.inputs)
    used_default = False
    for idx, p in default_inputs(plan, pipeline.base_dir).items():
        if idx not in inputs:
            inputs[idx] = p
            used_default = True
    for idx, p in inputs.items():
        if not os.path.exists(p):
            raise ArgError(f"input {idx}: file not found: {p}")
    runs = expand_inputs(inputs)
    target = Target.from_arg(args.output)
    if target.is_file and len(runs) > 1:
        raise ArgError(f"-o {target.path}: {len(runs)} inputs need an output folder, not a file")
    if used_default and not args.quiet:
        print(f"no -i given: using the bundled sample {inputs[min(inputs)]}", file=sys.stderr)

    from ..blockwise.cli import run_blockwise_cli, wants_blockwise

    if wants_blockwise(args):  # volumes larger than memory: blockwise on Dask
        return run_blockwise_cli(args, plan, path, runs, target)

    opts = RunOptions(overwrite=args.overwrite, threads=args.threads, verbose=bool(args.verbose),
                      trace_memory=args.verbose > 1, progress=(not args.quiet) and sys.stderr.isatty(), seed=args.seed)
    if args.seed is not None:
        import numpy as np
        np.random.seed(args.seed)

    manifest_entries, failures, skipped = [], [], 0
    plain_progress = not args.quiet and not sys.stderr.isatty()
    bar = None
    if opts.progress and len(runs) > 1:
        from tqdm import tqdm
        bar = tqdm(total=len(runs), unit="file", desc="c3d-run", file=sys.stderr)
    for k, run_inputs in enumerate(runs, 1):
        label = os.path.basename(run_inputs[min(run_inputs)]) if run_inputs else pipeline.name
        t0 = time.perf_counter()
        try:
            planned = plan_outputs(plan, run_inputs, target)
            existing = [p for p in planned if os.path.exists(p.path)]
            if planned and len(existing) == len(planned) and not args.overwrite:
                if target.is_file:
                    raise ArgError(f"output {target.path} exists; add --overwrite to replace it")
                skipped += 1
                log.info("%s: outputs exist, skipped (use --overwrite to redo)", label)
                manifest_entries += [_entry(p, run_inputs) for p in planned]
                continue
            if target.is_file and existing and not args.overwrite:
                raise ArgError(f"output {existing[0].path} exists; add --overwrite to replace it")
            opts.protected = tuple(run_inputs.values())
            written = execute(plan, run_inputs, target, opts)
            manifest_entries += [_entry(p, run_inputs) for p in written]
            if plain_progress:
                print(f"progress: {k}/{len(runs)} {label} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
        except C3DError as e:
            if len(runs) == 1:
                raise
            failures.append((label, e))
            print(f"error: {label}: {e}", file=sys.stderr)
            if args.verbose:
                traceback.print_exc()
        finally:
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    if not target.is_file:
        _write_manifest(target.path, path, manifest_entries, failures)
    if not args.quiet:
        done = len(runs) - len(failures) - skipped
        where = target.path
        print(f"done: {done} processed, {skipped} skipped, {len(failures)} failed; output: {where}", file=sys.stderr)
    if failures:
        for label, e in failures:
            print(f"failed: {label}: {e}", file=sys.stderr)
        return 1
    return 0


def _entry(p, run_inputs) -> dict:
    return {"input": {str(k): v for k, v in run_inputs.items()}, "item": p.item_id, "kind": p.kind,
            "output": p.number, "path": os.path.abspath(p.path)}


def _write_manifest(folder: str, pipeline_path: str, entries: list[dict], failures) -> None:
    from ..io_atomic import atomic_write_bytes

    os.makedirs(folder, exist_ok=True)
    doc = {"c3dseg": __version__, "pipeline": os.path.abspath(pipeline_path), "files": entries,
           "failures": [{"input": label, "error": str(e)} for label, e in failures]}
    atomic_write_bytes(os.path.join(folder, "manifest.json"), (json.dumps(doc, indent=2) + "\n").encode())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

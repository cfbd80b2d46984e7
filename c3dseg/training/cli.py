"""Console scripts ``c3d-train`` and ``c3d-export``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import C3DError, InputError, ParameterError

log = logging.getLogger("c3dseg")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("c3dseg").setLevel(level)


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def _fail(e: BaseException, verbose: bool, code: int) -> int:
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)
    return code


def train_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="c3d-train",
        description="Train the c3dseg 3D U-Net (foreground + flows) from a YAML config. Every config key can be "
                    "overridden with --set section.key=value.")
    parser.add_argument("config", help="YAML config (see configs/tanh.yaml)")
    parser.add_argument("--steps", type=int, help="training steps (train.steps)")
    parser.add_argument("--minutes", type=float, help="stop after this much training time (train.max_minutes)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="device (device)")
    parser.add_argument("--out", help="output folder (out)")
    parser.add_argument("--threads", type=int, help="torch threads (threads; 0 = all cores)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--init", metavar="CHECKPOINT",
                        help="start from this checkpoint's weights, e.g. to fine-tune on your own data (train.init)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        from .train import load_config, resolve_config, set_key, train

        raw = load_config(args.config)
        for item in args.set:
            if "=" not in item:
                parser.error(f"--set expects KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            set_key(raw, key.strip(), _parse_value(value))
        for key, value in (("train.steps", args.steps), ("train.max_minutes", args.minutes),
                           ("device", args.device), ("threads", args.threads)):
            if value is not None:
                set_key(raw, key, value)
        base = os.path.dirname(os.path.abspath(args.config))
        if args.out:
            raw["out"] = os.path.abspath(args.out)
        if args.init:
            set_key(raw, "train.init", os.path.abspath(args.init))
        cfg = resolve_config(raw, base_dir=base)
        result = train(cfg, resume=args.resume, progress=False if args.no_progress else None)
    except C3DError as e:
        return _fail(e, args.verbose, e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        return _fail(RuntimeError("out of memory: lower train.patch_size or train.batch_size"), args.verbose, 1)
    except (RuntimeError, OSError, ValueError) as e:
        return _fail(e, args.verbose, 1)
    best = "n/a" if result["best"] is None else f"{result['best']:.4f} at step {result['best_step']}"
    print(f"trained {result['steps']} steps in {result['elapsed_s'] / 60:.1f} min (amp {result['amp']}); "
          f"best validation score {best}")
    ckpts = [p for p in (result["best_checkpoint"], result["last"]) if os.path.isfile(p)]
    print(f"checkpoints: {', '.join(ckpts) or 'none'}; log: {result['log']}")
    if result["interrupted"]:
        print(f"interrupted: continue with c3d-train {args.config} --resume" + (f" --out {args.out}" if args.out else ""))
    if result.get("onnx"):
        print(f"model: {result['onnx']}")
    return 130 if result["interrupted"] else 0


def _rescanned(checkpoint: str, folder: str) -> dict:
    """The checkpoint with its model scale recomputed from the label files in ``folder``."""
    from .data import _image_files, rescan_scale
    from .export import load_checkpoint

    ck = load_checkpoint(checkpoint)
    info = dict(ck.get("data_info", {}))
    resample_to = info.get("resample_to")
    if not isinstance(resample_to, dict):
        raise ParameterError(f"{checkpoint}: trained without resample_to: {{cell_diameter_voxels: D}}, so it has "
                             "no model scale to recompute", key="--rescan-labels")
    try:
        paths = _image_files(folder)
    except InputError as e:
        raise InputError(f"{e.args[0] if e.args else e}", key="--rescan-labels") from None
    spacing = (ck.get("config", {}).get("data", {}) or {}).get("spacing")
    new = rescan_scale(paths, resample_to, spacing)
    info.setdefault("pooled_cell_diameter_voxels", info.get("median_cell_diameter_voxels"))
    log.info("model scale from %d label files: %.4g voxels (was %.4g)", new["rescanned_volumes"],
             new["median_cell_diameter_voxels"], float(info.get("median_cell_diameter_voxels", float("nan"))))
    info.update(new)
    return dict(ck, data_info=info)


def export_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="c3d-export",
        description="Export a c3d-train checkpoint (or run folder) to ONNX with its metadata, checked against torch.")
    parser.add_argument("checkpoint", help="best.pt / last.pt, or a run folder (its best.pt)")
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--fp16", action="store_true", help="float16 weights and compute (GPUs); float32 I/O")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--tolerance", type=float, help="largest accepted |onnxruntime - torch| "
                        "(default 1e-3, 2e-2 with --fp16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--rescan-labels", metavar="DIR",
                        help="recompute the model scale (median_cell_diameter_voxels) from the training label "
                             "files in DIR, as c3d-train measures it now (for checkpoints trained before "
                             "2026-12-01, whose scale counted cells cut by the training crops)")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output}: the output exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        from .export import export_onnx

        checkpoint = args.checkpoint
        if args.rescan_labels:
            checkpoint = _rescanned(checkpoint, args.rescan_labels)
        r = export_onnx(checkpoint, args.output, opset=args.opset, fp16=args.fp16, tol=args.tolerance)
    except C3DError as e:
        return _fail(e, args.verbose, e.exit_code)
    except (RuntimeError, OSError, ValueError) as e:
        return _fail(e, args.verbose, 1)
    if r["checked"]:
        print(f"wrote {r['path']}: max |onnxruntime - torch| = {r['max_abs_diff']:.3g} "
              f"(tolerance {r['tolerance']:g}, input {'x'.join(map(str, r['shape']))})")
    else:
        print(f"wrote {r['path']} (float16: not checked on this machine)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())

"""c3dseg for MorphoGraphX: segment the current stack with c3d-run and load the labels.

Run it inside MorphoGraphX (Process "Misc/Python", or ``mgx --model c3dseg_mgx.py``): it saves the
current Main stack to a temporary TIFF, calls ``c3d-run`` on it (single file in, single file out,
uint16 labels with the input's calibration) and opens the labels into the Work stack.

Outside MorphoGraphX the same file is a small command-line tool (used by the tests)::

    python c3dseg_mgx.py INPUT.tif OUTPUT.tif [--pipeline segment] [--set ITEM.KEY=VALUE]...

Settings (edit here, or set the environment variables):
    C3D_RUN       the c3d-run executable (default: found on PATH, else "python -m c3dseg.runner.cli")
    C3D_PIPELINE  pipeline file or shipped name (default: segment)
    C3D_SET       extra ";"-separated ITEM.KEY=VALUE overrides, e.g. "EstimateCellDiameter.CellDiameterUm=8"
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

PIPELINE = os.environ.get("C3D_PIPELINE", "segment")
EXTRA_SETS = [s for s in os.environ.get("C3D_SET", "").split(";") if s.strip()]


def c3d_run_command() -> list[str]:
    exe = os.environ.get("C3D_RUN")
    if exe:
        return shlex.split(exe)
    found = shutil.which("c3d-run")
    if found:
        return [found]
    return [sys.executable, "-m", "c3dseg.runner.cli"]


def build_command(input_path: str, output_path: str, pipeline: str = PIPELINE, sets=()) -> list[str]:
    """The c3d-run call: one file in, one file out, overwriting only our own output file."""
    cmd = c3d_run_command() + [pipeline, "-i", input_path, "-o", output_path, "--overwrite"]
    for s in list(sets) + EXTRA_SETS:
        cmd += ["--set", s]
    return cmd


def segment_file(input_path: str, output_path: str, pipeline: str = PIPELINE, sets=(), log=print) -> None:
    """Run c3d-run; raise RuntimeError with c3d-run's one-line error when it fails."""
    cmd = build_command(input_path, output_path, pipeline, sets)
    log("c3dseg: " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last_error = ""
    for line in proc.stdout:  # plain progress lines (c3d-run writes no bars when not on a terminal)
        line = line.rstrip()
        if line:
            log("c3dseg: " + line)
        if line.startswith("error:"):
            last_error = line
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(last_error or f"c3d-run failed with exit code {rc}")
    if not os.path.isfile(output_path):
        raise RuntimeError(f"c3d-run wrote no file at {output_path}")


def run_in_morphographx(Process) -> None:  # pragma: no cover - needs MorphoGraphX
    """Save Main stack 0, segment it, open the labels into the Work stack."""
    tmp = tempfile.mkdtemp(prefix="c3dseg_mgx_")
    src = os.path.join(tmp, "stack.tif")
    dst = os.path.join(tmp, "labels.tif")
    Process.Stack__System__Save(src, "Main", "0", "0", "")
    segment_file(src, dst)
    Process.Stack__System__Open(dst, "Work", "0", "")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Segment a stack with c3d-run (MorphoGraphX helper).")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--pipeline", default=PIPELINE)
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args(argv)
    try:
        segment_file(a.input, a.output, a.pipeline, a.sets)
    except RuntimeError as e:
        print(str(e) if str(e).startswith("error:") else f"error: {e}", file=sys.stderr)
        return 1
    return 0


try:  # inside MorphoGraphX the module "Process" exists in the interpreter's globals
    Process  # type: ignore[name-defined]  # noqa: B018
except NameError:
    if __name__ == "__main__":
        sys.exit(main())
else:  # pragma: no cover
    run_in_morphographx(Process)  # type: ignore[name-defined]

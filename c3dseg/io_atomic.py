"""Atomic file writing: write to a temporary name in the target folder, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error remove it.

    The temporary name keeps the extension (``suffix``, default: that of ``path``) so that writers
    choosing a format by extension still work.
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(path)
    if not suffix:
        suffix = "".join(_exts(base))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part" + suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _exts(name: str) -> list[str]:
    parts = name.split(".")
    if len(parts) <= 1:
        return []
    exts = ["." + parts[-1]]
    if len(parts) > 2 and parts[-2].lower() in ("ome", "nii"):
        exts.insert(0, "." + parts[-2])
    return exts

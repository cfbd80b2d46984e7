"""Fault injection for the blockwise tests (test-only; production code has no hook for it).

:func:`inject` wraps :meth:`c3dseg.blockwise.runtime.Runtime.run_pass` (monkeypatched in the test
process) so that the function of one named pass is replaced by a :class:`Fault` around it.  The
Fault travels to the workers as an ordinary task argument: it is pickled by reference to this
module, which worker processes import from ``tests/`` (a spawned worker inherits the parent's
``sys.path``).  On the worker it misbehaves on one block:

* ``"fail"``: the task raises every time (an interrupted run);
* ``"raise"``: the task raises once per run (marker file), then runs normally;
* ``"exit"``: the worker process dies in the middle of the task once (``os._exit``; marker file),
  so the scheduler has to run the block again on another (restarted) worker.
"""

from __future__ import annotations

import os

MODES = ("fail", "raise", "exit")


class Fault:
    """``fn`` with a fault on the block named ``block`` (see the module docstring)."""

    def __init__(self, fn, block: str, mode: str, marker: str):
        if mode not in MODES:
            raise ValueError(f"fault mode {mode!r}: expected one of {MODES}")
        self.fn, self.block, self.mode, self.marker = fn, block, mode, marker

    def __call__(self, block, *args, **kwargs):
        if block.name == self.block:
            if self.mode == "fail":
                raise RuntimeError(f"injected failure in block {block.name}")
            if _first_time(self.marker):
                if self.mode == "exit":
                    os._exit(1)        # the worker process dies mid-task
                raise RuntimeError(f"injected fault in block {block.name}")
        return self.fn(block, *args, **kwargs)


def _first_time(marker: str) -> bool:
    """True the first time (creates ``marker`` atomically), False afterwards."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def inject(monkeypatch, pass_name: str, block: str, mode: str, marker: str) -> None:
    """Make block ``block`` of pass ``pass_name`` misbehave (``mode``) in later blockwise runs;
    ``marker``: a file path that records that a one-time fault fired."""
    from c3dseg.blockwise.runtime import Runtime

    original = Runtime.run_pass

    def run_pass(self, name, fn, *args, **kwargs):
        if name == pass_name:
            fn = Fault(fn, block, mode, marker)
        return original(self, name, fn, *args, **kwargs)

    monkeypatch.setattr(Runtime, "run_pass", run_pass)

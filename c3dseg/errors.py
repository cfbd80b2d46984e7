"""One error hierarchy for the whole package.

Every error can carry the file, item id, filter name and parameter key it is about, so the
command line can print one line that says exactly where the problem is::

    error: segment.xml: item_0007 (GradientVectorFlowTrackingImageFilter): NumIterations: expected ...
"""

from __future__ import annotations


class C3DError(Exception):
    """Base class of all c3dseg errors.  ``exit_code`` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, *, file: str | None = None, item: str | None = None,
                 filter: str | None = None, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.item = item
        self.filter = filter
        self.key = key

    def where(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.item:
            parts.append(f"{self.item} ({self.filter})" if self.filter else self.item)
        elif self.filter:
            parts.append(self.filter)
        if self.key:
            parts.append(self.key)
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message

    def located(self, **kw) -> "C3DError":
        """Fill in location fields that are still empty and return self."""
        for k, v in kw.items():
            if v is not None and getattr(self, k, None) in (None, ""):
                setattr(self, k, v)
        return self


class PipelineError(C3DError):
    """The pipeline or the arguments are invalid (exit code 2); raised before anything runs."""

    exit_code = 2


class ParameterError(PipelineError):
    """A parameter value is missing, of the wrong type or out of range."""


class ArgumentError(PipelineError):
    """Bad command-line arguments (exit code 2; nothing ran): a missing file or folder, inputs that do
    not pair up, an output that exists."""


class InputError(C3DError):
    """An input file is missing, unreadable or unsuitable (exit code 1: found while running)."""


class ExecutionError(C3DError):
    """A filter failed while running."""


def print_error(e: Exception, verbose: bool = False) -> None:
    """A command-line tool's report of ``e``: ``error: <one line>`` on stderr, the traceback first
    with ``verbose``."""
    import sys

    if verbose:
        import traceback

        traceback.print_exc()
    print(f"error: {e}", file=sys.stderr)

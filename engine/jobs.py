"""Progress and cancellation, shared by every long-running engine call.

A job takes ``progress(done, total)`` (any callable, or None) and ``cancel``
(anything with ``is_set()``, e.g. ``threading.Event``, or None). Long loops
call :meth:`Job.step` once per batch: it reports progress and raises
:class:`Cancelled` when the flag is set, so a job stops within one batch.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

from .errors import Cancelled, UsageError

ProgressFn = Callable[[int, int], None]


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class Job:
    """Progress and cancel plumbing for one engine call."""

    def __init__(self, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelFlag] = None, total: int = 0):
        self._progress = progress
        self._cancel = cancel
        self.total = total
        self.done = 0

    @property
    def cancelled(self) -> bool:
        return bool(self._cancel is not None and self._cancel.is_set())

    def check(self) -> None:
        """Raise Cancelled if the caller asked to stop."""
        if self.cancelled:
            raise Cancelled()

    def set_total(self, total: int) -> None:
        self.total = int(total)
        self._report()

    def step(self, n: int = 1) -> None:
        """Count ``n`` units as done, report, and stop if cancelled."""
        self.done += n
        self._report()
        self.check()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self.done, max(self.total, self.done))


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to overwrite an existing output unless asked; make its folder."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists",
                         "choose another path or pass --overwrite")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    On any error (cancel included) the temporary file is removed, so no
    partial output is ever left under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=final.suffix + ".part",
                               dir=final.parent)
    os.close(fd)
    os.unlink(tmp)  # writers (GDAL, torch) create the file themselves
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        if tmp_path.exists():
            if tmp_path.is_dir():
                import shutil
                shutil.rmtree(tmp_path, ignore_errors=True)
            else:
                tmp_path.unlink()
        raise

"""Progress and cancellation, shared by every long-running engine call.

A job takes ``progress(done, total)`` (any callable, or None) and ``cancel``
(anything with ``is_set()``, e.g. ``threading.Event``, or None). Long loops
call :meth:`Job.step` once per batch: it reports progress and raises
:class:`Cancelled` when the flag is set, so a job stops within one batch.

Outputs: :func:`check_outputs` is the one guard every command runs before its
work (no output is an input of the run, every output writable, an existing
one only with overwrite); :func:`atomic_path` writes under a temporary name
and renames into place, and removes temporary files that killed runs left;
:func:`all_or_none` keeps outputs written one after another all or none.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

from .errors import Cancelled, UsageError
from .faults import fault_point

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


# --------------------------------------------------------------------------- #
# Output guard: one set of rules for every command (and for the dock and
# Processing, which call check_outputs with their inputs the same way).
# --------------------------------------------------------------------------- #
#: marks the temporary files :func:`atomic_path` makes (``.<stem>.mapclip-<pid>-<rand><suffix>.part``)
TEMP_TAG = "mapclip-"
#: sidecar files SQLite/GDAL may leave beside a temporary GeoPackage
_SIDECARS = ("-journal", "-wal", "-shm")

InputSpec = Tuple[str, Union[str, os.PathLike, None]]


def _real(p: Union[str, os.PathLike]) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(p)))


def same_file(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """True when ``a`` and ``b`` are one file or folder (symlinks, ``..``, hard links)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_inside(child: Union[str, os.PathLike], parent: Union[str, os.PathLike]) -> bool:
    """True when ``child`` lies in (or is) the folder ``parent``, real paths compared."""
    c, p = _real(child), _real(parent)
    return c == p or c.startswith(p.rstrip(os.sep) + os.sep)


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(label: str, path: Union[str, os.PathLike], folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: its folder (or the
    nearest existing one above it) must accept a new file; tested by creating one."""
    p = Path(os.path.abspath(os.fspath(path)))
    target = p if folder and p.is_dir() else p.parent
    base = _nearest_existing(target)
    if not base.is_dir():
        raise UsageError(f"cannot write {label} {path}: {base} is a file, not a folder",
                         "choose an output path inside a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{TEMP_TAG}probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write {label} {path}: {exc.strerror or exc} in {base}",
                         "choose a folder you can write to (or make it writable) and run "
                         "again; nothing was done") from None


#: files a command reads from a folder it is given (images, masks, rasters): an
#: existing one of these inside an input folder, at any depth, is an input
FOLDER_INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif",
                         ".jp2", ".img", ".vrt")


def input_of(output: Union[str, os.PathLike], inputs: Sequence[InputSpec]) -> Optional[str]:
    """Which input ``output`` is, or None: the same file (symlinks resolved, hard
    links, ``..``), or an existing image or raster inside an input folder at any
    depth (the run reads it). ``inputs``: (label, path) pairs; give every file the
    run reads (a VRT's sources at every level: ``raster.reader.raster_files``)."""
    p = Path(os.fspath(output))
    exists = p.exists() or p.is_symlink()
    for label, q in inputs:
        if q is None or str(q) == "":
            continue
        if same_file(p, q):
            return f"{label} {q}"
        if (exists and os.path.isdir(q) and not os.path.isdir(p) and is_inside(p, q)
                and _real(p).lower().endswith(FOLDER_INPUT_SUFFIXES)):
            return f"a file in {label} {q}"
    return None


def check_outputs(outputs: Sequence[InputSpec], inputs: Sequence[InputSpec] = (), *,
                  overwrite: bool = False, folders: Sequence[str] = (),
                  sealed: Sequence[InputSpec] = (), may_exist: Sequence[str] = ()
                  ) -> Dict[str, Path]:
    """The output guard every command calls before its work starts.

    ``outputs``: (label, path) pairs (None paths are skipped); ``inputs``: (label,
    path) pairs of everything the run reads (files or folders). Refused, whatever
    ``overwrite`` says: an output that is an input of the same run (real paths and
    ``samefile``, so symlinks and hard links count), two outputs naming one file,
    an output inside a ``sealed`` input folder (one the run reads as a whole, e.g.
    an index), an output that cannot be written. Refused without ``overwrite``:
    an output that exists (except labels in ``may_exist``). ``folders``: labels
    whose output is a folder. Returns label -> Path. Creates nothing.
    """
    outs = [(label, Path(os.fspath(p))) for label, p in outputs if p is not None and str(p) != ""]
    ins = [(label, Path(os.fspath(p))) for label, p in inputs if p is not None and str(p) != ""]
    for k, (label, p) in enumerate(outs):
        for label2, q in outs[:k]:
            if same_file(p, q):
                raise UsageError(f"{label2} and {label} name the same file {p}",
                                 "give each output its own path")
        hit = input_of(p, ins)
        if hit is not None:
            raise UsageError(f"{label} {p} is also an input of this run ({hit})",
                             "write the output to another path: an input is never "
                             "overwritten, even with --overwrite")
        for in_label, q in sealed:
            if q is not None and is_inside(p, q):
                raise UsageError(f"{label} {p} is inside {in_label} {q}, which this run reads",
                                 f"write {label} outside {q}")
        if p.exists() or p.is_symlink():
            if label in folders:
                if not p.is_dir():
                    raise UsageError(f"{label} {p} is a file, not a folder", "name a folder")
            elif p.is_dir():
                raise UsageError(f"{label} {p} is a folder", "name a file to write")
            elif not overwrite and label not in may_exist:
                raise UsageError(f"output {p} already exists",
                                 "choose another path or pass --overwrite")
        check_writable(label, p, folder=label in folders)
    return dict(outs)


def check_output_path(path: str | os.PathLike, overwrite: bool = False,
                      inputs: Sequence[InputSpec] = ()) -> Path:
    """Refuse an output that exists (unless ``overwrite``), is an input or cannot be
    written (see :func:`check_outputs`). Creates nothing: :func:`atomic_path`
    makes the folder when the output is written."""
    return check_outputs([("output", path)], inputs, overwrite=overwrite)["output"]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def clean_stale_temps(final: Union[str, os.PathLike]) -> List[Path]:
    """Remove temporary files an earlier, killed run left for ``final`` (their
    process is gone); return what was removed."""
    final = Path(final)
    removed: List[Path] = []
    if not final.parent.is_dir():
        return removed
    prefix = f".{final.stem}.{TEMP_TAG}"
    try:
        names = [n for n in os.listdir(final.parent) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        rest = name[len(prefix):]
        try:
            pid = int(rest.split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue  # a run is writing it now (this one, or another)
        p = final.parent / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _remove_temp(tmp: Path) -> None:
    for p in [tmp] + [tmp.with_name(tmp.name + s) for s in _SIDECARS]:
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError:
            pass


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    On any error (cancel included) the temporary file is removed, so no
    partial output is ever left under the final name. Temporary files carry
    the writer's process id; one left by a run that was killed (kill -9) is
    removed by the next run that writes the same output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final)
    tag = f"{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    tmp_path = final.with_name(f".{final.stem}.{tag}{final.suffix}.part")
    try:
        yield tmp_path
        fault_point("output.rename")
        os.replace(tmp_path, final)
    except BaseException:
        _remove_temp(tmp_path)
        raise
    for s in _SIDECARS:  # a writer may leave an empty journal beside the renamed file
        side = tmp_path.with_name(tmp_path.name + s)
        if side.exists():
            try:
                side.unlink()
            except OSError:
                pass


@contextmanager
def all_or_none(paths: Sequence[Union[str, os.PathLike, None]]) -> Iterator[None]:
    """Outputs written one after another, all or none: on any error every one of
    ``paths`` is put back as it was (a file that existed before is restored, a new
    one removed), so a failed second write (a full disk) costs neither the first
    output nor the good files that ``--overwrite`` was replacing. The earlier
    versions are kept as hard links (copies where links are not possible) under
    temporary names until the block ends."""
    saved: List[Tuple[Path, Optional[Path]]] = []
    try:
        for p in paths:
            if p is None or str(p) == "":
                continue
            p = Path(os.fspath(p))
            backup = None
            if p.is_file():
                tag = f"{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
                backup = p.with_name(f".{p.stem}.{tag}{p.suffix}.part")
                try:
                    os.link(p, backup)
                except OSError:
                    shutil.copy2(p, backup)
            saved.append((p, backup))
        yield
    except BaseException:
        for p, backup in saved:
            if backup is not None:
                os.replace(backup, p)
            else:
                p.unlink(missing_ok=True)
        raise
    finally:
        for _, backup in saved:
            if backup is not None:
                backup.unlink(missing_ok=True)

"""The images a dedup run does not keep, moved into a quarantine folder and back.

:func:`move_duplicates` moves the images not kept (duplicates and contaminated)
into a quarantine folder, keeping their paths below their input folder, after
writing a JSON manifest (atomically) that :func:`undo_move` follows to put them
back; undo refuses to overwrite a file that reappeared at an original path.
Nothing is deleted, and a move across filesystems never loses a file
(:func:`safe_move`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..core.errors import UsageError
from ..core.faults import fault_point
from ..core.jobs import TEMP_TAG, CancelFlag, Job, ProgressFn, _pid_alive, atomic_path, check_outputs, is_inside
from .duplicates import DedupResult
from .hashing import BATCH, PathLike

MANIFEST_VERSION = 1


@dataclass
class MoveResult:
    """What :func:`move_duplicates` or :func:`undo_move` did."""

    manifest: str
    moved: int
    skipped: List[str] = field(default_factory=list)   # entries not acted on, with reason
    #: partial copies an interrupted run left (its process gone), removed by this one
    removed_partial: List[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _partial_name(dst: Path, run: str) -> Path:
    """The temporary name of a cross-filesystem copy to ``dst`` by run ``run`` (the
    manifest's id): recognisable as this run's, so a later run can remove it."""
    return dst.with_name(f".{dst.name}.{TEMP_TAG}dedup-{run}-{os.getpid()}.part")


def remove_stale_partials(manifest: PathLike) -> List[str]:
    """Remove the partial copies (``.part`` files beside a move's source or target)
    that a killed run of ``manifest`` left, whose process is gone; the paths removed.
    A ``kill -9`` cannot remove its own; this is how they do not stay forever."""
    mpath = Path(manifest)
    run = mpath.stem[len("manifest-"):]
    try:
        moves = json.loads(mpath.read_text(encoding="utf-8"))["moves"]
        names = [(Path(str(m["from"])), Path(str(m["to"]))) for m in moves]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    pattern = re.compile(rf"^\.(.+)\.{re.escape(TEMP_TAG)}dedup-{re.escape(run)}-(\d+)\.part$")
    wanted: Dict[Path, set] = defaultdict(set)
    for a, b in names:
        for f in (a, b):
            wanted[f.parent].add(f.name)
    removed = []
    for folder, files in wanted.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for name in entries:
            m = pattern.match(name)
            if m and m.group(1) in files and not _pid_alive(int(m.group(2))):
                (folder / name).unlink(missing_ok=True)
                removed.append(str(folder / name))
    return removed


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _write_manifest(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


def check_quarantine(quarantine: PathLike, roots: Sequence[PathLike]) -> Path:
    """Refuse a quarantine folder equal to, inside or above an input folder (real
    paths compared), or one that cannot be written; call it before any work."""
    q = Path(os.path.abspath(quarantine))
    for root in roots:
        if is_inside(q, root) or is_inside(root, q):
            raise UsageError(f"quarantine {q} overlaps input folder {root}",
                             "choose a quarantine folder outside the inputs (and not above them)")
    check_outputs([("--move-to", q)], folders=["--move-to"], may_exist=["--move-to"])
    return q


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: PathLike, size: Optional[int], sha: Optional[str]) -> bool:
    """True when ``path`` has the size and hash a manifest recorded for it."""
    try:
        if size is not None and os.path.getsize(path) != int(size):
            return False
        return sha is None or file_sha256(path) == sha
    except OSError:
        return False


def safe_move(src: PathLike, dst: PathLike, size: Optional[int] = None,
              sha: Optional[str] = None, run: str = "") -> None:
    """Move one file without ever losing it. On one filesystem: a rename (atomic).
    Across filesystems: copy to a temporary name beside ``dst``, flush, verify
    size and SHA-256 against ``size``/``sha`` (the manifest's record), rename
    into place, and only then delete ``src``. A kill at any point leaves the
    original in place or a verified copy, never only a truncated one; the
    temporary copy is named with ``run`` (the manifest's id), so that the next
    run of that manifest removes it (:func:`remove_stale_partials`)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = _partial_name(dst, run or "0")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        shutil.copystat(src, tmp)
        fault_point("dedup.copy")
        if not _matches(tmp, size if size is not None else os.path.getsize(src),
                        sha if sha is not None else file_sha256(src)):
            raise UsageError(f"the copy of {src} in {dst.parent} does not match the original",
                             "check the quarantine's disk (space, errors) and run again; the "
                             "original was not touched")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.unlink(src)


def move_duplicates(result: DedupResult, quarantine: PathLike,
                    progress: Optional[ProgressFn] = None,
                    cancel: Optional[CancelFlag] = None) -> MoveResult:
    """Move ``result.remove`` into ``quarantine`` (below ``<k>-<input folder
    name>/`` and their path inside that folder), after writing the manifest
    ``quarantine/manifest-<UTC time>.json`` (the journal: every file's size and
    SHA-256, recorded before anything moves). Moves use :func:`safe_move`.
    Nothing is deleted."""
    q = check_quarantine(quarantine, result.roots + result.against_roots)
    roots = sorted(result.roots, key=len, reverse=True)
    moves = []
    for path in result.remove:
        root = next((r for r in roots if _inside(Path(path), Path(r))), None)
        if root is None:  # pragma: no cover - every image was found under a root
            raise UsageError(f"{path} is under no input folder", "report this")
        k = result.roots.index(root)
        rel = Path(path).relative_to(root)
        st = os.lstat(path)
        moves.append({"from": path, "to": str(q / f"{k}-{Path(root).name}" / rel),
                      "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "sha256": None if os.path.islink(path) else file_sha256(path)})
    for m in moves:
        if os.path.lexists(m["to"]):
            raise UsageError(f"{m['to']} already exists in the quarantine",
                             "choose an empty quarantine folder, or undo the last move first")
    q.mkdir(parents=True, exist_ok=True)
    removed = [p for old in sorted(q.glob("manifest-*.json")) for p in remove_stale_partials(old)]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    manifest = q / f"manifest-{stamp}.json"
    _write_manifest(manifest, {"version": MANIFEST_VERSION, "created": stamp,
                               "quarantine": str(q), "roots": result.roots,
                               "moves": moves, "undone": None})
    job = Job(progress, cancel, total=len(moves))
    job.set_total(len(moves))
    moved = 0
    for start in range(0, len(moves), BATCH):
        for m in moves[start:start + BATCH]:
            if os.path.islink(m["from"]):
                safe_move(m["from"], m["to"], run=stamp)
            else:
                safe_move(m["from"], m["to"], m["size"], m["sha256"], run=stamp)
            moved += 1
            fault_point("dedup.moved")
        job.step(len(moves[start:start + BATCH]))  # a cancel leaves a consistent manifest
    return MoveResult(manifest=str(manifest), moved=moved, removed_partial=removed)


def undo_move(manifest: PathLike, progress: Optional[ProgressFn] = None,
              cancel: Optional[CancelFlag] = None) -> MoveResult:
    """Move every file of a manifest back, each checked against the size and
    SHA-256 the manifest recorded. Refuses (moving nothing) when a different file
    has appeared at an original path, or when a quarantined file is not the one
    that was moved (a truncated copy, an edited file); entries already back are
    skipped, and a verified copy left by an interrupted move beside its intact
    original is removed."""
    mpath = Path(manifest)
    if not mpath.is_file():
        raise UsageError(f"manifest not found: {mpath}", "check the --undo path")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
        moves = data["moves"]
        entries = [(str(m["from"]), str(m["to"]), m.get("size"), m.get("sha256"))
                   for m in moves]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{mpath} is not a dedup manifest ({type(exc).__name__})",
                         "pass the manifest-*.json that --move-to wrote") from None
    todo, skipped, leftovers = [], [], []
    for src, dst, size, sha in entries:
        here, there = os.path.lexists(src), os.path.lexists(dst)
        is_link = os.path.islink(dst) if there else False
        if here and there:
            if not is_link and _matches(src, size, sha) and _matches(dst, size, sha):
                leftovers.append(dst)      # an interrupted cross-filesystem move: a copy
                skipped.append(f"{src}: already in place")
                continue
            raise UsageError(f"{src} exists again; undo would overwrite it",
                             "move it away, then run the undo again (nothing was moved)")
        if there:
            if not is_link and not _matches(dst, size, sha):
                raise UsageError(f"{dst} in the quarantine is not the file that was moved from "
                                 f"{src} (size or SHA-256 differs from the manifest)",
                                 "restore that file by hand if you know it is right; nothing "
                                 "was moved")
            todo.append((src, dst, size, sha, is_link))
        elif here:
            skipped.append(f"{src}: already in place")
        else:
            skipped.append(f"{src}: missing from the quarantine ({dst})")
    removed = remove_stale_partials(mpath)
    run = mpath.stem[len("manifest-"):]
    job = Job(progress, cancel, total=len(todo))
    job.set_total(len(todo))
    for dst in leftovers:
        os.unlink(dst)
    moved = 0
    created = {Path(d).parent for d in leftovers}
    for start in range(0, len(todo), BATCH):
        for src, dst, size, sha, is_link in todo[start:start + BATCH]:
            if is_link:
                safe_move(dst, src, run=run)
            else:
                safe_move(dst, src, size, sha, run=run)
            created.add(Path(dst).parent)
            moved += 1
        job.step(len(todo[start:start + BATCH]))
    q = Path(os.path.abspath(mpath.parent))
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        p = Path(os.path.abspath(folder))
        while p != q and _inside(p, q):
            try:
                p.rmdir()  # only empty folders the move made
            except OSError:
                break
            p = p.parent
    data["undone"] = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    _write_manifest(mpath, data)
    return MoveResult(manifest=str(mpath), moved=moved, skipped=skipped, removed_partial=removed)

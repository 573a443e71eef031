"""Named fault points: a crash at a chosen step, for the reliability tests.

The engine calls :func:`fault_point` at the steps where an interruption matters
(an index shard committed, a fine-tuning epoch saved, a file moved into the
quarantine, ...). It does nothing unless the environment variable
``MAPCLIP_FAULT`` names that point::

    MAPCLIP_FAULT=POINT[:N][:ACTION]

``N`` (default 1): act the N-th time this process reaches the point.
``ACTION`` (default ``kill``): one of :data:`ACTIONS`. ``MAPCLIP_FAULT_MARK``,
when set, is a file path that makes the fault happen once among all processes
(reader processes, Ray workers and restarted ones): only the process that
creates that file acts, and the file tells the test it did.

So a test stops a real run at a known step instead of after a guessed sleep,
then checks what the run left and that the next run resumes from it.
Standard library only; unset, a call costs one dictionary look-up.
"""
from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import UsageError

#: the variable that names the fault, and the one that makes it happen once
ENV = "MAPCLIP_FAULT"
MARK_ENV = "MAPCLIP_FAULT_MARK"

#: every point the engine calls, and where
POINTS: Dict[str, str] = {
    "read.batch": "a batch of tiles was read and is about to be handed out (raster/batches.py)",
    "reader.task": "a reader process read the tiles of one task into shared memory (raster/process_worker.py)",
    "index.commit": "an index build committed a shard to its manifest (archive/build.py)",
    "ray.batch": "a Ray worker is about to embed a batch of its chunk (archive/distributed.py)",
    "finetune.epoch": "fine-tuning saved an epoch's training state and run record (finetune/run.py)",
    "dedup.copy": "a cross-filesystem move copied a file under its temporary name, not yet "
                  "verified (dedup/quarantine.py)",
    "dedup.moved": "dedup --move-to moved one file into the quarantine (dedup/quarantine.py)",
    "output.rename": "an output is complete under its temporary name, not yet renamed into "
                     "place (core/jobs.py)",
}

#: what the process does to itself at the point
ACTIONS: Dict[str, str] = {
    "kill": "SIGKILL: gone at once, nothing cleaned up (kill -9)",
    "term": "SIGTERM (kill)",
    "int": "SIGINT to this process (Ctrl-C)",
    "ctrl-c": "SIGINT to the whole process group, as a terminal's Ctrl-C",
    "stop": "SIGSTOP: frozen, still holding what it holds, until killed or continued",
    "raise": "an OSError: no space left on device",
}


@dataclass(frozen=True)
class Fault:
    point: str
    count: int
    action: str


def parse(spec: str) -> Fault:
    """``POINT[:N][:ACTION]`` as a :class:`Fault`; a point, count or action that
    does not exist is a :class:`UsageError` (a typo would otherwise never fire)."""
    parts = spec.strip().split(":")
    point, count, action = parts[0], 1, "kill"
    rest = parts[1:]
    if rest and rest[0].isdigit():
        count = int(rest.pop(0))
    if rest:
        action = rest.pop(0)
    fix = (f"set {ENV}=POINT[:N][:ACTION], e.g. index.commit:2:kill; points: "
           f"{', '.join(POINTS)}; actions: {', '.join(ACTIONS)}")
    if point not in POINTS:
        raise UsageError(f"{ENV}={spec!r} names no fault point", fix)
    if rest or count < 1:
        raise UsageError(f"{ENV}={spec!r} is not POINT[:N][:ACTION] with N >= 1", fix)
    if action not in ACTIONS:
        raise UsageError(f"{ENV}={spec!r}: unknown action {action!r}", fix)
    return Fault(point, count, action)


_state: Dict[str, object] = {"spec": None, "fault": None, "seen": 0}


def _armed(spec: str) -> Tuple[Fault, int]:
    """The parsed fault and how often its point was reached so far in this process
    (counting starts again when the variable changes)."""
    if _state["spec"] != spec:
        _state.update(spec=spec, fault=parse(spec), seen=0)
    return _state["fault"], int(_state["seen"])  # type: ignore[return-value]


def _first_to_mark() -> bool:
    mark = os.environ.get(MARK_ENV)
    if not mark:
        return True
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def fault_point(name: str) -> None:
    """Act as ``MAPCLIP_FAULT`` says if it names point ``name`` (one of
    :data:`POINTS`) and this is its N-th time here; otherwise nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    fault, seen = _armed(spec)
    if fault.point != name:
        return
    _state["seen"] = seen + 1
    if seen + 1 != fault.count or not _first_to_mark():
        return
    act(fault.action, name)


def act(action: str, name: str = "") -> None:
    """Do ``action`` (one of :data:`ACTIONS`) to this process."""
    if action == "raise":
        raise OSError(errno.ENOSPC, f"No space left on device ({ENV} at {name})")
    if action == "ctrl-c":
        os.killpg(os.getpgrp(), signal.SIGINT)
        return
    sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT,
           "stop": signal.SIGSTOP}[action]
    os.kill(os.getpid(), sig)


def settings() -> Dict[str, str]:
    """The fault variables of this process, for a worker started elsewhere
    (a Ray actor does not inherit the driver's environment)."""
    return {k: os.environ[k] for k in (ENV, MARK_ENV) if os.environ.get(k)}


def adopt(values: Optional[Dict[str, str]]) -> None:
    """Take over :func:`settings` of the process that started this one."""
    for k in (ENV, MARK_ENV):
        if values and values.get(k):
            os.environ[k] = values[k]
        else:
            os.environ.pop(k, None)

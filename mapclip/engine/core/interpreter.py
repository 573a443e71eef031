"""The Python interpreter behind the running program, for child processes (the
reader processes, the plugin's pip and its import check). Standard library only.

``sys.executable`` cannot be trusted for that. In QGIS on Windows and macOS it
is the QGIS program; on Linux, QGIS's embedded Python takes the first
``python3`` on ``PATH``, which for an analyst who starts QGIS from a shell is
pyenv's, conda's or a virtual environment's: a child run with it mixes that
Python with QGIS's standard library and dies (issue 23).

So an interpreter is chosen by what it is, not by its name: each candidate
(:func:`candidates`, platform by platform) is run once and must report the
running interpreter's version and standard library (:func:`identity`). The
answer is cached per process (:func:`qgis_python`). The prefix is reported
but not compared: an embedded Python whose executable was looked up on
``PATH`` may compute its prefix as ``/`` where the same installation run
directly says ``/usr``, while both read the same standard library.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

#: what a candidate prints about itself: version, standard library, prefixes
PROBE = ("import json, os, sys; print(json.dumps([list(sys.version_info[:3]), "
         "os.path.dirname(os.__file__), sys.prefix, sys.exec_prefix]))")
#: seconds a candidate gets to answer (a first start from a cold disk can be slow)
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Identity:
    """What makes two interpreters the same for a child process."""

    version: Tuple[int, int, int]
    stdlib: str
    prefix: str = ""

    def same_as(self, other: "Identity") -> bool:
        return self.version == other.version and _real(self.stdlib) == _real(other.stdlib)

    def describe(self) -> str:
        return f"Python {'.'.join(map(str, self.version))} ({self.prefix or self.stdlib})"


def running() -> Identity:
    """The running interpreter's identity."""
    return Identity(tuple(sys.version_info[:3]), os.path.dirname(os.__file__), sys.prefix)


def _real(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _looks_like_python(path: str) -> bool:
    return re.split(r"[\\/]", path or "")[-1].lower().startswith("python")


def _names(platform: str, version_info) -> List[str]:
    if platform.startswith("win"):
        return ["python.exe", "python3.exe"]
    major, minor = version_info[0], version_info[1]
    return [f"python{major}.{minor}", f"python{major}", "python3", "python"]


def candidates(executable: Optional[str] = None, platform: Optional[str] = None,
               exec_prefix: Optional[str] = None, version_info=None,
               search_path: Optional[str] = None) -> List[str]:
    """Interpreters that may be QGIS's, most likely first (existing files, each once).

    - ``sys.executable`` itself when it is named like a Python (Linux).
    - Windows (OSGeo4W and the standalone installer): ``qgis-bin.exe`` is in
      ``<root>/bin``; Python is ``<root>/bin/python.exe`` (OSGeo4W) or
      ``<root>/apps/Python3x/python.exe`` (the running version's folder first).
    - macOS: ``QGIS.app/Contents/MacOS/QGIS``; Python is
      ``QGIS.app/Contents/MacOS/bin/python3``, else in the bundled framework.
    - Everywhere: ``<exec_prefix>/bin`` and ``<exec_prefix>``, then every folder of
      ``PATH`` (``search_path``), not only its first Python.

    Every argument defaults to the running interpreter's value (tests inject others).
    """
    exe = (sys.executable if executable is None else executable) or ""
    platform = sys.platform if platform is None else platform
    exec_prefix = sys.exec_prefix if exec_prefix is None else exec_prefix
    version_info = sys.version_info if version_info is None else version_info
    names = _names(platform, version_info)
    exe_dir = os.path.dirname(exe) if exe else ""
    folders: List[str] = []
    if platform.startswith("win"):
        folders += [exe_dir, exec_prefix]                         # <root>/bin, PYTHONHOME
        root = os.path.dirname(exe_dir) if exe_dir else ""
        if root:
            apps = os.path.join(root, "apps")
            try:
                pythons = [d for d in os.listdir(apps) if re.fullmatch(r"(?i)python3\d*", d)]
            except OSError:
                pythons = []
            want = f"python{version_info[0]}{version_info[1]}"
            pythons.sort(key=lambda d: (d.lower() != want, -int(d[7:] or 0)))
            folders += [os.path.join(apps, d) for d in pythons]
    else:
        if exe_dir:
            folders += [os.path.join(exe_dir, "bin"), exe_dir]      # QGIS.app/Contents/MacOS/bin
        folders += [os.path.join(exec_prefix, "bin"), exec_prefix]
        if platform == "darwin" and exe_dir:
            fw = os.path.join(os.path.dirname(exe_dir), "Frameworks", "Python.framework",
                              "Versions")
            ver = f"{version_info[0]}.{version_info[1]}"
            folders += [os.path.join(fw, ver, "bin"), os.path.join(fw, "Current", "bin")]
    search_path = os.environ.get("PATH", "") if search_path is None else search_path
    folders += search_path.split(os.pathsep)
    found = [exe] if _looks_like_python(exe) and os.path.isfile(exe) else []
    found += [os.path.join(f, n) for f in folders if f for n in names
              if os.path.isfile(os.path.join(f, n))]
    out: List[str] = []
    for path in found:
        if path not in out:
            out.append(path)
    return out


def identity(python: str, timeout: float = PROBE_TIMEOUT_S) -> Tuple[Optional[Identity], str]:
    """Run ``python`` once and ask what it is: (identity, "") or (None, why not)."""
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
    try:
        proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, creationflags=flags)
    except subprocess.TimeoutExpired:
        return None, f"did not answer within {timeout:.0f} s"
    except OSError as exc:
        return None, f"could not start ({exc.strerror or exc})"
    lines = proc.stdout.strip().splitlines()
    try:
        version, stdlib, prefix, _exec_prefix = json.loads(lines[-1])
        return Identity(tuple(int(v) for v in version), stdlib, prefix), ""
    except (IndexError, ValueError, TypeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"exited with code {proc.returncode}: {tail[:160]}"


@dataclass
class Search:
    """The outcome of looking for the running interpreter as a program."""

    path: Optional[str]
    want: Identity
    #: (candidate, what it turned out to be) for each candidate run, in order
    tried: List[Tuple[str, str]] = field(default_factory=list)

    def why_none(self) -> str:
        """Why no interpreter matched, in one clause for a message."""
        if not self.tried:
            return f"no Python program was found for {self.want.describe()}"
        seen = "; ".join(f"{p} {what}" for p, what in self.tried)
        return f"no Python program matching this one ({self.want.describe()}) was found: {seen}"


def find(paths: Optional[Sequence[str]] = None,
         probe: Callable[[str], Tuple[Optional[Identity], str]] = identity,
         want: Optional[Identity] = None) -> Search:
    """The first of ``paths`` (default :func:`candidates`) that ``probe`` finds the same
    interpreter as ``want`` (default: the running one)."""
    want = want or running()
    search = Search(None, want)
    for path in (candidates() if paths is None else paths):
        got, why = probe(path)
        if got is not None and got.same_as(want):
            search.path = path
            return search
        search.tried.append((path, f"is {got.describe()}" if got is not None else why))
    return search


_CACHE: List[Search] = []
_LOCK = threading.Lock()


def qgis_python() -> Search:
    """:func:`find` with the defaults, once per process."""
    with _LOCK:
        if not _CACHE:
            _CACHE.append(find())
        return _CACHE[0]


def forget() -> None:
    """Drop the cached answer (after ``sys.executable`` or ``PATH`` changed; tests)."""
    _CACHE.clear()

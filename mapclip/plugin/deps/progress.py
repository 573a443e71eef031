"""Progress from pip's output: bytes downloaded of the sizes pip announced, and the package."""
from __future__ import annotations

import re
from typing import List, Optional, Tuple
from urllib.parse import unquote, urlparse

_UNITS = {"bytes": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
_SIZE = r"\(\s*([\d.,]+)\s*(bytes|[kKMG]i?B)\s*\)"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_RE_COLLECT = re.compile(r"^Collecting\s+(.+?)\s*$")
_RE_DOWNLOAD = re.compile(r"^\s*Downloading\s+(\S+)(?:\s+" + _SIZE + r")?")
_RE_CACHED = re.compile(r"^\s*Using cached\s+(\S+)(?:\s+" + _SIZE + r")?")
#: pip >= 24.1, --progress-bar raw
RE_RAW = re.compile(r"^\s*Progress\s+(\d+)\s+of\s+(\d+)\s*$")
#: pip's rich progress bar (forced on with FORCE_COLOR): "━━━━━╸━━━━ 84.3/184.5 MB 9.1 MB/s eta 0:00:11"
RE_BAR = re.compile(r"(?:^|\s)([\d,]+(?:\.\d+)?)/([\d,]+(?:\.\d+)?)\s*(bytes|[kMG]B)\b")
_RE_INSTALLING = re.compile(r"^Installing collected packages:\s*(.*)$")
_RE_DONE = re.compile(r"^Successfully installed\s+(.*)$")
_RE_BUILD = re.compile(r"^\s*Building wheel for\s+(\S+)")


def strip_ansi(line: str) -> str:
    return _ANSI.sub("", line)


def human_size(n: float) -> str:
    """Bytes the way pip writes them: 536 kB, 184.5 MB, 6.12 GB."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e4:
        return f"{int(n / 1e3)} kB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{int(n)} bytes"


def _bytes(value: str, unit: str) -> float:
    return float(value.replace(",", "")) * _UNITS[unit.lower()]


def file_label(url: str) -> str:
    """'https://…/torch-2.14.1%2Bcpu-cp311-…whl' -> 'torch 2.14.1+cpu'."""
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1] if "://" in url else
                   url.replace("\\", "/").rsplit("/", 1)[-1])
    if name.endswith(".whl"):
        parts = name[:-4].split("-")
        if len(parts) >= 2:
            return f"{parts[0]} {parts[1]}"
    for ext in (".tar.gz", ".tar.bz2", ".zip", ".tgz"):
        if name.endswith(ext):
            stem = name[:-len(ext)]
            if "-" in stem:
                pkg, ver = stem.rsplit("-", 1)
                return f"{pkg} {ver}"
            return stem
    return name


def shorten(text: str, limit: int = 110) -> str:
    """Cut ``text`` at a word boundary after its first two words (the verb and the package).

    A single word longer than the room left is cut hard, so the package name
    that starts it stays readable.
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    words = text.split(" ")
    keep = len(words[0]) + 1 + len(words[1]) if len(words) > 1 else len(words[0])
    cut = text.rfind(" ", 0, limit - 1)
    if cut < keep:
        return text[:limit - 1] + "…"
    return text[:cut].rstrip(",;:") + "…"


class PipProgress:
    """Turns pip's output lines into (fraction, text).

    The fraction is the share of the file in flight that has arrived, from
    pip's own byte counts (its progress bar, or ``Progress <bytes> of
    <total>`` with pip >= 24.1), or -1 where pip gives no measure (resolving,
    unpacking, building). Texts start with what is happening and the package,
    then the running totals: the file's number and the bytes downloaded so far.
    """

    def __init__(self):
        self.collected = 0
        self.files = 0
        self.done = 0.0           # bytes of finished downloads
        self.current: Optional[Tuple[str, float]] = None
        self.current_bytes = 0.0
        self.installing: List[str] = []
        self.installed: List[str] = []

    def _finish_current(self) -> None:
        if self.current is not None:
            self.done += max(self.current[1], self.current_bytes)
            self.current = None
            self.current_bytes = 0.0

    def _so_far(self) -> str:
        total = self.done + self.current_bytes
        return f" · file {self.files}, {human_size(total)} downloaded so far" if total else ""

    def _bytes_event(self, cur: float, total: float) -> Optional[Tuple[float, str]]:
        if self.current is None:
            return None
        name, size = self.current
        if total > 0 and size <= 0:          # pip did not print the size on the line before
            size = total
            self.current = (name, size)
        self.current_bytes = min(cur, size) if size > 0 else cur
        fraction = self.current_bytes / size if size > 0 else -1.0
        return fraction, shorten(f"downloading {name}: {human_size(self.current_bytes)} of "
                                 f"{human_size(size)}{self._so_far()}")

    def feed(self, line: str) -> Optional[Tuple[float, str]]:
        line = strip_ansi(line).rstrip()
        m = RE_RAW.match(line)
        if m:
            return self._bytes_event(float(m.group(1)), float(m.group(2)))
        m = _RE_COLLECT.match(line)
        if m:
            self._finish_current()
            self.collected += 1
            return -1.0, shorten(f"collecting {m.group(1)} "
                                 f"(requirements so far: {self.collected})")
        m = _RE_DOWNLOAD.match(line) or _RE_CACHED.match(line)
        if m:
            self._finish_current()
            cached = line.lstrip().startswith("Using cached")
            name = file_label(m.group(1))
            size = _bytes(m.group(2), m.group(3)) if m.group(2) else 0.0
            self.files += 1
            sized = f" ({human_size(size)})" if size else ""
            if cached:
                return -1.0, shorten(f"using cached {name}{sized}")
            self.current = (name, size)
            # pip draws its bar (and so counts bytes) for files over 40 kB only
            fraction = 0.0 if size > 40e3 else -1.0
            return fraction, shorten(f"downloading {name}{sized}{self._so_far()}")
        m = RE_BAR.search(line)
        if m and self.current is not None:
            unit = m.group(3)
            return self._bytes_event(_bytes(m.group(1), unit), _bytes(m.group(2), unit))
        m = _RE_BUILD.match(line)
        if m:
            self._finish_current()
            return -1.0, shorten(f"building {m.group(1)} from source (this can take minutes)")
        m = _RE_INSTALLING.match(line)
        if m:
            self._finish_current()
            self.installing = [n.strip() for n in m.group(1).split(",") if n.strip()]
            names = ", ".join(self.installing)
            return -1.0, shorten(f"unpacking {len(self.installing)} packages into the folder: "
                                 f"{names}")
        m = _RE_DONE.match(line)
        if m:
            self._finish_current()
            self.installed = m.group(1).split()
            got = f" ({human_size(self.done)} downloaded)" if self.done else ""
            return 1.0, shorten(f"pip installed {len(self.installed)} packages{got}")
        return None


def progress_line(line: str) -> Optional[str]:
    """A short status for a pip output line worth showing, else None."""
    got = PipProgress().feed(line)
    return got[1] if got else None

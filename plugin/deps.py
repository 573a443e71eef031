"""Missing dependencies: find them, say so, and install them on request.

The engine needs torch, open_clip and rasterio (plus a few smaller packages)
in QGIS's own Python. When one cannot be found the plugin still loads, shows a
message-bar warning naming what is missing, and offers to install them with
pip into a plugin-owned folder (``<QGIS profile>/python/mapclip-deps``),
appended to ``sys.path`` so QGIS's own packages (NumPy, GDAL) stay first.

The pip command pins what the plugin ships in ``requirements.txt`` (one place
for versions), adds the NumPy pin QGIS needs (``numpy<2`` when QGIS's NumPy is
1.x: QGIS and GDAL are built against it) and picks the torch build from the
machine: CUDA wheels when ``nvidia-smi`` is present, the CPU index otherwise.
pip runs in a QProcess; its output drives the progress text, and a failure is
explained (proxy, no network, permissions) rather than dumped.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

#: import name -> pip name, for the packages whose absence stops the plugin
REQUIRED: Dict[str, str] = {"torch": "torch", "open_clip": "open_clip_torch",
                            "rasterio": "rasterio"}
#: requirements.txt entries that are for development only, or that QGIS provides
NOT_FOR_QGIS = {"pytest", "pytest-qt", "numpy"}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"
TORCH_PACKAGES = {"torch", "torchvision"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")

# A test or a user can force the "missing" path: MAPCLIP_PRETEND_MISSING=torch,rasterio
PRETEND_ENV = "MAPCLIP_PRETEND_MISSING"


def deps_dir() -> str:
    """The plugin-owned folder pip installs into (inside the QGIS profile)."""
    from qgis.core import QgsApplication
    return os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "mapclip-deps")


def add_deps_path(path: Optional[str] = None) -> str:
    """Append the deps folder to sys.path (after QGIS's own packages)."""
    path = path or deps_dir()
    if os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)
        importlib.invalidate_caches()
    return path


def missing_modules(required: Optional[Dict[str, str]] = None) -> List[str]:
    """Import names in ``required`` that QGIS's Python cannot find (cheap: no import)."""
    required = REQUIRED if required is None else required
    pretend = {m.strip() for m in os.environ.get(PRETEND_ENV, "").split(",") if m.strip()}
    out = []
    for name in required:
        if name in pretend:
            out.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def missing_message(missing: Sequence[str]) -> str:
    names = ", ".join(f"{m} ({REQUIRED.get(m, m)})" if REQUIRED.get(m, m) != m else m
                      for m in missing)
    return (f"MapCLIP needs Python packages that QGIS cannot find: {names}. "
            f"Searching is disabled until they are installed.")


# --------------------------------------------------------------------------- #
# The pip command
# --------------------------------------------------------------------------- #
def read_requirements(path: str = REQUIREMENTS) -> List[str]:
    """Runtime requirement lines from requirements.txt (dev-only and numpy left out)."""
    if not os.path.isfile(path):
        return [REQUIRED[m] for m in REQUIRED]
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = re.split(r"[<>=!~\[; ]", line, 1)[0].strip().lower()
            if name in NOT_FOR_QGIS:
                continue
            out.append(line)
    return out


def numpy_pin(version: Optional[str] = None) -> str:
    """Keep pip from replacing QGIS's NumPy major version."""
    if version is None:
        try:
            from importlib.metadata import version as _v
            version = _v("numpy")
        except Exception:
            version = ""
    major = version.split(".", 1)[0] if version else ""
    if major == "1":
        return "numpy<2"
    if major.isdigit():
        return f"numpy>={major},<{int(major) + 1}"
    return "numpy<2"


def has_cuda() -> bool:
    """An NVIDIA driver is present (nvidia-smi on PATH, or in its Windows place)."""
    if shutil.which("nvidia-smi"):
        return True
    win = os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvidia-smi.exe")
    return sys.platform.startswith("win") and os.path.isfile(win)


def python_executable() -> str:
    """The Python interpreter behind QGIS (sys.executable is the QGIS binary on Windows/macOS)."""
    exe = sys.executable or ""
    if os.path.basename(exe).lower().startswith("python"):
        return exe
    names = ["python.exe", "python3.exe"] if sys.platform.startswith("win") else \
        [f"python{sys.version_info.major}.{sys.version_info.minor}", "python3", "python"]
    for folder in (sys.exec_prefix, os.path.join(sys.exec_prefix, "bin"), sys.prefix,
                   os.path.join(sys.prefix, "bin"), os.path.dirname(exe)):
        for name in names:
            cand = os.path.join(folder, name)
            if os.path.isfile(cand):
                return cand
    return shutil.which("python3") or shutil.which("python") or "python3"


@dataclass
class PipPlan:
    """One pip invocation: program, arguments, and why it looks like that."""

    program: str
    args: List[str]
    target: str
    cuda: bool
    packages: List[str] = field(default_factory=list)

    def command(self) -> List[str]:
        return [self.program, *self.args]


def pip_plan(target: Optional[str] = None, cuda: Optional[bool] = None,
             numpy_version: Optional[str] = None, python: Optional[str] = None,
             requirements: Optional[Sequence[str]] = None) -> PipPlan:
    """The pip command that installs the engine's packages into ``target``."""
    target = target or deps_dir()
    cuda = has_cuda() if cuda is None else cuda
    packages = list(requirements) if requirements is not None else read_requirements()
    packages.append(numpy_pin(numpy_version))
    args = ["-m", "pip", "install", "--upgrade", "--target", target, "--no-input",
            "--disable-pip-version-check", "--progress-bar", "off",
            "--extra-index-url", TORCH_CUDA_INDEX if cuda else TORCH_CPU_INDEX, *packages]
    return PipPlan(python or python_executable(), args, target, cuda, packages)


# --------------------------------------------------------------------------- #
# Explaining failures
# --------------------------------------------------------------------------- #
_FAILURES = (
    (("ProxyError", "407 Proxy", "Tunnel connection failed", "Cannot connect to proxy"),
     "pip could not get through the proxy. Set HTTPS_PROXY (user:password@host:port) in "
     "Settings > Options > System > Environment, or in QGIS's network proxy settings, and retry."),
    (("Temporary failure in name resolution", "Name or service not known",
      "Failed to establish a new connection", "Network is unreachable", "No route to host",
      "getaddrinfo failed", "Connection refused", "timed out", "ConnectTimeoutError"),
     "pip could not reach the package index (no network?). Connect this machine to the "
     "internet, or install the packages listed in MapCLIP's requirements.txt into QGIS's "
     "Python by hand."),
    (("Permission denied", "[Errno 13]", "EACCES", "Access is denied"),
     "pip could not write to the install folder (permissions). Check that your user can "
     "write to it, or install the packages by hand as an administrator."),
    (("No space left on device", "[Errno 28]"),
     "the disk is full: torch needs several GB. Free space and retry."),
    (("No matching distribution found", "Could not find a version that satisfies"),
     "pip found no build of a package for this Python/OS. Check that QGIS's Python "
     "version is supported by torch, or install a matching torch by hand."),
    (("No module named pip",),
     "QGIS's Python has no pip. Install it (e.g. python3-pip on Debian/Ubuntu, or the "
     "OSGeo4W pip package on Windows) and retry."),
)


def explain_failure(output: str, exit_code: int) -> str:
    """One clear sentence for a failed pip run, from its output."""
    for needles, text in _FAILURES:
        if any(n.lower() in output.lower() for n in needles):
            return text
    tail = " | ".join(l.strip() for l in output.strip().splitlines()[-3:] if l.strip())
    return f"pip failed (exit code {exit_code}): {tail or 'no output'}"


_STEP = re.compile(r"^(Collecting|Downloading|Installing collected packages|Successfully installed)\b")


def progress_line(line: str) -> Optional[str]:
    """A short status for pip output lines worth showing, else None."""
    line = line.strip()
    if _STEP.match(line):
        return line[:120]
    return None


# --------------------------------------------------------------------------- #
# Running pip (QProcess) and the message bar offer
# --------------------------------------------------------------------------- #
try:
    from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, pyqtSignal
except ImportError:  # pragma: no cover - only outside QGIS
    QObject = object  # type: ignore


class PipInstaller(QObject):  # type: ignore[misc]
    """Run a :class:`PipPlan` in a QProcess; report steps; explain failure."""

    step = pyqtSignal(int, str)          # steps seen so far, the latest status line
    finished = pyqtSignal(bool, str)     # ok, message

    def __init__(self, plan: PipPlan, parent=None):
        super().__init__(parent)
        self.plan = plan
        self.output: List[str] = []
        self.steps = 0
        self.process = QProcess(self)
        self.process.setProcessChannelMode(QProcess.MergedChannels)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONNOUSERSITE", "1")
        self.process.setProcessEnvironment(env)
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.finished.connect(self._done)
        self.process.errorOccurred.connect(self._error)

    def start(self) -> None:
        os.makedirs(self.plan.target, exist_ok=True)
        self.process.start(self.plan.program, self.plan.args)

    def cancel(self) -> None:
        if self.process.state() != QProcess.NotRunning:
            self.process.kill()

    def _read(self) -> None:
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            self.output.append(line)
            status = progress_line(line)
            if status:
                self.steps += 1
                self.step.emit(self.steps, status)

    def _error(self, err) -> None:
        if err == QProcess.FailedToStart:
            self.finished.emit(False, f"could not start {self.plan.program}: "
                                      f"{self.process.errorString()}")

    def _done(self, code: int, status) -> None:
        out = "\n".join(self.output)
        if code == 0 and status == QProcess.NormalExit:
            add_deps_path(self.plan.target)
            self.finished.emit(True, f"installed into {self.plan.target}; restart QGIS "
                                     f"if a search still reports missing packages")
        else:
            self.finished.emit(False, explain_failure(out, code))


def offer_install(iface, missing: Sequence[str], on_install: Callable[[], None]):
    """A message-bar warning naming what is missing, with an Install button.

    Returns the message-bar item (or None without a message bar).
    """
    from qgis.core import Qgis
    from qgis.PyQt.QtWidgets import QPushButton

    from . import log
    text = missing_message(missing)
    log.warning(text)
    bar = iface.messageBar() if iface is not None else None
    if bar is None:
        return None
    item = bar.createMessage("MapCLIP", text)
    button = QPushButton("Install…", item)
    button.setObjectName("mapclipInstallDeps")
    button.setToolTip("pip install " + " ".join(read_requirements()) + f" into {deps_dir()}")
    button.clicked.connect(on_install)
    item.layout().addWidget(button)
    bar.pushWidget(item, Qgis.Warning, 0)
    return item

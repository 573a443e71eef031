"""Explaining a failed pip run: proxy, network, permissions, disk, an index that cannot be reached."""
from __future__ import annotations

import re
from typing import Callable, List, Optional
from urllib.parse import urlparse

from .plan import PYPI_INDEX, PipPlan
from .verify import torch_build

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
_CONNECT = ("Failed to establish a new connection", "Connection refused", "timed out",
            "Temporary failure in name resolution", "Name or service not known",
            "Network is unreachable", "No route to host", "getaddrinfo failed",
            "ConnectTimeoutError", "ProxyError", "Max retries exceeded")


#: pip's default index, and the host its files come from
PYPI_FILES = "files.pythonhosted.org"


def _hosts(line: str) -> List[str]:
    """Host names a line of pip's output mentions (host='...' and URLs)."""
    return re.findall(r"host='([^']+)'", line) + re.findall(r"https?://([^/\s:'\"]+)", line)


def _index_failure(output: str, plan: Optional[PipPlan],
                   probe: Optional[Callable[[str], Optional[str]]]) -> Optional[str]:
    """pip could not connect to some of the plan's indexes: which failed, which answered,
    the exact command to install by hand and the folder it installs into."""
    if plan is None:
        return None
    failed_hosts = {h for line in output.splitlines() if any(c in line for c in _CONNECT)
                    for h in _hosts(line)}
    if not failed_hosts:
        return None
    failed, answered, hosts = [], [], []
    for label, url in plan.indexes():
        host = urlparse(url).hostname or url
        files = {host} | ({PYPI_FILES} if url == PYPI_INDEX else set())
        if files & failed_hosts:
            failed.append(f"{host} ({label}, {url})")
            hosts.append(host)
        elif probe is not None and probe(url) is None:
            answered.append(f"{host} ({label})")
    if not failed:
        return None
    cause = f"pip could not connect to {' or '.join(failed)}"
    cause += f"; {', '.join(answered)} answered." if answered else " (no network?)."
    return (f"{cause} Nothing was installed. Fix: make {' and '.join(hosts)} reachable from this machine "
            f"(proxy: set HTTPS_PROXY in Settings > Options > System > Environment) and install "
            f"again, or install by hand: {plan.hand_command()} (target folder: {plan.target})")


def index_error(url: str, timeout: float = 4.0) -> Optional[str]:
    """Why ``url`` (a package index) cannot be fetched, or None when it answers.

    Uses the same proxy variables as pip (HTTPS_PROXY...). Only called after
    pip failed to find the torch build, to say which of the two it was.
    """
    import urllib.error
    import urllib.request
    probe = url.rstrip("/") + "/torch/"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as resp:
            resp.read(1)
        return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except Exception as exc:  # URLError, socket errors, timeouts
        reason = getattr(exc, "reason", None) or exc
        return f"{type(reason).__name__}: {reason}"


def _torch_pin_failure(output: str, plan: Optional[PipPlan],
                       probe: Optional[Callable[[str], Optional[str]]]) -> Optional[str]:
    """The PyTorch index of the chosen build could not serve torch: say so, never fall back."""
    m = re.search(r"No matching distribution found for (torch(?:vision)?)\s*==\s*([^\s]+)", output)
    if not m or plan is None or not plan.torch_index:
        return None
    pin = f"{m.group(1)}=={m.group(2)}"
    index = plan.torch_index
    parts = urlparse(index)
    marks = [p for p in (parts.hostname, parts.path.rstrip("/") + "/" if parts.path.strip("/")
                         else None) if p]
    failed = [line for line in output.splitlines()
              if any(mk in line for mk in marks) and any(c in line for c in _CONNECT)]
    why = None
    if failed:
        why = "connection failed"
    elif probe is not None:
        why = probe(index)
    build = plan.torch_build or "CPU"
    if why:
        cause = (f"pip could not reach the PyTorch {build} wheel index ({index}: {why}), the "
                 f"only place that has {pin}. Nothing was installed: MapCLIP does not fall back "
                 f"to the default index, whose torch for Linux is the CUDA build (about 6 GB "
                 f"with triton and the nvidia libraries).")
    else:
        cause = (f"the PyTorch {build} wheel index ({index}) has no {pin} for this Python and "
                 f"OS. Nothing was installed.")
    fix = (f"Fix: make {parts.hostname or index} reachable from this machine (proxy: set "
           f"HTTPS_PROXY in Settings > Options > System > Environment) and install again, or "
           f"install it by hand: {plan.hand_command([pin], [index])} (target folder: "
           f"{plan.target})")
    return f"{cause} {fix}"


def explain_failure(output: str, exit_code: int, plan: Optional[PipPlan] = None,
                    probe: Optional[Callable[[str], Optional[str]]] = index_error) -> str:
    """One clear sentence for a failed pip run, from its output.

    With the ``plan``, a torch build pip could not find is explained (the
    PyTorch index unreachable, checked with ``probe``, or without that build).
    """
    torch = _torch_pin_failure(output, plan, probe) or _index_failure(output, plan, probe)
    if torch:
        return torch
    m = re.search(r"No matching distribution found for numpy\s*==\s*([^\s]+)", output)
    if m:
        return (f"pip looks for QGIS's exact NumPy ({m.group(1)}) so that every package it "
                f"picks works with it, and the package index has no NumPy {m.group(1)} for "
                f"this Python. Fix: install MapCLIP's packages by hand with a NumPy pin your "
                f"index has and that QGIS accepts (same major version), then delete the numpy "
                f"folder that pip puts into {plan.target if plan else 'the MapCLIP folder'}.")
    for needles, text in _FAILURES:
        if any(n.lower() in output.lower() for n in needles):
            return text
    tail = " | ".join(l.strip() for l in output.strip().splitlines()[-3:] if l.strip())
    return f"pip failed (exit code {exit_code}): {tail or 'no output'}"

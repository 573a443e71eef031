"""Model files from the network: the Hugging Face hub, other URLs, the local cache.

Hub files download with huggingface_hub (``hf_hub_download``): ``HF_ENDPOINT``
(a mirror), ``HF_HUB_OFFLINE``, resumed partial downloads, proxies and the
shared Hugging Face cache (``$HF_HUB_CACHE``; under ``$MAPCLIP_CACHE/models/hub``
when ``$MAPCLIP_CACHE`` is set). Other files (SkyCLIP's zip from the authors'
bucket) download with :func:`download`, resumed too. A file already at
:func:`hf_cache_path` is used as is, so a file copied there by hand works
offline. :func:`preset_location` and :func:`preset_available` say where a preset
loads from and whether it needs the network.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional

from ..core.errors import ModelError, reason
from .presets import MODEL_CONFIG_FILE, RESOURCES_DIR, Preset

CACHE_ENV = "MAPCLIP_CACHE"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"

DownloadProgress = Callable[[int, int], None]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "mapclip")
    return Path(root) / "models"


def hf_endpoint() -> str:
    """The hub or mirror to download from: $HF_ENDPOINT, read at call time."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_offline() -> bool:
    """True when $HF_HUB_OFFLINE (or $TRANSFORMERS_OFFLINE) asks for no network."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_hub_cache() -> Optional[Path]:
    """Where hub files are cached: under $MAPCLIP_CACHE when it is set, else
    huggingface_hub's shared cache (None: $HF_HUB_CACHE / ~/.cache/huggingface/hub)."""
    return cache_dir() / "hub" if os.environ.get(CACHE_ENV) else None


def hf_file_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{hf_endpoint()}/{repo}/resolve/{revision}/{filename}"


def hf_cache_path(repo: str, filename: str) -> Path:
    """A file placed here by hand is used as is (no download, no hub cache)."""
    return cache_dir() / repo / filename


def _progress_tqdm(progress: Optional[DownloadProgress]):
    """A silent tqdm class that reports (done, total) bytes to ``progress``."""
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._total = int(kwargs.get("total") or 0)
            if progress and self._done:
                progress(self._done, self._total)

        def update(self, n=1):
            self._done += int(n or 0)
            if progress:
                progress(self._done, self._total)
            return super().update(n)

    return _Bar


#: seconds a connection to the hub may take before it counts as unreachable
HUB_CONNECT_TIMEOUT = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(endpoint: str, timeout: float = HUB_CONNECT_TIMEOUT) -> Optional[str]:
    """Why ``endpoint`` cannot be reached (one TCP connection, at most ``timeout`` s), or
    None when it can, or when a proxy is set (the proxy decides; huggingface_hub retries)."""
    import socket
    from urllib.parse import urlparse
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    url = urlparse(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port} cannot be reached ({reason(exc)})"


def hf_download(repo: str, filename: str, progress: Optional[DownloadProgress] = None,
                revision: str = "main") -> Path:
    """``filename`` of hub repo ``repo`` as a local file, through huggingface_hub.

    Honours $HF_ENDPOINT (mirrors), $HF_HUB_OFFLINE, proxies and resumes a
    partial download; files land in :func:`hf_hub_cache`. A file already at
    :func:`hf_cache_path` is returned without any network access.
    """
    legacy = hf_cache_path(repo, filename)
    if legacy.is_file():
        return legacy
    from huggingface_hub import hf_hub_download
    cache = hf_hub_cache()
    offline = hf_offline()
    unreachable = None if offline else hub_unreachable(hf_endpoint())
    if unreachable:      # no network: the cached copy if there is one, without 30 s of retries
        offline = True
    try:
        path = hf_hub_download(repo, filename, revision=revision, endpoint=hf_endpoint(),
                               cache_dir=str(cache) if cache else None, local_files_only=offline,
                               tqdm_class=_progress_tqdm(progress), library_name="mapclip")
    except Exception as exc:  # offline, network, hub or disk: one clear line
        why = (f"{unreachable}, and the file is not cached" if unreachable else
               "offline mode ($HF_HUB_OFFLINE) and the file is not cached" if offline else reason(exc))
        raise ModelError(
            f"could not download {repo}/{filename} from {hf_endpoint()} ({why})",
            f"with no network, download that file elsewhere and put it at {legacy} "
            f"(the cache folder is set by ${CACHE_ENV}); behind a firewall, set $HF_ENDPOINT "
            "to a hub mirror") from None
    return Path(path)


def download(url: str, dest: Path, progress: Optional[DownloadProgress] = None,
             timeout: float = 30.0) -> Path:
    """Fetch ``url`` into ``dest`` (atomically); a no-op if ``dest`` exists.

    A ``dest.part`` left by an interrupted download is resumed with an HTTP
    Range request (restarted if the server ignores the range).
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    try:
        headers = {"User-Agent": "MapCLIP"}
        if have:
            headers["Range"] = f"bytes={have}-"
        req = urllib.request.Request(url, headers=headers)
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not have:
                raise
            os.replace(part, dest)  # 416: the part is already the whole file
            return dest
        with resp:
            resumed = have and resp.status == 206
            done = have if resumed else 0
            total = int(resp.headers.get("Content-Length") or 0) + done
            with open(part, "ab" if resumed else "wb") as out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
            if total and done < total:  # a closed connection reads as a short file, not an error
                raise OSError(f"the connection closed after {done} of {total} bytes")
        os.replace(part, dest)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
        if not (part.is_file() and part.stat().st_size > have):
            part.unlink(missing_ok=True)  # keep a part that grew: the next try resumes it
        raise ModelError(
            f"could not download {url} ({getattr(exc, 'reason', exc)})",
            f"with no network, download that file elsewhere and put it at {dest} "
            f"(the cache folder is set by ${CACHE_ENV})") from None
    return dest


def zip_member_path(url: str, member: str) -> Path:
    """Where the ``member`` of the zip at ``url`` is kept once extracted."""
    stem = Path(url.rsplit("/", 1)[-1]).stem
    return cache_dir() / "url" / stem / Path(member).name


def download_zip_member(url: str, member: str, progress: Optional[DownloadProgress] = None) -> Path:
    """The file named ``member`` (its last path part) inside the zip at ``url``.

    The zip is downloaded (resumably) next to the extracted file, the member
    extracted, then the zip removed; an extracted file is reused offline.
    """
    dest = zip_member_path(url, member)
    if dest.is_file():
        return dest
    archive = download(url, dest.parent / url.rsplit("/", 1)[-1], progress)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if Path(n).name == Path(member).name]
            if not names:
                raise ModelError(f"{url} holds no {member}",
                                 f"download it by hand and put the checkpoint at {dest}")
            part = dest.with_name(dest.name + ".part")
            with zf.open(sorted(names, key=len)[0]) as src, open(part, "wb") as out:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
            os.replace(part, dest)
    except zipfile.BadZipFile:
        archive.unlink(missing_ok=True)
        raise ModelError(f"{url} did not download as a zip file",
                         f"download it by hand, unzip it and put {member} at {dest}") from None
    archive.unlink(missing_ok=True)
    return dest


def preset_location(preset: Preset) -> str:
    """Where a preset loads from, for listings."""
    if preset.source == "hf-file":
        where = hf_hub_cache() or "the Hugging Face cache"
        return f"{hf_file_url(preset.repo, preset.filename)} -> {where}"
    if preset.source == "url-zip":
        return f"{preset.url} ({preset.filename}) -> {zip_member_path(preset.url, preset.filename)}"
    if preset.source == "open_clip":
        return f"open_clip pretrained {preset.arch}:{preset.tag} -> {cache_dir() / 'open_clip'}"
    if preset.source == "folder":
        return str(RESOURCES_DIR / preset.path)
    return "random initialisation (seeded), nothing to download"


def preset_available(preset: Preset) -> bool:
    """True if loading the preset needs no download."""
    if preset.source == "hf-file":
        if hf_cache_path(preset.repo, preset.filename).is_file():
            return True
        try:
            from huggingface_hub import try_to_load_from_cache
            cache = hf_hub_cache()
            hit = try_to_load_from_cache(preset.repo, preset.filename,
                                         cache_dir=str(cache) if cache else None)
        except Exception:
            return False
        return isinstance(hit, str)
    if preset.source == "url-zip":
        return zip_member_path(preset.url, preset.filename).is_file()
    if preset.source == "folder":
        return (RESOURCES_DIR / preset.path / MODEL_CONFIG_FILE).is_file()
    return preset.source == "random"

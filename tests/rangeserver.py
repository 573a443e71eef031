"""A loopback HTTP server for a folder, the way object stores serve files to GDAL:
HEAD with Content-Length, ETag and Last-Modified, GET with ``Range: bytes=A-B``
answered by 206 and Content-Range. Records every request (method, path with its
query, Range; a POST's body in place of the Range).

With a ``stac-api.json`` in the folder (``{"items": [...], "page_size": N,
"next": "GET"|"POST"}``) it is also a STAC API: ``/`` is its landing page and
``/search`` its item search (GET or POST; bbox, datetime, collections, limit),
at most ``page_size`` items a page with a ``next`` link carrying a token.

It runs in its own process (``python tests/rangeserver.py ROOT LOG``): some of
rasterio's calls (a checksum, mask flags) hold the GIL while GDAL waits for the
server, so a server thread in the test's process would never answer them."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit


class _Server:
    def __init__(self, root, log=None):
        self.root = Path(root)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass   # GDAL closes a transfer once it has what it needs

            def _body(self):
                path = (server.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
                if server.root.resolve() not in path.parents or not path.is_file():
                    return None
                return path.read_bytes()

            def _missing(self):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _stamp(self):
                path = (server.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
                st = path.stat()
                self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
                self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))

            def _json(self, answer):
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/geo+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_HEAD(self):
                server.record("HEAD", self.path, "")
                body = self._body()
                if body is None:
                    return self._missing()
                self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                self._stamp()
                self.end_headers()

            def do_POST(self):
                sent = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                server.record("POST", self.path, sent)
                api = server.api()
                if api is None or urlsplit(self.path).path != "/search":
                    return self._missing()
                self._json(server.search(api, json.loads(sent or "{}"), self._base(), post=True))

            def _base(self):
                return f"http://{self.headers.get('Host')}"

            def do_GET(self):
                rng = self.headers.get("Range", "")
                server.record("GET", self.path, rng)
                api = server.api()
                route = urlsplit(self.path).path
                if api is not None and route in ("/", "/search"):
                    if route == "/":
                        return self._json(server.landing(self._base()))
                    params = dict(parse_qsl(urlsplit(self.path).query))
                    return self._json(server.search(api, params, self._base()))
                body = self._body()
                if body is None:
                    return self._missing()
                m = re.match(r"bytes=(\d+)-(\d*)$", rng)
                if m:
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else len(body) - 1, len(body) - 1)
                    part = body[start:end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                else:
                    part = body
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(part)))
                self._stamp()
                self.end_headers()
                self.wfile.write(part)

        self.log = log
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True

    def api(self):
        """The STAC API's items and paging, or None when the folder serves none."""
        path = self.root / "stac-api.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @staticmethod
    def landing(base):
        return {"type": "Catalog", "id": "api", "stac_version": "1.0.0", "description": "test API",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                               "https://api.stacspec.org/v1.0.0/item-search"],
                "links": [{"rel": "self", "href": base + "/"}, {"rel": "root", "href": base + "/"},
                          {"rel": "search", "href": base + "/search",
                           "type": "application/geo+json", "method": "GET"}]}

    @staticmethod
    def search(api, params, base, post=False):
        """One page of the item search: the filters as a STAC API applies them."""
        def listed(value):
            return value if isinstance(value, list) else str(value).split(",")

        def when(text, end):
            if text in ("", ".."):
                return dt.datetime.max if end else dt.datetime.min
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)

        items = api["items"]
        if params.get("bbox"):
            w, s, e, n = (float(v) for v in listed(params["bbox"]))
            items = [i for i in items if i["bbox"][0] <= e and i["bbox"][2] >= w
                     and i["bbox"][1] <= n and i["bbox"][3] >= s]
        if params.get("datetime"):
            lo, _, hi = params["datetime"].partition("/")
            lo, hi = when(lo, False), when(hi or lo, True)
            items = [i for i in items if lo <= when(i["properties"]["datetime"], False) <= hi]
        if params.get("collections"):
            wanted = set(listed(params["collections"]))
            items = [i for i in items if i.get("collection") in wanted]
        start = int(params.get("token", 0))
        size = min(int(params.get("limit", 10)), int(api.get("page_size", 10)))
        links = []
        if start + size < len(items):
            if api.get("next", "GET") == "POST":
                links.append({"rel": "next", "href": base + "/search", "method": "POST",
                              "body": {"token": start + size}, "merge": True})
            else:
                query = {k: (",".join(map(str, v)) if isinstance(v, list) else v)
                         for k, v in params.items()}
                query["token"] = start + size
                links.append({"rel": "next", "href": base + "/search?" + urlencode(query)})
        return {"type": "FeatureCollection", "features": items[start:start + size], "links": links}

    def record(self, method, path, rng):
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps([method, path, rng]) + "\n")


class RangeServer:
    """The server in a child process, for a ``with`` block: ``url``, ``requests``."""

    def __init__(self, root):
        self.root = Path(root)
        fd, self.log = tempfile.mkstemp(suffix=".log")
        os.close(fd)

    def __enter__(self) -> "RangeServer":
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.root), self.log],
                                     stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()
        os.remove(self.log)

    @property
    def requests(self) -> List[Tuple[str, str, str]]:
        with open(self.log) as f:
            return [tuple(json.loads(line)) for line in f if line.strip()]

    def ranged_gets(self) -> int:
        """GET requests that asked for a byte range (GDAL reading parts of a file)."""
        return sum(1 for m, _, r in self.requests if m == "GET" and r)


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_cog(path, data, **kw) -> Path:
    """``data`` (bands, rows, cols) uint8 as a Cloud Optimized GeoTIFF in EPSG:32633
    (tests/raster_fixtures.py's origin and pixel size), 128-px blocks."""
    import rasterio
    from rasterio.transform import from_origin

    from tests.raster_fixtures import UTM_ORIGIN, UTM_RES
    profile = dict(driver="COG", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(UTM_ORIGIN[0], UTM_ORIGIN[1], UTM_RES, UTM_RES),
                   blocksize=128, compress="deflate")
    profile.update(kw)
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return Path(path)


if __name__ == "__main__":
    server = _Server(sys.argv[1], sys.argv[2])
    print(server.httpd.server_address[1], flush=True)
    server.httpd.serve_forever()

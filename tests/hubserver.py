"""A local HTTP server that serves files the way the Hugging Face hub does.

``huggingface_hub.hf_hub_download`` first sends ``HEAD {endpoint}/{repo}/resolve/{revision}/{file}``
and reads ``X-Repo-Commit`` (the commit the revision points at), ``ETag`` (the
blob's id in the cache) and ``Content-Length``; then it ``GET``s the same URL,
with ``Range: bytes=N-`` when it resumes an ``.incomplete`` blob, and expects
``206 Partial Content`` with ``Content-Range`` for a range. This server does
exactly that for the files it is given, records every request, and serves any
other path (a plain URL, e.g. a zip in a bucket) by its path alone.

``drop`` maps a file key to a byte count: the first full GET of that file
sends only that many bytes and then closes the connection (an interrupted
download), so a client that resumes must come back with a Range request.
"""
from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Tuple

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    def __init__(self, files: Dict[str, bytes], drop: Dict[str, int] = None):
        """``files`` maps ``repo/filename`` (hub files) or ``/any/path`` (plain URLs) to bytes."""
        self.files = dict(files)
        self.drop = dict(drop or {})
        self.requests: List[Tuple[str, str, str]] = []  # (method, path, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _key(self):
                m = re.match(r"^/(.+?/.+?)/resolve/([^/]+)/(.+)$", self.path)
                if m and f"{m.group(1)}/{m.group(3)}" in server.files:
                    return f"{m.group(1)}/{m.group(3)}"
                return self.path

            def _lookup(self):
                key = self._key()
                return server.files.get(key), key != self.path

            def _head(self, body, hub, status=200, extra=None):
                self.send_response(status)
                if hub:
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
                self.send_header("Accept-Ranges", "bytes")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                return hub

            def do_HEAD(self):
                server.requests.append(("HEAD", self.path, self.headers.get("Range", "")))
                body, hub = self._lookup()
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._head(body, hub)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_GET(self):
                rng = self.headers.get("Range", "")
                server.requests.append(("GET", self.path, rng))
                body, hub = self._lookup()
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                m = re.match(r"bytes=(\d+)-$", rng)
                start = int(m.group(1)) if m else 0
                if start >= len(body) and m:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                part = body[start:]
                self._head(body, hub, 206 if m else 200,
                           {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if m else None)
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                cut = server.drop.pop(self._key(), None) if not m else None
                if cut is not None:
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    import socket
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

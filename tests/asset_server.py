"""A local HTTP server on 127.0.0.1 that plays the release-asset host in the download tests.

Each route is a behaviour: serve the bytes, cut the connection after some of them (always, or on the first
request only), answer with an HTML page, 404, redirect, trickle (some bytes at full speed, then one byte at a
time with a pause), or send zeros without end or with a huge announced size. Requests are counted per path, so a
test can also show that nothing was asked for.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BLOCK = 1 << 16
# an official-format yolov5n checkpoint (3.8 MB)
CKPT = (Path(__file__).parent / "fixtures" / "student.pt").read_bytes()
WEIGHTS_PATH = "/v7.0/yolov5n.pt"  # where the release host keeps it


@dataclass
class Route:
    """What the server does for one path."""

    body: bytes = b""
    cut_after: int | None = None  # send only this many bytes of `body`, then close (Content-Length is the full size)
    cut_times: int = 0  # cut only the first `cut_times` requests (0 with cut_after: always)
    html: bool = False  # answer 200 with an HTML page instead of `body`
    redirect: str | None = None  # answer 302 with this Location
    zeros: int = 0  # serve this many zero bytes (made on the fly, never held) instead of `body`
    length: bool = True  # with `zeros`: announce their number in Content-Length (False: the body ends at the close)
    endless: bool = False  # zeros without end and without a Content-Length (the body ends when the client goes)
    trickle_s: float = 0.0  # after `fast` bytes of `body`, one byte every trickle_s seconds
    fast: int = 0


class AssetServer:
    """ThreadingHTTPServer on an ephemeral port; use as a context manager."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter = collections.Counter()
        self.stopping = threading.Event()  # ends the trickling and endless answers at __exit__
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                server.hits[self.path] += 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                try:
                    self._answer(route)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client refused the body and hung up, as the bounds tests want

            def _answer(self, route: Route) -> None:
                if route.redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", route.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if route.html:
                    page = b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>" * 3000
                    self._send(page, "text/html", len(page))
                    return
                if route.endless:
                    self._head(None)
                    while not server.stopping.is_set():
                        self.wfile.write(bytes(BLOCK))
                    return
                if route.zeros:
                    self._head(route.zeros if route.length else None)
                    left = route.zeros
                    while left > 0 and not server.stopping.is_set():
                        self.wfile.write(bytes(min(BLOCK, left)))
                        left -= BLOCK
                    return
                if route.trickle_s:
                    self._head(len(route.body))
                    self.wfile.write(route.body[:route.fast])
                    self.wfile.flush()
                    for k in range(route.fast, len(route.body)):
                        if server.stopping.wait(route.trickle_s):
                            return
                        self.wfile.write(route.body[k:k + 1])
                        self.wfile.flush()
                    return
                cut = route.cut_after is not None and (route.cut_times == 0
                                                       or server.hits[self.path] <= route.cut_times)
                self._send(route.body[:route.cut_after] if cut else route.body, "application/octet-stream",
                           len(route.body))
                if cut:
                    self.close_connection = True

            def _head(self, length: int | None, ctype: str = "application/octet-stream") -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()

            def _send(self, data: bytes, ctype: str, length: int) -> None:
                self._head(length, ctype)
                self.wfile.write(data)
                self.wfile.flush()

            def log_message(self, *args) -> None:
                """Quiet."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)  # quick shutdown

    def __enter__(self) -> AssetServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_for(predicate, timeout_s: float = 10.0, step_s: float = 0.02) -> bool:
    """Poll `predicate` until it is true (returns True) or `timeout_s` passes (returns False)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step_s)
    return bool(predicate())

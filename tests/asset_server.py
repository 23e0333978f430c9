"""A local HTTP server on 127.0.0.1 that plays the release-asset host in the download tests.

Each route is a behaviour: serve the bytes, cut the connection after some of them (always, or on the first
request only), answer with an HTML page, or 404. Requests are counted per path, so a test can also show
that nothing was asked for.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """What the server does for one path."""

    body: bytes = b""
    cut_after: int | None = None  # send only this many bytes of `body`, then close (Content-Length is the full size)
    cut_times: int = 0  # cut only the first `cut_times` requests (0 with cut_after: always)
    html: bool = False  # answer 200 with an HTML page instead of `body`


class AssetServer:
    """ThreadingHTTPServer on an ephemeral port; use as a context manager."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: collections.Counter = collections.Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server interface
                server.hits[self.path] += 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                if route.html:
                    page = b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>" * 3000
                    self._send(page, "text/html", len(page))
                    return
                cut = route.cut_after is not None and (route.cut_times == 0 or server.hits[self.path] <= route.cut_times)
                self._send(route.body[:route.cut_after] if cut else route.body, "application/octet-stream",
                           len(route.body))
                if cut:
                    self.close_connection = True

            def _send(self, data: bytes, ctype: str, length: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def log_message(self, *args) -> None:
                """Quiet."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> AssetServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""An HTTP proxy in front of the S3 server that counts what reaches it: the tests' and the
bench's measure of requests per member and bytes fetched (workers' requests included)."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class CountingProxy:
    """Forwards HTTP requests to the S3 server and records (method, path, Range) of each, and
    the bytes of object data it returned."""

    upstream: tuple[str, int]
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    endpoint: str = ""
    bytes_returned: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # handlers run in threads

    def object_gets(self) -> list[tuple[str, str, str | None]]:
        """GETs of object bytes (a key after the bucket), not listings (`?list-type=2`)."""
        return [r for r in self.seen if r[0] == "GET" and "?" not in r[1]
                and urlsplit(r[1]).path.strip("/").count("/") >= 1]


def _handler(proxy: CountingProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Forward(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            with proxy.lock:
                proxy.seen.append((self.command, self.path, self.headers.get("Range")))
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                upstream.request(self.command, self.path, body, dict(self.headers))
                reply = upstream.getresponse()
                data = reply.read()
            finally:
                upstream.close()
            if self.command == "GET":
                with proxy.lock:
                    proxy.bytes_returned += len(data)
            self.send_response_only(reply.status, reply.reason)
            for name, value in reply.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            size = reply.getheader("Content-Length") if self.command == "HEAD" else len(data)
            self.send_header("Content-Length", str(size or 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Forward


@contextmanager
def counting_proxy(endpoint: str) -> Iterator[CountingProxy]:
    """A proxy to `endpoint` on a free loopback port, for the block's duration."""
    parts = urlsplit(endpoint)
    counting = CountingProxy((parts.hostname or "", parts.port or 80))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(counting))
    counting.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield counting
    finally:
        server.shutdown()
        server.server_close()

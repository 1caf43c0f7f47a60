"""A real S3-compatible server for the tests and the bench (moto's server mode, on a loopback
port), and an HTTP proxy in front of it that counts what reaches it: requests per member and
bytes fetched (workers' requests included)."""

from __future__ import annotations

import http.client
import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from helpers import free_port

AWS_SETTINGS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                "AWS_DEFAULT_REGION")


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with the environment's AWS settings pointed at
    it (restored after), so nothing reaches beyond this machine; yields its endpoint."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in AWS_SETTINGS}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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

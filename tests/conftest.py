"""Shared fixtures: a loopback HTTP server that serves files and misbehaves on purpose."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import time
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest
from PIL import Image

from mmcore.data.server import FileServer
from tests.objectstore import ObjectStore, configure_environment


def pytest_configure(config):
    configure_environment()  # before any process is forked: they all reach the tests' object store
    # No weights can be fetched here: a test that reaches for the Hugging Face Hub fails instead of hanging.
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def object_store():
    """The S3 API of tests/objectstore.py, for the session."""
    store = ObjectStore()
    yield store
    store.stop()


def jpeg_bytes(size=(48, 40), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


class MisbehavingHandler(SimpleHTTPRequestHandler):
    """Static files, plus /bad/... routes that fail the ways web servers do."""

    def log_message(self, format, *args):  # noqa: A002
        pass

    def finish(self):  # a route that reset its connection has nothing left to flush
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.requests.append(self.path)
        route = getattr(self, "_route_" + self.path.split("?")[0].strip("/").replace("bad/", "").replace("-", "_"),
                        None) if self.path.startswith("/bad/") else None
        if route is None:
            return super().do_GET()
        return route()

    def _send(self, body: bytes, content_type="image/jpeg", status=200, headers=(), length=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route_server_error(self):
        self._send(b"oops", "text/plain", status=500)

    def _route_slow(self):
        time.sleep(self.server.slow_s)
        self._send(jpeg_bytes())

    def _route_drip(self):  # a valid image, one byte at a time: each read is fast, the whole is not
        body = jpeg_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(len(body)):
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()
            time.sleep(0.05)

    def _route_reset(self):  # half the declared body, then a TCP reset (SO_LINGER 0) instead of a close
        body = jpeg_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _route_html_typed(self):
        self._send(b"<html><body>login page</body></html>", "text/html; charset=utf-8")

    def _route_robots(self):
        self._send(jpeg_bytes(), headers=[("X-Robots-Tag", "noai")])

    def _route_big(self):
        self._send(jpeg_bytes() + b"\0" * self.server.big_bytes)

    def _route_big_chunked(self):  # no Content-Length: the cap must hold while reading
        self._send(jpeg_bytes() + b"\0" * self.server.big_bytes, length=False)
        self.close_connection = True

    def _route_redirect_ok(self):
        self._redirect("/bad/robots-free")

    def _route_robots_free(self):
        self._send(jpeg_bytes(color=(30, 200, 30)))

    def _route_redirect_blocked(self):
        port = self.server.server_address[1]
        self._redirect(f"http://127.0.0.2:{port}/bad/robots-free")

    def _route_redirect_metadata(self):
        self._redirect("http://169.254.169.254/latest/meta-data/")

    def _route_redirect_file(self):
        self._redirect("file:///etc/passwd")

    def _route_redirect_loop(self):
        self._redirect("/bad/redirect-loop")


class TestServer(FileServer):
    """FileServer with the misbehaving routes and a log of request paths."""

    def __init__(self, root: Path):
        super().__init__(root, handler=MisbehavingHandler)
        self.requests: list[str] = []
        self.slow_s = 3.0
        self.big_bytes = 300_000


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory):
    """(server, root): a running TestServer over an empty directory the test may fill."""
    root = tmp_path_factory.mktemp("served")
    with TestServer(root) as server:
        yield server, root


@pytest.fixture
def fault(record_property):
    """fault(item, injected, tries, lost): what a fault test did and what it cost, for docs/reliability.md
    (bench/reliability.py reads it from pytest's JUnit XML; the outcome is the test's)."""
    import json

    def report(item: str, injected: str, tries: int, lost: str) -> None:
        record_property("fault", json.dumps({"item": item, "injected": injected, "tries": tries, "lost": lost}))

    record_property("fault_test", "1")  # a test that fails before it reports is still listed
    return report

"""A static HTTP server for the sample corpus, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _FileHandler(SimpleHTTPRequestHandler):
    """Serves files only: no directory listings, no request logging."""

    def list_directory(self, path):
        self.send_error(404, "Not Found")
        return None

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class FileServer(ThreadingHTTPServer):
    """A threaded static file server; use as a context manager to run it in the background."""

    daemon_threads = True
    request_queue_size = 256  # img2dataset opens many connections at once

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 handler: type[SimpleHTTPRequestHandler] = _FileHandler):
        super().__init__((host, port), functools.partial(handler, directory=str(root)))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FileServer":
        self._thread = threading.Thread(target=self.serve_forever, name="mmpipe-file-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()

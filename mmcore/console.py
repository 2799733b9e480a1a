"""What a user sees: mmpipe's own lines, bars and tables on the terminal; the libraries' output in a log file.

An entry point calls `configure(...)` once. Without `verbose`, file descriptors 1 and 2 of the
process are pointed at the log file, so everything Ray, Ray Data, DeepSpeed, Prefect, MLflow and
the processes they start write (their own threads, C++ code, child processes) lands in the log
and nothing is lost; mmpipe's consoles keep copies of the original terminal streams. With
`verbose` (`mmpipe -v`, or MMPIPE_VERBOSE=1) nothing is redirected: the libraries print to the
terminal as they normally do, and Python logging is still written to the file.
Without `configure` (a library call from a notebook or a test) nothing is changed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from mmcore.redact import RedactingFormatter, redact

out = Console(highlight=False, markup=False, soft_wrap=True)
"""Tables and mmpipe's lines (stdout)."""
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
"""Progress bars and error messages (stderr)."""
log = logging.getLogger("mmpipe")
"""mmpipe's own log lines; flows mirror this logger to the Prefect UI."""

VERBOSE_ENV = "MMPIPE_VERBOSE"
_state: dict = {}


def say(message: str) -> None:
    """One line of mmpipe's own output: to the terminal, and to the log (secrets masked in both)."""
    log.info(message)
    out.print(redact(message))


def log_file() -> Path | None:
    """Where this process writes its log (None when `configure` was not called)."""
    return _state.get("path")


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def configure(log_dir: Path, name: str, verbose: bool = False) -> Path:
    """Send library output to `<log_dir>/<time>-<name>.log`; returns its path. Once per process."""
    if "path" in _state:
        return _state["path"]
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{os.getpid()}.log"
    stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings become log records (in the file)
    if not verbose:
        _redirect_to(stream)
    _state.update(path=path)  # the handler keeps the stream open
    return path


def _redirect_to(stream) -> None:
    """Keep the terminal for mmpipe's consoles; point fds 1 and 2 (and so every child process) at the log,
    and this process's own prints through `redact`."""
    sys.stdout.flush()
    sys.stderr.flush()
    out.file = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    err.file = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout, sys.stderr = _Redacting(sys.stdout), _Redacting(sys.stderr)


class _Redacting:
    """sys.stdout/sys.stderr for the log file: what Python code prints passes through `redact` (MLflow
    prints run links with the tracking URI's password in them)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def failure(err_: BaseException, what: str) -> str:
    """The one message a failed command shows: what failed, why, and where the details are."""
    log.error("%s failed", what, exc_info=err_)
    detail = redact(str(err_).strip().splitlines()[0]) if str(err_).strip() else type(err_).__name__
    ours = isinstance(err_, (ValueError, OSError)) or type(err_).__module__.startswith("mmcore")
    kind = "" if ours else f"{type(err_).__name__}: "  # our messages say what happened; others get their type
    where = f"\n  details: {log_file()}" if log_file() else ""
    return f"mmpipe: error: {what} failed: {kind}{detail}{where}"

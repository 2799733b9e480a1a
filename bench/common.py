"""Helpers shared by the benchmarks: machine description and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every figure here was written by the command shown above it, on the machine it names.
Re-run a command to refresh its section; the other sections are left as they are.
"""


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def median(values) -> float:
    return statistics.median(values)


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section delimited by <!-- name:start --> / <!-- name:end -->."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamped = f"{start}\n{body.strip()}\n\n_Measured {time.strftime('%Y-%m-%d')} on {machine()}._\n{end}"
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: stamped, text) if pattern.search(text) else text.rstrip() + "\n\n" + stamped + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)

"""Progress bars for long work (rich), one helper so every stage looks the same.

Listeners (`progress_listener`) see the same updates, so an orchestrator can mirror a bar
somewhere else (the Prefect flows turn them into progress artifacts) without this library
knowing about it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from mmcore import console

Listener = Callable[[str, int, int], None]
"""Called as listener(description, done, total) on every update of every bar."""
_listeners: list[Listener] = []


@contextlib.contextmanager
def progress_listener(listener: Listener) -> Iterator[None]:
    """Send every progress update to `listener` while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


@contextlib.contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A bar for `total` items; yields `advance_to(done, status="")`, callable from the owning thread.

    `status` is a short text shown after the bar (e.g. the training loss and samples/s)."""
    columns = (TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console.err, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance_to(done: int, status: str | None = None) -> None:
            done = min(done, total)
            progress.update(task, completed=done, **({"status": status} if status is not None else {}))
            for listener in list(_listeners):
                listener(description, done, total)

        advance_to(0)
        yield advance_to

"""Transient progress bars that are closed when their loop ends, exceptions included.

A rich ``track`` generator abandoned by an exception stays suspended until the garbage collector
closes it, in whatever thread happens to run the collection; its closing joins a thread that needs
the lock rich's refresh thread may hold there, and the process hangs. So every bar is a context
manager that closes its ``track`` on the way out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager


@contextmanager
def bar(it: Iterable, total: int, desc: str, show: bool = True) -> Iterator[Iterable]:
    """``with bar(items, len(items), "doing") as items: for x in items: …`` (``show=False``: no bar)."""
    if not show:
        yield it
        return
    from rich.progress import track

    tracked = track(it, total=total, description=desc, transient=True)
    try:
        yield tracked
    finally:
        tracked.close()

"""Reading a user's file without surprises: the type is checked with ``stat`` before reading, so a
FIFO, a device (``/dev/zero``) or a directory is named for what it is instead of blocking, reading
forever or being reported as missing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symlink"),
    (stat.S_ISREG, "a regular file"),
)


def file_kind(mode: int) -> str:
    """What a file of ``stat`` mode ``mode`` is, in words: "a directory", "a FIFO (named pipe)" …"""
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def not_regular(path: str | Path) -> str | None:
    """None for an existing regular file (symlinks followed); else what ``path`` is instead: "does
    not exist", "is a directory, not a regular file" …"""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of the path is a file)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if stat.S_ISREG(mode) else f"is {file_kind(mode)}, not a regular file"


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file. Opened non-blocking and checked after opening (the type may
    change after a ``stat``), so a FIFO never blocks and a device is never read. Raises ValueError
    naming what the path is when it is not a regular file; OSError when it cannot be read."""
    with open(path, "rb", opener=_nonblocking) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"is {file_kind(mode)}, not a regular file")
        return f.read()

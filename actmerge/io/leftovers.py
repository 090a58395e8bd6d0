"""Temp names, locks and the leftovers of interrupted runs, beside an output NAME.

Every name actmerge makes there follows one pattern:

- ``.NAME.tmp-PID-START-RAND``: a file or directory being written, or scratch space;
- ``.NAME.old-PID-START-RAND``: the previous output, set aside while ``--force`` swaps the new one in;
- ``.NAME.lock``: ``PID START``, the process writing NAME.

PID-START names the process: START is its start time (field 22 of ``/proc/PID/stat``; 0 where there
is no /proc), so a pid reused by another process is not mistaken for the writer. The next writer of
NAME cleans what a dead process left: temp files and directories are removed; a set-aside old output
is renamed back when NAME is missing (the swap was interrupted before the new output was in) and
removed when NAME is there; a stale lock is removed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

TAGS = ("tmp", "old")
# what a temp name adds to NAME: "." + ".tmp-" + pid (≤ 7) + "-" + start (≤ 12) + "-" + 8 random + slack
NAME_OVERHEAD = 40


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[19])  # field 22; the name in (…) may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def me() -> str:
    """``PID-START`` of this process, as temp names and locks record it."""
    return f"{os.getpid()}-{process_start(os.getpid()) or 0}"


def temp_prefix(out: Path, tag: str = "tmp") -> str:
    return f".{Path(out).name}.{tag}-{me()}-"


def _started_at(pid: int) -> float | None:
    """Wall-clock start of ``pid`` (Linux), for locks that record no start time."""
    start = process_start(pid)
    try:
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return None if start is None else btime + start / os.sysconf("SC_CLK_TCK")


def alive(pid: int, start: int | None, since: float | None = None) -> bool:
    """Whether the process that wrote ``pid`` (and ``start``, 0/None: unknown) still runs. ``since``:
    when a pid-only record was written; a process started after it is another one with the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    if start and now is not None:
        return now == start
    if since is not None and (began := _started_at(pid)) is not None:
        return began <= since + 2.0  # ticks are coarse: a little slack
    return True


def parse_owner(out: Path, name: str) -> tuple[str, int, int | None] | None:
    """(tag, pid, start) of a temp name beside ``out`` (start None in names of older versions)."""
    head = f".{Path(out).name}."
    if not name.startswith(head):
        return None
    tag, _, tail = name[len(head) :].partition("-")
    parts = tail.split("-")
    if tag not in TAGS or len(parts) not in (2, 3) or not parts[0].isdigit():
        return None
    start = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
    return tag, int(parts[0]), start


def remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(out: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Clean what dead processes left beside ``out`` (see the module docstring); returns the
    leftovers removed or restored."""
    out = Path(out)
    done: list[Path] = []
    if not out.parent.is_dir():
        return done
    for p in sorted(out.parent.iterdir()):
        if p.name == f".{out.name}.lock":
            if lock_holder(p) is None:
                p.unlink(missing_ok=True)
                done.append(p)
            continue
        owner = parse_owner(out, p.name)
        if owner is None or owner[1] == os.getpid() or alive(owner[1], owner[2]):
            continue
        if owner[0] == "old" and not out.exists() and not out.is_symlink():
            p.rename(out)  # an interrupted --force swap: the old output goes back
            log(f"restored {out} from {p.name}, set aside by an interrupted `--force` replace")
            continue
        remove(p)
        done.append(p)
    if done:
        names = ", ".join(p.name for p in done)
        log(f"removed {len(done)} leftover(s) of an interrupted actmerge run: {names}")
    return done


def lock_holder(lock: Path) -> int | None:
    """The pid of the live process holding a lock file, or None when the lock is stale (its process
    is gone, or its pid now belongs to a process started after it). A lock that holds no pid yet is
    held (0) for its first seconds: its writer is between creating and filling it."""
    try:
        text, mtime = lock.read_text().split(), lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        text, mtime = [], 0.0
    if not text or not text[0].isdigit():
        return 0 if time.time() - mtime < 5 else None
    pid = int(text[0])
    start = int(text[1]) if len(text) > 1 and text[1].isdigit() else None
    if pid == os.getpid() and (not start or start == process_start(pid)):
        return None  # our own: a lock this process left (it is not inside a write of this output)
    return pid if alive(pid, start, since=None if start else mtime) else None


@contextmanager
def lock(out: Path) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside ``out`` while the block runs; a live holder is an error naming the
    lock file, a dead (or pid-reused) one is replaced."""
    out = Path(out)
    path = out.parent / f".{out.name}.lock"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = lock_holder(path)
            if pid is not None:
                who = f"pid {pid}" if pid else "starting up"
                raise OutputError(
                    f"{out} is being written by another actmerge process ({who}): wait for it to finish or "
                    f"choose another -o. If no actmerge process is running, remove the lock file {path}."
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise OutputError(f"could not take the lock {path}: remove it if no actmerge process is running.")
    try:
        os.write(fd, me().replace("-", " ").encode())
        os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)

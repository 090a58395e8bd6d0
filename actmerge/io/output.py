"""Atomic outputs: every file and directory actmerge writes goes through here.

A directory is written into a temp dir beside the output (``.NAME.tmp-PID-…``) and renamed in
when complete; a file likewise (``.NAME.tmp-PID-…`` then ``os.replace``). While a directory is
written, ``.NAME.lock`` holds the writer's pid: a second writer fails fast naming it. Temp dirs
and locks whose process is gone are removed (and reported) by the next writer to the same place.

``--force`` replaces only a directory actmerge wrote (its ``actmerge/bake.json`` marker is there),
never the current directory, a parent of it, the home directory or the source, and only after the
new one is complete: the old one is renamed aside, the new one renamed in, then the old one
deleted, so a failed bake keeps the old output.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, OutputExistsError

PROVENANCE_DIR = "actmerge"
MARKER = f"{PROVENANCE_DIR}/bake.json"  # present in every directory actmerge writes


def is_actmerge_output(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be replaced, or None."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if out == cwd or cwd.is_relative_to(out):
        return "it is the current directory or one of its parents"
    if out == home or home.is_relative_to(out):
        return "it is your home directory or one of its parents"
    if out == Path(out.anchor):
        return "it is a file-system root"
    return None


def check_output(
    out: Path, source: Path | None = None, *, force: bool = False, is_dir: bool = True, owned: bool = False
) -> None:
    """Refuse an output that overlaps the source, exists without --force, is of the wrong kind, or
    (with --force) is not something actmerge may replace (``owned``: a cache entry of actmerge's own,
    replaceable without its marker). Cheap: call it before any slow work."""
    out = Path(out)
    out_r = out.resolve()
    if source is not None:
        src_r = Path(source).resolve()
        if out_r == src_r or out_r.is_relative_to(src_r) or src_r.is_relative_to(out_r):
            raise OutputExistsError(f"output {out} overlaps the source {source}: choose another -o.")
    if not out.exists() and not out.is_symlink():
        _check_parent_writable(out)
        return
    if is_dir and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is a file, not a directory: choose another -o.")
    if not is_dir and out.is_dir():
        raise OutputExistsError(f"output {out} is a directory; give a file name with -o.")
    if not force:
        raise OutputExistsError(
            f"output {out} already exists: choose another -o or pass --force to replace it."
        )
    if is_dir:
        why = _protected(out_r)
        if why is None and not owned and not is_actmerge_output(out):
            why = f"it is not an actmerge output (no {MARKER} in it)"
        if why:
            raise OutputExistsError(f"--force will not replace {out}: {why}. Choose another -o directory.")
    _check_parent_writable(out)


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _check_parent_writable(out: Path) -> None:
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not _writable(parent):
        raise OutputError(f"cannot write to {parent}: permission denied. Choose another -o location.")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before any slow work when the output's file system cannot hold ``needed`` bytes."""
    parent = Path(out).absolute()
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OutputError(
            f"not enough free space for {out}: the bake writes ~{needed / 2**30:.2f} GiB and {parent} has "
            f"{free / 2**30:.2f} GiB free. Free space or choose another -o location."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    """The pid in ``.NAME.tmp-PID-…`` / ``.NAME.old-PID-…``."""
    for tag in (".tmp-", ".old-"):
        if tag in name:
            pid = name.split(tag, 1)[1].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def clean_stale(out: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove temp dirs/files and locks beside ``out`` left by processes that no longer exist."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*"):
        pid = _owner(p.name) if not p.name.endswith(".lock") else _lock_pid(p)
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log(
            f"removed {len(removed)} leftover(s) of an interrupted actmerge run: {', '.join(p.name for p in removed)}"
        )
    return removed


def _lock_pid(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    lock = out.parent / f".{out.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise OutputError(
                    f"{out} is being written by another actmerge process (pid {pid}): wait for it to "
                    f"finish, or choose another -o. (Lock file: {lock})"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise OutputError(f"could not take the lock {lock}: remove it if no actmerge process is running.")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _fs_error(exc: OSError, where: Path) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"no space left on the device holding {where}: free space or choose another -o.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {where}: {exc.strerror}. Choose another -o location.")
    return OutputError(f"writing {where} failed: {exc}. Nothing was written.")


@contextmanager
def atomic_dir(
    out: Path,
    *,
    source: Path | None = None,
    force: bool = False,
    owned: bool = False,
    log: Callable[[str], None] = print,
) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out``; rename it to ``out`` when the block completes.

    On any error or interrupt the temp dir is removed and ``out`` is as it was."""
    out = Path(out)
    check_output(out, source, force=force, owned=owned)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fs_error(exc, out.parent) from None
    clean_stale(out, log)
    with _lock(out):
        check_output(out, source, force=force, owned=owned)  # again, under the lock
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an output follows the umask
        except OSError as exc:
            raise _fs_error(exc, out.parent) from None
        try:
            try:
                yield tmp
            except OSError as exc:
                raise _fs_error(exc, out) from exc
            _swap_in(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(3).hex()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``out``; ``os.replace`` it onto ``out`` when the block completes."""
    out = Path(out)
    check_output(out, force=force, is_dir=False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise _fs_error(exc, out.parent) from None
    tmp = Path(name)
    try:
        try:
            yield tmp
        except OSError as exc:
            raise _fs_error(exc, out) from exc
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

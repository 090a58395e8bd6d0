"""The one rule for every write: every file and directory actmerge writes goes through here.

``check_output`` (cheap: call it before any slow work; ``atomic_dir``/``atomic_file`` call it again):

- never into or over a model source (the resolved model, maps and checkpoints read), actmerge's
  cache (except its own cache code) or a Hugging Face cache (``markers.protected_roots``), through
  whatever symlinks the path takes;
- never a symlink as the output itself (the link would be replaced, or written through);
- an existing output needs ``--force``, and ``--force`` replaces only what actmerge wrote: a
  directory with its provenance (``actmerge/bake.json`` or ``actmerge/output.json``), a file with its
  marker (``markers.is_actmerge_file``); never the current directory, a parent of it or the home
  directory;
- a name short enough for the temp names made beside it (``leftovers.NAME_OVERHEAD``).

A directory is written into ``.NAME.tmp-…`` beside the output and renamed in when complete; a file
likewise (``os.replace``). The writer holds ``.NAME.lock``; the leftovers of a killed writer are
cleaned by the next one (``leftovers.clean_stale``). ``--force`` sets the old output aside as
``.NAME.old-…``, renames the new one in, then deletes the old one: a failed write keeps the old
output, and a kill between the two renames is undone by the next run. Outputs follow the umask.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, OutputExistsError
from .leftovers import NAME_OVERHEAD, clean_stale, lock, remove, temp_prefix
from .markers import (  # noqa: F401  (MARKER, PROVENANCE_DIR, is_actmerge_output: the output API)
    MARKER,
    PROVENANCE_DIR,
    REPORT_MARKER,
    is_actmerge_file,
    is_actmerge_output,
    protected_roots,
    report_marker,
)

Sources = Path | str | Iterable[Path | str] | None


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


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _places(out: Path) -> list[Path]:
    """Where ``out`` is: its location (parent links resolved) and, for a link, where it points."""
    here = out.absolute().parent.resolve() / out.name
    return [here, out.resolve()] if out.is_symlink() else [here]


def _sources(source: Sources) -> list[Path]:
    if source is None:
        return []
    items = [source] if isinstance(source, str | Path) else list(source)
    return [Path(s).expanduser() for s in items if s is not None]


def check_name(out: Path) -> None:
    """Refuse a name too long for the temp names actmerge makes beside it."""
    limit = _name_max(Path(out)) - NAME_OVERHEAD
    size = len(os.fsencode(Path(out).name))
    if size > limit:
        raise OutputExistsError(
            f"output name {Path(out).name[:40]}… is {size} bytes long; actmerge needs room for a temp name "
            f"beside it: use at most {limit} bytes (choose a shorter -o)."
        )


def _name_max(out: Path) -> int:
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        return os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output(
    out: Path,
    source: Sources = None,
    *,
    force: bool = False,
    is_dir: bool = True,
    owned: bool = False,
) -> None:
    """Refuse an output the rule forbids (module docstring). ``source``: every path the command
    reads (model, maps, checkpoints); ``owned``: a cache entry of actmerge's own (written into its
    cache, replaceable without a marker). Cheap: call it before any slow work."""
    out = Path(out)
    check_name(out)
    places = _places(out)
    for src in _sources(source):
        src_r = src.resolve()
        if any(_overlaps(p, src_r) for p in places):
            raise OutputExistsError(f"output {out} overlaps the source {src}: choose another -o.")
    for root, what in protected_roots(cache_write=owned):
        root_r = root.resolve()
        if any(_overlaps(p, root_r) for p in places):
            raise OutputExistsError(
                f"output {out} is in or holds {root} ({what}): actmerge never writes there. Choose another -o."
            )
    if out.is_symlink():
        raise OutputExistsError(
            f"output {out} is a symbolic link: actmerge neither replaces nor writes through links. Give "
            "the real path, or remove the link."
        )
    if not out.exists():
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
    why = _protected(out.resolve())
    if why is None and not owned:
        if is_dir and not is_actmerge_output(out):
            why = f"it is not an actmerge output (no {MARKER} or {REPORT_MARKER} in it)"
        if not is_dir and not is_actmerge_file(out):
            why = "it is not a file actmerge wrote (no actmerge marker in it)"
    if why:
        raise OutputExistsError(f"--force will not replace {out}: {why}. Choose another -o.")
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


def _fs_error(exc: OSError, where: Path) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"no space left on the device holding {where}: free space or choose another -o.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {where}: {exc.strerror}. Choose another -o location.")
    if exc.errno == errno.ENAMETOOLONG:
        return OutputError(f"a path under {where} is too long for the file system: choose a shorter -o.")
    return OutputError(f"writing {where} failed: {exc}. Nothing was written.")


@contextmanager
def _prepared(out: Path, source: Sources, force: bool, owned: bool, is_dir: bool, log) -> Iterator[None]:
    """Check, make the parent, clean a dead writer's leftovers, and hold the lock (checking again)."""
    check_output(out, source, force=force, owned=owned, is_dir=is_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fs_error(exc, out.parent) from None
    clean_stale(out, log)
    with lock(out):
        check_output(out, source, force=force, owned=owned, is_dir=is_dir)  # again, under the lock
        yield


@contextmanager
def atomic_dir(
    out: Path,
    *,
    source: Sources = None,
    force: bool = False,
    owned: bool = False,
    log: Callable[[str], None] = print,
) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``out``; rename it to ``out`` when the block completes.

    On any error or interrupt the temp dir is removed and ``out`` is as it was."""
    out = Path(out)
    with _prepared(out, source, force, owned, True, log):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
        except OSError as exc:
            raise _fs_error(exc, out.parent) from None
        try:
            try:
                yield tmp
                follow_umask(tmp)
            except OSError as exc:
                raise _fs_error(exc, out) from exc
            _swap_in(tmp, out)
        finally:
            remove(tmp)


@contextmanager
def scratch_dir(out: Path) -> Iterator[Path]:
    """A temp dir beside ``out`` for work on the way to it (removed at the end; a killed run's is
    cleaned by the next writer of ``out``)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    except OSError as exc:
        raise _fs_error(exc, out.parent) from None
    try:
        yield tmp
    finally:
        remove(tmp)


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        tmp.rename(out)
        return
    old = out.parent / f"{temp_prefix(out, 'old')}{os.urandom(4).hex()}"
    out.rename(old)  # from here until `old` is gone, a dead run's `old` is renamed back (clean_stale)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    remove(old)


@contextmanager
def atomic_file(
    out: Path,
    *,
    force: bool = False,
    source: Sources = None,
    owned: bool = False,
    log: Callable[[str], None] = print,
) -> Iterator[Path]:
    """Yield a temp path beside ``out``; ``os.replace`` it onto ``out`` when the block completes."""
    out = Path(out)
    with _prepared(out, source, force, owned, False, log):
        try:
            fd, name = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
            os.close(fd)
        except OSError as exc:
            raise _fs_error(exc, out.parent) from None
        tmp = Path(name)
        try:
            try:
                yield tmp
                os.chmod(tmp, 0o666 & ~umask())
            except OSError as exc:
                raise _fs_error(exc, out) from exc
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)


def write_report_dir(
    out: Path,
    kind: str,
    write: Callable[[Path], None],
    *,
    source: Sources = None,
    force: bool = False,
    log=print,
) -> Path:
    """An eval or tune report directory: ``write(tmp)`` fills it, ``actmerge/output.json`` marks it."""
    with atomic_dir(out, source=source, force=force, log=log) as tmp:
        write(tmp)
        (tmp / REPORT_MARKER).parent.mkdir(parents=True, exist_ok=True)
        (tmp / REPORT_MARKER).write_bytes(report_marker(kind))
    return Path(out)


def rewrite_in_output(out_dir: Path, rel: str, data: bytes, log=print) -> bool:
    """Replace the file ``rel`` (e.g. README.md) of a checkpoint actmerge wrote, atomically and never
    through a link. False, and nothing written, for a directory actmerge did not write (no
    ``actmerge/bake.json``), a link, or a path in a model cache."""
    out_dir = Path(out_dir)
    target = out_dir / rel
    if out_dir.is_symlink() or target.is_symlink() or not (out_dir / MARKER).is_file():
        return False
    if any(_overlaps(out_dir.resolve(), root.resolve()) for root, _ in protected_roots()):
        return False
    with lock(out_dir):
        with atomic_file(target, force=True, owned=True, log=log) as tmp:
            tmp.write_bytes(data)
    return True


def follow_umask(root: Path) -> None:
    """Give every file and directory under ``root`` the mode a new one gets under the umask (some
    writers, e.g. safetensors' ``save_file``, make 0600 files); executables stay executable."""
    mask = umask()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        full = 0o777 if p.is_dir() or mode & 0o111 else 0o666
        if stat.S_IMODE(mode) != full & ~mask:  # an unneeded chmod would still change the ctime
            os.chmod(p, full & ~mask)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""Entries of actmerge's snapshot cache (``ACTMERGE_CACHE``): a converted model that later runs trust.

An entry is written like every output (``output.atomic_dir``: a temp dir renamed in when complete).
``seal`` gives its files the umask's modes and then, as the last write, records ``MANIFEST``: the
size and sha256 of every file and where the snapshot came from (``origin``). Before each use,
``check_entry`` compares every size (each run) and every digest, streamed, once per file state:
the (size, mtime_ns, ctime_ns) of a file whose digest matched is remembered in ``VERIFIED``, so an
unchanged entry is not hashed again. A damaged entry is refused with the remedy: delete it.

``conversion_lock`` serialises first-use conversions of one entry across processes (``flock``:
released by the kernel when its process dies, so it never goes stale); a second process waits.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CacheError
from .output import umask

MANIFEST = ".actmerge-manifest.json"  # hidden: never copied into a bake (``tree.copy_verbatim``)
VERIFIED = ".actmerge-verified.json"
FORMAT = 1
WAIT_S = 30 * 60.0  # how long a process waits for another one's conversion of the same entry


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Relative paths of the regular files and links under ``root``, hidden paths left out."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or (p.is_dir() and not p.is_symlink()):
            continue
        out.append(rel.as_posix())
    return out


def _state(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def seal(tmp: Path, origin: dict) -> None:
    """Finish a new entry in its temp dir: modes from the umask (safetensors' writer makes 0600
    files), then the manifest, written last, and the digests as verified."""
    mask = umask()
    for p in [tmp, *tmp.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    files, verified = {}, {}
    for rel in _files(tmp):
        st = os.stat(tmp / rel)
        digest = sha256_file(tmp / rel)
        files[rel] = {"size": st.st_size, "sha256": digest}
        verified[rel] = [*_state(st), digest]
    _write_json(tmp / VERIFIED, verified)
    _write_json(tmp / MANIFEST, {"format": FORMAT, "origin": origin, "files": files})


def _write_json(path: Path, data: dict) -> None:
    fd, name = tempfile.mkstemp(prefix=f"{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.chmod(name, 0o666 & ~umask())
        os.replace(name, path)
    finally:
        if os.path.exists(name):
            os.unlink(name)


def read_manifest(entry: Path) -> dict | None:
    """The entry's manifest; None when it has none. Unreadable: the entry is damaged."""
    path = Path(entry) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()
        ):
            raise ValueError("not a manifest")
    except (OSError, ValueError) as exc:
        raise damaged(entry, f"its manifest {MANIFEST} is unreadable ({exc})") from None
    return data


def origin(entry: Path) -> dict:
    """Where the snapshot in ``entry`` came from (empty for a directory that is no cache entry)."""
    try:
        manifest = read_manifest(entry)
    except CacheError:
        return {}
    found = manifest.get("origin") if manifest else None
    return dict(found) if isinstance(found, dict) else {}


def damaged(entry: Path, why: str) -> CacheError:
    return CacheError(
        f"the actmerge cache entry {entry} is damaged ({why}): delete {entry} (it will be rebuilt)."
    )


def check_entry(entry: Path, manifest: dict, *, log: Callable[[str], None] = print) -> None:
    """Refuse an entry whose files differ from its manifest: missing, added, resized (every run), or
    with another sha256 (hashed once per file state, then remembered in ``VERIFIED``)."""
    entry = Path(entry)
    files: dict = manifest["files"]
    states = {}
    for rel, meta in files.items():
        try:
            st = os.lstat(entry / rel)
        except OSError:
            raise damaged(entry, f"{rel} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise damaged(entry, f"{rel} is not a regular file")
        if st.st_size != meta.get("size"):
            raise damaged(entry, f"{rel} is {st.st_size} bytes, {meta.get('size')} when it was written")
        states[rel] = _state(st)
    added = sorted(set(_files(entry)) - set(files))
    if added:
        raise damaged(entry, f"{', '.join(added)} {'was' if len(added) == 1 else 'were'} added to it")
    try:
        known = json.loads((entry / VERIFIED).read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    todo = [rel for rel in files if known.get(rel) != [*states[rel], files[rel]["sha256"]]]
    if not todo:
        return
    size = sum(states[rel][0] for rel in todo)
    log(f"[actmerge] checking the cached snapshot {entry} (sha256 of {size / 2**20:.0f} MiB, once)")
    for rel in todo:
        if sha256_file(entry / rel) != files[rel]["sha256"]:
            raise damaged(entry, f"{rel} does not match the sha256 recorded when it was written")
        known[rel] = [*states[rel], files[rel]["sha256"]]
    try:
        _write_json(entry / VERIFIED, {k: v for k, v in known.items() if k in files})
    except OSError:
        pass  # a read-only cache: checked again next time


def check_writable(root: Path) -> None:
    """The cache directory exists (created) and is writable, or a message naming it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(root, exc.strerror or str(exc)) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise unwritable(root, "permission denied")


def unwritable(root: Path, why: str) -> CacheError:
    return CacheError(
        f"cannot write to the actmerge cache {root} ({why}): set ACTMERGE_CACHE to a writable "
        "directory, or fix the permissions of this one."
    )


def write_failed(entry: Path, exc: Exception) -> CacheError:
    """A failure of the writer while building ``entry`` (``output.atomic_dir``'s OutputError, whose
    remedy speaks of -o), re-said for the cache."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        why = cause.strerror
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            why += "; free space"
    else:
        why = re.sub(r"[.:;]?\s*[Cc]hoose another -o[^.]*\.?", "", str(exc)).rstrip(". ")
    return CacheError(
        f"could not write the actmerge cache entry {entry} ({why}): nothing was kept; fix that or set "
        "ACTMERGE_CACHE to another directory."
    )


@contextmanager
def conversion_lock(
    entry: Path, *, what: str, wait_s: float = WAIT_S, log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold ``.convert-NAME.lock`` beside ``entry`` while converting into it; wait (saying so) while
    another process holds it, up to ``wait_s`` seconds."""
    entry = Path(entry)
    lock = entry.parent / f".convert-{entry.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise unwritable(entry.parent, exc.strerror or str(exc)) from None
    try:
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    log(
                        f"[actmerge] another actmerge process (pid {holder}) is converting {what} into "
                        f"{entry}: waiting for it (up to {wait_s / 60:.0f} min)"
                    )
                    said = True
                if time.monotonic() > deadline:
                    raise CacheError(
                        f"gave up after {wait_s / 60:.0f} min waiting for another actmerge process converting "
                        f"{what} into {entry} (lock {lock}): run again when it has finished."
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race a waiting process)

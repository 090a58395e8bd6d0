"""The writer thread of a rewrite: writes at explicit offsets and byte-range copies between files
(a reflink where the file system has one, else ``copy_file_range``, else read + write)."""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

PIECE = 64 << 20  # a copy is queued in pieces so that an interrupt stops the writer promptly
HELD_BYTES = 256 << 20  # computed bytes waiting for the writer, at most (beyond: the caller writes)
OPEN_FILES = 8  # output files being written at once, at most (the caller runs this far ahead)


class OutFile:
    """One output file being written and the file it is copied from; closed by the writer thread
    once sealed (nothing more will be queued) and its last job is done."""

    def __init__(self, src: Path, dest: Path):
        self.src = open(src, "rb")  # noqa: SIM115 (closed by close(), possibly in the writer thread)
        try:
            self.dst = open(dest, "wb")  # noqa: SIM115
        except BaseException:
            self.src.close()
            raise
        self.pending, self.sealed = 0, False

    def close(self) -> None:
        self.src.close()
        self.dst.close()


class Writer:
    """One thread that writes every output file of a rewrite: copies and writes at explicit offsets.

    Writes of computed bytes go first (they hold memory; past ``held`` bytes waiting, the caller
    writes the oldest itself); in-kernel copies fill the rest of the thread's time, file by file in
    the order queued. So the caller computes the next tensors, and the next shard's, while earlier
    ones are copied; at ``close`` it copies too, starting from the last file queued (another file
    than the thread's: writes to one file take its inode lock in turn). The first error the thread
    meets is raised in the caller's thread (at its next call or at ``close``); an exception in the
    caller (an interrupt) drops the queued work, stops the thread and closes the files."""

    def __init__(self, held: int = HELD_BYTES):
        self.cond = threading.Condition()
        self.data: deque = deque()  # (job, bytes, out): writes of computed bytes
        self.copies: dict[OutFile, deque] = {}  # out → its in-kernel copies (job, 0, out), in order
        self.held, self.limit = 0, held
        self.error: BaseException | None = None
        self.stopped = self.closing = False
        self.outs: list[OutFile] = []
        self.thread = threading.Thread(target=self._run, name="actmerge-writer", daemon=True)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._stop()

    def close(self) -> None:
        """Help with, then wait for, everything queued; raise the writer's error, if any."""
        try:
            while self.error is None and (job := self._take(steal=True)):
                self._do(job)
            with self.cond:
                self.closing = True
                self.cond.notify_all()
            while self.thread.is_alive():
                self.thread.join(0.2)  # in steps: an interrupt still reaches this thread
        except BaseException:
            self._stop()
            raise
        self._close_files()
        if self.error is not None:
            raise self.error

    def _stop(self) -> None:
        with self.cond:
            self.stopped = True  # the rest of the queue is dropped
            self.data.clear()
            self.copies.clear()
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join()  # the current job is at most one piece
        self._close_files()

    def _close_files(self) -> None:
        for out in self.outs:
            out.close()
        self.outs.clear()

    def _take(self, steal: bool = False) -> tuple | None:
        """The next job: a write first, else the next copy into the first file queued (with
        ``steal``: into the last one); None if none."""
        with self.cond:
            if self.stopped:
                return None
            if self.data:
                return self.data.popleft()
            if not self.copies:
                return None
            out = next(reversed(self.copies)) if steal else next(iter(self.copies))
            job = self.copies[out].popleft()
            if not self.copies[out]:
                del self.copies[out]
            return job

    def _do(self, job: tuple, catch: bool = False) -> None:
        fn, n, out = job
        try:
            if self.error is None:
                fn()
        except BaseException as exc:
            if not catch:
                raise
            self.error = exc  # re-raised in the caller's thread
        finally:
            with self.cond:
                self.held -= n
                out.pending -= 1
                if out.sealed and not out.pending:
                    self._retire(out)
                self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.data or self.copies or self.closing or self.stopped):
                    self.cond.wait()
            job = self._take()
            if job is None:
                with self.cond:
                    if self.stopped or (self.closing and not self.data and not self.copies):
                        return
                continue
            self._do(job, catch=True)

    def _retire(self, out: OutFile) -> None:
        try:
            out.close()
        except OSError as exc:  # a write error reported at close (e.g. a full network file system)
            self.error = self.error or exc
        if out in self.outs:
            self.outs.remove(out)

    def _submit(self, job: Callable[[], None], n: int, out: OutFile) -> None:
        """Queue a write of ``n`` computed bytes, or (``n`` = 0) a copy into ``out``."""
        while True:
            with self.cond:
                if self.error is not None:
                    raise self.error
                if not n or not self.held or self.held + n <= self.limit:
                    (self.data if n else self.copies.setdefault(out, deque())).append((job, n, out))
                    self.held += n
                    out.pending += 1
                    self.cond.notify_all()
                    return
                ahead = self.data.popleft() if self.data else None
            if ahead is None:  # the writer thread holds the bytes: wait for it
                with self.cond:
                    self.cond.wait(0.2)  # in steps: an interrupt still reaches this thread
            else:  # the writer is behind: write the oldest waiting block here
                self._do(ahead)

    def open(self, src: Path, dest: Path) -> OutFile:
        """``dest`` created now, written by the queued jobs; ``seal`` it when nothing more is queued.
        With ``OPEN_FILES`` outputs unfinished, the caller copies (or waits) until one is done."""
        while True:
            with self.cond:
                if self.error is not None:
                    raise self.error
                if len(self.outs) < OPEN_FILES:
                    break
            job = self._take(steal=True)
            if job is None:
                with self.cond:
                    self.cond.wait(0.2)
            else:
                self._do(job)
        out = OutFile(src, dest)
        with self.cond:
            self.outs.append(out)
        return out

    def seal(self, out: OutFile) -> None:
        with self.cond:
            out.sealed = True
            if not out.pending:
                self._retire(out)

    def write(self, out: OutFile, offset: int, data) -> None:
        n = memoryview(data).nbytes
        self._submit(lambda: pwrite_all(out.dst.fileno(), data, offset), n, out)

    def copy(self, out: OutFile, src_offset: int, dst_offset: int, count: int) -> None:
        for k in range(0, count, PIECE):
            n = min(PIECE, count - k)
            self._submit(
                lambda a=src_offset + k, b=dst_offset + k, n=n: copy_at(
                    out.src.fileno(), out.dst.fileno(), a, b, n
                ),
                0,
                out,
            )

    def copy_file(self, src: Path, dest: Path) -> None:
        """A whole file: a reflink where the file system has one (now), else queued in-kernel copies."""
        out = self.open(src, dest)
        try:
            if not reflink(out.src.fileno(), out.dst.fileno()):
                self.copy(out, 0, 0, os.fstat(out.src.fileno()).st_size)
        finally:
            self.seal(out)


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_FATAL = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def copy_at(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """``count`` bytes of ``src`` at ``src_offset`` to ``dst`` at ``dst_offset`` (in-kernel when
    possible, else read + write)."""
    try:
        while count > 0:
            n = os.copy_file_range(src, dst, count, src_offset, dst_offset)
            if n == 0:
                break
            count, src_offset, dst_offset = count - n, src_offset + n, dst_offset + n
        return
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in _FATAL:
            raise
    while count > 0:
        block = os.pread(src, min(count, 16 << 20), src_offset)
        if not block:
            break
        pwrite_all(dst, block, dst_offset)
        count, src_offset, dst_offset = count - len(block), src_offset + len(block), dst_offset + len(block)


FICLONE = 0x40049409  # ioctl(dst, FICLONE, src): share the extents (btrfs, XFS, bcachefs, ...)


def reflink(src: int, dst: int) -> bool:
    try:
        import fcntl

        fcntl.ioctl(dst, FICLONE, src)
        return True
    except (ImportError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in _FATAL:
            raise
        return False

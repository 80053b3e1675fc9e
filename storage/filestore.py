"""Durable instance files: write to a temp file, fsync, rename into a UID-based layout.

A file is either absent or complete at its final path, even after `kill -9` or a power
cut, because the bytes are fsynced before the atomic rename and the directory entry is
fsynced after it. Temp files left by a crash are removed by `clean_temp` at start-up.

Layout under the data directory::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    conflicts/<SOPInstanceUID>.<sha256-16>.dcm     same UID, different content (kept aside)
    rejected/unparsed.<sha256-16>.dcm              datasets that could not be parsed
    rejected/<SOPInstanceUID>.<utc-time>.<n>.dcm   files cut short by a crash

Copies kept aside are named by their content (the first 16 hex digits of its SHA-256):
a sender that retries sends the same bytes again, which keeps one copy, not one per try.
    tmp/                                           in-flight writes
    node.lock                                      held by the running node
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidUID(ValueError):
    """A UID that is not a dotted digit string cannot be used in the file layout."""


def check_uid(name: str, value: str) -> str:
    """Return value if it is a syntactically valid DICOM UID (PS3.5 9.1), else raise."""
    if not value or len(value) > 64 or not _UID.fullmatch(value):  # "$" allows a "\n"
        raise InvalidUID(f"{name} {value!r} is not a valid DICOM UID")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all_and_fsync(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


class DataDirInUse(RuntimeError):
    """Another running node holds the data directory."""


class DataDirLock:
    """One running node per data directory.

    A second `dicomnode serve` on the same directory would, at its start-up, remove the
    first one's in-flight temp files and queue its running jobs again (its crash
    recovery); an advisory lock (`flock`, released by the kernel when the holder dies,
    even by kill -9) refuses it first.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "node.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"another dicomnode (pid {holder}) is serving {self.path.parent}: stop it"
                " first, or give this node its own [storage] data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class FileStore:
    """The node's files under one data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self._durable_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._counter = itertools.count()
        for sub in ("instances", "tmp", "conflicts", "rejected"):
            self._ensure_dir(root / sub)

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Relative path of an instance; raises InvalidUID for UIDs unsafe in a path."""
        check_uid("StudyInstanceUID", study_uid)
        check_uid("SeriesInstanceUID", series_uid)
        check_uid("SOPInstanceUID", sop_uid)
        return f"instances/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def write(self, relpath: str, data: bytes, *, exclusive: bool = False) -> int:
        """Durably write data to relpath (replacing it atomically); returns the size.

        `exclusive`: raise FileExistsError instead of replacing an existing file; the file
        at relpath is then always a complete one (published by a hard link, not a rename).
        """
        final = self.root / relpath
        self._ensure_dir(final.parent)
        tmp = self.tmp_dir / f"{os.getpid()}.{threading.get_ident()}.{next(self._counter)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all_and_fsync(fd, data)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        if exclusive:
            try:
                os.link(tmp, final)
            finally:  # missing: a restarted node's start-up cleaned tmp/ (orphaned worker)
                tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        return len(data)

    def create(self, relpath: str, data: bytes) -> int:
        """Durably write a new file that is not indexed yet, in place, with one fsync;
        FileExistsError when the path is taken (the file system's own existence check,
        for free with the create: an existing file is never truncated, so nothing that
        is indexed or being read can be cut).

        The C-STORE fast path: no temp file, rename or directory fsync. ext4 and XFS commit
        a new file's directory entry with the fsync of the file itself. A write that fails
        (disk full, I/O error) removes its partial file; a crash mid-write leaves one that
        no index row points to, which `StudyIndex` reconciliation after an unclean
        shutdown sets aside (complete ones are re-indexed).
        """
        final = self.root / relpath
        self._ensure_dir(final.parent)
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all_and_fsync(fd, data)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        os.close(fd)
        return len(data)

    def instance_files(self) -> list[str]:
        """Relative paths of every file under instances/ (for reconciliation)."""
        base = self.root / "instances"
        return sorted(str(p.relative_to(self.root)) for p in base.glob("*/*/*.dcm"))

    def set_aside(self, relpath: str, kind: str = "rejected") -> str:
        """Move a file out of the instance tree (kept for inspection, never deleted)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")
        target = f"{kind}/{Path(relpath).stem}.{stamp}.{next(self._counter)}.dcm"
        os.replace(self.root / relpath, self.root / target)
        _fsync_dir((self.root / target).parent)
        return target

    def keep_aside(self, kind: str, stem: str, data: bytes) -> tuple[str, bool]:
        """Keep data that must not replace an instance (a conflict, an unparseable data
        set), once per content: the same bytes again only touch the copy, so that purge,
        which goes by a file's last change, counts from the last time it came. Returns its
        path and whether it is new."""
        relpath = f"{kind}/{stem}.{hashlib.sha256(data).hexdigest()[:16]}.dcm"
        try:
            os.utime(self.root / relpath)
            return relpath, False
        except FileNotFoundError:
            self.write(relpath, data)
            return relpath, True

    def size(self, relpath: str) -> int | None:
        """Size in bytes of a file, None if there is none."""
        try:
            return (self.root / relpath).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, relpath: str) -> bytes:
        return (self.root / relpath).read_bytes()

    def clean_temp(self) -> int:
        """Remove half-written files of a previous run; returns how many were removed."""
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.warning("removed %d half-written temp file(s) from %s", removed, self.tmp_dir)
        return removed

    def remove(self, relpaths: Iterable[str]) -> int:
        """Delete files (`dicomnode purge`), then the folders they leave empty; returns
        the bytes freed. Files already gone are skipped."""
        freed = 0
        folders: set[Path] = set()
        for relpath in relpaths:
            path = self.root / relpath
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            while folder != self.root and folder.parent != self.root:  # keep instances/ ...
                try:
                    folder.rmdir()
                except OSError:  # not empty
                    break
                folder = folder.parent
        return freed

    def aside_files_before(self, cutoff: datetime) -> list[str]:
        """Files under conflicts/ and rejected/ last changed before `cutoff` (UTC)."""
        stamp = cutoff.replace(tzinfo=UTC).timestamp() if cutoff.tzinfo is None else (
            cutoff.timestamp())
        return sorted(
            str(path.relative_to(self.root))
            for kind in ("conflicts", "rejected")
            for path in (self.root / kind).iterdir()
            if path.is_file() and path.stat().st_mtime < stamp
        )

    def free_bytes(self) -> int:
        """Free space on the data directory's file system."""
        return shutil.disk_usage(self.root).free

    def _ensure_dir(self, directory: Path) -> None:
        """Create directory and make its entry durable (once per process per directory)."""
        if directory in self._durable_dirs:
            return
        with self._lock:
            missing: list[Path] = []
            probe = directory
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            directory.mkdir(parents=True, exist_ok=True)
            for created in reversed(missing):
                _fsync_dir(created.parent)
            self._durable_dirs.add(directory)

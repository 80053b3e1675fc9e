"""`dicomnode serve`: wires the store, the index, the SCP, the assembler, the AI workers
and the exporter together.

Start-up is where crash recovery happens: half-written temp files are removed, jobs
that were running are queued again, and collecting series keep the timestamps the
index persisted, so their completion timers simply resume.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dicomnode.assembler import SeriesAssembler
from dicomnode.config import ConfigError, Settings
from dicomnode.export import Exporter
from dicomnode.scp import StorageSCP, reconcile_store
from dicomnode.workers import WorkerPool
from storage.filestore import DataDirLock, FileStore
from storage.index import StudyIndex, counts_line

logger = logging.getLogger(__name__)


class Node:
    """One running node; `start` is non-blocking, `serve_forever` blocks until a signal."""

    def __init__(self, settings: Settings, *, analyse: bool = True) -> None:
        """`analyse=False` runs receive and assembly only (jobs stay queued)."""
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.filestore = FileStore(settings.data_dir)
        self.lock = DataDirLock(settings.data_dir)
        # Migrated in `start`, under the lock: a node of the older version may be running.
        self.index = StudyIndex(settings.database_url, schema="defer")
        self.scp = StorageSCP(settings, self.index, self.filestore)
        self.assembler = SeriesAssembler(self.index, settings.series)
        self.exporter = Exporter(settings, self.index, self.filestore)
        self.workers = None
        self._started = False
        if analyse and settings.pipeline.workers > 0:
            self.workers = WorkerPool(settings, self.index)

    def start(self) -> None:
        """Raises `DataDirInUse` before touching anything when another node runs here. A
        start that fails later undoes itself: nothing left running, the lock released."""
        self.lock.acquire()
        try:
            self._start_locked()
        except BaseException:
            self._shut_down(clean=False)
            raise
        self._started = True

    def _start_locked(self) -> None:
        self.index.prepare_schema()
        self.filestore.clean_temp()
        if not self.index.mark_running():
            reconcile_store(self.filestore, self.index)
        requeued, failed = self.index.recover_after_restart(
            self.settings.pipeline.max_attempts)
        if requeued or failed:
            logger.warning("%d job(s) interrupted by the last shutdown queued again, %d"
                           " failed (claimed max_attempts times)", requeued, failed)
        logger.info("index %s: %s", self.index.shown_url,
                    counts_line(self.index.counts()))
        try:
            self.scp.start()
        except (OSError, ConfigError) as exc:
            # Nothing was received and recovery is done: the next start need not scan the
            # whole store again, as it would after a crash.
            self.index.mark_clean_shutdown()
            if isinstance(exc, OSError):
                node = self.settings.node
                raise OSError(exc.errno, f"the storage SCP cannot listen on {node.host}:"
                              f"{node.port} ([node] host, port): {exc.strerror}") from exc
            raise
        free_mb = self.filestore.free_bytes() // 2**20
        if free_mb < self.settings.storage.min_free_disk_mb:
            logger.warning("data_dir %s has %d MB free, below [storage] min_free_disk_mb (%d"
                           " MB): every C-STORE is refused (0xA700) until space is freed",
                           self.settings.data_dir, free_mb,
                           self.settings.storage.min_free_disk_mb)
        self.assembler.check()
        self.assembler.start()
        self.exporter.start()
        if self.workers is not None:
            self.workers.start()

    def stop(self) -> None:
        """Stop cleanly; a node that is not running (never started, or its start failed)
        has nothing to stop, and must not mark an index that it does not hold."""
        if not self._started:
            return
        self._started = False
        self._shut_down(clean=True)

    def _shut_down(self, clean: bool) -> None:
        """Stop every part (each is a no-op when it did not start), mark the index clean
        when asked, close it, and only then free the lock: a node started next must find
        the mark made."""
        self.scp.stop()
        self.assembler.stop()
        if self.workers is not None:
            self.workers.stop()
        self.exporter.stop()
        if clean:
            self.index.mark_clean_shutdown()
        self.index.close()
        self.lock.release()

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly."""
        stop_requested = threading.Event()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            logger.info("signal %d received: stopping", signum)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        stop_requested.wait()
        self.stop()

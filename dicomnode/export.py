"""Delivery of results to the destinations: C-STORE with a persistent queue.

Each Export row is one job's outputs for one destination, sent on one association and
retried as a whole (a PACS that took half a study gets all of it again, which C-STORE
makes harmless). Retries back off exponentially until `give_up_after_seconds`; a
refusal that retrying cannot fix fails at once with the peer's own reason. Rows live in
the index, so deliveries pending at a crash go out after the restart.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from dicomnode.config import Destination, Settings
from dicomnode.scu import Peer, client_tls_context, send
from storage.filestore import FileStore
from storage.index import ExportGone, ExportTask, StudyIndex, utcnow
from storage.models import ExportState

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0


def retry_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x initial, 4x ... capped at max (the exponent too:
    a float overflows from 2 ** 1024, which a day of retries a minute apart reaches)."""
    return min(max_s, initial_s * 2 ** min(max(0, attempts - 1), 62))


def destination_tls(destination: Destination, base_dir: Path) -> ssl.SSLContext:
    """The TLS context of a `tls = true` destination."""
    def path(value: str) -> Path | None:
        return base_dir / value if value else None

    return client_tls_context(path(destination.tls_ca), path(destination.tls_cert),
                              path(destination.tls_key),
                              f"destinations[{destination.name}].tls_ca / tls_cert / tls_key")


class OutcomeNotRecorded(RuntimeError):
    """A delivery ended but the index could not record how (locked, disk full)."""


class Exporter:
    """Sends queued deliveries: one background thread per destination, driven by the
    index, so a PACS that is down (each try waiting out its timeout) never holds up the
    deliveries to the others."""

    def __init__(self, settings: Settings, index: StudyIndex, filestore: FileStore) -> None:
        self.settings = settings
        self.index = index
        self.filestore = filestore
        self.destinations = {d.name: d for d in settings.destinations}
        self._tls = {d.name: destination_tls(d, settings.base_dir)
                     for d in settings.destinations if d.tls}
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self.destinations}
        self._threads: list[threading.Thread] = []
        # Per destination, the end of a delivery that the index refused to record,
        # recorded first next time (else its row would stay "sending", which nothing
        # claims again until a restart).
        self._unrecorded: dict[str | None, tuple[int, str, datetime | None, datetime | None]] = {}
        # Per destination, no new association before this time (the retry time of its
        # last failed delivery): after an outage each queued delivery would otherwise try
        # its own association, back to back, just as the PACS comes up or is overloaded.
        self._paused_until: dict[str, datetime] = {}

    def queue(self, job_id: int, outputs: Mapping[str, Sequence[str]],
              attempt: int | None = None) -> list[int]:
        """Owe each destination the outputs it is configured for; returns the export ids.
        `attempt`: the job's claim this comes from (see `StudyIndex.queue_export`)."""
        ids = []
        for destination in self.settings.destinations:
            paths = [p for kind in destination.outputs for p in outputs.get(kind, ())]
            if not paths:
                continue
            export_id = self.index.queue_export(
                job_id, destination.name, paths, self.settings.export.give_up_after_seconds,
                attempt=attempt,
            )
            if export_id is not None:  # None: all of them were queued before
                ids.append(export_id)
                self._wake[destination.name].set()
        return ids

    def run_once(
        self, now: datetime | None = None, destination: str | None = None
    ) -> ExportState | None:
        """Try the oldest due delivery (to `destination`, or to any); returns its new state
        (None when nothing was due). Raises `OutcomeNotRecorded` when the index fails to
        take a delivery's end; the next call records it before anything else."""
        unrecorded = self._unrecorded.get(destination)
        if unrecorded is not None:  # `_finish` keeps it again if the index still refuses
            del self._unrecorded[destination]
            state = self._finish(destination, *unrecorded)
            if state is not None:
                logger.info("export %d: its outcome recorded late (%s)", unrecorded[0], state)
            return state
        task = self.index.claim_due_export(now, destination)
        if task is None:
            return None
        configured = self.destinations.get(task.destination)
        if configured is None:
            return self._finish(
                destination, task.export_id,
                f"destination {task.destination!r} is no longer configured",
            )
        missing = [p for p in task.paths if not self.filestore.path(p).is_file()]
        if missing:
            return self._finish(
                destination, task.export_id,
                f"{len(missing)} output file(s) missing, e.g. {missing[0]}",
            )
        try:
            return self._deliver(task, configured, now, destination)
        except OutcomeNotRecorded:
            raise
        except Exception as exc:  # never leave a delivery stuck in "sending"
            logger.exception("export %d: unexpected error", task.export_id)
            return self._retry_or_give_up(task, configured, destination,
                                          f"internal error: {type(exc).__name__}: {exc}", now)

    def _finish(self, claimed_for: str | None, export_id: int, error: str = "",
                retry_at: datetime | None = None, now: datetime | None = None) -> (
        ExportState | None
    ):
        """`StudyIndex.finish_export`, remembering the outcome when it cannot be written
        (for the next `run_once` of the same `claimed_for`); None when the row was
        replaced meanwhile (`dicomnode resend`)."""
        try:
            return self.index.finish_export(export_id, error, retry_at, now)
        except ExportGone:
            logger.warning("export %d was replaced while being sent: its outcome is not"
                           " recorded", export_id)
            return None
        except Exception as exc:
            self._unrecorded[claimed_for] = (export_id, error, retry_at, now)
            raise OutcomeNotRecorded(f"export {export_id}: outcome not recorded: {exc}") from exc

    def _deliver(self, task: ExportTask, destination: Destination, now: datetime | None,
                 claimed_for: str | None) -> ExportState | None:
        peer = Peer(destination.ae_title, destination.host, destination.port)
        report = send(
            [self.filestore.path(p) for p in task.paths], peer,
            calling_aet=self.settings.node.ae_title,
            timeout_s=self.settings.export.timeout_seconds,
            tls=self._tls.get(destination.name),
        )
        # A file that could not be read was not delivered either (a result is never
        # marked sent when it was not): it fails the delivery, to be retried.
        undelivered = [*report.failed, *report.skipped]
        if not undelivered:
            logger.info("export %d: %d file(s) delivered to %s (attempt %d)",
                        task.export_id, report.sent, destination.name, task.attempts)
            return self._finish(claimed_for, task.export_id)
        _, first_reason = undelivered[0]
        error = f"{len(undelivered)} of {len(task.paths)} file(s) not delivered: {first_reason}"
        if report.permanent and not report.transient:
            logger.error("export %d to %s failed, not retried: %s",
                         task.export_id, destination.name, error)
            return self._finish(claimed_for, task.export_id, error, None, now or utcnow())
        return self._retry_or_give_up(task, destination, claimed_for, error, now)

    def _retry_or_give_up(self, task: ExportTask, destination: Destination,
                          claimed_for: str | None, error: str, now: datetime | None) -> (
        ExportState | None
    ):
        """Back off before the next try, or give up once that would pass `give_up_at`; the
        destination's other deliveries wait as long (`_paused_until`)."""
        now = now or utcnow()
        retry_at = now + timedelta(seconds=retry_delay(
            task.attempts, self.settings.export.retry_initial_seconds,
            self.settings.export.retry_max_seconds,
        ))
        if retry_at > task.give_up_at:
            logger.error("export %d to %s given up after %d attempt(s): %s",
                         task.export_id, destination.name, task.attempts, error)
            return self._finish(claimed_for, task.export_id,
                                f"gave up after {task.attempts} attempt(s): {error}", None, now)
        logger.warning("export %d to %s failed (attempt %d), retry at %s: %s",
                       task.export_id, destination.name, task.attempts,
                       retry_at.isoformat(timespec="seconds"), error)
        self._paused_until[destination.name] = retry_at
        return self._finish(claimed_for, task.export_id, error, retry_at, now)

    # -- thread ------------------------------------------------------------------------

    def start(self) -> None:
        """Fail what is owed to destinations no longer in the configuration (nothing
        would send it), then start one thread per destination."""
        failed = self.index.fail_exports_except(
            list(self.destinations), "destination is no longer configured"
        )
        if failed:
            logger.warning("%d delivery(ies) to destinations no longer configured: failed",
                           failed)
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._loop, args=(name,), name=f"exporter-{name}",
                             daemon=True)
            for name in self.destinations
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for wake in self._wake.values():
            wake.set()
        deadline = time.monotonic() + 30  # for all senders together (one may be mid-send)
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._threads = []

    def _loop(self, destination: str) -> None:
        wake = self._wake[destination]
        while not self._stop.is_set():
            paused = (self._paused_until.get(destination, utcnow()) - utcnow()).total_seconds()
            if paused > 0:
                wake.wait(min(paused, POLL_SECONDS))
                wake.clear()
                continue
            try:
                busy = self.run_once(destination=destination) is not None
            except Exception:  # the exporter must outlive any one bad delivery
                logger.exception("exporter error (destination %s)", destination)
                busy = False
            if not busy:
                wake.wait(POLL_SECONDS)
                wake.clear()

"""Series completion: decides when a collecting series is complete, then applies the rules.

Three rules, checked in this order, and the one that fired is recorded on the Job:
the hard `max_wait_seconds` deadline from the start of the collecting pass (the first
instance, or the late one that re-opened the series or began a new pass; at the latest
the node's start); the sending association
was released and the series has been idle for `release_grace_seconds`; the series has
been idle for `quiet_seconds`. Timers are the index's persisted timestamps, so they
resume across a restart. A late instance re-opens the Job (see storage.index).

A series with instances the node refused for want of resources (disk space, a failed
write) and has not received since is incomplete: only the deadline closes it, and then
as skipped (`dicomnode.rules`), so no partial volume is analysed and sent to the PACS.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from dicomnode.config import SeriesConfig
from dicomnode.rules import skip_reason
from storage.index import SeriesProgress, StudyIndex, utcnow
from storage.models import CompletionRule

logger = logging.getLogger(__name__)


def completion_rule(
    series: SeriesProgress, rules: SeriesConfig, now: datetime,
    started_at: datetime | None = None,
) -> CompletionRule | None:
    """The rule under which the series is complete at `now`, or None while collecting.

    `started_at`: when the node started. A series that was collecting then, with nothing
    received since, waits a quiet period from the start whatever its timers say: one
    whose quiet period (or deadline) ran out while the node was down is not completed
    the moment it starts, before its sender has had a chance to reconnect and go on. Nor
    does the deadline count the time the node was down once the sender goes on: it runs
    from the start for a series that was collecting then."""
    resumed = started_at is not None and series.last_received_at < started_at
    if resumed and not series.refused_instances:
        if now - started_at < timedelta(seconds=rules.quiet_seconds):
            return None
        return CompletionRule.QUIET
    idle = now - series.last_received_at
    collecting_since = series.collecting_since
    if started_at is not None:
        collecting_since = max(collecting_since, started_at)
    if now - collecting_since >= timedelta(seconds=rules.max_wait_seconds):
        return CompletionRule.MAX_WAIT
    if series.refused_instances:  # the sender may send them again: wait for them
        return None
    if (
        series.released_at is not None
        and series.released_at >= series.last_received_at
        and idle >= timedelta(seconds=rules.release_grace_seconds)
    ):
        return CompletionRule.RELEASE
    if idle >= timedelta(seconds=rules.quiet_seconds):
        return CompletionRule.QUIET
    return None


class SeriesAssembler:
    """Polls the index for collecting series and closes those that are complete."""

    def __init__(self, index: StudyIndex, rules: SeriesConfig, poll_seconds: float = 0.5):
        self.index = index
        self.rules = rules
        self.poll_seconds = poll_seconds
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, now: datetime | None = None) -> int:
        """Close every series complete at `now`; returns how many were closed."""
        now = now or utcnow()
        closed = 0
        decided_on: list[SeriesProgress] = []  # the series as each decision saw it, for the log

        def decide(series: SeriesProgress) -> tuple[CompletionRule, str | None] | None:
            decided_on.append(series)
            rule = completion_rule(series, self.rules, now, self.started_at)
            return None if rule is None else (rule, skip_reason(series, self.rules))

        for series in self.index.collecting_series():
            if completion_rule(series, self.rules, now, self.started_at) is None:
                continue
            # Decided again on the series as it is under the write lock: an instance that
            # arrived since the read may have ended its quiet period, and a deadline holds
            # however fast instances keep arriving.
            decision = self.index.close_collecting_job(series.job_id, decide, now)
            if decision is None:
                continue
            rule, reason = decision
            series = decided_on[-1]
            closed += 1
            if reason is None:
                logger.info(
                    "series %s complete (%s, %d instances): queued for AI",
                    series.series_instance_uid,
                    rule.value,
                    series.instance_count,
                )
            else:
                # the rule only: its detail may quote a series description, free text that
                # can hold a name (`dicomnode status` shows it whole)
                logger.info(
                    "series %s complete (%s): skipped by the series rule %s",
                    series.series_instance_uid,
                    rule.value,
                    reason.split(":", 1)[0],
                )
                logger.debug("series %s skipped: %s", series.series_instance_uid, reason)
        return closed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception:  # the node keeps serving; the next poll retries
                logger.exception("series assembler check failed")

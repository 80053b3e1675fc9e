"""The AI worker processes of a node (`[pipeline] workers`), kept running.

Importing this module loads no torch: the receiving process stays small, and each
worker imports the pipeline (torch, the model) in its own process. A worker that dies
(the kernel's out-of-memory killer, a crash in native code, an index it cannot reach) is
replaced: a watcher thread queues its job again, or fails it once it has been claimed
`[pipeline] max_attempts` times, and starts a new worker under the same name.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from dicomnode.config import Settings
from storage.index import StudyIndex, utcnow

logger = logging.getLogger(__name__)

WATCH_SECONDS = 1.0
"""How often the watcher looks at the workers."""
STEADY_SECONDS = 60.0
"""A worker that ran this long before it died is restarted at once; one that died sooner
waits 1, 2, 4 ... up to `MAX_RESTART_DELAY_SECONDS` (a worker that cannot start, e.g. a
broken GPU driver, must not be restarted in a tight loop)."""
MAX_RESTART_DELAY_SECONDS = 60.0
STOP_GRACE_SECONDS = 120.0
"""How long a stop waits for the workers to finish their jobs, all of them together."""


class StopFlag:
    """The node's request that its workers stop: one shared byte, without a lock. A
    multiprocessing.Event has one, and a worker killed at the wrong moment (for memory,
    or as hung) leaves it held or owes it a wake-up, so the node's stop hangs on set()."""

    def __init__(self, context: SpawnContext) -> None:
        self._value = context.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def clear(self) -> None:
        self._value.value = 0

    def is_set(self) -> bool:
        return bool(self._value.value)


WorkerEntry = Callable[[Settings, str, StopFlag], None]


def run_worker(settings: Settings, name: str, stop: StopFlag) -> None:
    """A worker's main: Ctrl-C in the node's terminal reaches the whole process group,
    but only the node acts on it (it sets `stop`, and the worker finishes its job)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    node = os.getppid()  # before the imports: a node that dies meanwhile is noticed
    from dicomnode.pipeline import worker_main

    worker_main(settings, name, stop, node)


def exit_cause(exitcode: int | None) -> str:
    """What a worker's exit code says, in words for the log and the job's reason."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


@dataclass
class _Worker:
    process: BaseProcess | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float = 0.0
    hung_after: float | None = None
    """Set when the watcher killed the worker for taking too long (the job's cause)."""


class WorkerPool:
    """The `[pipeline] workers` processes of a node, replaced when they die."""

    def __init__(self, settings: Settings, index: StudyIndex,
                 entry: WorkerEntry = run_worker) -> None:
        """`entry`: the worker's main function (a module-level function: it is started
        in a spawned process)."""
        self.settings = settings
        self.index = index
        self._entry = entry
        self._context = multiprocessing.get_context("spawn")  # no forked threads or locks
        self._stop = StopFlag(self._context)  # read by the workers
        self._stopping = threading.Event()  # wakes the watcher
        self._workers: dict[str, _Worker] = {}
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._stopping.clear()
        self._workers = {f"worker-{i}": _Worker() for i in range(self.settings.pipeline.workers)}
        for name in self._workers:
            self._spawn(name)
        self._watcher = threading.Thread(target=self._watch, name="ai-worker-watch",
                                         daemon=True)
        self._watcher.start()

    def processes(self) -> dict[str, BaseProcess | None]:
        """The current process of each worker name (None while one waits to restart)."""
        return {name: worker.process for name, worker in self._workers.items()}

    def stop(self) -> None:
        """Let running jobs finish (a job cut short is re-queued at the next start)."""
        self._stop.set()
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        # One deadline for all workers, not 120 s each: they finish their jobs side by
        # side, and systemd's TimeoutStopSec (200 s) must cover the whole stop.
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        processes = [w.process for w in self._workers.values() if w.process is not None]
        for process in processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                logger.warning("AI worker %s did not stop in time: terminated", process.name)
                process.terminate()
        for process in processes:
            process.join(timeout=10)
        self._workers.clear()

    def _spawn(self, name: str) -> None:
        process = self._context.Process(
            target=self._entry, args=(self.settings, name, self._stop),
            name=f"dicomnode-ai-{name}", daemon=True,
        )
        process.start()
        worker = self._workers[name]
        worker.process = process
        worker.started_at = time.monotonic()

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_SECONDS):
            for name, worker in self._workers.items():
                if worker.process is not None and worker.process.is_alive():
                    self._kill_if_hung(name, worker)
                if worker.process is not None and not worker.process.is_alive():
                    self._bury(name, worker)
                if worker.process is None and time.monotonic() >= worker.restart_at:
                    if self._stop.is_set():
                        return
                    logger.info("starting a new AI worker %s", name)
                    try:
                        self._spawn(name)
                    except Exception:  # e.g. fork's ENOMEM right after an OOM kill
                        worker.restart_at = time.monotonic() + MAX_RESTART_DELAY_SECONDS
                        logger.exception("AI worker %s could not be started: next try in"
                                         " %.0f s", name, MAX_RESTART_DELAY_SECONDS)

    def _kill_if_hung(self, name: str, worker: _Worker) -> None:
        """A worker on one job for longer than `job_timeout_seconds` (a hung GPU driver or
        network file system): killed, so that `_bury` releases its job and replaces it."""
        timeout = self.settings.pipeline.job_timeout_seconds
        try:
            since = self.index.running_since(name)
        except Exception:  # the index busy: the next round looks again
            return
        if since is None or (utcnow() - since).total_seconds() < timeout:
            return
        assert worker.process is not None
        logger.error("AI worker %s has run one job for over %.0f s: killed as hung", name,
                     timeout)
        worker.hung_after = timeout
        worker.process.kill()
        worker.process.join(timeout=10)

    def _bury(self, name: str, worker: _Worker) -> None:
        """A worker died: release its jobs, then schedule its replacement. If the index
        cannot be written now, the next round tries again (nothing is started before)."""
        assert worker.process is not None
        cause = exit_cause(worker.process.exitcode)
        if worker.hung_after is not None:
            cause = f"no result after {worker.hung_after:g} s, killed as hung"
        try:
            queued, failed = self.index.release_worker_jobs(
                name, cause, self.settings.pipeline.max_attempts)
        except Exception:
            logger.exception("AI worker %s died (%s); its jobs could not be released yet",
                             name, cause)
            return
        now = time.monotonic()
        if now - worker.started_at >= STEADY_SECONDS:
            worker.quick_deaths = 0
            delay = 0.0
        else:
            worker.quick_deaths += 1
            delay = min(MAX_RESTART_DELAY_SECONDS, 2.0 ** (worker.quick_deaths - 1))
        worker.process = None
        worker.hung_after = None
        worker.restart_at = now + delay
        logger.error("AI worker %s died (%s): %d job(s) queued again, %d failed;"
                     " a new worker starts in %.0f s", name, cause, queued, failed, delay)

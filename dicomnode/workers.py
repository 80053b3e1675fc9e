"""The AI worker processes of a node (`[pipeline] workers`).

Importing this module loads no torch: the receiving process stays small, and each
worker imports the pipeline (torch, the model) in its own process.
"""

from __future__ import annotations

import logging
import multiprocessing
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

from dicomnode.config import Settings

logger = logging.getLogger(__name__)


def _worker_entry(settings: Settings, name: str, stop: EventType) -> None:
    from dicomnode.pipeline import worker_main

    worker_main(settings, name, stop)


class WorkerPool:
    """The `[pipeline] workers` processes of a node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")  # no forked threads or locks
        self._stop = self._context.Event()
        self._processes: list[BaseProcess] = []

    def start(self) -> None:
        self._stop.clear()
        for i in range(self.settings.pipeline.workers):
            process = self._context.Process(
                target=_worker_entry, args=(self.settings, f"worker-{i}", self._stop),
                name=f"dicomnode-ai-{i}", daemon=True,
            )
            process.start()
            self._processes.append(process)

    def stop(self) -> None:
        """Let running jobs finish (a job cut short is re-queued at the next start)."""
        self._stop.set()
        for process in self._processes:
            process.join(timeout=120)
            if process.is_alive():
                logger.warning("AI worker %s did not stop in time: terminated", process.name)
                process.terminate()
                process.join(timeout=10)
        self._processes.clear()

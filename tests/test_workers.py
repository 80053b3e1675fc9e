"""AI workers that die are replaced; their jobs are queued again, then failed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from dicomnode.config import Settings
from dicomnode.workers import StopFlag, WorkerPool, exit_cause
from storage.index import InstanceRecord, StudyIndex
from storage.models import CompletionRule, JobState
from tests.conftest import complete_job, node_settings


def claim_and_die(settings: Settings, name: str, stop: StopFlag) -> None:
    """A worker that the out-of-memory killer takes down on every job it claims."""
    index = StudyIndex(settings.database_url)
    while not stop.is_set():
        if index.claim_next_job(name) is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)


def claim_and_hang(settings: Settings, name: str, stop: StopFlag) -> None:
    """A worker stuck on its job (a hung GPU driver, a dead network file system)."""
    index = StudyIndex(settings.database_url)
    while index.claim_next_job(name) is None and not stop.is_set():
        time.sleep(0.05)
    while not stop.is_set():  # deaf to everything but the node's stop
        time.sleep(0.05)


def wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def ignores_sigint(pid: int) -> bool:
    """Whether a process has set SIGINT to be ignored (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def _index_with_a_queued_job(settings: Settings) -> tuple[StudyIndex, int]:
    settings.data_dir.mkdir(parents=True)
    index = StudyIndex(settings.database_url)
    index.add_instance(InstanceRecord(
        sop_instance_uid="1.2.3.4.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT"), "p/1", 10, "sha")
    [progress] = index.collecting_series()
    assert complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 1)
    return index, progress.job_id


def test_exit_causes_in_words() -> None:
    assert exit_cause(-9) == "killed by SIGKILL (out of memory?)"
    assert exit_cause(-11) == "killed by SIGSEGV"
    assert exit_cause(1) == "exit code 1"


def test_a_worker_killed_on_a_job_is_replaced_and_the_job_failed_after_max_attempts(
    tmp_path: Path,
) -> None:
    settings = node_settings(tmp_path, pipeline={"workers": 1, "max_attempts": 2})
    index, job_id = _index_with_a_queued_job(settings)
    pool = WorkerPool(settings, index, entry=claim_and_die)
    pool.start()
    try:
        wait_for(lambda: index.job_state(job_id)[0] == JobState.FAILED)
        state, reason = index.job_state(job_id)
        assert "on each of 2 attempts" in reason and "SIGKILL" in reason
        # and a third worker runs, waiting for the next job
        wait_for(lambda: (p := pool.processes()["worker-0"]) is not None and p.is_alive())
    finally:
        pool.stop()


def test_ctrl_c_is_left_to_the_node(tmp_path: Path) -> None:
    """SIGINT goes to the terminal's whole process group: the worker must not die of it
    mid-job; the node's stop ends it."""
    settings = node_settings(tmp_path, pipeline={"workers": 1},
                             ai={"checkpoint": str(tmp_path / "none.pt")})
    settings.data_dir.mkdir(parents=True)
    pool = WorkerPool(settings, StudyIndex(settings.database_url))
    pool.start()
    try:
        process = pool.processes()["worker-0"]
        assert process is not None and process.pid is not None
        wait_for(lambda: ignores_sigint(process.pid), timeout=30)  # nothing else to wait on
        os.kill(process.pid, signal.SIGINT)
        time.sleep(1.0)
        assert process.is_alive()
    finally:
        pool.stop()
    assert process.exitcode == 0


def test_a_worker_stuck_on_a_job_is_killed_after_the_job_timeout(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, pipeline={"workers": 1, "max_attempts": 1,
                                                 "job_timeout_seconds": 1.5})
    index, job_id = _index_with_a_queued_job(settings)
    pool = WorkerPool(settings, index, entry=claim_and_hang)
    pool.start()
    try:
        wait_for(lambda: index.job_state(job_id)[0] == JobState.FAILED, timeout=30)
        assert "no result after 1.5 s, killed as hung" in index.job_state(job_id)[1]
    finally:
        pool.stop()


ORPHANED_WORKER = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c",
    "from dicomnode.pipeline import _exit_when_orphaned; "
    f"_exit_when_orphaned({os.getpid()})"], stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
os._exit(0)  # the node dies (kill -9) while its worker runs a job
"""


def test_a_worker_whose_node_died_exits_at_once() -> None:
    """It would otherwise finish its job (up to the job timeout), holding the memory and
    GPU that the restarted node's worker needs for the same job."""
    import subprocess
    import sys

    node = subprocess.run([sys.executable, "-c", ORPHANED_WORKER], capture_output=True,
                          text=True, timeout=60, check=True)
    worker = int(node.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return  # gone (reaped by init or a subreaper)
        if _is_zombie(worker):
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the orphaned worker kept running")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return False

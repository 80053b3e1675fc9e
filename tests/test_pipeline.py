"""The whole loop in one process: series in -> analysis -> SEG/SR/key images/PDF out to a
destination; bad series fail with their reason and lose nothing; outputs are never
re-analysed. A tiny random model stands in for the weights (a fixture, not a result)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

import dicomnode.pipeline as pipeline_module
from ai.checkpoint import Provenance, preprocess_config_for, save_checkpoint
from ai.infer import load_model
from ai.model import ModelConfig, build_model
from dicomnode.export import Exporter
from dicomnode.offline import run_offline
from dicomnode.pipeline import Pipeline, algorithm_parameters, job_key, worker_threads
from dicomnode.scu import Peer, send
from dicomnode.service import Node
from dicomnode.volume import SeriesRejected
from storage.filestore import FileStore
from storage.index import OWN_OUTPUT, ClaimedJob, ResultRecord, StudyIndex
from storage.models import JobState
from tests.conftest import free_port, node_settings, write_ct_series

torch.set_num_threads(1)

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.named("tiny", "joint"), seg_prior=0.5)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, build_model(cfg), preprocess_config_for(cfg),
                    Provenance.now("random (test fixture)", 0))
    return path


class Collector:
    """A PACS stand-in: a Storage SCP that keeps every dataset it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return 0x0000

    def of_class(self, sop_class: str) -> list[pydicom.Dataset]:
        with self._lock:
            return [ds for ds in self.received if ds.SOPClassUID == sop_class]


@pytest.fixture
def pacs() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.server.shutdown()


def wait_for(predicate: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def analysing_node(start_node: Callable[..., Node], checkpoint: Path, pacs: Collector,
                   **extra: dict) -> Node:
    return start_node(
        analyse=True,
        series={"quiet_seconds": 0.5, "release_grace_seconds": 0.2, "min_slices": 8},
        ai={"checkpoint": str(checkpoint), "device": "cpu", "min_lesion_volume_mm3": 0},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs.port, "outputs": ["seg", "sr", "key_images", "pdf"]}],
        **extra,
    )


def _job_rows(node: Node, series_uid: str) -> dict:
    [row] = [r for r in node.index.series_status() if r["series_instance_uid"] == series_uid]
    return row


def test_series_in_results_out(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path
) -> None:
    node = analysing_node(start_node, tiny_checkpoint, pacs)
    files = write_ct_series(tmp_path / "ct", slices=24, size=64, seed=4)
    ct = pydicom.dcmread(files[0])
    assert send(files, Peer("DICOMNODE", "127.0.0.1", node.scp.port)).sent == len(files)
    wait_for(lambda: pacs.of_class(COMPREHENSIVE_SR) and pacs.of_class(ENCAPSULATED_PDF))
    [seg] = pacs.of_class(SEG)
    [sr] = pacs.of_class(COMPREHENSIVE_SR)
    assert pacs.of_class(SECONDARY_CAPTURE)
    for ds in (seg, sr, *pacs.of_class(SECONDARY_CAPTURE), *pacs.of_class(ENCAPSULATED_PDF)):
        assert ds.StudyInstanceUID == ct.StudyInstanceUID
        assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence} >= {
        seg.SOPInstanceUID}

    assert _job_rows(node, ct.SeriesInstanceUID)["state"] == "done"
    job_id = _job_rows(node, ct.SeriesInstanceUID)["job_id"]
    result = node.index.result_for_job(job_id)
    assert result is not None and result.model_name == "DeepSC-COVID tiny"
    assert set(result.outputs) == {"seg", "sr", "key_images", "pdf"}
    shown = _job_rows(node, ct.SeriesInstanceUID)["result"]  # what `dicomnode status` shows
    assert shown["diagnosis"] == result.diagnosis and shown["lvr"] == result.lvr
    assert shown["caveats"] == []  # lungs imaged from apex to base
    for uid in (seg.SeriesInstanceUID, sr.SeriesInstanceUID):  # outputs: stored, not analysed
        row = _job_rows(node, uid)
        assert (row["state"], row["reason"]) == ("skipped", OWN_OUTPUT)
    wait_for(lambda: all(e["state"] == "done" for e in node.index.export_status()), timeout=30)
    assert len(pacs.received) == sum(len(v) for v in result.outputs.values())  # once each


def _node_with_a_queued_job(
    start_node: Callable[..., Node], checkpoint: Path, pacs: Collector, tmp_path: Path,
    held_back: int = 0,
) -> tuple[Node, str, list[Path]]:
    """A node that receives and assembles only, the series of its queued job, and the
    last `held_back` files of the series, not sent."""
    node = start_node(
        series={"quiet_seconds": 0.5, "release_grace_seconds": 0.2, "min_slices": 8},
        ai={"checkpoint": str(checkpoint), "device": "cpu", "min_lesion_volume_mm3": 0},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs.port, "outputs": ["seg", "sr", "key_images", "pdf"]}],
    )
    files = write_ct_series(tmp_path / "ct", slices=24, size=64, seed=8)
    sent, kept = files[: len(files) - held_back], files[len(files) - held_back:]
    assert send(sent, Peer("DICOMNODE", "127.0.0.1", node.scp.port)).sent == len(sent)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    wait_for(lambda: _job_rows(node, series_uid)["state"] == "queued", timeout=30)
    return node, series_uid, kept


def _queued_job_and_pipeline(
    start_node: Callable[..., Node], checkpoint: Path, pacs: Collector, tmp_path: Path
) -> tuple[Node, Pipeline, ClaimedJob]:
    """A node that receives and assembles only, its queued job claimed, and an in-process
    pipeline (the node's own workers are subprocesses, out of monkeypatch's reach)."""
    node, _, _ = _node_with_a_queued_job(start_node, checkpoint, pacs, tmp_path)
    pipeline = Pipeline(node.settings, node.index, node.filestore, node.exporter)
    job = node.index.claim_next_job("test")
    assert job is not None
    return node, pipeline, job


def test_seg_and_sr_are_queued_for_export_before_the_views_are_rendered(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node, pipeline, job = _queued_job_and_pipeline(start_node, tiny_checkpoint, pacs, tmp_path)
    owed_when_rendering: list[list[int]] = []
    original = pipeline_module.build_views

    def spy(*args: object, **kwargs: object) -> object:
        owed_when_rendering.append([e["files"] for e in node.index.export_status()])
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline_module, "build_views", spy)
    assert pipeline.run_job(job) == "done"
    assert owed_when_rendering == [[2]]  # SEG + SR, already owed to the PACS
    result = node.index.result_for_job(job.job_id)
    assert result is not None and set(result.outputs) == {"seg", "sr", "key_images", "pdf"}
    assert sorted(e["files"] for e in node.index.export_status()) == [
        2, len(result.outputs["key_images"]) + 1]
    assert {"store", "encode_seg", "encode_sr", "encode_pdf"} <= set(result.timings)


def test_a_failure_of_the_views_leaves_the_seg_and_sr_delivered(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    node, pipeline, job = _queued_job_and_pipeline(start_node, tiny_checkpoint, pacs, tmp_path)

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(pipeline_module, "build_views", broken)
    with caplog.at_level(logging.ERROR, logger="dicomnode.pipeline"):
        assert pipeline.run_job(job) == "done"
    assert "key images / PDF report failed" in caplog.text
    result = node.index.result_for_job(job.job_id)
    assert result is not None and set(result.outputs) == {"seg", "sr"}
    wait_for(lambda: bool(pacs.of_class(SEG)) and bool(pacs.of_class(COMPREHENSIVE_SR)))
    wait_for(lambda: all(e["state"] == "done" for e in node.index.export_status()), timeout=30)
    assert len(pacs.received) == 2  # the results, and no failure notice


class Crash(BaseException):
    """The worker process dying (not an error that `run_job` would catch)."""


def test_a_job_run_again_after_a_crash_sends_each_result_once(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node, pipeline, job = _queued_job_and_pipeline(start_node, tiny_checkpoint, pacs, tmp_path)

    def crash(*args: object, **kwargs: object) -> object:
        raise Crash

    monkeypatch.setattr(pipeline_module, "build_views", crash)  # dies after SEG + SR
    with pytest.raises(Crash):
        pipeline.run_job(job)
    wait_for(lambda: len(pacs.received) == 2, timeout=30)  # SEG + SR delivered already
    first = {ds.SOPClassUID: ds.SOPInstanceUID for ds in pacs.received}
    kept = {uid: node.index.find_instance(uid) for uid in first.values()}
    monkeypatch.undo()

    assert node.index.recover_after_restart() == (1, 0)
    again = node.index.claim_next_job("test")
    assert again is not None and again.job_id == job.job_id and again.attempts == 2
    assert pipeline.run_job(again) == "done"
    result = node.index.result_for_job(job.job_id)
    assert result is not None and set(result.outputs) == {"seg", "sr", "key_images", "pdf"}
    views = len(result.outputs["key_images"]) + 1
    wait_for(lambda: len(pacs.received) == 2 + views, timeout=30)
    wait_for(lambda: all(e["state"] == "done" for e in node.index.export_status()), timeout=30)
    time.sleep(0.5)  # anything sent twice would have arrived by now
    assert len(pacs.received) == 2 + views
    assert sorted(e["files"] for e in node.index.export_status()) == [2, views]
    assert len({ds.SOPInstanceUID for ds in pacs.received}) == 2 + views
    # The second attempt's SEG and SR are the first's: same UIDs, the stored files kept.
    for kind, sop_class in (("seg", SEG), ("sr", COMPREHENSIVE_SR)):
        [path] = result.outputs[kind]
        stored = kept[first[sop_class]]
        assert stored is not None and path == stored.path
        assert hashlib.sha256(node.filestore.read(path)).hexdigest() == stored.sha256


def test_a_result_the_index_refuses_to_record_leaves_the_job_done_without_a_notice(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SEG and SR are sent before the result is recorded: an index that stays locked
    then must not turn the job into a failure (whose notice would contradict them)."""
    node, pipeline, job = _queued_job_and_pipeline(start_node, tiny_checkpoint, pacs, tmp_path)
    pipeline.settings = dataclasses.replace(
        node.settings, pipeline=dataclasses.replace(node.settings.pipeline, failure_notice=True))
    monkeypatch.setattr(pipeline_module, "RESULT_RETRY_SECONDS", (0.0, None))
    tries = []

    def locked(*args: object) -> None:
        tries.append(args)
        raise RuntimeError("database is locked")

    monkeypatch.setattr(node.index, "record_result", locked)
    assert pipeline.run_job(job) == "done"
    assert len(tries) == 2
    assert node.index.job_state(job.job_id)[0] == JobState.DONE
    wait_for(lambda: len(pacs.received) >= 2, timeout=30)
    time.sleep(0.5)
    assert COMPREHENSIVE_SR in {ds.SOPClassUID for ds in pacs.received}
    assert all("not analysed" not in str(ds.get("SeriesDescription", ""))
               for ds in pacs.received)


def test_an_orphaned_worker_of_a_killed_node_neither_records_nor_notifies(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node is killed while a worker runs a job; the restarted node queues the job
    again and a new worker takes it. The orphan's attempt then fails: its end is not
    recorded over the new attempt, and no failure notice goes to the PACS."""
    node, _, orphan_claim = _queued_job_and_pipeline(start_node, tiny_checkpoint, pacs,
                                                     tmp_path)
    notify = dataclasses.replace(node.settings.pipeline, failure_notice=True)
    orphan = Pipeline(dataclasses.replace(node.settings, pipeline=notify), node.index,
                      node.filestore, node.exporter)
    assert node.index.recover_after_restart() == (1, 0)
    new_claim = node.index.claim_next_job("worker-0")
    assert new_claim is not None and new_claim.attempts == 2

    def rejected(*args: object, **kwargs: object) -> object:
        raise SeriesRejected("slices are missing")

    monkeypatch.setattr(pipeline_module, "read_series", rejected)
    assert orphan.run_job(orphan_claim) == JobState.FAILED
    assert node.index.job_state(orphan_claim.job_id)[0] == JobState.RUNNING
    assert node.index.export_status() == []
    # had the orphan's attempt come out done, its result would not be recorded either
    found = ResultRecord(
        diagnosis="COVID_19", probabilities={}, lvr=0.1, plr=0.5, lesion_count=1,
        lesion_volume_ml=1.0, lung_volume_ml=10.0, analysis={}, model_name="", model_version="",
        checkpoint_sha256="", timings={}, outputs={},
    )
    assert node.index.record_result(orphan_claim.job_id, orphan_claim.attempts, found) is None
    assert node.index.result_for_job(orphan_claim.job_id) is None


def test_an_internal_error_is_tried_again_then_fails_with_a_notice(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error of the node's own (here a storage read error) is not the series' fault:
    the job is queued again, and fails (with a notice) only after `max_attempts` claims."""
    node, pipeline, first = _queued_job_and_pipeline(start_node, tiny_checkpoint, pacs, tmp_path)
    notify = dataclasses.replace(node.settings.pipeline, failure_notice=True, max_attempts=2)
    pipeline.settings = dataclasses.replace(node.settings, pipeline=notify)

    def unreadable(*args: object, **kwargs: object) -> object:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(pipeline_module, "read_series", unreadable)
    assert pipeline.run_job(first) == JobState.QUEUED
    assert node.index.export_status() == []  # no notice yet
    second = node.index.claim_next_job("test")
    assert second is not None and second.job_id == first.job_id and second.attempts == 2
    assert pipeline.run_job(second) == JobState.FAILED
    state, reason = node.index.job_state(first.job_id)
    assert state == JobState.FAILED
    assert reason == "internal error: OSError: [Errno 5] Input/output error on each of 2 attempts"
    wait_for(lambda: pacs.of_class(COMPREHENSIVE_SR), timeout=30)
    [notice] = pacs.of_class(COMPREHENSIVE_SR)
    assert "on each of 2 attempts" in notice.ContentSequence[0].TextValue
    # two jobs in a row ended in errors of the node's own: the next claim waits, and
    # longer after each further one, so a persistent fault does not fail the queue
    assert pipeline.fault_pause() == pipeline_module.FAULT_PAUSE_SECONDS[0]
    pipeline._internal_errors += 10
    assert pipeline.fault_pause() == pipeline_module.FAULT_PAUSE_SECONDS[1]
    monkeypatch.undo()
    node.index.reanalyse(node.index.job_series(first.job_id)[0])
    again = node.index.claim_next_job("test")
    assert again is not None and pipeline.run_job(again) == JobState.DONE
    assert pipeline.fault_pause() == 0.0  # a job that went well ends the pause


def test_a_worker_without_its_model_leaves_the_series_queued_until_it_loads(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A checkpoint path with a typo, say: no job is claimed (none fails) until the model
    loads; then the queued series are analysed."""
    node, series_uid, _ = _node_with_a_queued_job(start_node, tiny_checkpoint, pacs, tmp_path)
    monkeypatch.setattr(pipeline_module, "MODEL_RETRY_SECONDS", 0.05)
    fixed = threading.Event()
    loads: list[bool] = []

    def load() -> object:
        loads.append(fixed.is_set())
        if not fixed.is_set():
            raise FileNotFoundError("checkpoint modle.pt not found")
        return load_model(str(tiny_checkpoint), "cpu")

    pipeline = Pipeline(node.settings, node.index, node.filestore, node.exporter,
                        checkpoint_loader=load)
    stop = threading.Event()
    worker = threading.Thread(target=pipeline.run_until, args=(stop.is_set, "test"))
    with caplog.at_level(logging.INFO, logger="dicomnode.pipeline"):
        worker.start()
        try:
            wait_for(lambda: len(loads) >= 3, timeout=30)
            assert _job_rows(node, series_uid)["state"] == "queued"
            problem = node.index.model_problem()  # what `dicomnode status` shows
            assert problem is not None and "checkpoint modle.pt not found" in problem[1]
            fixed.set()
            wait_for(lambda: _job_rows(node, series_uid)["state"] == "done", timeout=120)
            assert node.index.model_problem() is None
        finally:
            stop.set()
            worker.join()
    errors = [r for r in caplog.records if "the model did not load" in r.getMessage()]
    assert len(errors) == 1 and "modle.pt" in errors[0].getMessage()  # once, not per retry
    assert "the model loaded; analysing the queued series" in caplog.text


@pytest.mark.parametrize("outcome", ["analysed", "rejected"])
def test_a_result_of_part_of_a_series_is_dropped_when_the_rest_arrives(
    outcome: str, start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender that paused: the series was complete by the rules and its job claimed when
    the rest came. Neither the part's result nor its failure notice goes out; the new
    pass analyses the whole series."""
    node, series_uid, rest = _node_with_a_queued_job(start_node, tiny_checkpoint, pacs,
                                                     tmp_path, held_back=8)
    notify = dataclasses.replace(node.settings.pipeline, failure_notice=True)
    pipeline = Pipeline(dataclasses.replace(node.settings, pipeline=notify), node.index,
                        node.filestore, node.exporter)
    part = node.index.claim_next_job("test")
    assert part is not None
    assert send(rest, Peer("DICOMNODE", "127.0.0.1", node.scp.port)).sent == len(rest)
    wait_for(lambda: _job_rows(node, series_uid)["state"] == "collecting", timeout=30)
    if outcome == "rejected":
        def rejected(*args: object, **kwargs: object) -> object:
            raise SeriesRejected("slices are missing")

        monkeypatch.setattr(pipeline_module, "read_series", rejected)
    assert pipeline.run_job(part) == JobState.SUPERSEDED
    assert node.index.job_state(part.job_id)[0] == JobState.SUPERSEDED
    assert node.index.result_for_job(part.job_id) is None
    assert node.index.export_status() == [] and pacs.received == []
    assert _job_rows(node, series_uid)["instances"] == 24


def test_a_new_pass_that_fails_says_that_the_earlier_result_stands_for_what_it_saw(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path,
) -> None:
    """A series analysed and delivered gets one more instance (here a second copy of a
    slice under a new UID); its new pass fails. The failure notice must not read as if the
    series had never been analysed."""
    node, series_uid, _ = _node_with_a_queued_job(start_node, tiny_checkpoint, pacs, tmp_path)
    notify = dataclasses.replace(node.settings.pipeline, failure_notice=True)
    pipeline = Pipeline(dataclasses.replace(node.settings, pipeline=notify), node.index,
                        node.filestore, node.exporter)
    first = node.index.claim_next_job("test")
    assert first is not None and pipeline.run_job(first) == JobState.DONE
    stray = pydicom.dcmread(sorted((tmp_path / "ct").glob("*.dcm"))[3])
    stray.SOPInstanceUID = generate_uid()
    stray.save_as(tmp_path / "stray.dcm", enforce_file_format=True)
    peer = Peer("DICOMNODE", "127.0.0.1", node.scp.port)
    assert send([tmp_path / "stray.dcm"], peer).sent == 1
    wait_for(lambda: _job_rows(node, series_uid)["state"] == "queued", timeout=30)
    second = node.index.claim_next_job("test")
    assert second is not None and pipeline.run_job(second) == JobState.FAILED
    wait_for(lambda: any("not analysed" in str(ds.get("SeriesDescription", ""))
                         for ds in pacs.of_class(COMPREHENSIVE_SR)), timeout=15)
    [notice] = [ds for ds in pacs.of_class(COMPREHENSIVE_SR)
                if "not analysed" in str(ds.get("SeriesDescription", ""))]
    text = notice.ContentSequence[0].TextValue
    assert "The series was analysed on " in text and "not to those received since" in text


def _claimed(completed_at: datetime) -> ClaimedJob:
    return ClaimedJob(job_id=3, series_instance_uid="1.2.3", study_instance_uid="1.2",
                      attempts=1, completed_at=completed_at)


def test_the_job_key_changes_with_the_series_completion_and_the_content() -> None:
    """Same job, same completion, same content: same key (its outputs keep their UIDs).
    A series re-opened by a late instance (completed again), or an analysis that came out
    differently, gets a new key: a second result, never a stale one under old UIDs."""
    now = datetime(2026, 12, 1, 4, 30)
    key = job_key(_claimed(now), b"masks", "probabilities")
    assert job_key(_claimed(now), b"masks", "probabilities") == key
    assert job_key(_claimed(now + timedelta(seconds=9)), b"masks", "probabilities") != key
    assert job_key(_claimed(now), b"masks", "other probabilities") != key
    assert job_key(_claimed(now), b"masks2", "probabilities") != key


def test_bad_series_fails_with_its_reason_and_keeps_the_data(
    start_node: Callable[..., Node], tiny_checkpoint: Path, pacs: Collector, tmp_path: Path
) -> None:
    node = analysing_node(start_node, tiny_checkpoint, pacs,
                          pipeline={"failure_notice": True})
    files = sorted(write_ct_series(tmp_path / "ct", slices=24, size=64, seed=5),
                   key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    del files[7]  # a slice lost on the way: the volume has a gap
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    assert send(files, Peer("DICOMNODE", "127.0.0.1", node.scp.port)).sent == len(files)
    wait_for(lambda: _job_rows(node, series_uid)["state"] == "failed")
    row = _job_rows(node, series_uid)
    assert "slices are missing" in row["reason"]
    assert row["instances"] == len(files)  # nothing received is lost
    wait_for(lambda: bool(pacs.of_class(COMPREHENSIVE_SR)))  # the failure notice
    [notice] = pacs.of_class(COMPREHENSIVE_SR)
    assert "slices are missing" in notice.ContentSequence[0].TextValue
    wait_for(lambda: bool(pacs.of_class(SECONDARY_CAPTURE)))  # and as an image, for OHIF
    [image] = pacs.of_class(SECONDARY_CAPTURE)
    assert image.SeriesDescription.startswith("AI not analysed, image (DeepSC)")
    assert image.StudyInstanceUID == notice.StudyInstanceUID
    assert not pacs.of_class(SEG)
    # and the node still analyses the next series
    good = write_ct_series(tmp_path / "good", slices=24, size=64, seed=6)
    assert send(good, Peer("DICOMNODE", "127.0.0.1", node.scp.port)).sent == len(good)
    wait_for(lambda: bool(pacs.of_class(SEG)))


def test_offline_infer_writes_every_output(tiny_checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from dicomnode.config import Settings

    write_ct_series(tmp_path / "in", slices=24, size=64, seed=7)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    code = run_offline([tmp_path / "in"], tmp_path / "out", Settings(base_dir=tmp_path),
                       checkpoint=tiny_checkpoint, device="cpu")
    assert code == 0
    [folder] = list((tmp_path / "out").iterdir())
    names = sorted(p.name for p in folder.iterdir())
    assert "seg.dcm" in names and "sr.dcm" in names and "pdf.dcm" in names
    assert any(n.startswith("key_images") for n in names)
    assert "LVR" in capsys.readouterr().out
    # How the numbers were made travels with them (the SEG's and the SR's algorithm
    # parameters): on a GPU the same weights mirror and overlap windows by default.
    seg = pydicom.dcmread(folder / "seg.dcm")
    [algorithm] = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    parameters = dict(p.split("=") for p in algorithm.AlgorithmParameters.split(","))
    assert parameters == {
        "device": "cpu", "test_time_mirroring": "off", "window_overlap": "0",
        "lesion_threshold": "0.5", "field_of_view_mm": "whole matrix",
        "min_lesion_volume_mm3": "10",
        "peripheral_thickness_mm": "10", "peripheral_outline_closing_mm": "10",
        "consolidation_hu": "-300", "outline_band_mm": "6", "outline_contrast_hu": "30",
        "disease_thresholds": "most probable class",
    }
    sr = pydicom.dcmread(folder / "sr.dcm")
    [evaluations] = [item for item in sr.ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    comments = [str(item.TextValue) for item in evaluations.ContentSequence]
    assert comments[1] == "Algorithm parameters: " + algorithm.AlgorithmParameters.replace(
        ",", ", ")


def test_a_scan_range_short_of_the_lung_base_is_analysed_with_a_caveat(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last 3 of 24 slices (39 mm) left out: analysed, and the summary and the SR say
    that the volumes cover the imaged part of the lungs."""
    from dicomnode.config import Settings

    files = write_ct_series(tmp_path / "in", slices=24, size=64, seed=7)
    for path in files[-3:]:
        path.unlink()
    code = run_offline([tmp_path / "in"], tmp_path / "out", Settings(base_dir=tmp_path),
                       checkpoint=tiny_checkpoint, device="cpu")
    assert code == 0
    out = capsys.readouterr().out
    assert "\n  caveat: The scan range may not cover the whole lungs" in out
    [folder] = list((tmp_path / "out").iterdir())
    sr = pydicom.dcmread(folder / "sr.dcm")
    [evaluations] = [item for item in sr.ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    comments = [str(item.TextValue) for item in evaluations.ContentSequence]
    assert comments[1].startswith("Caveat: The scan range may not cover the whole lungs")
    assert comments[2].startswith("Algorithm parameters: ")


def test_status_shows_a_results_caveats() -> None:
    from dicomnode.cli import _status_table

    row = {"reason": "", "completion_rule": "quiet", "last_received_at": "2026-12-01 10:00:00",
           "state": "done", "instances": 21, "modality": "CT", "study_date": "20261201",
           "accession_number": "A1", "series_description": "Chest", "series_instance_uid": "1.2",
           "result": {"diagnosis": "COVID19", "lvr": 0.05, "plr": None, "lesion_count": 2,
                      "caveats": [{"short": "Scan range may miss lung", "detail": "..."}]}}
    assert _status_table([row]).splitlines()[1].endswith(
        "COVID19, LVR 5.0%, PLR n/a, 2 lesion(s); Scan range may miss lung")


def test_algorithm_parameters_say_how_the_model_ran() -> None:
    """A GPU's defaults and an operating point, in values the SEG can join with "," and "="."""
    from dicomnode.config import AIConfig, Settings

    settings = Settings(ai=AIConfig(disease_thresholds=[0.3, 0.45]))
    ran = {"device": "cuda:0", "mirror": True, "window_overlap": 0.5, "threshold": 0.5}
    parameters = algorithm_parameters(settings, ran)
    assert parameters["test_time_mirroring"] == "on" and parameters["window_overlap"] == "0.5"
    assert parameters["device"] == "cuda:0"
    assert parameters["disease_thresholds"] == "COVID-19 0.3; CAP 0.45"
    assert not any(c in v for v in parameters.values() for c in ",=")
    assert "device" not in algorithm_parameters(settings, {})  # a failure notice: no model run


def test_every_ai_analysis_setting_reaches_the_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings away from the defaults, so that a line dropped from `analyse_volume` (which
    would fall back to the default) fails here."""
    from ai.refine import OutlineRefinement
    from dicomnode.config import AIConfig, Settings

    seen: dict[str, Any] = {}
    monkeypatch.setattr(pipeline_module, "analyse", lambda *a, **kw: seen.update(kw))
    ai = AIConfig(peripheral_thickness_mm=7.0, peripheral_outline_closing_mm=4.0,
                  min_lesion_volume_mm3=25.0, consolidation_hu=-250.0,
                  disease_thresholds=[0.3, 0.45], mirror="on", window_overlap=0.25,
                  outline_band_mm=4.0, outline_contrast_hu=45.0)
    volume = dataclasses.make_dataclass("V", ["hu", "spacing_mm"])(None, (1.0, 1.0, 1.0))
    pipeline_module.analyse_volume(volume, Settings(ai=ai), None)  # type: ignore[arg-type]
    assert {k: seen[k] for k in ("peripheral_mm", "outline_closing_mm", "min_lesion_mm3",
                                 "consolidation_hu", "disease_thresholds", "mirror",
                                 "overlap", "refinement")} == {
        "peripheral_mm": 7.0, "outline_closing_mm": 4.0, "min_lesion_mm3": 25.0,
        "consolidation_hu": -250.0, "disease_thresholds": [0.3, 0.45], "mirror": True,
        "overlap": 0.25, "refinement": OutlineRefinement(band_mm=4.0, contrast_hu=45.0)}


def test_offline_infer_goes_on_after_a_series_that_breaks(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dicomnode import offline
    from dicomnode.config import Settings

    broken = pydicom.dcmread(write_ct_series(tmp_path / "in" / "a", slices=24, size=64,
                                             seed=7)[0]).SeriesInstanceUID
    write_ct_series(tmp_path / "in" / "b", slices=24, size=64, seed=8)
    real = offline.analyse_volume

    def analyse(volume: Any, *args: Any) -> Any:
        if volume.datasets[0].SeriesInstanceUID == broken:
            raise RuntimeError("a decoder crashed")
        return real(volume, *args)

    monkeypatch.setattr(offline, "analyse_volume", analyse)
    code = run_offline([tmp_path / "in"], tmp_path / "out", Settings(base_dir=tmp_path),
                       checkpoint=tiny_checkpoint, device="cpu")
    assert code == 1
    out = capsys.readouterr().out
    assert f"{broken}: NOT ANALYSED: internal error: RuntimeError: a decoder crashed" in out
    assert "LVR" in out  # the other series was analysed and written
    assert len(list((tmp_path / "out").iterdir())) == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, on the bad UID
def test_offline_infer_writes_nothing_outside_its_folder(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A series UID that is a path ("../escaped") is refused, not followed."""
    from dicomnode.config import Settings

    for path in write_ct_series(tmp_path / "in", slices=24, size=64, seed=7):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "../escaped"
        ds.save_as(path)
    code = run_offline([tmp_path / "in"], tmp_path / "out", Settings(base_dir=tmp_path),
                       checkpoint=tiny_checkpoint, device="cpu")
    assert code == 1
    assert "../escaped: NOT ANALYSED: SeriesInstanceUID '../escaped' is not a valid DICOM UID" \
        in capsys.readouterr().out
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_worker_warm_up_loads_the_model_and_runs_every_encoder(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112,
                   "outputs": ["seg", "sr", "key_images", "pdf"]}
    settings = node_settings(tmp_path, ai={"checkpoint": str(tiny_checkpoint), "device": "cpu"},
                             destinations=[destination])
    filestore = FileStore(settings.data_dir)  # creates the data directory
    index = StudyIndex(settings.database_url)
    loads: list[str] = []

    def load() -> object:
        loads.append(str(tiny_checkpoint))
        return load_model(str(tiny_checkpoint), "cpu")

    pipeline = Pipeline(settings, index, filestore, Exporter(settings, index, filestore),
                        checkpoint_loader=load)
    built: list[set[str]] = []
    original = pipeline_module.build_outputs

    def spy(*args: object, **kwargs: object) -> object:
        out = original(*args, **kwargs)  # type: ignore[arg-type]
        built.append(set(out[0]))
        return out

    monkeypatch.setattr(pipeline_module, "build_outputs", spy)
    with caplog.at_level(logging.INFO, logger="dicomnode.pipeline"):
        pipeline.warm_up()
    assert built == [{"seg", "sr", "key_images", "pdf"}]
    pipeline.checkpoint()
    assert len(loads) == 1  # loaded at warm-up, kept for the jobs
    assert "(model loaded, output encoders self-tested)" in caplog.text
    assert index.series_status() == []  # the made-up CT and its outputs are not kept
    index.close()


def test_worker_warm_up_without_weights_logs_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = node_settings(tmp_path, ai={"checkpoint": str(tmp_path / "missing.pt")})
    filestore = FileStore(settings.data_dir)  # creates the data directory
    index = StudyIndex(settings.database_url)
    pipeline = Pipeline(settings, index, filestore, Exporter(settings, index, filestore))
    with caplog.at_level(logging.INFO, logger="dicomnode.pipeline"):
        pipeline.warm_up()  # does not raise: jobs will fail with the reason
    assert "the model did not load" in caplog.text and "missing.pt" in caplog.text
    assert "(NO MODEL, output encoders self-tested)" in caplog.text  # the encoders work
    index.close()


def test_cpu_workers_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [worker_threads(n) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]


def test_the_model_is_warmed_up_on_a_gpu_only(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA's first passes take seconds the first patient would pay; a CPU has none."""
    import ai.infer
    from dicomnode.warmup import warm_model, warm_up_scan

    ckpt = load_model(str(tiny_checkpoint), "cpu")
    calls: list[tuple[tuple[int, ...], bool]] = []

    def predict(checkpoint: object, volume: Any, lung: Any, spacing: Any, **kw: Any) -> None:
        calls.append((volume.shape, kw.get("mirror", False)))

    monkeypatch.setattr(ai.infer, "predict", predict)
    assert not warm_model(ckpt) and calls == []
    on_gpu = dataclasses.replace(ckpt, device=torch.device("cuda", 0))
    assert warm_model(on_gpu)
    assert calls == [((24, 128, 128), True)]  # the GPU default: mirrored
    real = ai.infer.Prediction  # and the made-up scan is one the network accepts
    monkeypatch.undo()
    assert isinstance(ai.infer.predict(ckpt, *warm_up_scan()), real)

"""export.py: deliveries survive outages and restarts, arrive once, and never hammer a PACS
that refuses them."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomnode.config import settings_from_mapping
from dicomnode.export import Exporter, OutcomeNotRecorded, retry_delay
from dicomnode.scp import instance_record
from storage.filestore import FileStore
from storage.index import StudyIndex, utcnow
from storage.models import ExportState
from tests.conftest import free_port


class Destination:
    """A pynetdicom Storage SCP that records every SOP Instance UID it receives."""

    def __init__(self, port: int, calling_aets: list[str] | None = None) -> None:
        self.port = port
        self.received: list[str] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(CTImageStorage)
        if calling_aets:
            self.ae.require_calling_aet = calling_aets
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def start(self) -> Destination:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def setup(tmp_path: Path, port: int) -> Iterator[tuple[Exporter, StudyIndex, int]]:
    settings = settings_from_mapping({
        "storage": {"data_dir": str(tmp_path / "data")},
        "export": {"retry_initial_seconds": 5, "retry_max_seconds": 40,
                   "give_up_after_seconds": 300, "timeout_seconds": 5},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": port, "outputs": ["seg", "sr"]}],
    }, base_dir=tmp_path)
    filestore = FileStore(settings.data_dir)
    index = StudyIndex(settings.database_url)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    record = instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "MODALITY")
    relpath = filestore.instance_relpath(record.study_instance_uid, record.series_instance_uid,
                                         record.sop_instance_uid)
    filestore.write(relpath, data)
    index.add_instance(record, relpath, len(data), hashlib.sha256(data).hexdigest())
    exporter = Exporter(settings, index, filestore)
    job_id = index.series_status()[0]["job_id"]
    yield exporter, index, job_id
    index.close()


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n, 5, 40) for n in range(1, 6)] == [5, 10, 20, 40, 40]


def test_destination_down_then_up_delivers_once(
    setup: tuple[Exporter, StudyIndex, int], port: int
) -> None:
    exporter, index, job_id = setup
    paths = [index.series_instance_paths(index.job_series(job_id)[1])[0]]
    [export_id] = exporter.queue(job_id, {"sr": paths, "pdf": ["not/for/this/destination"]})
    now = utcnow()
    assert exporter.run_once(now) == ExportState.PENDING  # nobody listens yet
    assert exporter.run_once(now) is None  # backing off: not due again yet
    [row] = index.export_status()
    assert row["attempts"] == 1 and "could not associate" in row["last_error"]
    assert row["files"] == 1  # only the kinds configured for the destination
    pacs = Destination(port).start()
    try:
        assert exporter.run_once(now + timedelta(seconds=6)) == ExportState.DONE
        assert exporter.run_once(now + timedelta(hours=1)) is None
    finally:
        pacs.stop()
    assert pacs.received == [pydicom.dcmread(get_testdata_file("CT_small.dcm")).SOPInstanceUID]
    assert index.export_status()[0]["state"] == "done"
    assert export_id == row["export_id"]


def test_permanent_rejection_fails_at_once(
    setup: tuple[Exporter, StudyIndex, int], port: int
) -> None:
    exporter, index, job_id = setup
    paths = index.series_instance_paths(index.job_series(job_id)[1])
    exporter.queue(job_id, {"seg": paths})
    pacs = Destination(port, calling_aets=["SOMEONE"]).start()
    try:
        assert exporter.run_once() == ExportState.FAILED
    finally:
        pacs.stop()
    [row] = index.export_status()
    assert row["attempts"] == 1
    assert "rejected" in row["last_error"]
    assert "Calling AE title not recognised" in row["last_error"]
    assert exporter.run_once(utcnow() + timedelta(days=1)) is None  # not retried
    assert pacs.received == []


def test_gives_up_after_the_deadline(setup: tuple[Exporter, StudyIndex, int]) -> None:
    exporter, index, job_id = setup
    paths = index.series_instance_paths(index.job_series(job_id)[1])
    exporter.queue(job_id, {"seg": paths})
    now = utcnow()
    state = ExportState.PENDING
    attempts = 0
    while state == ExportState.PENDING:
        state = exporter.run_once(now)  # type: ignore[assignment]
        now += timedelta(seconds=41)
        attempts += 1
    assert state == ExportState.FAILED
    [row] = index.export_status()
    assert row["last_error"].startswith(f"gave up after {attempts} attempt(s)")
    assert 5 < attempts < 20


def test_pending_delivery_survives_a_restart_and_resend_requeues(
    setup: tuple[Exporter, StudyIndex, int], port: int
) -> None:
    exporter, index, job_id = setup
    paths = index.series_instance_paths(index.job_series(job_id)[1])
    exporter.queue(job_id, {"seg": paths})
    assert index.claim_due_export() is not None  # the node dies while sending
    restarted = StudyIndex(index.url)
    try:
        restarted.recover_after_restart()
        exporter_after = Exporter(exporter.settings, restarted, exporter.filestore)
        pacs = Destination(port).start()
        try:
            assert exporter_after.run_once() == ExportState.DONE
            study_uid = restarted.job_series(job_id)[0]
            assert restarted.requeue_study_exports(study_uid, 60) == 1
            assert exporter_after.run_once() == ExportState.DONE
        finally:
            pacs.stop()
    finally:
        restarted.close()
    assert len(pacs.received) == 2  # once per delivery: the restart did not duplicate it


def test_a_job_queues_each_file_once_per_destination(
    setup: tuple[Exporter, StudyIndex, int],
) -> None:
    """A job run again after a crash queues its outputs again: only what is new goes."""
    exporter, index, job_id = setup
    [first] = exporter.queue(job_id, {"seg": ["a.dcm"], "sr": ["b.dcm"]})
    assert exporter.queue(job_id, {"seg": ["a.dcm"], "sr": ["b.dcm"]}) == []
    [second] = exporter.queue(job_id, {"seg": ["a.dcm"], "sr": ["b.dcm", "c.dcm"]})
    rows = {e["export_id"]: e["files"] for e in index.export_status()}
    assert rows == {first: 2, second: 1}
    assert index.queue_export(job_id, "pacs", ["c.dcm"], 60) is None
    assert index.queue_export(job_id, "other", ["c.dcm"], 60) is not None  # per destination


def test_a_delivery_whose_end_the_index_refused_is_recorded_next_time(
    setup: tuple[Exporter, StudyIndex, int], port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index is locked (or the disk full) just as a delivery ends: its row must not
    stay "sending" (nothing claims those again until a restart), nor be sent twice."""
    exporter, index, job_id = setup
    paths = index.series_instance_paths(index.job_series(job_id)[1])
    exporter.queue(job_id, {"seg": paths})
    real_finish = index.finish_export

    def locked(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(index, "finish_export", real_finish)
        raise RuntimeError("database is locked")

    monkeypatch.setattr(index, "finish_export", locked)
    pacs = Destination(port).start()
    try:
        with pytest.raises(OutcomeNotRecorded, match="database is locked"):
            exporter.run_once()
        assert index.export_status()[0]["state"] == "sending"
        assert exporter.run_once() == ExportState.DONE  # recorded, not sent again
        assert exporter.run_once(utcnow() + timedelta(days=1)) is None
    finally:
        pacs.stop()
    assert len(pacs.received) == 1
    assert index.export_status()[0]["state"] == "done"

"""export.py: deliveries survive outages and restarts, arrive once, and never hammer a PACS
that refuses them."""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    SegmentationStorage,
)

from dicomnode.config import ConfigError, settings_from_mapping
from dicomnode.export import Exporter, OutcomeNotRecorded, retry_delay
from dicomnode.scp import instance_record
from dicomnode.scu import store_outcome
from storage.filestore import FileStore
from storage.index import ResultRecord, StudyIndex, utcnow
from storage.models import CompletionRule, ExportState, JobState
from tests.conftest import complete_job, free_port, self_signed_certificate


class Destination:
    """A pynetdicom Storage SCP that records every SOP Instance UID it receives."""

    def __init__(self, port: int, calling_aets: list[str] | None = None,
                 syntaxes: list[str] | None = None, sop_class: str = CTImageStorage,
                 status: int | list[int] = 0x0000) -> None:
        """`status`: the answer to every C-STORE, or one per C-STORE in turn."""
        self.port = port
        self.status = status
        self.received: list[str] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(sop_class, syntaxes or DEFAULT_TRANSFER_SYNTAXES)
        if calling_aets:
            self.ae.require_calling_aet = calling_aets
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return self.status.pop(0) if isinstance(self.status, list) else self.status

    def start(self, tls: ssl.SSLContext | None = None) -> Destination:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
                                           ssl_context=tls)
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
    assert retry_delay(5000, 5, 40) == 40  # no float overflow after days of retries


@pytest.mark.parametrize(("code", "outcome"), [
    (0x0000, (True, False)),
    (0xB000, (True, False)),  # coercion of data elements: stored
    (0x0107, (True, False)),  # attribute list error (warning): stored
    (0x0001, (True, False)),
    (0x0111, (True, False)),  # duplicate SOP instance: it arrived with an earlier try
    (None, (False, False)),  # no response: try again
    (0xA700, (False, False)),  # out of resources: try again later
    (0x0213, (False, False)),  # resource limitation
    (0x0110, (False, False)),  # processing failure
    (0xA900, (False, True)),  # data set does not match the SOP class
    (0xC000, (False, True)),  # cannot understand
    (0x0122, (False, True)),  # SOP class not supported
    (0x0124, (False, True)),  # not authorised
])
def test_c_store_statuses_are_classified_per_ps3_7(
    code: int | None, outcome: tuple[bool, bool]
) -> None:
    assert store_outcome(code) == outcome


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


def test_resend_failed_queues_every_study_whose_delivery_failed(
    setup: tuple[Exporter, StudyIndex, int], port: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The PACS refused the node (its AE title was not configured there); once that is
    fixed, one command sends everything that failed, without knowing the studies."""
    from dicomnode.cli import main

    exporter, index, job_id = setup
    study_uid = index.job_series(job_id)[0]
    exporter.queue(job_id, {"seg": index.series_instance_paths(index.job_series(job_id)[1])})
    refusing = Destination(port, calling_aets=["SOMEONE"]).start()
    try:
        assert exporter.run_once() == ExportState.FAILED
    finally:
        refusing.stop()
    assert index.studies_with_failed_exports() == [study_uid]
    assert index.studies_with_failed_exports(since=utcnow() + timedelta(hours=1)) == []
    config = tmp_path / "node.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{exporter.settings.data_dir}"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f'port = {port}\noutputs = ["seg", "sr"]\n')
    assert main(["resend", "--config", str(config)]) == 2  # neither studies nor --failed
    assert main(["resend", "--config", str(config), study_uid, "--failed"]) == 2
    capsys.readouterr()
    assert main(["resend", "--config", str(config), "--failed", "--since", "1"]) == 0
    assert "1 deliver(y/ies) of 1 study(ies) queued again" in capsys.readouterr().out
    pacs = Destination(port).start()
    try:
        assert exporter.run_once() == ExportState.DONE
    finally:
        pacs.stop()
    assert len(pacs.received) == 1
    assert main(["resend", "--config", str(config), "--failed"]) == 0  # nothing to do
    assert "no failed deliveries: nothing to resend" in capsys.readouterr().out


def _other_job(index: StudyIndex, n: int) -> int:
    """A second (third ...) series of the setup's study, completed into its own job."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = f"1.2.826.0.1.99.{n}", f"1.2.826.0.1.99.{n}.1"
    record = instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "MODALITY")
    index.add_instance(record, f"other/{n}.dcm", 1, f"sha{n}")
    return next(r["job_id"] for r in index.series_status()
                if r["series_instance_uid"] == ds.SeriesInstanceUID)


def test_resend_failed_spares_the_destinations_that_have_the_results(
    setup: tuple[Exporter, StudyIndex, int],
) -> None:
    """The study reached one PACS and was refused by another: `resend --failed` (from
    cron, say) must not send it to the first again on every run."""
    _, index, job_id = setup
    study = index.job_series(job_id)[0]
    now = utcnow()
    for destination, error in (("pacs", ""), ("archive", "refused")):
        index.queue_export(job_id, destination, ["seg.dcm"], 60, now=now)
        assert index.claim_due_export(now, destination=destination) is not None
        index.finish_export(index.export_status()[0]["export_id"], error, None, now)
    counts = index.requeue_study_exports(study, 60, {"pacs": ["seg"], "archive": ["seg"]},
                                         only_failed=True)
    assert counts == {"queued": 1, "sending": 0, "unconfigured": 0}
    states = {(r["destination"], r["state"]) for r in index.export_status()}
    assert states == {("pacs", "done"), ("archive", "pending")}


def test_status_lists_every_delivery_not_made_before_the_latest_made(
    setup: tuple[Exporter, StudyIndex, int],
) -> None:
    """A failure must not scroll out of `dicomnode status` behind later successes."""
    _, index, job_id = setup
    jobs = [job_id, *(_other_job(index, n) for n in range(3))]
    now = utcnow()
    for i, job in enumerate(jobs):
        export_id = index.queue_export(job, "pacs", [f"{i}.dcm"], 60, now=now)
        assert export_id is not None
        assert index.claim_due_export(now, destination="pacs") is not None
        index.finish_export(export_id, "refused" if i == 0 else "", None,
                            now + timedelta(seconds=i))
    rows = index.export_status(limit=2)
    assert [r["state"] for r in rows] == ["failed", "done", "done"]
    assert [r["job_id"] for r in rows] == [jobs[0], jobs[3], jobs[2]]


def test_a_sender_whose_delivery_was_replaced_goes_on(
    setup: tuple[Exporter, StudyIndex, int], port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a delivery could not be recorded, and meanwhile its row stopped being
    the one sent (a `resend` on a server database, a restart): the outcome is dropped,
    not retried for ever (which stopped the destination's sender), nor written on
    another row."""
    exporter, index, job_id = setup
    exporter.queue(job_id, {"seg": index.series_instance_paths(index.job_series(job_id)[1])})
    _lock_finish_once(index, monkeypatch)
    pacs = Destination(port).start()
    try:
        with pytest.raises(OutcomeNotRecorded):
            exporter.run_once(destination="pacs")
        index.recover_after_restart()  # the row is pending again, no longer this send's
        assert exporter.run_once(destination="pacs") is None  # dropped, with a warning
        assert exporter.run_once(destination="pacs") == ExportState.DONE  # sent anew
    finally:
        pacs.stop()
    assert len(pacs.received) == 2


def test_after_a_failed_try_the_destination_waits_for_its_retry_time(
    setup: tuple[Exporter, StudyIndex, int],
) -> None:
    """Three studies owed to a PACS that is down: one association is tried, then the
    others wait for that retry (5 s here) instead of each trying its own at once."""
    exporter, index, job_id = setup
    for n, job in enumerate([job_id, *(_other_job(index, n) for n in range(2))]):
        index.queue_export(job, "pacs", [f"{n}.dcm"], 300)
        exporter.filestore.write(f"{n}.dcm", b"not sent: nothing listens")
    exporter.start()
    try:
        time.sleep(2.5)
    finally:
        exporter.stop()
    rows = index.export_status()
    assert sum(r["attempts"] for r in rows) == 1, rows
    assert sorted(r["state"] for r in rows) == ["pending"] * 3


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
            assert restarted.requeue_study_exports(study_uid, 60, {"pacs": ["seg"]}) == {
                "queued": 1, "sending": 0, "unconfigured": 0}
            assert restarted.export_status()[0]["attempts"] == 0  # a fresh backoff
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


def _lock_finish_once(index: StudyIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index refuses the next delivery's end (locked, or the disk full), once."""
    real_finish = index.finish_export

    def locked(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(index, "finish_export", real_finish)
        raise RuntimeError("database is locked")

    monkeypatch.setattr(index, "finish_export", locked)


def test_a_delivery_whose_end_the_index_refused_is_recorded_next_time(
    setup: tuple[Exporter, StudyIndex, int], port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index is locked (or the disk full) just as a delivery ends: its row must not
    stay "sending" (nothing claims those again until a restart), nor be sent twice."""
    exporter, index, job_id = setup
    paths = index.series_instance_paths(index.job_series(job_id)[1])
    exporter.queue(job_id, {"seg": paths})
    _lock_finish_once(index, monkeypatch)
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


def _deliver_to(setup: tuple[Exporter, StudyIndex, int], pacs: Destination) -> ExportState:
    exporter, index, job_id = setup
    exporter.queue(job_id, {"seg": index.series_instance_paths(index.job_series(job_id)[1])})
    pacs.start()
    try:
        return exporter.run_once()  # type: ignore[return-value]
    finally:
        pacs.stop()


def test_a_peer_taking_implicit_vr_only_gets_the_file_re_encoded(
    setup: tuple[Exporter, StudyIndex, int], port: int
) -> None:
    """Implicit VR Little Endian is the one syntax every SCP must accept; a file stored
    in Explicit VR is re-encoded for such a peer rather than refused."""
    pacs = Destination(port, syntaxes=[ImplicitVRLittleEndian])
    assert _deliver_to(setup, pacs) == ExportState.DONE
    assert len(pacs.received) == 1


def test_a_peer_that_stores_none_of_the_sop_classes_fails_at_once(
    setup: tuple[Exporter, StudyIndex, int], port: int
) -> None:
    pacs = Destination(port, sop_class=SegmentationStorage)  # takes no CT
    assert _deliver_to(setup, pacs) == ExportState.FAILED
    [row] = setup[1].export_status()
    assert "accepts none of the SOP classes sent (CT Image Storage)" in row["last_error"]


def test_a_warning_status_is_delivered_and_a_refusal_is_not_retried(
    setup: tuple[Exporter, StudyIndex, int], port: int
) -> None:
    assert _deliver_to(setup, Destination(port, status=0xB000)) == ExportState.DONE
    exporter, index, job_id = setup
    index.requeue_study_exports(index.job_series(job_id)[0], 60, {"pacs": ["seg"]})
    pacs = Destination(port, status=0x0124).start()  # not authorised
    try:
        assert exporter.run_once() == ExportState.FAILED
    finally:
        pacs.stop()
    assert "status 0x0124" in index.export_status()[0]["last_error"]


def test_a_refusal_beside_a_transient_failure_is_retried(
    setup: tuple[Exporter, StudyIndex, int], port: int
) -> None:
    """The PACS refuses one file for good (0xC000) and is out of resources for the next
    (0xA700): failing the delivery at once would lose the second file."""
    exporter, index, job_id = setup
    [path] = index.series_instance_paths(index.job_series(job_id)[1])
    second = pydicom.dcmread(exporter.filestore.path(path))
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    exporter.filestore.write("outputs/second.dcm", _encode(second))
    exporter.queue(job_id, {"seg": [path, "outputs/second.dcm"]})
    pacs = Destination(port, status=[0xC000, 0xA700]).start()
    try:
        assert exporter.run_once() == ExportState.PENDING  # retried, not failed
    finally:
        pacs.stop()
    assert "2 of 2 file(s) not delivered" in index.export_status()[0]["last_error"]


def _encode(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_an_unreadable_output_is_not_counted_as_delivered(
    setup: tuple[Exporter, StudyIndex, int], port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(path: Path) -> tuple[str, str]:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("dicomnode.scu._header", unreadable)
    pacs = Destination(port)
    assert _deliver_to(setup, pacs) == ExportState.PENDING  # retried, not "done"
    assert "cannot be read" in setup[1].export_status()[0]["last_error"]
    assert pacs.received == []


def test_an_unexpected_error_backs_off_and_gives_up(
    setup: tuple[Exporter, StudyIndex, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter, index, job_id = setup

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr("dicomnode.export.send", broken)
    exporter.queue(job_id, {"seg": index.series_instance_paths(index.job_series(job_id)[1])})
    now, states = utcnow(), []
    while not states or states[-1] == ExportState.PENDING:
        states.append(exporter.run_once(now))
        now += timedelta(seconds=41)
    assert states[-1] == ExportState.FAILED and 5 < len(states) < 20
    assert "gave up" in index.export_status()[0]["last_error"]


def test_each_destination_has_its_own_thread_and_removed_ones_fail(
    tmp_path: Path, port: int
) -> None:
    """A PACS that is down (every try waits out its timeout) must not hold up the
    deliveries to another destination; what is owed to a destination removed from the
    configuration fails at start rather than waiting forever."""
    silent = socket.socket()  # takes TCP connections, never answers an association
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    settings = settings_from_mapping({
        "storage": {"data_dir": str(tmp_path / "data")},
        "export": {"timeout_seconds": 20},
        "destinations": [
            {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1",
             "port": silent.getsockname()[1], "outputs": ["seg"]},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
             "outputs": ["seg"]},
        ],
    }, base_dir=tmp_path)
    filestore = FileStore(settings.data_dir)
    index = StudyIndex(settings.database_url)
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    filestore.write("ct.dcm", data)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    index.add_instance(instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "M"),
                       "ct.dcm", len(data), hashlib.sha256(data).hexdigest())
    job_id = index.series_status()[0]["job_id"]
    index.queue_export(job_id, "removed", ["ct.dcm"], 60)
    exporter = Exporter(settings, index, filestore)
    pacs = Destination(port).start()
    exporter.start()
    try:
        exporter.queue(job_id, {"seg": ["ct.dcm"]})  # "down" first, then "pacs"
        for _ in range(50):  # well inside the 20 s that "down" holds its sender
            if pacs.received:
                break
            threading.Event().wait(0.1)
    finally:
        pacs.stop()
        silent.close()
        exporter.stop()
        index.close()
    assert len(pacs.received) == 1
    index = StudyIndex(settings.database_url)
    rows = {r["destination"]: r for r in index.export_status()}
    index.close()
    assert rows["removed"]["state"] == "failed"
    assert "no longer configured" in rows["removed"]["last_error"]
    assert rows["pacs"]["state"] == "done"


def test_a_tls_destination_gets_its_deliveries_over_tls_only(tmp_path: Path, port: int) -> None:
    """A PACS that requires DICOM TLS and a client certificate: the node verifies the
    PACS's certificate against the configured CA and presents its own."""
    (tmp_path / "pacs").mkdir()
    (tmp_path / "node").mkdir()
    pacs_cert, pacs_key = self_signed_certificate(tmp_path / "pacs")
    node_cert, node_key = self_signed_certificate(tmp_path / "node")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(node_cert))
    server.load_cert_chain(pacs_cert, pacs_key)
    server.verify_mode = ssl.CERT_REQUIRED

    def exporter_for(**tls: object) -> tuple[Exporter, StudyIndex]:
        settings = settings_from_mapping({
            "storage": {"data_dir": str(tmp_path / "data")},
            "export": {"timeout_seconds": 5},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "localhost",
                              "port": port, "outputs": ["seg"], **tls}],
        }, base_dir=tmp_path)
        filestore = FileStore(settings.data_dir)
        index = StudyIndex(settings.database_url)
        data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
        filestore.write("ct.dcm", data)
        if not index.series_status():
            ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
            index.add_instance(instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "M"),
                               "ct.dcm", len(data), hashlib.sha256(data).hexdigest())
        exporter = Exporter(settings, index, filestore)
        index.queue_export(index.series_status()[0]["job_id"], "pacs", ["ct.dcm"], 60)
        return exporter, index

    pacs = Destination(port).start(tls=server)
    try:
        plain, index = exporter_for()
        assert plain.run_once() == ExportState.PENDING  # no TLS: no association
        index.close()
        # the PACS's certificate not trusted: retried, and the reason points at TLS
        wrong, index = exporter_for(tls=True, tls_ca=str(node_cert),
                                    tls_cert=str(node_cert), tls_key=str(node_key))
        assert wrong.run_once(utcnow() + timedelta(seconds=15)) == ExportState.PENDING
        assert "the TLS handshake failed" in index.export_status()[0]["last_error"]
        index.close()
        secure, index = exporter_for(tls=True, tls_ca=str(pacs_cert),
                                     tls_cert=str(node_cert), tls_key=str(node_key))
        assert secure.run_once(utcnow() + timedelta(minutes=1)) == ExportState.DONE  # retry
        index.close()
    finally:
        pacs.stop()
    assert len(pacs.received) == 1


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    destination = {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 1}
    with pytest.raises(ConfigError, match="tls = true"):
        settings_from_mapping({"destinations": [{**destination, "tls_ca": "ca.pem"}]},
                              base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"destinations\[pacs\].tls_ca = 'ca.pem': no such"):
        settings_from_mapping({"destinations": [{**destination, "tls": True,
                                                 "tls_ca": "ca.pem"}]}, base_dir=tmp_path)
    (tmp_path / "ca.pem").write_text("not a certificate")
    settings = settings_from_mapping({"destinations": [{**destination, "tls": True,
                                                        "tls_ca": "ca.pem"}]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"destinations\[pacs\].tls_ca / tls_cert / tls_key"):
        Exporter(settings, None, None)  # type: ignore[arg-type]


def test_resend_serves_the_destinations_as_configured_now(
    setup: tuple[Exporter, StudyIndex, int],
) -> None:
    """A destination added after the analysis, or a changed outputs list, gets the
    study's results on `resend`; the job's earlier deliveries are replaced, not doubled."""
    _, index, job_id = setup
    complete_job(index, job_id, CompletionRule.QUIET, None, 1)
    claim = index.claim_next_job("w")
    assert claim is not None and claim.job_id == job_id
    outputs = {"seg": ["seg.dcm"], "sr": ["sr.dcm"], "pdf": ["pdf.dcm"]}
    record = ResultRecord(
        diagnosis="CAP", probabilities={}, lvr=0.1, plr=0.2, lesion_count=1,
        lesion_volume_ml=1.0, lung_volume_ml=10.0, analysis={}, model_name="",
        model_version="", checkpoint_sha256="", timings={}, outputs=outputs,
    )
    assert index.record_result(job_id, claim.attempts, record) is not None
    index.queue_export(job_id, "pacs", ["seg.dcm", "sr.dcm"], 60)
    index.queue_export(job_id, "gone", ["seg.dcm"], 60)
    study = index.job_series(job_id)[0]
    counts = index.requeue_study_exports(
        study, 60, {"pacs": ["seg", "sr", "pdf"], "archive": ["sr"]})
    assert counts == {"queued": 2, "sending": 0, "unconfigured": 1}
    rows = {(r["destination"], r["files"], r["state"]) for r in index.export_status()}
    assert rows == {("pacs", 3, "pending"), ("archive", 1, "pending"), ("gone", 1, "pending")}
    # analysed again (new weights, say): resend sends the series' latest result only
    assert index.finish_job(job_id, claim.attempts, JobState.DONE)
    assert index.reanalyse(study)[0] == [index.job_series(job_id)[1]]
    again = index.claim_next_job("w")
    assert again is not None and again.job_id != job_id
    newer = replace(record, outputs={"seg": ["seg2.dcm"], "sr": ["sr2.dcm"]})
    assert index.record_result(again.job_id, again.attempts, newer) is not None
    assert index.requeue_study_exports(study, 60, {"pacs": ["seg", "sr"]})["queued"] == 1
    [latest] = [r for r in index.export_status() if r["job_id"] == again.job_id]
    assert (latest["destination"], latest["files"]) == ("pacs", 2)


def _big_file(path: Path) -> Path:
    """A 20 MB Secondary Capture image (a large SEG's size)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4000, 5000, 1, (
        "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((4000, 5000), np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _slow_pacs(port: int, on_data: Callable[[evt.Event], None]) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ae = AE(ae_title="PACS")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_DATA_RECV, on_data), (evt.EVT_C_STORE, lambda event: 0x0000)])


def test_a_peer_that_stops_reading_does_not_block_its_sender(
    tmp_path: Path, port: int
) -> None:
    """A PACS frozen with its TCP connection up (a full disk, a suspended VM) stops
    reading mid-file: the send ends, to be retried, instead of blocking the destination's
    sender for good (pynetdicom leaves the connected socket without a timeout)."""
    from dicomnode.scu import Peer, send

    big = _big_file(tmp_path / "big.dcm")
    thawed, packets = threading.Event(), [0]

    def freeze(event: evt.Event) -> None:
        packets[0] += 1
        if packets[0] > 3:
            thawed.wait(60)

    server = _slow_pacs(port, freeze)
    done: dict[str, object] = {}
    sender = threading.Thread(target=lambda: done.update(
        report=send([big], Peer("PACS", "127.0.0.1", port), timeout_s=2)))
    try:
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "the sender is still blocked"
    finally:
        thawed.set()
        sender.join(30)
        server.shutdown()
    report = done["report"]
    assert report.sent == 0 and report.transient and not report.permanent  # type: ignore[attr-defined]


def test_a_large_file_on_a_slow_link_gets_the_time_to_arrive(tmp_path: Path, port: int) -> None:
    """The response wait starts once the file is queued: a 20 MB file that takes longer
    than the timeout to cross the link is still delivered (was: 'no response', sent again
    and again until given up, though the PACS had stored it)."""
    from dicomnode.scu import Peer, send

    big = _big_file(tmp_path / "big.dcm")
    server = _slow_pacs(port, lambda event: time.sleep(0.01))
    try:
        started = time.monotonic()
        report = send([big], Peer("PACS", "127.0.0.1", port), timeout_s=2)
        took = time.monotonic() - started
    finally:
        server.shutdown()
    assert took > 2, f"the link was not slow enough to test this ({took:.1f} s)"
    assert report.sent == 1 and not report.failed


def test_a_jobs_later_deliveries_wait_for_its_first(
    setup: tuple[Exporter, StudyIndex, int],
) -> None:
    """The SEG and SR are queued first; in backoff, they still reach the PACS before the
    key images and PDF, which are due sooner."""
    _, index, job_id = setup
    now = utcnow()
    first = index.queue_export(job_id, "pacs", ["seg.dcm", "sr.dcm"], 3600)
    views = index.queue_export(job_id, "pacs", ["key.dcm", "pdf.dcm"], 3600)
    other = index.queue_export(job_id, "archive", ["pdf.dcm"], 3600)
    assert first is not None and views is not None and other is not None
    task = index.claim_due_export(now + timedelta(seconds=1), destination="pacs")
    assert task is not None and task.export_id == first
    index.finish_export(first, "no response", now + timedelta(minutes=5), now)  # backoff
    later = now + timedelta(minutes=1)
    assert index.claim_due_export(later, destination="pacs") is None  # views wait
    assert index.claim_due_export(later, destination="archive") is not None  # not others
    assert index.next_export_due() == now + timedelta(minutes=5)  # no wake-up for views
    task = index.claim_due_export(now + timedelta(minutes=6), destination="pacs")
    assert task is not None and task.export_id == first
    index.finish_export(first, now=now + timedelta(minutes=6))
    task = index.claim_due_export(now + timedelta(minutes=6), destination="pacs")
    assert task is not None and task.export_id == views

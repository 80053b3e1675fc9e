"""kill -9 of `dicomnode serve` mid-series: nothing acknowledged is lost, work resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import text

from dicomnode.scu import Peer, echo, send
from storage.index import StudyIndex
from storage.models import SCHEMA_VERSION
from tests.conftest import free_port, write_ct_series


def start_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    return proc


def wait_ready(peer: Peer, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited early:\n{log.read_text()}"
        try:
            if echo(peer, timeout_s=2) == 0:
                return
        except ConnectionError:
            time.sleep(0.2)
    raise AssertionError(f"serve did not answer C-ECHO:\n{log.read_text()}")


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def latest_state(index: StudyIndex, series_uid: str) -> str:
    rows = [r for r in index.series_status() if r["series_instance_uid"] == series_uid]
    return rows[0]["state"] if rows else ""


def test_kill_9_mid_series_then_restart(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nport = {port}\nhost = "127.0.0.1"\n'
        f'[storage]\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n'
        "[series]\nquiet_seconds = 3\nrelease_grace_seconds = 0.5\nmin_slices = 4\n"
        "[pipeline]\nworkers = 0\n"  # receive only: queued jobs must stay queued
    )
    peer = Peer("DICOMNODE", "127.0.0.1", port)
    log = tmp_path / "serve.log"
    complete = write_ct_series(tmp_path / "a", slices=4, size=32, seed=1)
    interrupted = write_ct_series(tmp_path / "b", slices=40, size=64, seed=2)
    series_a = pydicom.dcmread(complete[0]).SeriesInstanceUID
    series_b = pydicom.dcmread(interrupted[0]).SeriesInstanceUID

    proc = start_serve(config, log)
    try:
        wait_ready(peer, proc, log)
        assert send(complete, peer).sent == 4
        index = StudyIndex(f"sqlite:///{data / 'index.sqlite'}")
        wait_for(lambda: latest_state(index, series_a) == "queued")
    except BaseException:  # a failed assertion must not leave the node running
        proc.kill()
        raise

    acknowledged: list[str] = []

    def sender() -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        for path in interrupted:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0:
                return
            acknowledged.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 15)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    thread.join(timeout=30)
    assert 15 <= len(acknowledged) < len(interrupted)
    (data / "tmp" / "crash.part").write_bytes(b"half written")  # as a crash mid-write leaves

    for uid in acknowledged:  # every acknowledged instance is on disk and indexed
        stored = index.find_instance(uid)
        assert stored is not None, f"acknowledged {uid} lost"
        assert pydicom.dcmread(data / stored.path).SOPInstanceUID == uid
    assert latest_state(index, series_a) == "queued"

    proc = start_serve(config, log)
    try:
        wait_ready(peer, proc, log)
        assert not list((data / "tmp").iterdir())  # half-written files cleaned up
        assert latest_state(index, series_a) == "queued"  # still queued
        wait_for(lambda: latest_state(index, series_b) == "queued")  # the timer resumed
        (row,) = [r for r in index.series_status() if r["series_instance_uid"] == series_b]
        assert row["completion_rule"] == "quiet_period"
        stored_count = index.counts()["instances"] - len(complete)
        assert row["instances"] == stored_count
        assert len(acknowledged) <= stored_count <= len(acknowledged) + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        index.close()


def test_unclean_shutdown_reconciles_files_the_index_lost(tmp_path: Path) -> None:
    """Power loss after an acknowledgement but before SQLite's WAL reached the disk: the
    fsynced file is re-indexed at the next start; files cut short (in the header, in the
    pixel data) are set aside, and the sender's re-send of one is stored as new."""
    from dicomnode.service import Node
    from tests.conftest import node_settings

    files = write_ct_series(tmp_path / "ct", slices=5, size=32, seed=3)
    settings = node_settings(tmp_path)
    node = Node(settings, analyse=False)
    node.start()
    assert send(files[:2], Peer("DICOMNODE", "127.0.0.1", node.scp.port)).sent == 2
    node.scp.stop()
    node.assembler.stop()
    node.exporter.stop()
    node.index.close()  # no clean-shutdown mark: as if the power went out
    node.lock.release()  # (the kernel releases a dead process's lock)

    lost = pydicom.dcmread(files[2])  # acknowledged, file fsynced, index row lost
    relpath = node.filestore.instance_relpath(lost.StudyInstanceUID, lost.SeriesInstanceUID,
                                              lost.SOPInstanceUID)
    node.filestore.create(relpath, files[2].read_bytes())
    cut = pydicom.dcmread(files[3])  # the crash hit mid-write: never acknowledged
    cut_path = node.filestore.instance_relpath(cut.StudyInstanceUID, cut.SeriesInstanceUID,
                                               cut.SOPInstanceUID)
    node.filestore.create(cut_path, files[3].read_bytes()[:300])
    short = pydicom.dcmread(files[4])  # cut in the pixel data: the header still parses
    short_path = node.filestore.instance_relpath(
        short.StudyInstanceUID, short.SeriesInstanceUID, short.SOPInstanceUID)
    node.filestore.create(short_path, files[4].read_bytes()[:-100])

    restarted = Node(settings, analyse=False)
    restarted.start()
    try:
        assert restarted.index.find_instance(lost.SOPInstanceUID) is not None
        assert restarted.index.find_instance(cut.SOPInstanceUID) is None
        assert restarted.index.find_instance(short.SOPInstanceUID) is None
        assert not (settings.data_dir / cut_path).exists()
        assert not (settings.data_dir / short_path).exists()
        assert len(list((settings.data_dir / "rejected").iterdir())) == 2
        assert restarted.index.counts()["instances"] == 3
        assert send([files[4]], Peer("DICOMNODE", "127.0.0.1", restarted.scp.port)).sent == 1
        resent = restarted.index.find_instance(short.SOPInstanceUID)
        assert resent is not None
        assert pydicom.dcmread(settings.data_dir / resent.path).PixelData == short.PixelData
        assert not list((settings.data_dir / "conflicts").iterdir())
    finally:
        restarted.stop()
    again = Node(settings, analyse=False)  # a clean stop: no reconciliation next time
    assert again.index.mark_running() is True
    again.index.close()


def test_a_second_node_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    """Its start-up would clean the running node's temp files and queue its running jobs
    again: it stops before touching anything, with the first node's pid."""
    from dicomnode.service import Node
    from storage.filestore import DataDirInUse
    from tests.conftest import node_settings

    settings = node_settings(tmp_path)
    first = Node(settings, analyse=False)
    first.start()
    try:
        in_flight = settings.data_dir / "tmp" / "in-flight.part"
        in_flight.write_bytes(b"half an instance")
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            Node(settings, analyse=False).start()
        assert in_flight.exists()
        assert echo(Peer("DICOMNODE", "127.0.0.1", first.scp.port), timeout_s=5) == 0
    finally:
        first.stop()
    second = Node(settings, analyse=False)  # free again once the first has stopped
    second.start()
    second.stop()


def _meta(index: StudyIndex, key: str) -> str | None:
    with index.engine.connect() as conn:
        return conn.execute(text("SELECT value FROM meta WHERE key = :k"), {"k": key}
                            ).scalar_one_or_none()


def test_a_second_node_of_a_newer_version_leaves_the_running_node_alone(
    tmp_path: Path
) -> None:
    """Refused by the lock, it must not have migrated the index first (the running node,
    here one whose index says the schema before this one, would go on with a schema it
    does not know), nor mark the running node's index as cleanly stopped when told to
    stop. The node of the new version, started once the old one has stopped, migrates."""
    from dicomnode.service import Node
    from storage.filestore import DataDirInUse
    from tests.conftest import node_settings

    settings = node_settings(tmp_path)
    first = Node(settings, analyse=False)
    first.start()
    try:
        with first.index.engine.begin() as conn:
            conn.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"),
                         {"v": str(SCHEMA_VERSION - 1)})
        second = Node(settings, analyse=False)
        with pytest.raises(DataDirInUse):
            second.start()
        second.stop()  # nothing to stop
        assert first.index.schema_version() == SCHEMA_VERSION - 1
        assert _meta(first.index, "clean_shutdown") == "0", "still running"
    finally:
        first.stop()
    upgraded = Node(settings, analyse=False)
    upgraded.start()
    assert upgraded.index.schema_version() == SCHEMA_VERSION
    upgraded.stop()


def test_a_start_that_fails_late_undoes_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the Storage SCP listens (here the exporter's start) must not leave
    it listening, nor the data directory locked: the next start works."""
    from dicomnode.export import Exporter
    from dicomnode.service import Node
    from tests.conftest import node_settings

    settings = node_settings(tmp_path)
    failing = Node(settings, analyse=False)

    listening_on: list[int] = []

    def broken_start(_self: Exporter) -> None:
        listening_on.append(failing.scp.port)
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(Exporter, "start", broken_start)
    with pytest.raises(RuntimeError, match="exporter broke"):
        failing.start()
    (port,) = listening_on
    with pytest.raises(ConnectionError):  # not listening any more
        echo(Peer("DICOMNODE", "127.0.0.1", port), timeout_s=2)
    failing.stop()  # nothing to stop
    monkeypatch.undo()
    node = Node(settings, analyse=False)
    node.start()
    assert echo(Peer("DICOMNODE", "127.0.0.1", node.scp.port), timeout_s=5) == 0
    node.stop()


def test_a_port_in_use_is_named_and_leaves_the_index_clean(tmp_path: Path) -> None:
    """The start fails before anything is received: the next start must not scan the whole
    store as after a crash, and the error names the setting to change."""
    import socket

    from dicomnode.service import Node
    from tests.conftest import node_settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = node_settings(tmp_path, node={"host": "127.0.0.1", "port": port})
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port} \(\[node\] host,"
                                          r" port\): Address already in use"):
            Node(settings, analyse=False).start()
    index = StudyIndex(settings.database_url)
    assert index.mark_running(), "the failed start is recorded as a clean stop"
    index.close()
    node = Node(settings, analyse=False)  # the data directory's lock was released
    node.start()
    node.stop()

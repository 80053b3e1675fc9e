"""The Storage SCP over real sockets, with dcmtk and pynetdicom as peers."""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.cli import _status_table, main
from dicomnode.config import ConfigError, NodeConfig
from dicomnode.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    instance_record,
    peer_allowed,
    read_complete_file,
    read_header,
)
from dicomnode.scu import Peer, echo, send
from dicomnode.service import Node
from storage.index import OWN_OUTPUT, counts_line, utcnow
from storage.models import CompletionRule, JobState
from tests.conftest import dcmtk_tool, node_settings, self_signed_certificate, write_ct_series

# name -> (how to encode from Explicit VR Little Endian, transfer syntax UID, lossless)
ENCODINGS: dict[str, tuple[list[str] | None, str, bool]] = {
    "explicit_le": ([], "1.2.840.10008.1.2.1", True),
    "implicit_le": (["dcmconv", "+ti"], "1.2.840.10008.1.2", True),
    "deflated": (["dcmconv", "+td"], "1.2.840.10008.1.2.1.99", True),
    "jpeg_baseline": (["dcmcjpeg", "+eb"], "1.2.840.10008.1.2.4.50", False),
    "jpeg_extended": (["dcmcjpeg", "+ee"], "1.2.840.10008.1.2.4.51", False),
    "jpeg_lossless_sv1": (["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70", True),
    "jpeg_ls_lossless": (["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80", True),
    "jpeg_ls_near": (["dcmcjpls", "+en"], "1.2.840.10008.1.2.4.81", False),
    "rle": (["dcmcrle"], "1.2.840.10008.1.2.5", True),
    "jpeg2000_lossless": (None, JPEG2000Lossless, True),
}

STORESCU_PROPOSE = {
    "deflated": ["-xd"], "jpeg_baseline": ["-xy"], "jpeg_extended": ["-xx"],
    "jpeg_lossless_sv1": ["-xs"], "jpeg_ls_lossless": ["-xt"], "jpeg_ls_near": ["-xu"],
    "rle": ["-xr"], "jpeg2000_lossless": ["-xv"],
}


def encode(src: Path, dst: Path, how: list[str] | None) -> None:
    if how is None:  # no free dcmtk encoder for JPEG 2000: pydicom + openjpeg
        ds = pydicom.dcmread(src)
        ds.compress(JPEG2000Lossless)
        ds.save_as(dst, enforce_file_format=True)
    elif not how:
        shutil.copy(src, dst)
    else:
        subprocess.run([dcmtk_tool(how[0]), *how[1:], str(src), str(dst)], check=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the transfer syntax matrix."""
    node = Node(node_settings(tmp_path_factory.mktemp("node")), analyse=False)
    node.start()
    yield node
    node.stop()


def peer_of(node: Node) -> Peer:
    return Peer(node.settings.node.ae_title, "127.0.0.1", node.scp.port)


def storescu(node: Node, files: list[Path], calling: str = "STORESCU",
             called: str = "DICOMNODE", *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_tool("storescu"), "-R", *options, "-aet", calling, "-aec", called, "127.0.0.1",
         str(node.scp.port), *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )


def stored_dataset(node: Node, sop_instance_uid: str) -> pydicom.Dataset:
    stored = node.index.find_instance(sop_instance_uid)
    assert stored is not None, f"{sop_instance_uid} not indexed"
    return pydicom.dcmread(node.filestore.path(stored.path))


@pytest.mark.parametrize("sender", ["storescu", "pynetdicom"])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_every_transfer_syntax_is_stored_as_received(
    node: Node, ct_series_dir: Path, tmp_path: Path, encoding: str, sender: str
) -> None:
    how, syntax, lossless = ENCODINGS[encoding]
    sources = sorted(ct_series_dir.glob("*.dcm"))[:2]
    files = []
    for n, src in enumerate(sources):
        ds = pydicom.dcmread(src)  # fresh UIDs: each case stores new instances
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, encoding,
                                                          sender])
        plain = tmp_path / f"plain{n}.dcm"
        ds.save_as(plain, enforce_file_format=True)
        files.append(tmp_path / f"{encoding}{n}.dcm")
        encode(plain, files[-1], how)
    if sender == "storescu":
        # storescu proposes uncompressed syntaxes unless told which compressed one to offer.
        options = STORESCU_PROPOSE.get(encoding, [])
        result = storescu(node, files, "STORESCU", "DICOMNODE", *options)
        assert result.returncode == 0, result.stderr
    else:
        assert send(files, peer_of(node), calling_aet="PYNETDICOM").sent == len(files)
    for path in files:
        sent = pydicom.dcmread(path)
        assert sent.file_meta.TransferSyntaxUID == syntax
        stored = stored_dataset(node, sent.SOPInstanceUID)
        assert stored.file_meta.TransferSyntaxUID == syntax
        assert stored.pixel_array.shape == (sent.Rows, sent.Columns)  # decodable
        if lossless:
            original = pydicom.dcmread(tmp_path / f"plain{files.index(path)}.dcm")
            np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)


def test_echo_from_dcmtk_and_pynetdicom(node: Node) -> None:
    result = subprocess.run(
        [dcmtk_tool("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.scp.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert echo(peer_of(node)) == 0


def test_calling_ae_allow_list_and_called_ae_check(
    start_node: Callable[..., Node], ct_series_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused associations are refused, and logged with who asked, from where and why;
    `dicomnode echo` says why too."""
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    node = start_node(node={"allowed_calling_aets": ["CT_SCANNER"]})
    files = sorted(ct_series_dir.glob("*.dcm"))[:1]
    rejected = storescu(node, files, calling="INTRUDER")
    assert rejected.returncode != 0
    assert "reject" in (rejected.stdout + rejected.stderr).lower()
    assert node.index.counts()["instances"] == 0
    wrong_called = storescu(node, files, calling="CT_SCANNER", called="SOMEONE_ELSE")
    assert wrong_called.returncode != 0
    with pytest.raises(ConnectionError, match="Calling AE title not recognised"):
        echo(peer_of(node), calling_aet="OTHER")
    logged = [r.getMessage() for r in caplog.records if "rejected:" in r.getMessage()]
    assert len(logged) == 3
    assert logged[0].startswith("association from INTRUDER at 127.0.0.1:")
    assert logged[0].endswith("rejected: Rejected Permanent, Calling AE title not recognised")
    assert "(called AE SOMEONE_ELSE)" in logged[1] and "Called AE title not recognised" in logged[1]
    accepted = storescu(node, files, calling="CT_SCANNER")
    assert accepted.returncode == 0, accepted.stderr
    assert node.index.counts()["instances"] == 1


def test_peer_address_allow_list(
    start_node: Callable[..., Node], ct_series_dir: Path, caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """A host outside `allowed_peers` is disconnected before any DICOM; a host inside
    stores as usual. (A calling AE title is the sender's to choose; an address is not.)"""
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    elsewhere = start_node(node={"allowed_peers": ["10.0.0.0/8"]})
    with pytest.raises(ConnectionError, match="could not associate"):
        echo(peer_of(elsewhere))
    assert any(r.getMessage() == "connection from 127.0.0.1 refused: not in [node] allowed_peers"
               for r in caplog.records)
    here = start_node(node={"allowed_peers": ["10.0.0.0/8", "127.0.0.0/8"]},
                      storage={"data_dir": str(tmp_path / "data-here")})
    files = sorted(ct_series_dir.glob("*.dcm"))[:1]
    assert storescu(here, files).returncode == 0
    assert here.index.counts()["instances"] == 1


def test_a_refused_host_gets_no_tls_handshake(
    start_node: Callable[..., Node], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With TLS, the address is checked before the handshake: a refused host is closed
    at once, without one."""
    caplog.set_level(logging.WARNING, logger="dicomnode.scp")
    cert, key = self_signed_certificate(tmp_path)
    node = start_node(node={"tls_cert": str(cert), "tls_key": str(key),
                            "allowed_peers": ["10.0.0.0/8"]})
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with (socket.create_connection(("127.0.0.1", node.scp.port), timeout=5) as raw,
          pytest.raises((ssl.SSLError, ConnectionError, OSError))):
        client.wrap_socket(raw, server_hostname="localhost")
    assert any(r.getMessage() == "connection from 127.0.0.1 refused: not in [node] allowed_peers"
               for r in caplog.records)


def test_a_silent_client_does_not_hold_up_tls_associations(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """A host that opens a connection and never sends its TLS hello (a stuck probe) must
    not stall the handshakes of the modalities behind it for the network timeout."""
    cert, key = self_signed_certificate(tmp_path)
    node = start_node(node={"tls_cert": str(cert), "tls_key": str(key),
                            "network_timeout_s": 30})
    peer = f"DICOMNODE@localhost:{node.scp.port}"
    with socket.create_connection(("127.0.0.1", node.scp.port), timeout=5):
        time.sleep(0.2)  # accepted, and silent
        started = time.monotonic()
        assert main(["echo", peer, "--tls-ca", str(cert), "--timeout", "10"]) == 0
        assert time.monotonic() - started < 5


def test_allowed_peers_as_written_by_an_administrator() -> None:
    """An IPv4-mapped entry (as a dual-stack node logs its peers) matches that IPv4
    peer; an address with host bits set under a prefix is a typo, not a whole network."""
    networks = NodeConfig(allowed_peers=["::ffff:10.1.2.0/120"]).peer_networks()
    assert peer_allowed("::ffff:10.1.2.3", networks) and peer_allowed("10.1.2.3", networks)
    assert not peer_allowed("10.1.3.3", networks)
    with pytest.raises(ConfigError, match="'10.1.2.3/8' is not an IP address or network"):
        NodeConfig(allowed_peers=["10.1.2.3/8"])


@pytest.mark.parametrize(("host", "allowed"), [
    ("10.1.2.3", True), ("10.1.3.3", False), ("::ffff:10.1.2.3", True), ("fd00::5", True),
    ("fe80::1%eth0", False), ("not an address", False),
])
def test_peer_allowed(host: str, allowed: bool) -> None:
    networks = NodeConfig(allowed_peers=["10.1.2.0/24", "fd00::/8"]).peer_networks()
    assert peer_allowed(host, networks) is allowed


def test_tls_association(start_node: Callable[..., Node], ct_series_dir: Path,
                         tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    node = start_node(node={"tls_cert": str(cert), "tls_key": str(key)})
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, pydicom.dcmread(
        next(ct_series_dir.glob("*.dcm"))).file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOMNODE",
                         tls_args=(client, "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    path = next(ct_series_dir.glob("*.dcm"))
    assert assoc.send_c_store(path).Status == 0
    assoc.release()
    assert node.index.counts()["instances"] == 1
    ae.acse_timeout = ae.network_timeout = 3
    plain = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOMNODE")
    assert not plain.is_established  # a plain TCP peer cannot talk to the TLS port
    peer = f"DICOMNODE@localhost:{node.scp.port}"
    assert main(["echo", peer, "--tls-ca", str(cert)]) == 0  # the CLI speaks TLS too
    assert main(["echo", peer, "--tls", "--timeout", "3"]) == 1  # not signed by a system CA


def test_duplicate_is_idempotent_and_conflict_is_kept_aside(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node()
    files = write_ct_series(tmp_path / "ct", slices=2, size=32)
    peer = peer_of(node)
    assert send(files, peer).sent == 2
    first_bytes = node.filestore.path(node.index.find_instance(
        pydicom.dcmread(files[0]).SOPInstanceUID).path).read_bytes()
    assert send(files, peer).sent == 2  # identical re-send: success, nothing new
    assert node.index.counts()["instances"] == 2
    # the same data set again in another transfer syntax (a PACS that stores compressed):
    # nothing new either, and no conflict copy
    rle = pydicom.dcmread(files[0])
    rle.compress(RLELossless, generate_instance_uid=False)
    rle.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert send([tmp_path / "rle.dcm"], peer).sent == 1
    assert not (node.settings.data_dir / "conflicts").exists() or not any(
        (node.settings.data_dir / "conflicts").iterdir())
    changed = pydicom.dcmread(files[0])
    changed.PatientComments = "edited after sending"
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    assert send([tmp_path / "changed.dcm"], peer).sent == 1
    assert node.index.counts()["instances"] == 2
    stored = node.index.find_instance(changed.SOPInstanceUID)
    assert node.filestore.path(stored.path).read_bytes() == first_bytes  # the first is kept
    (aside,) = (node.settings.data_dir / "conflicts").iterdir()
    assert pydicom.dcmread(aside).PatientComments == "edited after sending"
    assert send([tmp_path / "changed.dcm"], peer).sent == 1  # a sender that retries:
    assert list((node.settings.data_dir / "conflicts").iterdir()) == [aside]  # one copy
    # The same SOP Instance UID under another series: also a conflict, also kept aside,
    # and nothing is left in the instance tree that no row points to.
    moved = pydicom.dcmread(files[1])
    moved.SeriesInstanceUID = pydicom.uid.generate_uid()
    moved.save_as(tmp_path / "moved.dcm", enforce_file_format=True)
    assert send([tmp_path / "moved.dcm"], peer).sent == 1
    assert send([tmp_path / "moved.dcm"], peer).sent == 1
    assert node.index.counts()["instances"] == 2
    assert len(list((node.settings.data_dir / "conflicts").iterdir())) == 2
    indexed = {node.index.find_instance(pydicom.dcmread(f).SOPInstanceUID).path for f in files}
    on_disk = {
        str(p.relative_to(node.settings.data_dir))
        for p in (node.settings.data_dir / "instances").rglob("*.dcm")
    }
    assert on_disk == indexed


def _raw_store(node: Node, path: Path) -> int:
    """C-STORE a file's bytes without parsing them first (chunked sending)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CTImageStorage, read_file_meta_info(path).TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def _file_with_dataset_bytes(template: Path, dataset: bytes, out: Path) -> Path:
    """A Part 10 file whose file meta is valid and whose dataset is the given bytes."""
    meta = DicomBytesIO()
    write_file_meta_info(meta, pydicom.dcmread(template).file_meta)
    out.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + dataset)
    return out


def test_unparseable_dataset_is_refused_and_the_node_keeps_serving(
    start_node: Callable[..., Node], ct_series_dir: Path, tmp_path: Path
) -> None:
    node = start_node()
    good = next(ct_series_dir.glob("*.dcm"))
    # a sequence of undefined length whose items are garbage: pydicom cannot parse it
    garbage = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\x01\x02" * 5
    corrupt = _file_with_dataset_bytes(good, garbage, tmp_path / "corrupt.dcm")
    assert _raw_store(node, corrupt) == STATUS_CANNOT_UNDERSTAND
    no_series = pydicom.dcmread(good)
    del no_series.SeriesInstanceUID
    no_series.SOPInstanceUID = no_series.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_series.save_as(tmp_path / "no_series.dcm", enforce_file_format=True)
    assert _raw_store(node, tmp_path / "no_series.dcm") == STATUS_CANNOT_UNDERSTAND
    assert len(list((node.settings.data_dir / "rejected").iterdir())) == 2  # kept as evidence
    assert _raw_store(node, corrupt) == STATUS_CANNOT_UNDERSTAND  # sent again: one copy
    assert len(list((node.settings.data_dir / "rejected").iterdir())) == 2
    assert _raw_store(node, good) == 0  # still serving
    assert node.index.counts()["instances"] == 1


def test_disk_watermark_answers_out_of_resources(
    start_node: Callable[..., Node], ct_series_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = start_node(storage={"min_free_disk_mb": 100})
    path = next(ct_series_dir.glob("*.dcm"))
    monkeypatch.setattr(node.filestore, "free_bytes", lambda: 99 * 1024 * 1024)
    assert _raw_store(node, path) == STATUS_OUT_OF_RESOURCES
    assert node.index.counts()["instances"] == 0
    assert not list((node.settings.data_dir / "instances").rglob("*.dcm"))
    # an instance that would take the free space below the reserve is refused too
    size = path.stat().st_size
    monkeypatch.setattr(node.filestore, "free_bytes", lambda: 100 * 1024 * 1024 + size // 2)
    assert _raw_store(node, path) == STATUS_OUT_OF_RESOURCES
    monkeypatch.setattr(node.filestore, "free_bytes", lambda: 101 * 1024 * 1024)
    assert _raw_store(node, path) == 0


def test_refused_instances_hold_their_series_until_they_are_sent_again(
    start_node: Callable[..., Node], ct_series_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills in the middle of a series: the refused instances are noted, so the
    series waits for them (`dicomnode.assembler`) instead of being analysed without them;
    once sent again it is whole."""
    node = start_node(storage={"min_free_disk_mb": 100})
    paths = sorted(ct_series_dir.glob("*.dcm"))[:5]
    for path in paths[:3]:
        assert _raw_store(node, path) == 0
    monkeypatch.setattr(node.filestore, "free_bytes", lambda: 99 * 1024 * 1024)
    for path in paths[3:]:
        assert _raw_store(node, path) == STATUS_OUT_OF_RESOURCES
    (collecting,) = node.index.collecting_series()
    assert collecting.instance_count == 3 and collecting.refused_instances == 2
    (row,) = node.index.series_status()
    assert row["refused_instances"] == 2
    assert "waiting for 2 refused instance(s)" in _status_table([row])
    monkeypatch.setattr(node.filestore, "free_bytes", lambda: 101 * 1024 * 1024)
    for path in paths[3:]:
        assert _raw_store(node, path) == 0
    (collecting,) = node.index.collecting_series()
    assert collecting.instance_count == 5 and collecting.refused_instances == 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, on the bad UID
def test_a_refused_instance_the_node_could_never_store_is_not_waited_for(
    start_node: Callable[..., Node], ct_series_dir: Path, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Refused for disk space, but its UID is not one the node accepts (0xC000 when sent
    again): its series must not wait for it."""
    node = start_node(storage={"min_free_disk_mb": 100})
    first, second = sorted(ct_series_dir.glob("*.dcm"))[:2]
    assert _raw_store(node, first) == 0
    ds = pydicom.dcmread(second)
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1a"  # a letter, as old devices write
    ds.save_as(tmp_path / "bad-uid.dcm", enforce_file_format=True)
    monkeypatch.setattr(node.filestore, "free_bytes", lambda: 99 * 1024 * 1024)
    assert _raw_store(node, tmp_path / "bad-uid.dcm") == STATUS_OUT_OF_RESOURCES
    (collecting,) = node.index.collecting_series()
    assert collecting.refused_instances == 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom's, writing it
def test_a_malformed_sop_class_uid_is_refused_as_data_not_as_resources(
    start_node: Callable[..., Node], ct_series_dir: Path, tmp_path: Path,
) -> None:
    """A server database refuses a value wider than its column: answered 0xA700, the
    sender retried for ever and the series waited for it. The node can never store it:
    cannot understand (0xC000), and nothing waits."""
    node = start_node()
    ds = pydicom.dcmread(next(ct_series_dir.glob("*.dcm")))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2." + "1" * 60
    ds.save_as(tmp_path / "long-class.dcm", enforce_file_format=False)
    assert _raw_store(node, tmp_path / "long-class.dcm") == STATUS_CANNOT_UNDERSTAND
    assert node.index.counts()["instances"] == 0


def test_failed_write_is_out_of_resources_and_the_resend_is_stored_whole(
    start_node: Callable[..., Node], ct_series_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails half-way leaves no row; the sender's retry replaces the half
    file and is indexed."""
    node = start_node()
    first, path = sorted(ct_series_dir.glob("*.dcm"))[:2]
    assert _raw_store(node, first) == 0
    real_create = node.filestore.create

    def disk_fails_midway(relpath: str, data: bytes, *, exclusive: bool = False) -> int:
        real_create(relpath, data[: len(data) // 2], exclusive=exclusive)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(node.filestore, "create", disk_fails_midway)
    assert _raw_store(node, path) == STATUS_OUT_OF_RESOURCES
    uid = pydicom.dcmread(path).SOPInstanceUID
    assert node.index.find_instance(uid) is None
    (collecting,) = node.index.collecting_series()  # waits for the refused instance
    assert (collecting.instance_count, collecting.refused_instances) == (1, 1)
    monkeypatch.setattr(node.filestore, "create", real_create)
    assert _raw_store(node, path) == 0
    stored = node.index.find_instance(uid)
    assert stored is not None and node.filestore.size(stored.path) == stored.size_bytes
    assert pydicom.dcmread(node.filestore.path(stored.path)).PixelData == pydicom.dcmread(
        path).PixelData
    (series,) = node.index.series_status()
    assert (series["instances"], series["refused_instances"]) == (2, 0)


def test_resend_over_a_damaged_stored_file_writes_it_again(
    start_node: Callable[..., Node], ct_series_dir: Path
) -> None:
    node = start_node()
    path = next(ct_series_dir.glob("*.dcm"))
    assert _raw_store(node, path) == 0
    stored = node.index.find_instance(pydicom.dcmread(path).SOPInstanceUID)
    whole = node.filestore.path(stored.path).read_bytes()
    node.filestore.path(stored.path).write_bytes(whole[:100])  # cut short
    assert _raw_store(node, path) == 0
    assert node.filestore.path(stored.path).read_bytes() == whole
    node.filestore.path(stored.path).unlink()  # lost
    assert _raw_store(node, path) == 0
    assert node.filestore.path(stored.path).read_bytes() == whole
    assert node.index.counts()["instances"] == 1
    assert not list((node.settings.data_dir / "conflicts").iterdir())  # not a conflict


def _open_association(node: Node) -> object:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    return assoc


def _job(node: Node) -> dict:
    (row,) = node.index.series_status()
    return row


def test_completion_by_quiet_period_while_associated(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(series={"quiet_seconds": 30, "min_slices": 4})
    files = write_ct_series(tmp_path / "ct", slices=4, size=32)
    assoc = _open_association(node)
    for path in files:
        assert assoc.send_c_store(path).Status == 0
    assert node.assembler.check(now=utcnow() + timedelta(seconds=29)) == 0
    assert _job(node)["state"] == JobState.COLLECTING
    assert node.assembler.check(now=utcnow() + timedelta(seconds=31)) == 1
    row = _job(node)
    assert (row["state"], row["completion_rule"]) == (JobState.QUEUED, CompletionRule.QUIET)
    assoc.release()


def test_completion_by_release_and_late_instance_reopens(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = start_node(series={"release_grace_seconds": 2, "min_slices": 4})
    files = write_ct_series(tmp_path / "ct", slices=5, size=32)
    assoc = _open_association(node)
    for path in files[:4]:
        assert assoc.send_c_store(path).Status == 0
    assert node.assembler.check(now=utcnow() + timedelta(seconds=5)) == 0  # still associated
    assoc.release()
    assert node.assembler.check(now=utcnow() + timedelta(seconds=1)) == 0  # within the grace
    assert _completes_after_release(node, grace_s=2)
    row = _job(node)
    assert (row["state"], row["completion_rule"]) == (JobState.QUEUED, CompletionRule.RELEASE)
    assert send(files[4:], peer_of(node)).sent == 1  # a late instance
    row = _job(node)
    assert (row["state"], row["reopen_count"], row["instances"]) == (JobState.COLLECTING, 1, 5)
    assert _completes_after_release(node, grace_s=2)
    assert _job(node)["state"] == JobState.QUEUED


def _completes_after_release(node: Node, grace_s: float) -> bool:
    """The SCP records a release in its own thread, just after the SCU sees it: poll."""
    for _ in range(50):
        if node.assembler.check(now=utcnow() + timedelta(seconds=grace_s + 1)) == 1:
            return True
        time.sleep(0.05)
    return False


def test_stored_file_is_byte_identical_to_what_was_sent(
    start_node: Callable[..., Node], ct_series_dir: Path
) -> None:
    node = start_node()
    path = next(ct_series_dir.glob("*.dcm"))
    assert send([path], peer_of(node)).sent == 1
    sent = pydicom.dcmread(path)
    stored = node.index.find_instance(sent.SOPInstanceUID)
    dataset_bytes = node.filestore.path(stored.path).read_bytes()
    assert hashlib.sha256(dataset_bytes[-len(sent.PixelData):]).digest() == hashlib.sha256(
        sent.PixelData).digest()
    assert not list((node.settings.data_dir / "tmp").iterdir())


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom's, on purpose here
def test_malformed_optional_values_are_stored_and_indexed_as_absent(
    start_node: Callable[..., Node], ct_series_dir: Path, tmp_path: Path
) -> None:
    """A value that does not convert costs the index that value, never the instance."""
    node = start_node()
    ds = pydicom.dcmread(next(ct_series_dir.glob("*.dcm")))
    # as a sender with a bug would encode them (pydicom refuses to set such values)
    ds[0x00200037] = RawDataElement(Tag(0x00200037), "DS", 16, b"1\\0\\zero\\0\\1\\0 ",
                                    0, False, True)
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 6, b"seven ", 0, False, True)
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    assert _raw_store(node, tmp_path / "odd.dcm") == 0
    stored = node.index.find_instance(ds.SOPInstanceUID)
    assert stored is not None
    assert node.filestore.path(stored.path).read_bytes().endswith(ds.PixelData)
    record = instance_record(pydicom.dcmread(tmp_path / "odd.dcm"), "1.2.840.10008.1.2.1", "X")
    assert record.image_orientation == () and record.instance_number is None


@pytest.mark.parametrize("encoding", ["explicit_le", "implicit_le", "big_endian", "deflated",
                                      "jpeg_lossless_sv1"])
def test_the_header_read_of_a_c_store_indexes_what_pydicom_reads(
    ct_series_dir: Path, tmp_path: Path, encoding: str
) -> None:
    """`read_header` reads the data set after the file meta, in the context's transfer
    syntax, and stops before the image; the indexed values are read from the raw bytes
    (default-repertoire VRs) or decoded in the character set (names, descriptions). Both
    must give what pydicom's full read gives."""
    how, syntax = ((["dcmconv", "+tb"], "1.2.840.10008.1.2.2") if encoding == "big_endian"
                   else ENCODINGS[encoding][:2])
    ds = pydicom.dcmread(next(ct_series_dir.glob("*.dcm")))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Jörg"
    ds.StudyDescription = "Thorax – Lunge"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "2.5 "
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    encode(plain, tmp_path / "sent.dcm", how)
    sent = (tmp_path / "sent.dcm").read_bytes()
    full = pydicom.dcmread(tmp_path / "sent.dcm")
    assert full.file_meta.TransferSyntaxUID == syntax
    header = read_header(sent, syntax)
    assert "PixelData" not in header
    assert isinstance(header, pydicom.FileDataset) == (encoding == "deflated")  # dcmread
    record = instance_record(header, syntax, "SENDER")
    assert record == instance_record(full, syntax, "SENDER")
    assert (record.patient_name, record.study_description) == ("Müller^Jörg", "Thorax – Lunge")
    assert (record.sop_instance_uid, record.series_instance_uid, record.modality) == (
        full.SOPInstanceUID, full.SeriesInstanceUID, full.Modality)
    assert record.image_type == tuple(full.ImageType)
    assert record.image_orientation == tuple(float(v) for v in full.ImageOrientationPatient)
    assert record.slice_thickness_mm == 2.5
    assert (record.instance_number, record.series_number) == (
        full.InstanceNumber, full.SeriesNumber)
    assert (record.study_date, record.patient_id) == (full.StudyDate, full.PatientID)


def test_a_single_valued_image_type_is_one_value_not_its_letters(ct_series_dir: Path) -> None:
    """ImageType "DERIVED" alone (non-conformant, but sent): the rules' "DERIVED" exclusion
    must see it."""
    ds = pydicom.dcmread(next(ct_series_dir.glob("*.dcm")))
    ds.ImageType = "DERIVED"
    assert instance_record(ds, "1.2.840.10008.1.2.1", "X").image_type == ("DERIVED",)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert instance_record(ds, "1.2.840.10008.1.2.1", "X").image_type == (
        "ORIGINAL", "PRIMARY", "AXIAL")


def test_the_nodes_own_output_coming_back_is_stored_and_never_analysed(
    start_node: Callable[..., Node], ct_series_dir: Path, tmp_path: Path
) -> None:
    """A PACS that forwards everything sends the node its key images back, to a node
    whose index does not know them (rebuilt), with OT among the analysed modalities."""
    node = start_node(series={"modalities": ["CT", "OT"], "image_type_excludes": [],
                              "min_slices": 1})
    ds = pydicom.dcmread(next(ct_series_dir.glob("*.dcm")))
    ds.Manufacturer, ds.Modality = "dicomnode", "OT"
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.save_as(tmp_path / "key.dcm", enforce_file_format=True)
    assert _raw_store(node, tmp_path / "key.dcm") == 0
    [row] = [r for r in node.index.series_status()
             if r["series_instance_uid"] == ds.SeriesInstanceUID]
    assert row["state"] == "skipped" and row["reason"] == OWN_OUTPUT
    # `dicomnode status` lists and counts them apart (--all shows them)
    assert all(r["series_instance_uid"] != ds.SeriesInstanceUID
               for r in node.index.series_status(own_outputs=False))
    counts = node.index.counts()
    assert counts["own_output_series"] == 1 and not counts.get("jobs_skipped")
    assert counts_line(counts).endswith("jobs: own outputs 1")


def test_later_instances_of_a_series_take_its_series_attributes(ct_series_dir: Path) -> None:
    """Patient, study and series attributes are those of the series' first record (what the
    index keeps); instance attributes and the placing UIDs are always read."""
    first_path, second_path = sorted(ct_series_dir.glob("*.dcm"))[:2]
    first = instance_record(pydicom.dcmread(first_path), "1.2.840.10008.1.2.1", "A")
    second_ds = pydicom.dcmread(second_path)
    second_ds.PatientName = "Changed^Name"
    second_ds.SeriesDescription = "changed"
    second = instance_record(second_ds, "1.2.840.10008.1.2", "B", same_series=first)
    assert (second.patient_name, second.series_description) == (
        first.patient_name, first.series_description)
    assert second.sop_instance_uid == second_ds.SOPInstanceUID != first.sop_instance_uid
    assert second.instance_number == second_ds.InstanceNumber != first.instance_number
    assert (second.transfer_syntax_uid, second.calling_aet) == ("1.2.840.10008.1.2", "B")
    read_whole = instance_record(second_ds, "1.2.840.10008.1.2", "B")
    assert second == replace(read_whole, patient_name=first.patient_name,
                             series_description=first.series_description)
    second_ds.SeriesInstanceUID = generate_uid()  # another series: everything read again
    other = instance_record(second_ds, "1.2.840.10008.1.2", "B", same_series=first)
    assert (other.patient_name, other.series_description) == ("Changed^Name", "changed")


def test_running_out_of_memory_is_out_of_resources(start_node: Callable[..., Node]) -> None:
    """A passing shortage (other large instances in flight): the sender may try again,
    where pynetdicom's answer to an exception in the handler (0xC211) says it may not."""
    node = start_node()

    def too_large() -> bytes:
        raise MemoryError

    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="BIGSCU"))
    event = SimpleNamespace(assoc=assoc, encoded_dataset=too_large,
                            context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"))
    assert node.scp._on_store(event) == STATUS_OUT_OF_RESOURCES


def test_a_c_store_racing_an_abort_is_stored_and_leaves_no_association_record(
    start_node: Callable[..., Node], ct_series_dir: Path
) -> None:
    """The end events come from the connection's thread: an abort can be handled while a
    C-STORE of the same association is still being parsed. The instance is stored, and
    no record of the ended association is left for a later one with the same id()."""
    node = start_node()
    path = sorted(ct_series_dir.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="RACER"))
    event = SimpleNamespace(assoc=assoc, encoded_dataset=path.read_bytes,  # Part 10, as sent
                            context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"))
    node.scp._on_accepted(event)
    node.scp._on_ended(event)  # the abort, handled first
    assert node.scp._on_store(event) == 0x0000
    assert node.index.find_instance(ds.SOPInstanceUID) is not None
    assert id(assoc) not in node.scp._assoc_series


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                                  "image_dfl.dcm"])
def test_a_file_cut_short_is_told_from_a_complete_one(name: str) -> None:
    """Restart reconciliation indexes complete files only; pydicom itself reads a cut
    file without an error (native or encapsulated pixel data). A deflated one, whose
    element offsets count in the inflated stream, was set aside though complete."""
    data = Path(get_testdata_file(name)).read_bytes()
    assert read_complete_file(data).SOPInstanceUID
    size = len(data)
    for cut in (size // 2, size - 4096, size - 600, size - 100, size - 131, size - 7, 1000):
        if name == "image_dfl.dcm" and cut > size - 10:
            continue  # this file's last 8 bytes (a zlib trailer) hold none of its data
        with pytest.raises(ValueError):
            read_complete_file(data[:cut])


def test_stop_aborts_an_association_left_open_after_the_drain(
    start_node: Callable[..., Node],
) -> None:
    """Stopping closes the port at once, lets open associations finish for a while,
    then aborts them: nothing is stored after the node records its clean stop."""
    node = start_node()
    ae = AE(ae_title="SLOWSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOMNODE")
    assert assoc.is_established
    started = time.monotonic()
    node.scp.stop(drain_seconds=0.5)
    assert time.monotonic() - started < 5
    assoc.join(timeout=5)
    assert assoc.is_aborted
    assert node.scp.ae.active_associations == []


def test_a_series_sent_localizer_first_in_one_association_is_described_by_its_slices(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The later instances of an association take their series' attributes from the
    first one's record, but never its ImageType, orientation or thickness."""
    node = start_node(series={"min_slices": 4})
    files = write_ct_series(tmp_path / "ct", slices=4, size=32)
    localizer = pydicom.dcmread(files[0])
    localizer.SOPInstanceUID = generate_uid()
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    localizer.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    localizer.SliceThickness = 200
    localizer.save_as(tmp_path / "localizer.dcm", enforce_file_format=True)
    assoc = _open_association(node)
    for path in [tmp_path / "localizer.dcm", *files]:
        assert assoc.send_c_store(path).Status == 0
    assoc.release()
    assert _completes_after_release(node, grace_s=node.settings.series.release_grace_seconds)
    row = _job(node)
    assert row["state"] == JobState.QUEUED, row["reason"]


def test_an_association_that_only_re_sends_stored_instances_signals_no_release(
    start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """Another association is still sending the series: a re-send of one of its stored
    instances, then a release, must not cut the series' wait short."""
    node = start_node(series={"release_grace_seconds": 2, "min_slices": 4})
    files = write_ct_series(tmp_path / "ct", slices=5, size=32)
    sending = _open_association(node)
    for path in files[:4]:
        assert sending.send_c_store(path).Status == 0
    assert send(files[:1], peer_of(node)).sent == 1  # a duplicate, then released
    time.sleep(0.3)  # the SCP records a release in its own thread
    assert node.assembler.check(now=utcnow() + timedelta(seconds=5)) == 0
    assert _job(node)["state"] == JobState.COLLECTING
    sending.release()
    assert _completes_after_release(node, grace_s=2)


def test_the_receiving_process_does_not_load_torch_or_highdicom() -> None:
    """The Storage SCP's process stays small (docs/benchmarks.md: ingest peak RSS): the
    model and the output encoders run in the AI workers. highdicom alone added 20 MB
    and slowed every C-STORE (a larger heap for the garbage collector to walk)."""
    code = ("import sys; import dicomnode.service; "
            "print(sorted(m for m in ('torch', 'highdicom') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr

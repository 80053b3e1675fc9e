"""The node's DICOM face: a pynetdicom Application Entity serving C-ECHO and C-STORE.

C-STORE answers Success (0x0000) only after the instance is fsynced at its final path
and its Instance row is committed (DESIGN.md "Receive"). Any storage SOP class and any
transfer syntax pynetdicom knows is accepted; pixel data is stored as received and only
decoded when a volume is built. Status codes used (PS3.4 GG.4): 0xA700 out of
resources (disk below the watermark, write or index failure), 0xC000 cannot
understand (the dataset does not parse or lacks the UIDs that place it).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import ssl
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import ServiceUser
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import ConfigError, NodeConfig, Settings
from dicomnode.outputs import MANUFACTURER
from dicomnode.volume import string_values, value_text
from storage.filestore import FileStore, check_uid
from storage.index import InstanceRecord, StudyIndex

logger = logging.getLogger(__name__)

DRAIN_SECONDS = 10.0
"""How long a stop lets associations in progress finish before it aborts them."""

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
_REQUIRED_UIDS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")


_DEFAULT_REPERTOIRE_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
"""Value representations limited to the default character repertoire (PS3.5 6.2): their
bytes are their text in any character set."""


@functools.cache
def _in_default_repertoire(keyword: str) -> bool:
    return dictionary_VR(keyword) in _DEFAULT_REPERTOIRE_VRS


def _text(ds: Dataset, keyword: str) -> str:
    if _in_default_repertoire(keyword):
        return value_text(ds, keyword)
    value = ds.get(keyword, "")  # a name or description: decoded in its character set
    return "" if value is None else str(value).strip()


def _number(ds: Dataset, keyword: str, kind: type[int] | type[float]) -> Any:
    """A DS or IS value; None when absent or not a finite number (an IS must be whole)."""
    try:
        number = float(value_text(ds, keyword))
    except ValueError:
        return None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        return None
    return kind(number)


def is_own_output(ds: Dataset) -> bool:
    """An object this node made (SEG, SR, key images, PDF), coming back: a PACS that
    forwards everything, or a copy restored after the index was rebuilt. It is stored
    and never analysed."""
    return _text(ds, "Modality") != "CT" and _text(ds, "Manufacturer") == MANUFACTURER


def placing_uids(ds: Dataset) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs that place an instance in the store; raises
    ValueError when any of them, or the SOP Class UID, is missing."""
    uids = {keyword: _text(ds, keyword) for keyword in _REQUIRED_UIDS}
    missing = [keyword for keyword, uid in uids.items() if not uid]
    if missing:
        raise ValueError(f"dataset lacks {', '.join(missing)}")
    check_uid("SOPClassUID", uids["SOPClassUID"])  # the others are checked as path parts
    return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]


def _numbers(ds: Dataset, keyword: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in string_values(ds, keyword))
    except ValueError:
        return ()


def instance_record(
    ds: Dataset,
    transfer_syntax_uid: str,
    calling_aet: str,
    same_series: InstanceRecord | None = None,
) -> InstanceRecord:
    """The indexed attributes of a dataset; raises ValueError if a placing UID is missing.
    Malformed optional values are indexed as absent (the file keeps them as sent).

    `same_series`: the record of an earlier instance; when it is of the same study and
    series, its patient, study and series attributes are taken rather than read again
    (the index keeps a series' first instance's anyway), which halves the work per
    C-STORE of a series. ImageType, orientation and thickness are always read: a series
    that starts with its localizer is described by its first slice after it.
    """
    study_instance_uid, series_instance_uid, sop_instance_uid = placing_uids(ds)
    if (
        same_series is not None
        and same_series.series_instance_uid == series_instance_uid
        and same_series.study_instance_uid == study_instance_uid
    ):
        return replace(
            same_series,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=_text(ds, "SOPClassUID"),
            transfer_syntax_uid=transfer_syntax_uid,
            image_type=string_values(ds, "ImageType"),
            image_orientation=_numbers(ds, "ImageOrientationPatient"),
            slice_thickness_mm=_number(ds, "SliceThickness", float),
            instance_number=_number(ds, "InstanceNumber", int),
            calling_aet=calling_aet,
        )
    return InstanceRecord(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=_text(ds, "SOPClassUID"),
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        modality=_text(ds, "Modality"),
        series_number=_number(ds, "SeriesNumber", int),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        image_type=string_values(ds, "ImageType"),
        image_orientation=_numbers(ds, "ImageOrientationPatient"),
        slice_thickness_mm=_number(ds, "SliceThickness", float),
        instance_number=_number(ds, "InstanceNumber", int),
        calling_aet=calling_aet,
    )


_LAST_INDEXED_TAG = 0x00200037
"""Image Orientation (Patient): the highest tag `instance_record` and `is_own_output` read."""
_META_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
"""(0002,0000) UL, length 4: the first element of the file meta, in explicit VR LE."""


def read_header(encoded: bytes, transfer_syntax_uid: str) -> Dataset:
    """The data set's elements up to `_LAST_INDEXED_TAG`, unconverted (pydicom converts an
    element when it is read), from a C-STORE's Part 10 bytes.

    pynetdicom starts those bytes with a file meta group it made from the presentation
    context, whose group length says where the data set begins: the data set is read
    from there in the context's transfer syntax, and stops before the image. Deflated
    data sets, and bytes without that group length, go through `dcmread`.
    """
    encoding = _dataset_encoding(transfer_syntax_uid)
    if encoding and encoded[128:132] == b"DICM" and encoded[132:140] == _META_GROUP_LENGTH:
        stream = io.BytesIO(encoded)
        stream.seek(144 + int.from_bytes(encoded[140:144], "little"))
        return read_dataset(stream, *encoding,
                            stop_when=lambda tag, vr, length: tag > _LAST_INDEXED_TAG)
    return dcmread(io.BytesIO(encoded), stop_before_pixels=True)


@functools.cache
def _dataset_encoding(transfer_syntax_uid: str) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a transfer syntax pydicom knows; None for deflate,
    whose data set must be inflated first, and for private ones."""
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return None
    return syntax.is_implicit_VR, syntax.is_little_endian


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tls_server_context(config: NodeConfig, base_dir: Path) -> ssl.SSLContext:
    """Server-side TLS; with a CA bundle configured, callers must present a certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(base_dir / config.tls_cert, base_dir / config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls_cert / node.tls_key: cannot load {config.tls_cert} with"
                          f" {config.tls_key}: {exc}") from None
    if config.tls_ca:
        try:
            context.load_verify_locations(base_dir / config.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"node.tls_ca = {config.tls_ca!r}: cannot load: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def same_data_set(stored: bytes, received: bytes) -> bool:
    """Whether two stored instances (file meta and data set) hold the same data set in
    any transfer syntax: a PACS that sends a study again compressed, or in implicit VR,
    sends nothing new, and must not fill conflicts/ with a copy of each instance. Pixel
    data compare decoded (a lossy encoding differs), everything else element by element.
    Only called when the bytes differ, so it may be slow."""
    try:
        first, second = (dcmread(io.BytesIO(data), force=True) for data in (stored, received))
        if ("PixelData" in first) != ("PixelData" in second):
            return False
        if "PixelData" in first:
            if not np.array_equal(first.pixel_array, second.pixel_array):
                return False
            del first.PixelData, second.PixelData
        return first == second
    except Exception:  # undecodable pixels, a broken file: not provably the same
        return False


def peer_address(host: str) -> IPv4Address | IPv6Address | None:
    """The peer's address as the socket gives it, an IPv4 one seen through a dual-stack
    socket (::ffff:10.1.2.3) as itself; None if it is not an IP address."""
    try:
        address = ip_address(host.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def peer_allowed(host: str, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether `host` lies in one of `networks` (`NodeConfig.peer_networks`)."""
    address = peer_address(host)
    return address is not None and any(address in network for network in networks)


class _PeerFilteringServer(ThreadedAssociationServer):
    """Closes a connection from a host outside `[node] allowed_peers` as it is accepted,
    before any DICOM is read from it and before a TLS handshake (done here, in the one
    accepting thread: a refused host must not hold it up)."""

    allowed_peers: Sequence[IPv4Network | IPv6Network] = ()

    @staticmethod
    def _host(client_address: Any) -> str:
        return str(client_address[0] if isinstance(client_address, tuple) else client_address)

    def _refused(self, client_address: Any) -> bool:
        host = self._host(client_address)
        return bool(self.allowed_peers) and not peer_allowed(host, self.allowed_peers)

    def get_request(self) -> tuple[Any, Any]:
        if not self.ssl_context:
            return super().get_request()
        assert self.socket is not None
        client, address = self.socket.accept()
        if self._refused(address):
            return client, address  # unwrapped: `verify_request` closes it
        # The handshake happens on the association's first read, in its own thread: done
        # here, in the one accepting thread, a client that connects and says nothing held
        # up every other association for the network timeout.
        client.settimeout(self.ae.network_timeout)
        return (self.ssl_context.wrap_socket(client, server_side=True,
                                             do_handshake_on_connect=False), address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self._refused(client_address):
            return True
        host = self._host(client_address)
        logger.warning("connection from %s refused: not in [node] allowed_peers",
                       peer_address(host) or host)
        return False


class _NodeAE(AE):
    """pynetdicom's AE whose servers filter their peers by address."""

    allowed_peers: Sequence[IPv4Network | IPv6Network] = ()

    def make_server(self, address: Any, **kwargs: Any) -> ThreadedAssociationServer:
        server = super().make_server(address, **(kwargs | {"server_class": _PeerFilteringServer}))
        server.allowed_peers = self.allowed_peers  # before its thread accepts anything
        return server


class StorageSCP:
    """Receives instances into the file store and the index."""

    def __init__(self, settings: Settings, index: StudyIndex, filestore: FileStore) -> None:
        self.settings = settings
        self.index = index
        self.filestore = filestore
        self.min_free_bytes = settings.storage.min_free_disk_mb * 1024 * 1024
        self._uid_locks = [threading.Lock() for _ in range(64)]
        # Per open association (from EVT_ACCEPTED to its end), the latest record of each
        # series it sent and when it was stored: the series to signal on release, and the
        # attributes its next instances share.
        self._assoc_series: dict[int, dict[str, tuple[InstanceRecord, datetime | None]]] = {}
        self._assoc_lock = threading.Lock()
        self.ae = self._make_ae(settings.node)
        self._server: ThreadedAssociationServer | None = None
        # hashlib releases the GIL: each C-STORE's digest is made here while its file is
        # written and fsynced (0.4 ms of 512 KB, in parallel with about 1 ms of I/O).
        self._hasher = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                          thread_name_prefix="sha256")

    def _make_ae(self, config: NodeConfig) -> AE:
        ae = _NodeAE(ae_title=config.ae_title)
        ae.allowed_peers = config.peer_networks()
        ae.maximum_associations = config.max_associations
        ae.require_calling_aet = list(config.allowed_calling_aets)
        ae.require_called_aet = config.check_called_aet
        ae.acse_timeout = config.acse_timeout_s
        ae.dimse_timeout = config.dimse_timeout_s
        ae.network_timeout = config.network_timeout_s
        ae.maximum_pdu_size = config.max_pdu_bytes
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful when the configured port is 0)."""
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        node = self.settings.node
        context = tls_server_context(node, self.settings.base_dir) if node.tls_enabled else None
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = self.ae.start_server(
            (node.host, node.port), block=False, evt_handlers=handlers, ssl_context=context
        )
        logger.info("storage SCP %s listening on %s:%d%s", node.ae_title, node.host, self.port,
                    " (TLS)" if context else "")
        if not node.allowed_peers and not node.allowed_calling_aets:
            logger.warning("any host that reaches port %d may store to this node: set [node]"
                           " allowed_peers (addresses) and allowed_calling_aets", self.port)

    def stop(self, drain_seconds: float = DRAIN_SECONDS) -> None:
        """Stop listening, give the associations in progress `drain_seconds` to finish,
        then abort the rest (their senders keep what was not acknowledged and send it
        again): nothing is stored after the node's stop is recorded."""
        if self._server is not None:
            self._server.shutdown()  # closes the listening socket only
            self._server = None
        deadline = time.monotonic() + drain_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        remaining = self.ae.active_associations
        if remaining:
            logger.warning("stopping: %d association(s) still open after %.0f s: aborted",
                           len(remaining), drain_seconds)
        for assoc in remaining:
            assoc.abort()
        for assoc in remaining:
            assoc.join(timeout=5)
        self._hasher.shutdown()

    # -- event handlers ------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        calling_aet = event.assoc.requestor.ae_title
        free = self.filestore.free_bytes()
        try:
            encoded = event.encoded_dataset()
        except MemoryError:  # a passing shortage (other large instances in flight)
            logger.error("C-STORE from %s refused: out of memory", calling_aet)
            return STATUS_OUT_OF_RESOURCES
        if free - len(encoded) < self.min_free_bytes:  # this instance may not eat the reserve
            reason = (f"free disk {free // 2**20} MB (less this instance's"
                      f" {len(encoded) / 2**20:.1f} MB) below min_free_disk_mb"
                      f" ({self.settings.storage.min_free_disk_mb} MB)")
            logger.error("C-STORE from %s refused: %s", calling_aet, reason)
            self._record_refused(encoded, event.context.transfer_syntax, calling_aet, reason)
            return STATUS_OUT_OF_RESOURCES
        try:
            header = read_header(encoded, event.context.transfer_syntax)
            study_uid, series_uid, sop_uid = placing_uids(header)
            relpath = self.filestore.instance_relpath(study_uid, series_uid, sop_uid)
        except Exception as exc:
            return self._reject(encoded, calling_aet, exc)
        with self._assoc_lock:  # none: ended while this C-STORE was on its way (abort)
            sent = self._assoc_series.get(id(event.assoc), {})
        earlier = sent.get(series_uid)
        lock = self._uid_locks[hash(sop_uid) % len(self._uid_locks)]
        try:
            with lock:
                record, indexed_at = self._store(
                    encoded, header, event.context.transfer_syntax, calling_aet, relpath,
                    earlier[0] if earlier else None)
        except Exception as exc:
            if isinstance(exc, OSError):  # a full or failing disk: the cause, no traceback
                logger.error("C-STORE of %s from %s not stored: %s", sop_uid, calling_aet, exc)
            else:
                logger.exception("C-STORE of %s failed to persist", sop_uid)
            self._record_refused(encoded, event.context.transfer_syntax, calling_aet,
                                 f"not stored: {exc}")
            return STATUS_OUT_OF_RESOURCES
        # The index's own receive time of the association's latest new instance of the
        # series (None: it only re-sent stored ones): a release marks the series only if
        # it indexed some and no other association indexed one after them. One
        # association's C-STOREs come one at a time.
        sent[series_uid] = (record, indexed_at or (earlier[1] if earlier else None))
        return STATUS_SUCCESS

    def _record_refused(self, encoded: bytes, transfer_syntax_uid: str, calling_aet: str,
                        reason: str) -> None:
        """Note a refused instance in the index, so that its series waits for it to be sent
        again instead of being analysed without it. Best effort: a full disk may refuse
        the note too (logged; the sender still has the refusal)."""
        try:
            study_uid, series_uid, sop_uid = placing_uids(read_header(encoded, transfer_syntax_uid))
            self.filestore.instance_relpath(study_uid, series_uid, sop_uid)
        except Exception:  # an instance the node could not store anyway (0xC000 when sent
            return  # again): its series must not wait for it
        try:
            self.index.record_refused(series_uid, sop_uid, calling_aet, reason)
        except Exception as exc:
            logger.error("the refusal could not be noted in the index (%s): its series may"
                         " be analysed without the refused instance", exc)

    def _store(self, encoded: bytes, header: Dataset, transfer_syntax_uid: str,
               calling_aet: str, relpath: str, same_series: InstanceRecord | None
               ) -> tuple[InstanceRecord, datetime | None]:
        """New instance: exclusive create (the file system says whether the path is
        taken), then the row. Anything else takes `_store_again`. Returns the instance's
        index record and the index's receive time (None when nothing new was indexed)."""
        hashing = self._hasher.submit(_sha256, encoded)
        record = instance_record(header, transfer_syntax_uid, calling_aet, same_series)
        own = is_own_output(header)
        try:
            size = self.filestore.create(relpath, encoded)
        except FileExistsError:
            return record, self._store_again(encoded, record, relpath, hashing.result(), own)
        digest = hashing.result()
        indexed_at = self.index.add_instance(record, relpath, size, digest, node_output=own)
        if indexed_at is None:
            known = self.index.find_instance(record.sop_instance_uid)
            if known is not None and known.path == relpath and known.sha256 == digest:
                logger.warning("%s re-sent after its stored file was lost: written again",
                               record.sop_instance_uid)
            else:  # indexed under another study or series: keep the first
                # the file only: its folder may be taking another instance of the series
                self.filestore.path(relpath).unlink(missing_ok=True)
                self._keep_conflict(record, encoded)
        return record, indexed_at

    def _store_again(
        self, encoded: bytes, record: InstanceRecord, relpath: str, digest: str, own: bool
    ) -> datetime | None:
        """The instance's path exists: an identical re-send (success, nothing new; a
        stored file that was damaged since is written again), a conflicting one (the
        first is kept, the second set aside), or a file no row points to (left by a
        crash before indexing: replaced and indexed; its receive time is returned)."""
        known = self.index.find_instance(record.sop_instance_uid)
        if known is None:
            size = self.filestore.write(relpath, encoded)
            return self.index.add_instance(record, relpath, size, digest, node_output=own)
        if known.sha256 == digest and self.filestore.size(known.path) != known.size_bytes:
            logger.warning("%s re-sent over a damaged stored file: written again",
                           record.sop_instance_uid)
            self.filestore.write(known.path, encoded)  # temp file, then rename: never cut
        elif known.sha256 == digest:
            logger.debug("duplicate of %s ignored (identical)", record.sop_instance_uid)
        elif same_data_set(self.filestore.read(known.path), encoded):
            logger.debug("duplicate of %s ignored (the same data set in transfer syntax %s)",
                         record.sop_instance_uid, record.transfer_syntax_uid)
        else:
            self._keep_conflict(record, encoded)

    def _keep_conflict(self, record: InstanceRecord, encoded: bytes) -> None:
        """The first copy stays; the other is kept aside once (a retrying sender's copies
        are one)."""
        aside, new = self.filestore.keep_aside("conflicts", record.sop_instance_uid, encoded)
        if new:
            logger.warning("conflict: %s re-sent by %s with different content; kept the"
                           " first, stored the second as %s", record.sop_instance_uid,
                           record.calling_aet, aside)
        else:
            logger.info("conflict: %s re-sent by %s again as %s", record.sop_instance_uid,
                        record.calling_aet, aside)

    def _reject(self, encoded: bytes, calling_aet: str, exc: Exception) -> int:
        try:
            aside, new = self.filestore.keep_aside("rejected", "unparsed", encoded)
            kept = f"kept as {aside}" if new else f"the same bytes as {aside}, rejected before"
        except Exception as write_exc:  # keep serving even if the evidence cannot be kept
            kept = f"not kept ({write_exc})"
        logger.error("C-STORE from %s rejected with 0xC000: %s (dataset %s)",
                     calling_aet, exc, kept)
        return STATUS_CANNOT_UNDERSTAND

    def _on_accepted(self, event: evt.Event) -> None:
        """Open the association's record here, not at its first C-STORE: a C-STORE that
        races an abort (the end events come from the connection's thread) then cannot
        re-create a record that nothing would remove, and that a later association
        given the same `id()` would inherit."""
        with self._assoc_lock:
            self._assoc_series[id(event.assoc)] = {}

    def _on_released(self, event: evt.Event) -> None:
        with self._assoc_lock:
            sent = self._assoc_series.pop(id(event.assoc), {})
        series = {uid: stored_at for uid, (_, stored_at) in sent.items() if stored_at}
        self.index.mark_released(series)
        if series:
            logger.info("association from %s released after sending %d series",
                        event.assoc.requestor.ae_title, len(series))

    def _on_rejected(self, event: evt.Event) -> None:
        """A refused association leaves a trace: who asked, from where, and why (pynetdicom
        says only "Rejecting Association", at INFO, below the node's level for it)."""
        requestor, answer = event.assoc.requestor, event.assoc.acceptor.primitive
        called = getattr(requestor.primitive, "called_ae_title", "?")
        why = (f"{answer.result_str}, {answer.reason_str}" if answer is not None
               else "rejected")
        logger.warning("association from %s at %s (called AE %s) rejected: %s",
                       requestor.ae_title, _endpoint(requestor), called, why)

    def _on_ended(self, event: evt.Event) -> None:
        """Aborted or dropped: the sender may not be done, so no release signal."""
        with self._assoc_lock:
            self._assoc_series.pop(id(event.assoc), None)


def _endpoint(user: ServiceUser) -> str:
    """The peer's IP address and port, for the log ("?" when not known)."""
    info = user.address_info
    return f"{info.address}:{info.port}" if info is not None else "?"


_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_complete_file(data: bytes) -> Dataset:
    """Parse a whole Part 10 file; raise ValueError if it ends early (a write cut short).

    pydicom reads a truncated file without an error: an element shorter than its length
    keeps what there is, an element header cut in two ends the data set quietly, and a
    missing encapsulated-pixel delimiter is only a warning. So: every element read raw
    must hold its length, the last one must end where the file ends, and an image must
    have its pixel data. A cut exactly between two elements is not detectable, except
    before the pixel data of an image.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = dcmread(io.BytesIO(data))
        except Exception as exc:  # pydicom raises struct errors, EOFError, ... on cut files
            raise ValueError(f"does not parse: {type(exc).__name__}: {exc}") from exc
    for warning in caught:
        if "End of file" in str(warning.message):
            raise ValueError(f"the file ends early ({warning.message})")
    end: int | None = None
    for tag in sorted(ds.keys()):  # not `in ds`: that decodes every element
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement):  # already decoded by the reader
            end = None
            continue
        size = len(raw.value or b"")
        if raw.length != _UNDEFINED_LENGTH and size < raw.length:
            raise ValueError(f"element {tag} holds {size} of its {raw.length} bytes")
        # an undefined length's value excludes its 8-byte sequence delimiter
        end = raw.value_tell + (size + 8 if raw.length == _UNDEFINED_LENGTH else raw.length)
    # a deflated data set's offsets count in the inflated stream, not in the file: there
    # each element must hold its length, and the stream must inflate (above)
    deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    if end is not None and end != len(data) and not deflated:
        raise ValueError(f"{len(data) - end} bytes after the last complete element")
    sop_class = ds.get("SOPClassUID")
    is_image = sop_class is not None and UID(str(sop_class)).name.endswith("Image Storage")
    if is_image and not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise ValueError("an image without pixel data")
    return ds


def reconcile_store(filestore: FileStore, index: StudyIndex) -> tuple[int, int]:
    """After an unclean shutdown: index instance files the index lost, set broken ones aside.

    A file in the instance tree without an index row was either acknowledged and then
    lost from the index by a power loss (it is complete: index it), or cut short by the
    crash before its acknowledgement (it ends early, `read_complete_file`: move it to
    rejected/, so that the sender's re-send is stored as new, not as a conflict).
    Returns (re-indexed, set aside).
    """
    indexed = index.indexed_paths()
    recovered = broken = 0
    for relpath in filestore.instance_files():
        if relpath in indexed:
            continue
        data = filestore.read(relpath)
        try:
            ds = read_complete_file(data)
            record = instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "")
            if record.sop_instance_uid != Path(relpath).stem:
                raise ValueError("file name and SOP Instance UID differ")
        except Exception as exc:  # any parse failure means a partial write
            aside = filestore.set_aside(relpath)
            logger.warning("unindexed partial file %s set aside as %s (%s)", relpath, aside, exc)
            broken += 1
            continue
        index.add_instance(record, relpath, len(data), _sha256(data),
                           node_output=is_own_output(ds))
        recovered += 1
    if recovered or broken:
        logger.warning("reconciled the store after an unclean shutdown: %d instance(s) "
                       "re-indexed, %d partial file(s) set aside", recovered, broken)
    return recovered, broken

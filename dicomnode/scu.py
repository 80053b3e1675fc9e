"""Outgoing DICOM: C-ECHO and C-STORE as a Service Class User.

Files are sent as they are on disk (no decompression): each association proposes, for
every SOP class, exactly the transfer syntaxes of the files to send plus Explicit VR
Little Endian, staying under the 128 presentation contexts an association allows.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicomnode.config import ConfigError

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
UPLOAD_BYTES_PER_S = 1_000_000
"""The slowest link a C-STORE is given time for: a 300 MB SEG gets 300 s more to arrive."""
RETRYABLE_FAILURES = frozenset({0x0110, 0x0210, 0x0213})
"""C-STORE failures that may pass on a later try (PS3.7 C.4: processing failure,
duplicate invocation, resource limitation), besides 0xA7xx (out of resources). Every
other failure status says the peer refuses the data or the node itself (0xA9xx data set
does not match the SOP class, 0xCxxx cannot understand, 0x0122 SOP class not supported,
0x0124 not authorised, 0x0117 invalid instance ...): retrying resends the same refusal."""
DUPLICATE_SOP_INSTANCE = 0x0111
"""PS3.7 Annex C: the peer holds an instance of that SOP Instance UID already."""
_PEER = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+|\[[^\]]+\]):(?P<port>\d{1,5})$")


class PeerError(ValueError):
    """A peer given on the command line is not AET@HOST:PORT."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        match = _PEER.match(text)
        if not match or not 0 < int(match["port"]) < 65536:
            raise PeerError(f"{text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(match["aet"], match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class SendReport:
    """What happened to each file of a send."""

    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    permanent: bool = False
    """A failure that retrying will not fix: a permanent association rejection, a
    presentation context the peer does not accept, or a C-STORE failure status outside
    RETRYABLE_FAILURES."""
    transient: bool = False
    """A failure that a retry may fix (no response, an association lost or not made, a
    retryable status): a delivery with one is retried even when another file of it was
    refused for good, or that file's neighbours would be lost."""

    @property
    def ok(self) -> bool:
        return not self.failed


def client_tls_context(ca: Path | None, cert: Path | None, key: Path | None,
                       settings: str) -> ssl.SSLContext:
    """DICOM TLS towards a peer (PS3.15 B.1): its certificate verified against `ca` (the
    system's CAs when None) and its host name, TLS 1.2 or newer, with a client
    certificate when the peer requires one. Files that do not load raise a ConfigError
    naming the `settings` they came from."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(ca) if ca else None)
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{settings}: cannot load: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _associate(ae: AE, peer: Peer, tls: ssl.SSLContext | None) -> Association:
    return ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                        tls_args=(tls, peer.host) if tls is not None else None)


def echo(peer: Peer, calling_aet: str = "DICOMNODE", timeout_s: float = 10.0,
         tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO the peer; returns the DIMSE status, raises ConnectionError if unreachable."""
    ae = _scu_ae(calling_aet, timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer, tls)
    if not assoc.is_established:
        raise ConnectionError(_association_failure(assoc, peer, tls is not None)[0])
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status:
        raise ConnectionError(f"no C-ECHO response from {peer}")
    return int(status.Status)


def _scu_ae(calling_aet: str, timeout_s: float) -> AE:
    """An AE whose every wait is bounded by `timeout_s`, the TCP connect included (else
    a host whose firewall drops packets holds the caller for the OS's two minutes)."""
    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def store_outcome(code: int | None) -> tuple[bool, bool]:
    """(delivered, permanent) for a C-STORE response status; None: no response.

    Success and every warning (0x0001, 0x0107, 0x0116, 0xBxxx: stored, with coercion or
    elements discarded) are delivered (PS3.4 B.2.3, PS3.7 C.4), and so is 0x0111
    (Duplicate SOP Instance): the PACS holds that UID already, and an output's UIDs are
    its job's own (`Provenance.uid`), so it is this object, from an earlier attempt of a
    delivery retried as a whole."""
    if code is None:
        return False, False
    if code == DUPLICATE_SOP_INSTANCE:
        return True, False
    category = code_to_category(code)
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return True, False
    permanent = (category == STATUS_FAILURE and code >> 8 != 0xA7
                 and code not in RETRYABLE_FAILURES)
    return False, permanent


def dicom_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under the given files and directories, in a stable order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def _header(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def _contexts_for(pairs: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Presentation contexts for (SOP class, transfer syntax) pairs: the files' own syntaxes,
    plus the uncompressed little endian ones every SCP accepts."""
    classes = {sop_class for sop_class, _ in pairs}
    fallback = {(c, ts) for c in classes for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)}
    return sorted(pairs | fallback)


def _batches(files: list[tuple[Path, str, str]]) -> Iterator[list[tuple[Path, str, str]]]:
    """Split files so that no association needs more than MAX_CONTEXTS contexts."""
    batch: list[tuple[Path, str, str]] = []
    pairs: set[tuple[str, str]] = set()
    for path, sop_class, syntax in files:
        grown = pairs | {(sop_class, syntax)}
        if batch and len(_contexts_for(grown)) > MAX_CONTEXTS:
            yield batch
            batch, grown = [], {(sop_class, syntax)}
        batch.append((path, sop_class, syntax))
        pairs = grown
    if batch:
        yield batch


def send(
    paths: Iterable[Path], peer: Peer, calling_aet: str = "DICOMNODE", timeout_s: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE every DICOM file under paths to the peer; non-DICOM files are skipped."""
    report = SendReport()
    files: list[tuple[Path, str, str]] = []
    for path in dicom_files(paths):
        try:
            sop_class, syntax = _header(path)
        except (InvalidDicomError, AttributeError) as exc:
            report.skipped.append((path, f"not a DICOM file ({exc})"))
            continue
        except OSError as exc:
            report.skipped.append((path, f"cannot be read ({exc})"))
            continue
        files.append((path, sop_class, syntax))
    for batch in _batches(files):
        _send_batch(batch, peer, calling_aet, timeout_s, tls, report)
    return report


def _send_batch(
    batch: list[tuple[Path, str, str]], peer: Peer, calling_aet: str, timeout_s: float,
    tls: ssl.SSLContext | None, report: SendReport,
) -> None:
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream files from disk as they are
    ae = _scu_ae(calling_aet, timeout_s)
    for sop_class, syntax in _contexts_for({(c, ts) for _, c, ts in batch}):
        ae.add_requested_context(sop_class, syntax)
    assoc = _associate(ae, peer, tls)
    if not assoc.is_established:
        reason, permanent = _association_failure(assoc, peer, tls is not None)
        report.permanent |= permanent
        report.transient |= not permanent
        report.failed.extend((path, reason) for path, _, _ in batch)
        return
    # pynetdicom leaves the connected socket without a timeout: a peer that stops reading
    # would block a write, and with it this destination's sender, for good.
    assoc.dul.socket.socket.settimeout(timeout_s)
    try:
        for position, (path, sop_class, syntax) in enumerate(batch):
            # The response wait starts once the whole file is queued: give it the time a
            # slow link (1 MB/s) takes to carry the file, on top of the peer's own.
            assoc.dimse_timeout = timeout_s + path.stat().st_size / UPLOAD_BYTES_PER_S
            try:
                status = _store(assoc, path, syntax)
            except ValueError as exc:  # no accepted presentation context for this file
                report.permanent = True
                report.failed.append((path, f"{peer} accepts no context for {sop_class} in "
                                            f"{syntax}: {exc}"))
                continue
            except RuntimeError:  # the peer released or aborted the association meanwhile
                status = None
            code = int(status.Status) if status else None
            delivered, permanent = store_outcome(code)
            if delivered:
                report.sent += 1
                continue
            report.permanent |= permanent
            report.transient |= not permanent
            report.failed.append((path, "no response" if code is None else f"status 0x{code:04X}"))
            if not assoc.is_established:
                report.failed.extend((p, "association lost") for p, _, _ in batch[position + 1:])
                report.transient = True
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _store(assoc: Association, path: Path, syntax: str) -> Any:
    """C-STORE a file as it is on disk; when the peer took its SOP class only in another
    uncompressed syntax (Implicit VR Little Endian, the one every SCP must accept), the
    file is read and sent as a dataset, which pynetdicom re-encodes. Raises ValueError
    when no accepted context can carry it (a compressed file the peer will not take)."""
    try:
        return assoc.send_c_store(path)
    except ValueError:
        if UID(syntax).is_compressed:
            raise
        return assoc.send_c_store(dcmread(path))


def _association_failure(assoc: Association, peer: Peer, tls: bool) -> tuple[str, bool]:
    """Why an association was not made, and whether that is permanent (PS3.8 9.3.4).
    Over TLS a refused certificate or handshake looks like an unreachable peer here
    (pynetdicom logs the TLS error): the reason says so."""
    if assoc.is_aborted and assoc.rejected_contexts:
        # pynetdicom aborts an association on which the peer accepted no context at all:
        # the peer does not store these SOP classes, and will not on a retry.
        refused = sorted({UID(cx.abstract_syntax).name for cx in assoc.rejected_contexts})
        return f"{peer} accepts none of the SOP classes sent ({', '.join(refused)})", True
    if not assoc.is_rejected:
        why = "unreachable, aborted or timed out" + (
            "; or the TLS handshake failed: certificates, see the log" if tls else "")
        return f"could not associate with {peer} ({why})", False
    rsp = assoc.acceptor.primitive
    text = f"association rejected by {peer}: {rsp.result_str}, {rsp.source_str}, {rsp.reason_str}"
    return text, rsp.result == 0x01

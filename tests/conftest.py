"""Shared fixtures: small CT series on disk, nodes on free ports, dcmtk tools."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dicomnode.config import Settings, settings_from_mapping
from dicomnode.service import Node
from storage.index import CompletionRule, SeriesProgress, StudyIndex

REQUIRE_TOOLS = os.environ.get("DICOMNODE_REQUIRE_TOOLS") == "1"
"""CI sets this: a missing dcmtk or dicom3tools then fails the tests instead of skipping."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_tool(name: str) -> str:
    """Path of a dcmtk program; pynetdicom installs look-alike `storescu`/`echoscu` scripts,
    so each candidate on PATH is asked who made it."""
    candidates = [str(Path(d) / name) for d in os.environ.get("PATH", "").split(os.pathsep)]
    for candidate in [f"/usr/bin/{name}", *candidates]:
        if not os.access(candidate, os.X_OK):
            continue
        result = subprocess.run([candidate, "--version"], capture_output=True, text=True)
        if "dcmtk" in (result.stdout + result.stderr).lower():
            return candidate
    message = f"dcmtk's {name} is not installed (apt-get install dcmtk)"
    if REQUIRE_TOOLS:
        pytest.fail(message)
    pytest.skip(message)


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of dicom3tools' validator (it writes its findings to stderr)."""
    try:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        if REQUIRE_TOOLS:
            pytest.fail("dciodvfy is not installed (apt-get install dicom3tools)")
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


def write_ct_series(
    out_dir: Path, slices: int = 8, size: int = 64, seed: int = 3, kind: str = "covid",
    **kwargs: Any,
) -> list[Path]:
    """A small phantom chest CT series as DICOM files (training/phantoms.py)."""
    from training.phantoms import generate_phantom, write_dicom_series

    phantom = generate_phantom(kind, seed, slices=slices, size=size)
    return write_dicom_series(phantom, out_dir, **kwargs)


def store_flipped(path: Path, rows: bool = True, columns: bool = True) -> None:
    """Rewrite a supine axial CT instance (ImageOrientationPatient (1, 0, 0, 0, 1, 0)) as
    some scanners store the same voxels of patient space: the pixel matrix mirrored
    (rows, columns or both: both is how prone scans come), the direction cosines
    negated to match, and the position of what is now the first pixel."""
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(path)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x + (ds.Columns - 1) * column_spacing * columns,
                               y + (ds.Rows - 1) * row_spacing * rows, z]
    ds.ImageOrientationPatient = [-1 if columns else 1, 0, 0, 0, -1 if rows else 1, 0]
    pixels = ds.pixel_array[::-1 if rows else 1, ::-1 if columns else 1]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)


def store_prone(path: Path) -> None:
    """`store_flipped` in rows and columns: a prone scan."""
    store_flipped(path, rows=True, columns=True)


@pytest.fixture(scope="session")
def ct_series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 8-slice 64x64 CT series, shared read-only by the tests of a session."""
    out = tmp_path_factory.mktemp("ct_series")
    write_ct_series(out)
    return out


def node_settings(tmp_path: Path, **sections: Any) -> Settings:
    """Settings for a test node: a free port, a temp data dir, no disk watermark."""
    data: dict[str, Any] = {
        "node": {"port": 0, "ae_title": "DICOMNODE"},
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk_mb": 0},
        # Long timers: tests drive completion through assembler.check(now=...) instead.
        "series": {"min_slices": 4, "quiet_seconds": 300, "release_grace_seconds": 120,
                   "max_wait_seconds": 3600},
    }
    for name, values in sections.items():
        if isinstance(values, list):  # [[destinations]]
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return settings_from_mapping(data, base_dir=tmp_path)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process nodes (stopped at the end of the test); AI workers only on request."""
    nodes: list[Node] = []

    def start(analyse: bool = False, **sections: dict[str, Any]) -> Node:
        node = Node(node_settings(tmp_path, **sections), analyse=analyse)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def self_signed_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate and key for "localhost", valid for a day (TLS tests)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "node.crt", tmp_path / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


def complete_job(
    index: StudyIndex,
    job_id: int,
    rule: CompletionRule,
    skip_reason: str | None,
    expected_instance_count: int,
    now: datetime | None = None,
) -> bool:
    """Close a collecting job as the assembler would: queue it (no reason) or skip it;
    refused (False) when the series no longer holds `expected_instance_count` instances."""
    def decide(series: SeriesProgress) -> tuple[CompletionRule, str | None] | None:
        return (rule, skip_reason) if series.instance_count == expected_instance_count else None

    return index.close_collecting_job(job_id, decide, now) is not None

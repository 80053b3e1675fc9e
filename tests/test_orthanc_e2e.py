"""End to end against a real PACS: dcmtk storescu -> `dicomnode serve` (a subprocess) ->
Orthanc (Debian package, started here on free ports). The SEG, SR, key images and PDF
must arrive in Orthanc in the CT's study, with the right references."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch

from ai.checkpoint import Provenance, preprocess_config_for, save_checkpoint
from ai.model import ModelConfig, build_model
from tests.conftest import REQUIRE_TOOLS, dcmtk_tool, free_port, write_ct_series


def orthanc_binary() -> str:
    for candidate in ("Orthanc", "/usr/sbin/Orthanc"):
        found = shutil.which(candidate)
        if found:
            return found
    message = "Orthanc is not installed (apt-get install orthanc)"
    if REQUIRE_TOOLS:
        pytest.fail(message)
    pytest.skip(message + "; tests/test_pipeline.py covers the loop with a pynetdicom SCP")


class Orthanc:
    def __init__(self, work: Path) -> None:
        self.http = free_port()
        self.dicom = free_port()
        storage = work / "orthanc-db"
        config = {
            "Name": "dicomnode-test", "StorageDirectory": str(storage),
            "IndexDirectory": str(storage), "HttpPort": self.http, "DicomPort": self.dicom,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True, "Plugins": [],
            "StableAge": 2,
        }
        path = work / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = (work / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([orthanc_binary(), str(path)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    reason = (work / "orthanc.log").read_text()[-2000:]
                    self.stop()
                    if REQUIRE_TOOLS:
                        pytest.fail(f"Orthanc did not start:\n{reason}")
                    pytest.skip(f"Orthanc could not start:\n{reason}")
                time.sleep(0.2)

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as rsp:
            return json.load(rsp)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path)
    yield server
    server.stop()


def test_ct_in_results_in_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig.named("tiny", "joint"), seg_prior=0.5)
    weights = tmp_path / "tiny.pt"
    save_checkpoint(weights, build_model(cfg), preprocess_config_for(cfg),
                    Provenance.now("random (test fixture)", 0))
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\nmin_free_disk_mb = 0\n'
        "[series]\nquiet_seconds = 2\nrelease_grace_seconds = 0.5\nmin_slices = 8\n"
        f'[ai]\ncheckpoint = "{weights}"\ndevice = "cpu"\n'
        "[[destinations]]\n"
        f'name = "orthanc"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom}\n'
        'outputs = ["seg", "sr", "key_images", "pdf"]\n'
    )
    log = (tmp_path / "serve.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        files = write_ct_series(tmp_path / "ct", slices=24, size=64, seed=8)
        ct = pydicom.dcmread(files[0])
        deadline = time.monotonic() + 30
        while subprocess.run([dcmtk_tool("echoscu"), "-aec", "DICOMNODE", "127.0.0.1",
                              str(port)], capture_output=True).returncode != 0:
            assert node.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "serve.log").read_text())
            time.sleep(0.2)
        for aet, target in (("ORTHANC", orthanc.dicom), ("DICOMNODE", port)):  # PACS has the CT
            sent = subprocess.run([dcmtk_tool("storescu"), "-aec", aet, "127.0.0.1",
                                   str(target), *map(str, files)], capture_output=True, text=True)
            assert sent.returncode == 0, sent.stderr

        def modalities() -> dict[str, dict]:
            out = {}
            for series_id in orthanc.get("/series"):  # type: ignore[union-attr]
                series = orthanc.get(f"/series/{series_id}")
                description = series["MainDicomTags"].get("SeriesDescription", "")  # type: ignore
                out[series["MainDicomTags"]["Modality"] + description] = series  # type: ignore
            return out

        of_ct = f" S{ct.SeriesNumber}"  # each output names the CT series it is about
        seg_key, sr_key = f"SEGAI lesions (DeepSC){of_ct}", f"SRAI report (DeepSC){of_ct}"
        wanted = {seg_key, sr_key, f"DOCAI report PDF (DeepSC){of_ct}",
                  f"OTAI key images (DeepSC){of_ct}"}
        deadline = time.monotonic() + 120
        while not wanted <= set(modalities()):
            assert node.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (
                f"results did not arrive: {sorted(modalities())}\n"
                + (tmp_path / "serve.log").read_text()[-3000:])
            time.sleep(0.5)
        series = modalities()
        studies = {s["ParentStudy"] for s in series.values()}
        assert len(studies) == 1  # all in the CT's study
        assert len(series) == 5  # the CT and the four outputs
        seg_instance = series[seg_key]["Instances"][0]
        tags = orthanc.get(f"/instances/{seg_instance}/simplified-tags")
        assert tags["StudyInstanceUID"] == ct.StudyInstanceUID  # type: ignore[index]
        assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == (  # type: ignore[index]
            ct.SeriesInstanceUID)
        sr_instance = series[sr_key]["Instances"][0]
        sr_tags = orthanc.get(f"/instances/{sr_instance}/simplified-tags")
        evidence = {item["ReferencedSOPInstanceUID"]
                    for study in sr_tags["CurrentRequestedProcedureEvidenceSequence"]  # type: ignore
                    for s in study["ReferencedSeriesSequence"]
                    for item in s["ReferencedSOPSequence"]}
        assert tags["SOPInstanceUID"] in evidence  # type: ignore[index]
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=30)
        log.close()

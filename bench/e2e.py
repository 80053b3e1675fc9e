"""End-to-end benchmark: last instance acknowledged -> SR stored in the PACS.

Starts a PACS and `dicomnode serve` on free ports, sends a phantom CT series (300 x 512
x 512 by default), and measures from the moment the sender returns (every instance
acknowledged) to the moment the PACS holds the SR. The split comes from the node's own
Result row (volume load, AI stages, encoding of each output, storage) and the export
row. Peak RSS of the node process from /proc.

The PACS is Orthanc (Debian package) and the sender dcmtk `storescu`; on a host without
them (the GPU machine of `bench/device_check.sh`), a pynetdicom Storage SCP that keeps
what it receives and the node's own `dicomnode send`.

    python3 bench/e2e.py --out bench/results/e2e-cpu.json [--slices 300] [--quiet 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    free_port,
    machine,
    peak_rss_mb,
    wait_listening,
    write_report,
)
from storage.index import StudyIndex  # noqa: E402
from training.phantoms import generate_phantom, write_dicom_series  # noqa: E402

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
STORESCU = "/usr/bin/storescu"

PYNETDICOM_PACS = """
import os, sys
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
out, port = sys.argv[1], int(sys.argv[2])
def on_store(event):
    name = os.path.join(out, f"{event.dataset.Modality}-{event.request.AffectedSOPInstanceUID}")
    with open(name + ".part", "wb") as f:
        f.write(event.encoded_dataset())
    os.replace(name + ".part", name + ".dcm")  # whole when it appears
    return 0x0000
ae = AE(ae_title="PACS")
ae.maximum_pdu_size = 4194304
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


class Pacs:
    """The destination: Orthanc, whose REST API lists the stored series' modalities, or
    the pynetdicom SCP above, whose files are named by modality."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind, self.dicom_port, self.http_port = kind, free_port(), free_port()
        self.ae_title = "ORTHANC" if kind == "orthanc" else "PACS"
        self.folder = work / "pacs"
        self.folder.mkdir()
        if kind == "orthanc":
            (work / "orthanc.json").write_text(json.dumps({
                "Name": "bench", "StorageDirectory": str(self.folder),
                "IndexDirectory": str(self.folder), "HttpPort": self.http_port,
                "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
                "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": []}))
            command = [ORTHANC, str(work / "orthanc.json")]
        else:
            command = [sys.executable, "-c", PYNETDICOM_PACS, str(self.folder),
                       str(self.dicom_port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_listening(self.http_port if kind == "orthanc" else self.dicom_port)

    def modalities(self) -> list[str]:
        if self.kind != "orthanc":
            return [p.name.split("-", 1)[0] for p in self.folder.glob("*.dcm")]
        url = f"http://127.0.0.1:{self.http_port}/series?expand"
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return [s["MainDicomTags"].get("Modality", "") for s in json.load(rsp)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def send(files: list[Path], port: int) -> None:
    """C-STORE the series in one association, released at the end (as a scanner does)."""
    if Path(STORESCU).exists():
        command = [STORESCU, "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)]
    else:
        command = [sys.executable, "-m", "dicomnode", "send", str(files[0].parent),
                   f"DICOMNODE@127.0.0.1:{port}"]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=10.0, help="[series] quiet_seconds")
    parser.add_argument("--release-grace", type=float, default=2.0,
                        help="[series] release_grace_seconds")
    parser.add_argument("--checkpoint", default="", help="default: the shipped weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pacs", choices=("orthanc", "pynetdicom"),
                        default="orthanc" if Path(ORTHANC).exists() else "pynetdicom")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-e2e-") as tmp:
        work = Path(tmp)
        port = free_port()
        phantom = generate_phantom("covid", 7, slices=args.slices, size=args.size)
        files = write_dicom_series(phantom, work / "ct")
        pacs = Pacs(args.pacs, work)
        config = work / "node.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {port}\n'
            f'[storage]\ndata_dir = "{work / "data"}"\nmin_free_disk_mb = 0\n'
            f"[series]\nquiet_seconds = {args.quiet}\n"
            f"release_grace_seconds = {args.release_grace}\n"
            f'[ai]\ncheckpoint = "{args.checkpoint}"\ndevice = "{args.device}"\n'
            f'[[destinations]]\nname = "{args.pacs}"\nae_title = "{pacs.ae_title}"\n'
            f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n'
            'outputs = ["seg", "sr", "key_images", "pdf"]\n')
        log = (work / "node.log").open("wb")
        node = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_listening(port)
            # The AI worker loads the model and warms up (on a GPU, a first pass) before
            # the clock starts: a node in service has done that long before a scan comes.
            ready_by = time.perf_counter() + 300
            while "AI worker ready" not in (work / "node.log").read_text():
                if node.poll() is not None or time.perf_counter() > ready_by:
                    raise SystemExit((work / "node.log").read_text()[-3000:])
                time.sleep(0.2)
            t0 = time.perf_counter()
            send(files, port)
            acked = time.perf_counter()
            while "SR" not in pacs.modalities():
                if node.poll() is not None or time.perf_counter() - acked > 900:
                    raise SystemExit((work / "node.log").read_text()[-3000:])
                time.sleep(0.1)
            sr_stored = time.perf_counter()
            rss = peak_rss_mb(node.pid)
            worker_rss = max((peak_rss_mb(c.pid) for c in psutil.Process(node.pid).children()),
                             default=float("nan"))
        finally:
            node.terminate()
            node.wait(timeout=60)
            pacs.stop()
            log.close()
        index = StudyIndex(f"sqlite:///{work / 'data' / 'index.sqlite'}")
        [job] = [r for r in index.series_status() if r["modality"] == "CT"]
        result = index.result_for_job(job["job_id"])
        exports = index.export_status()
        index.close()
    assert result is not None
    after_ack = sr_stored - acked
    # storescu releases its association: the release rule usually fires, not the quiet one.
    wait = args.quiet if job["completion_rule"] == "quiet_period" else args.release_grace
    report = {
        "benchmark": "e2e",
        "series": {"slices": args.slices, "size": args.size},
        "machine": machine(),
        "device": args.device,
        "model": {"name": result.model_name, "version": result.model_version},
        "pacs": args.pacs,
        "send_s": round(acked - t0, 2),
        "ack_to_sr_in_pacs_s": round(after_ack, 2),
        "completion_rule": job["completion_rule"],
        "completion_wait_s": wait,
        "after_completion_s": round(after_ack - wait, 2),
        "node_stages_s": result.timings,
        "exports": [{k: e[k] for k in ("destination", "state", "files", "attempts")}
                    for e in exports],
        "node_peak_rss_mb": round(rss, 1),
        "ai_worker_peak_rss_mb": round(worker_rss, 1),
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

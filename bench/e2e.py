"""End-to-end benchmark: last instance acknowledged -> SR stored in Orthanc.

Starts Orthanc (Debian package) and `dicomnode serve` on free ports, sends a phantom CT
series (300 x 512 x 512 by default) with dcmtk `storescu`, and measures from the moment
storescu returns (every instance acknowledged) to the moment Orthanc holds the SR. The
split comes from the node's own Result row (volume load, AI stages, encoding of each
output, storage) and the export row. Peak RSS of the node process from /proc.

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


def orthanc_series(http_port: int) -> list[str]:
    url = f"http://127.0.0.1:{http_port}/series?expand"
    with urllib.request.urlopen(url, timeout=5) as rsp:
        return [s["MainDicomTags"].get("Modality", "") for s in json.load(rsp)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=10.0, help="[series] quiet_seconds")
    parser.add_argument("--release-grace", type=float, default=2.0,
                        help="[series] release_grace_seconds")
    parser.add_argument("--checkpoint", default="", help="default: the shipped weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "e2e.json")
    args = parser.parse_args()
    orthanc_bin = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    with tempfile.TemporaryDirectory(prefix="dicomnode-e2e-") as tmp:
        work = Path(tmp)
        http, dicom, port = free_port(), free_port(), free_port()
        (work / "orthanc.json").write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(work / "orthanc"),
            "IndexDirectory": str(work / "orthanc"), "HttpPort": http, "DicomPort": dicom,
            "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": []}))
        config = work / "node.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {port}\n'
            f'[storage]\ndata_dir = "{work / "data"}"\nmin_free_disk_mb = 0\n'
            f"[series]\nquiet_seconds = {args.quiet}\n"
            f"release_grace_seconds = {args.release_grace}\n"
            f'[ai]\ncheckpoint = "{args.checkpoint}"\ndevice = "{args.device}"\n'
            f'[[destinations]]\nname = "orthanc"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
            f'port = {dicom}\noutputs = ["seg", "sr", "key_images", "pdf"]\n')
        phantom = generate_phantom("covid", 7, slices=args.slices, size=args.size)
        files = write_dicom_series(phantom, work / "ct")
        orthanc = subprocess.Popen([orthanc_bin, str(work / "orthanc.json")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = (work / "node.log").open("wb")
        node = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_listening(http)
            wait_listening(port)
            t0 = time.perf_counter()
            subprocess.run(["/usr/bin/storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                            *map(str, files)], check=True, capture_output=True)
            acked = time.perf_counter()
            while "SR" not in orthanc_series(http):
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
            orthanc.terminate()
            orthanc.wait(timeout=30)
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
        "model": {"name": result.model_name, "version": result.model_version},
        "send_s": round(acked - t0, 2),
        "ack_to_sr_in_orthanc_s": round(after_ack, 2),
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

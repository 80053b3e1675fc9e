"""Ingest benchmark: how fast a CT series lands durably, against two reference receivers.

Sends a phantom CT series (300 x 512 x 512, about 150 MB) over loopback with dcmtk
`storescu` to (a) `dicomnode serve` (fsync + index before every Success), (b) a bare
pynetdicom SCP whose handler only writes and fsyncs `event.encoded_dataset()`, and
(c) dcmtk `storescp` with TCP_NODELAY=1 (no fsync, no index). Then four senders at
once, each with its own series. Each receiver runs as its own process so its peak RSS
(VmHWM) is its own. Prints and writes JSON; docs/benchmarks.md holds the table.

    python3 bench/ingest.py --out bench/results/ingest.json [--slices 300] [--size 512] [--rounds 3]

Each number is the median over the rounds (receivers interleaved, each round starting with
the next one, the disk synced between them); every round is kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    free_port,
    machine,
    peak_rss_mb,
    wait_listening,
    write_report,
)
from training.phantoms import generate_phantom, write_dicom_series  # noqa: E402

SETTLE_S = 5.0
"""Pause after a receiver listens, so start-up work does not compete with the
measurement: steady state is what is compared."""

BARE_SCP = """
import os, sys
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
out, port = sys.argv[1], int(sys.argv[2])
def on_store(event):
    path = os.path.join(out, event.request.AffectedSOPInstanceUID + ".dcm")
    with open(path, "wb") as f:
        f.write(event.encoded_dataset())
        f.flush()
        os.fsync(f.fileno())
    return 0x0000
ae = AE(ae_title="BARE")
ae.maximum_associations = 32
ae.maximum_pdu_size = 4194304
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


def dcmtk(name: str) -> str:
    path = f"/usr/bin/{name}"
    if not os.access(path, os.X_OK):
        raise SystemExit(f"dcmtk's {name} not found at {path} (apt-get install dcmtk)")
    return path


def start_receiver(kind: str, work: Path, port: int) -> subprocess.Popen[bytes]:
    out = work / f"recv-{kind}"
    out.mkdir()
    log = open(work / f"{kind}.log", "wb")  # noqa: SIM115 - closed with the process
    if kind == "dicomnode":
        config = work / "node.toml"
        config.write_text(
            f'[node]\nae_title = "DICOMNODE"\nhost = "127.0.0.1"\nport = {port}\n'
            f'[storage]\ndata_dir = "{out}"\nmin_free_disk_mb = 0\n'
            # Receive, index and assemble only: an AI worker would analyse the first
            # series (tens of seconds of both cores) while the next ones are received.
            '[pipeline]\nworkers = 0\n'
        )
        cmd = [sys.executable, "-m", "dicomnode", "serve", "--config", str(config)]
        env = dict(os.environ)
    elif kind == "pynetdicom-fsync":
        cmd = [sys.executable, "-c", BARE_SCP, str(out), str(port)]
        env = dict(os.environ)
    else:
        cmd = [dcmtk("storescp"), "--fork", "+xa", "-od", str(out), str(port)]
        env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wait_listening(port)
    time.sleep(SETTLE_S)
    return proc


def send(series_dir: Path, port: int, aet: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [dcmtk("storescu"), "-aec", aet, "+sd", "127.0.0.1", str(port), str(series_dir)],
        check=True, capture_output=True,
    )
    return time.perf_counter() - start


def run_case(kind: str, work: Path, series: list[Path], megabytes: float) -> dict[str, float]:
    port = free_port()
    aet = {"dicomnode": "DICOMNODE", "pynetdicom-fsync": "BARE", "storescp": "STORESCP"}[kind]
    proc = start_receiver(kind, work, port)
    try:
        one = send(series[0], port, aet)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(series) - 1) as pool:
            list(pool.map(lambda d: send(d, port, aet), series[1:]))
        concurrent = time.perf_counter() - start
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    n_concurrent = len(series) - 1
    return {
        "one_sender_s": round(one, 3),
        "one_sender_mb_s": round(megabytes / one, 1),
        "concurrent_senders": n_concurrent,
        "concurrent_s": round(concurrent, 3),
        "concurrent_mb_s": round(megabytes * n_concurrent / concurrent, 1),
        "peak_rss_mb": round(rss, 1),
    }


RECEIVERS = ("dicomnode", "pynetdicom-fsync", "storescp")


def median_case(runs: list[dict[str, float]]) -> dict[str, object]:
    """Median of each number over the rounds (loopback timings on a shared machine vary
    by tens of percent from run to run), with every round kept."""
    summary: dict[str, object] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    summary["rounds"] = runs
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--senders", type=int, default=4, help="concurrent senders")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of all receivers; medians are reported"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-") as tmp:
        work = Path(tmp)
        phantom = generate_phantom("covid", 11, slices=args.slices, size=args.size)
        series = []
        for i in range(1 + args.senders):  # one for the single sender, one per concurrent one
            d = work / f"series-{i}"
            write_dicom_series(phantom, d, series_uid=f"1.2.826.0.1.3680043.10.1011.9.{i}",
                               study_uid=f"1.2.826.0.1.3680043.10.1011.8.{i}")
            series.append(d)
        megabytes = sum(p.stat().st_size for p in series[0].iterdir()) / 1e6
        rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in RECEIVERS}
        for r in range(args.rounds):  # interleaved, so drift of the machine hits all alike
            # Each round starts with the next receiver: whoever follows storescp (which
            # does not fsync) would otherwise always share the disk with its write-back.
            first = r % len(RECEIVERS)
            for kind in RECEIVERS[first:] + RECEIVERS[:first]:
                rounds[kind].append(run_case(kind, work, series, megabytes))
                shutil.rmtree(work / f"recv-{kind}")
                os.sync()  # and nothing is left to write back when the next one starts
        results = {kind: median_case(runs) for kind, runs in rounds.items()}
    node, bare, dcm = (results[kind] for kind in RECEIVERS)
    report = {
        "benchmark": "ingest",
        "series": {"slices": args.slices, "size": args.size, "megabytes": round(megabytes, 1)},
        "machine": machine(),
        "receivers": results,
        "ratios": {
            "dicomnode_vs_pynetdicom_fsync": round(node["one_sender_s"] / bare["one_sender_s"], 2),
            "dicomnode_vs_storescp": round(node["one_sender_s"] / dcm["one_sender_s"], 2),
            "concurrent_dicomnode_vs_pynetdicom_fsync":
                round(node["concurrent_s"] / bare["concurrent_s"], 2),
            "concurrent_dicomnode_vs_storescp":
                round(node["concurrent_s"] / dcm["concurrent_s"], 2),
        },
    }
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

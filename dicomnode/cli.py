"""The `dicomnode` command line: serve, status, echo, send, resend, reanalyse, purge, infer,
phantom, train, evaluate, init-config."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode import __version__
from dicomnode.config import (
    ConfigError,
    Settings,
    StorageConfig,
    check_ae_title,
    load_settings,
    render_config_toml,
)
from dicomnode.scu import Peer, PeerError, client_tls_context, echo, send
from storage.errors import IndexUnavailable
from storage.filestore import DataDirInUse
from storage.index import NO_CT_IMAGE

if TYPE_CHECKING:  # storage.index pulls in SQLAlchemy: imported where it is used
    from storage.index import StudyIndex

logger = logging.getLogger("dicomnode")

DEFAULT_CONFIG = Path("config.toml")


def _settings(args: argparse.Namespace) -> Settings:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    settings = load_settings(path)
    if path is None:  # said, so that a forgotten --config is not a silent empty node
        print(f"no --config and no ./{DEFAULT_CONFIG}: the defaults, data in"
              f" {settings.data_dir}", file=sys.stderr)
    return settings


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for chatty in ("pynetdicom", "highdicom"):  # per-element chatter at INFO
        logging.getLogger(chatty).setLevel(
            max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.service import Node

    settings = _settings(args)
    setup_logging(settings.node.log_level)
    Node(settings).serve_forever()
    return 0


def _status_table(rows: list[dict[str, object]]) -> str:
    header = ("LAST ACTIVITY (UTC)", "STATE", "N", "MOD", "STUDY DATE", "ACCESSION",
              "SERIES", "SERIES UID", "RESULT OR WHY")
    lines = [header]
    for r in rows:
        why = str(r["reason"] or r["completion_rule"])
        if r.get("refused_instances") and r["state"] == "collecting":
            why = (f"waiting for {r['refused_instances']} refused instance(s) (disk space,"
                   " a failed write) to be sent again")
        result = r["result"]
        if isinstance(result, dict):  # what the AI found, for a done job
            plr = "n/a" if result["plr"] is None else f"{100 * result['plr']:.0f}%"
            why = (f"{result['diagnosis']}, LVR {100 * result['lvr']:.1f}%, PLR {plr}, "
                   f"{result['lesion_count']} lesion(s)")
            why += "".join(f"; {caveat['short']}" for caveat in result["caveats"])
        lines.append((str(r["last_received_at"])[:19], str(r["state"]), str(r["instances"]),
                      str(r["modality"]), str(r["study_date"]), str(r["accession_number"]),
                      str(r["series_description"])[:24], str(r["series_instance_uid"]), why))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _missing_sqlite_index(url: str) -> bool:
    """A SQLite index file that does not exist (opening it would create an empty one)."""
    return url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists()


def cmd_status(args: argparse.Namespace) -> int:
    from storage.index import StudyIndex, counts_line

    settings = _settings(args)
    url = settings.database_url
    if _missing_sqlite_index(url):
        print(f"no index at {url}: the node has not run with this configuration yet")
        return 0
    index = StudyIndex(url, schema="check")  # a node migrates it (docs/architecture.md)
    try:
        counts = index.counts()
        rows = index.series_status(limit=args.limit, own_outputs=args.all)
        exports = index.export_status(limit=args.limit)
        problem = index.model_problem()
    finally:
        index.close()
    disk = None
    if settings.data_dir.is_dir():  # with a server database the files may be elsewhere
        disk = {"free_mb": shutil.disk_usage(settings.data_dir).free // 2**20,
                "min_free_disk_mb": settings.storage.min_free_disk_mb}
    if args.json:
        print(json.dumps({"counts": counts, "series": rows, "exports": exports,
                          "model_problem": None if problem is None else {
                              "since": problem[0].isoformat(), "reason": problem[1]},
                          "disk": disk}, indent=2))
    else:
        print(counts_line(counts))
        if disk is not None:
            print(f"disk: {disk['free_mb']} MB free in {settings.data_dir}"
                  + (" - BELOW min_free_disk_mb: every C-STORE is refused"
                     if disk["free_mb"] < disk["min_free_disk_mb"]
                     else f" (C-STOREs refused below {disk['min_free_disk_mb']} MB)"))
        if problem is not None:
            print(f"AI: the model has not loaded since {problem[0].isoformat()[:19]} UTC"
                  f" (queued series wait; the workers try every 30 s): {problem[1]}")
        if rows:
            print(_status_table(rows))
        if exports:
            print()
            print(_exports_table(exports))
    return 0


def _exports_table(rows: list[dict[str, object]]) -> str:
    lines = ["DELIVERIES"]
    for r in rows:
        when = r["sent_at"] or f"next try {str(r['next_attempt_at'])[:19]}"
        if r["state"] == "failed":
            when = "given up"
        lines.append(f"  {r['state']:<8} {r['destination']:<12} attempts {r['attempts']:<3} "
                     f"{r['files']} file(s)  study {r['study_instance_uid']}  {when}  "
                     f"{r['last_error']}".rstrip())
    return "\n".join(lines)


def _existing_index(settings: Settings) -> StudyIndex | None:
    """The node's index, or None (said on stderr) when the node never ran with these
    settings: opening a SQLite file that is not there would create an empty one."""
    from storage.index import StudyIndex

    url = settings.database_url
    if _missing_sqlite_index(url):
        print(f"no index at {url}: the node has not run with this configuration",
              file=sys.stderr)
        return None
    return StudyIndex(url, schema="check")


def cmd_reanalyse(args: argparse.Namespace) -> int:
    index = _existing_index(_settings(args))
    if index is None:
        return 1
    try:
        queued, others = index.reanalyse(args.uid, skipped=args.skipped)
    finally:
        index.close()
    for uid, state in others.items():
        if state.endswith(NO_CT_IMAGE):
            hint = ""  # nothing would analyse it
        elif state.startswith("skipped"):
            hint = "; --skipped analyses it all the same"
        else:
            hint = " (only done, failed or, with --skipped, skipped series are)"
        print(f"series {uid}: {state}, not queued{hint}", file=sys.stderr)
    if not queued:
        if not others:
            print(f"no series or study {args.uid} in the index", file=sys.stderr)
        return 1
    for uid in queued:
        print(f"series {uid}: queued for a new analysis")
    print("a running node analyses them and sends the new results (new UIDs, beside any"
          " earlier result)")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from storage.index import utcnow

    if bool(args.study_uids) == args.failed or (args.since and not args.failed):
        print("resend: name the studies (STUDY_UID ...) or give --failed [--since DAYS]",
              file=sys.stderr)
        return 2
    settings = _settings(args)
    index = _existing_index(settings)
    if index is None:
        return 1
    try:
        studies = args.study_uids
        if args.failed:
            since = utcnow() - timedelta(days=args.since) if args.since else None
            studies = index.studies_with_failed_exports(since)
            if not studies:  # nothing to do is not an error (a cron job runs this)
                print("no failed deliveries" + (f" in the last {args.since:g} days"
                                                 if args.since else "") + ": nothing to resend")
                return 0
        queued = 0
        for study_uid in studies:
            counts = index.requeue_study_exports(
                study_uid, settings.export.give_up_after_seconds,
                {d.name: d.outputs for d in settings.destinations}, only_failed=args.failed,
            )
            queued += counts["queued"]
            _report_resend(study_uid, counts)
    finally:
        index.close()
    if not queued:
        return 1
    print(f"{queued} deliver(y/ies) of {len(studies)} study(ies) queued again; a running"
          " node sends them within seconds")
    return 0


def _report_resend(study_uid: str, counts: dict[str, int]) -> None:
    if counts["sending"]:
        print(f"{counts['sending']} deliver(y/ies) of study {study_uid} being sent now:"
              " left alone", file=sys.stderr)
    if counts["unconfigured"]:
        print(f"{counts['unconfigured']} deliver(y/ies) of study {study_uid} were to"
              " destinations no longer configured: not queued", file=sys.stderr)
    if not any(counts.values()):
        print(f"nothing to resend for study {study_uid}: no results or deliveries"
              " recorded (or no destination configured)", file=sys.stderr)
    elif counts["queued"]:
        print(f"study {study_uid}: {counts['queued']} deliver(y/ies) queued again")


def cmd_purge(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from storage.filestore import DataDirLock, FileStore
    from storage.index import StudyIndex, utcnow

    settings = _settings(args)
    url = settings.database_url
    if _missing_sqlite_index(url):
        print(f"no index at {url}: nothing to purge", file=sys.stderr)
        return 1
    lock = DataDirLock(settings.data_dir)
    lock.acquire()  # the node must be stopped: it may be writing what this deletes
    try:
        cutoff = utcnow() - timedelta(days=args.older_than)
        filestore = FileStore(settings.data_dir)
        index = StudyIndex(url)
        try:
            studies = index.idle_studies(cutoff)
            aside = filestore.aside_files_before(cutoff)
            files = [p for study in studies for p in study.paths] + aside
            freed = 0
            if not args.dry_run:
                # Files first, then rows: a purge cut short leaves rows whose files are
                # gone, which the next purge finds and finishes.
                freed = filestore.remove(files)
                index.delete_studies([study.study_instance_uid for study in studies])
        finally:
            index.close()
    finally:
        lock.release()
    verb = "would remove" if args.dry_run else "removed"
    for study in studies:
        print(f"{verb} study {study.study_instance_uid} (study date {study.study_date or '?'},"
              f" last activity {study.last_activity:%Y-%m-%d}, {len(study.paths)}"
              " instance(s))")
    print(f"{verb} {len(studies)} study(ies), {len(files)} file(s) ({len(aside)} set aside"
          f" under conflicts/ and rejected/)" + ("" if args.dry_run else
                                                 f", {freed / 1e6:.1f} MB freed"))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from dicomnode.offline import run_offline

    settings = _settings(args)
    setup_logging("WARNING" if not args.verbose else "INFO")
    return run_offline(args.paths, args.out, settings, checkpoint=args.checkpoint,
                       device=args.device, as_json=args.json)


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not 0 < days < 100_000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of days")
    return days


def _calling_aet(text: str) -> str:
    try:
        return check_ae_title("--aet", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context that --tls / --tls-ca / --tls-cert ask for, or None."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key: give both, or neither")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return client_tls_context(args.tls_ca, args.tls_cert, args.tls_key,
                              "--tls-ca / --tls-cert / --tls-key")


def cmd_echo(args: argparse.Namespace) -> int:
    status = echo(args.peer, calling_aet=args.aet, timeout_s=args.timeout, tls=_tls(args))
    print(f"C-ECHO {args.peer}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    missing = [path for path in args.paths if not path.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    report = send(args.paths, args.peer, calling_aet=args.aet, timeout_s=args.timeout,
                  tls=_tls(args))
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    for path, reason in report.failed:
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    print(f"sent {report.sent} instance(s) to {args.peer}; {len(report.failed)} failed, "
          f"{len(report.skipped)} skipped")
    return 0 if report.ok and report.sent else 1


def cmd_init_config(args: argparse.Namespace) -> int:
    sections: dict[str, object] = {}
    if args.data_dir is not None:  # absolute: a relative one resolves against the file's folder
        sections["storage"] = StorageConfig(data_dir=str(args.data_dir.resolve()))
    text = render_config_toml(sections)
    if args.output == Path("-"):
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        print(f"{args.output} exists; use --force to overwrite", file=sys.stderr)
        return 1
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


LAZY_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "phantom": ("training.phantoms", "add_phantom_arguments", "run_phantom_command",
                "write a synthetic chest CT with ground truth (DICOM and/or NIfTI)"),
    "train": ("training.trainer", "add_train_arguments", "run_train_command",
              "train the DeepSC model (two stages) on phantoms, NIfTI or DICOM data"),
    "evaluate": ("training.trainer", "add_evaluate_arguments", "run_evaluate_command",
                 "evaluate a checkpoint: Table II metrics, JSON and ROC/overlay PNG"),
}
"""Commands whose modules import torch: loaded only when that command runs, so
`dicomnode status` and friends stay fast."""


def _add_lazy_command(sub: Any, name: str, load: bool) -> None:
    module_name, add_name, run_name, helptext = LAZY_COMMANDS[name]
    p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
    if load:
        module = importlib.import_module(module_name)
        getattr(module, add_name)(p)
        run: Callable[[argparse.Namespace], int] = getattr(module, run_name)

        def logged(args: argparse.Namespace) -> int:
            setup_logging("INFO")  # a run's epochs, an evaluation's summary: their progress
            return run(args)

        p.set_defaults(func=logged)


def _peer(text: str) -> Peer:
    try:
        return Peer.parse(text)
    except PeerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; `command` names the one about to run (its heavy parts are loaded)."""
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="A DICOM AI node: receives chest CT, runs DeepSC-COVID, returns SEG and SR.",
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None,
                       help="config file (default: ./config.toml if present, else defaults)")

    p = sub.add_parser("serve", help="run the DICOM node (Storage SCP, assembler, AI, export)",
                       description="Run the node until SIGINT/SIGTERM.")
    with_config(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="studies and series in the index, with their state",
                       description="Show what the node holds and where each series stands.")
    with_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=50,
                   help="how many of the most recently active series (an instance received,"
                        " or its job changed) and of the latest deliveries made to list;"
                        " deliveries not made are all listed")
    p.add_argument("--all", action="store_true",
                   help="also list the node's own output series (SEG, SR, key images, PDF)")
    p.set_defaults(func=cmd_status)

    for name, helptext in (("echo", "C-ECHO a DICOM node"), ("send", "C-STORE files to a node")):
        p = sub.add_parser(name, help=helptext, description=helptext + ".")
        if name == "send":
            p.add_argument("paths", type=Path, nargs="+", metavar="DIR",
                           help="DICOM files or directories (searched recursively)")
        p.add_argument("peer", type=_peer, metavar="AET@HOST:PORT", help="the peer to contact")
        p.add_argument("--aet", default="DICOMNODE", type=_calling_aet,
                       help="calling AE title (default DICOMNODE)")
        p.add_argument("--timeout", type=float, default=30.0, help="network timeout, seconds")
        p.add_argument("--tls", action="store_true",
                       help="DICOM TLS, verifying the peer's certificate (system CAs)")
        p.add_argument("--tls-ca", type=Path, metavar="PEM",
                       help="verify the peer against this CA bundle (implies --tls)")
        p.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="client certificate, for a peer that requires one (with --tls-key)")
        p.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
        p.set_defaults(func=cmd_echo if name == "echo" else cmd_send)

    p = sub.add_parser("resend", help="send studies' results to the destinations again",
                       description="Queue every delivery of the studies named again, or "
                                   "every delivery that failed (--failed: after a PACS "
                                   "outage; destinations that have the results are not "
                                   "sent them again); a running node sends them.")
    with_config(p)
    p.add_argument("study_uids", metavar="STUDY_UID", nargs="*", help="StudyInstanceUID")
    p.add_argument("--failed", action="store_true",
                   help="every failed (given up or refused) delivery, and those only")
    p.add_argument("--since", type=_days, metavar="DAYS",
                   help="with --failed: only deliveries that failed in the last DAYS days")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("reanalyse", help="analyse a study's or a series' CT again",
                       description="Queue a new analysis of every series of a study (or of "
                                   "one series) whose last analysis is done or failed: after a "
                                   "model or GPU problem was fixed, or with new weights. A "
                                   "running node analyses them and sends the new results, "
                                   "under new UIDs, beside any earlier one.")
    with_config(p)
    p.add_argument("uid", metavar="UID", help="StudyInstanceUID or SeriesInstanceUID")
    p.add_argument("--skipped", action="store_true",
                   help="also series the [series] rules skipped (after the rules were"
                        " changed, say): they are analysed whatever the rules say")
    p.set_defaults(func=cmd_reanalyse)

    p = sub.add_parser("purge", help="delete studies with no activity for a number of days",
                       description="Delete every study (received instances, the node's "
                                   "outputs, index rows) with nothing received, analysed or "
                                   "delivered for --older-than days and no work in flight, and "
                                   "files set aside under conflicts/ and rejected/ as old. "
                                   "The node must be stopped.")
    with_config(p)
    p.add_argument("--older-than", type=_days, required=True, metavar="DAYS",
                   help="days without activity (e.g. 30)")
    p.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("infer", help="analyse DICOM files offline and write the results",
                       description="Run the node's pipeline on a folder of DICOM files without "
                                   "a network: every CT series found is analysed, the SEG, SR, "
                                   "key images and PDF are written, and a summary printed.")
    with_config(p)
    p.add_argument("paths", type=Path, nargs="+", metavar="DIR_OR_FILES")
    p.add_argument("--out", type=Path, default=Path("dicomnode-results"),
                   help="output folder (default ./dicomnode-results)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model checkpoint (default: [ai] checkpoint, else the shipped weights)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: [ai])")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.set_defaults(func=cmd_infer)

    for name in LAZY_COMMANDS:
        _add_lazy_command(sub, name, load=name == command)

    p = sub.add_parser("init-config", help="write a commented config.toml with every default",
                       description="Write the documented default configuration.")
    p.add_argument("output", type=Path, nargs="?", default=DEFAULT_CONFIG,
                   help="where to write it ('-' for stdout; default ./config.toml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="[storage] data_dir to write, made absolute (default ./dicomnode-data,"
                   " relative to the config file's folder)")
    p.set_defaults(func=cmd_init_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, DataDirInUse, IndexUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a port in use, a data_dir that cannot be created ...
        print(f"error: {exc}", file=sys.stderr)
        logger.debug("details", exc_info=True)
        return 1

"""The command line: help, init-config, status, echo, send and clear errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text

from dicomnode.cli import build_parser, main, setup_logging
from dicomnode.config import StorageConfig, load_settings, render_config_toml, settings_from_mapping
from dicomnode.service import Node
from storage.errors import IndexUnavailable
from storage.index import StudyIndex
from storage.models import SCHEMA_VERSION
from tests.conftest import complete_job, free_port

COMMANDS = ["serve", "status", "echo", "send", "resend", "reanalyse", "purge", "infer", "phantom",
            "train", "evaluate", "init-config"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: dicomnode " + command in capsys.readouterr().out


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "dicomnode", "--help"],
                            capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in result.stdout
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)


def test_init_config_writes_the_documented_defaults(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    assert main(["init-config", str(target)]) == 0
    assert target.read_text() == render_config_toml()
    assert main(["init-config", str(target)]) == 1  # no silent overwrite
    assert main(["init-config", str(target), "--force"]) == 0
    # a service's config in /etc names its data directory absolutely
    assert main(["init-config", str(target), "--force", "--data-dir", "srv/dicomnode"]) == 0
    settings = load_settings(target)
    assert settings.data_dir == (Path.cwd() / "srv" / "dicomnode").resolve()
    assert target.read_text() == render_config_toml(
        {"storage": StorageConfig(data_dir=str(settings.data_dir))})


def test_config_error_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[series]\nmin_slices = \"forty\"\n")
    assert main(["status", "--config", str(config)]) == 2
    assert "series.min_slices = 'forty': expected integer" in capsys.readouterr().err


def test_status_echo_and_send_against_a_node(
    start_node: Callable[..., Node], ct_series_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = start_node()
    peer = f"DICOMNODE@127.0.0.1:{node.scp.port}"
    assert main(["echo", peer]) == 0
    assert main(["send", str(ct_series_dir), peer]) == 0
    assert "sent 8 instance(s)" in capsys.readouterr().out
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{node.settings.data_dir}"\n')
    assert main(["status", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["instances"] == 8
    (series,) = report["series"]
    assert (series["state"], series["instances"], series["modality"]) == ("collecting", 8, "CT")
    assert report["disk"]["free_mb"] > 0 and report["disk"]["min_free_disk_mb"] == 1024
    assert main(["status", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert "collecting" in table and series["series_instance_uid"] in table
    assert f"MB free in {node.settings.data_dir}" in table.splitlines()[1]


def test_status_and_start_say_when_the_disk_is_below_the_limit(
    start_node: Callable[..., Node], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A node that refuses every C-STORE for want of disk space says so where the
    administrator looks: at start, in the log, and in `dicomnode status`."""
    caplog.set_level(logging.WARNING, logger="dicomnode.service")
    node = start_node(storage={"min_free_disk_mb": 10**9})  # 1 PB
    assert any("every C-STORE is refused (0xA700)" in r.getMessage() for r in caplog.records)
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{node.settings.data_dir}"\n'
                      "min_free_disk_mb = 1000000000\n")
    assert main(["status", "--config", str(config)]) == 0
    assert "BELOW min_free_disk_mb: every C-STORE is refused" in capsys.readouterr().out


def test_unreachable_peer_and_bad_peer_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["echo", f"NOBODY@127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "could not associate with NOBODY@127.0.0.1:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["echo", "127.0.0.1:104"])
    assert exit_info.value.code == 2
    assert "expected AET@HOST:PORT" in capsys.readouterr().err


def test_heavy_commands_load_only_when_run() -> None:
    """`dicomnode status` must not pay for importing torch."""
    code = ("import sys; from dicomnode.cli import build_parser; build_parser('status'); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def _config_of_a_node_that_ran(tmp_path: Path) -> tuple[Path, StudyIndex]:
    """A config file and the index its node made (open: the caller closes it)."""
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    settings = settings_from_mapping({"storage": {"data_dir": str(tmp_path / "data")}},
                                     base_dir=tmp_path)
    settings.data_dir.mkdir()
    return config, StudyIndex(settings.database_url)


def test_status_of_a_newer_version_leaves_an_older_index_to_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An upgrade installed under a running node: the new CLI must not migrate the index
    under it, and says what to do."""
    config, index = _config_of_a_node_that_ran(tmp_path)
    with index.engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"),
                     {"v": str(SCHEMA_VERSION - 1)})
    assert main(["status", "--config", str(config)]) == 1
    assert "start this version's `dicomnode serve`" in capsys.readouterr().err
    assert index.schema_version() == SCHEMA_VERSION - 1
    index.close()


def test_resend_of_an_unknown_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, index = _config_of_a_node_that_ran(tmp_path)
    index.close()
    assert main(["resend", "--config", str(config), "1.2.3"]) == 1
    assert "nothing to resend for study 1.2.3" in capsys.readouterr().err


def test_send_of_a_missing_path_and_a_bad_calling_aet_are_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = f"PACS@127.0.0.1:{free_port()}"
    assert main(["send", str(tmp_path / "nothing-here"), peer]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert main(["send", str(tmp_path), peer]) == 1  # nothing sent is not a success
    with pytest.raises(SystemExit) as exit_info:
        main(["echo", peer, "--aet", "BAD\\AE"])
    assert exit_info.value.code == 2
    assert "--aet = 'BAD\\\\AE'" in capsys.readouterr().err


def test_a_lower_case_log_level_is_accepted() -> None:
    loggers = [logging.getLogger(), logging.getLogger("pynetdicom"),
               logging.getLogger("highdicom")]
    levels = [one.level for one in loggers]
    try:
        setup_logging("info")  # the config accepts it; serve crashed on it
        assert logging.getLogger("pynetdicom").level == logging.WARNING
    finally:
        for one, level in zip(loggers, levels, strict=True):
            one.setLevel(level)


def test_an_index_that_cannot_be_opened_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[storage]\ndatabase_url = "postgresql+nodriver://u:S3cr@t@127.0.0.1:1/db"\n')
    assert main(["status", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "cannot open the study index 'postgresql+nodriver://u:***@127.0.0.1:1/db'" in err
    assert "S3cr" not in err  # the password stays out of messages and logs
    with pytest.raises(IndexUnavailable, match="unable to open database file"):
        StudyIndex(f"sqlite:///{tmp_path / 'missing-folder' / 'index.sqlite'}")
    config.write_text('[storage]\ndatabase_url = "sqlite://"\n')
    assert main(["status", "--config", str(config)]) == 1
    assert "is in memory" in capsys.readouterr().err


def test_an_index_from_a_newer_dicomnode_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    StudyIndex(url).close()
    with StudyIndex(url).engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = '999' WHERE key = 'schema_version'"))
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndatabase_url = "{url}"\n')
    assert main(["status", "--config", str(config)]) == 1
    assert "newer than this dicomnode" in capsys.readouterr().err


def test_purge_deletes_idle_studies_and_old_set_aside_files_with_the_node_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    from datetime import timedelta

    from pydicom.data import get_testdata_file

    from dicomnode.scp import instance_record
    from storage.filestore import DataDirLock, FileStore
    from storage.index import utcnow
    from storage.models import CompletionRule

    data = tmp_path / "data"
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{data}"\n')
    filestore = FileStore(data)
    index = StudyIndex(f"sqlite:///{data / 'index.sqlite'}")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    record = instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "CT")
    relpath = filestore.instance_relpath(record.study_instance_uid,
                                         record.series_instance_uid, record.sop_instance_uid)
    filestore.write(relpath, b"x" * 1000)
    long_ago = utcnow() - timedelta(days=60)
    index.add_instance(record, relpath, 1000, "sha", now=long_ago)
    [series] = index.collecting_series()
    complete_job(index, series.job_id, CompletionRule.QUIET, "min_slices: 1 instances", 1,
                       now=long_ago)
    index.close()
    old_reject, _ = filestore.keep_aside("rejected", "unparsed", b"junk")
    os.utime(data / old_reject, (long_ago.timestamp(), long_ago.timestamp()))
    new_reject, _ = filestore.keep_aside("rejected", "unparsed", b"other junk")
    seen_again, _ = filestore.keep_aside("rejected", "unparsed", b"junk sent again")
    os.utime(data / seen_again, (long_ago.timestamp(), long_ago.timestamp()))
    assert filestore.keep_aside("rejected", "unparsed", b"junk sent again") == (seen_again, False)

    node = DataDirLock(data)  # a running node holds the data directory
    node.acquire()
    try:
        assert main(["purge", "--config", str(config), "--older-than", "30"]) == 1
        assert "stop it first" in capsys.readouterr().err
    finally:
        node.release()
    assert main(["purge", "--config", str(config), "--older-than", "30", "--dry-run"]) == 0
    assert "would remove 1 study(ies), 2 file(s)" in capsys.readouterr().out
    assert (data / relpath).exists() and (data / old_reject).exists()
    assert main(["purge", "--config", str(config), "--older-than", "30"]) == 0
    assert f"removed study {record.study_instance_uid}" in capsys.readouterr().out
    assert not (data / relpath).exists() and not (data / relpath).parent.parent.exists()
    assert not (data / old_reject).exists() and (data / new_reject).exists()
    assert (data / seen_again).exists()  # sent again since: counts from then
    assert (data / "instances").is_dir()
    index = StudyIndex(f"sqlite:///{data / 'index.sqlite'}")
    assert index.counts()["studies"] == 0 and index.counts()["instances"] == 0
    index.close()


def test_reanalyse_of_an_unknown_uid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, index = _config_of_a_node_that_ran(tmp_path)
    index.close()
    assert main(["reanalyse", "--config", str(config), "1.2.3"]) == 1
    assert "no series or study 1.2.3 in the index" in capsys.readouterr().err


def test_reanalyse_of_a_skipped_series_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pydicom.data import get_testdata_file

    from dicomnode.scp import instance_record
    from storage.models import CompletionRule

    config, index = _config_of_a_node_that_ran(tmp_path)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    record = instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "CT")
    index.add_instance(record, "p/1", 10, "sha1")
    [progress] = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.QUIET, "min_slices", 1)
    index.close()
    series = record.series_instance_uid
    assert main(["reanalyse", "--config", str(config), series]) == 1
    assert (f"series {series}: skipped (min_slices), not queued; --skipped analyses it"
            in capsys.readouterr().err)
    assert main(["reanalyse", "--config", str(config), record.study_instance_uid,
                 "--skipped"]) == 0
    assert f"series {series}: queued for a new analysis" in capsys.readouterr().out


def test_reanalyse_of_a_seg_series_promises_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A radiologist's SEG sent back: skipped by the rules, and nothing would analyse it,
    so no hint to try --skipped (which said it would, then did not)."""
    from dataclasses import replace

    from pydicom.data import get_testdata_file

    from dicomnode.scp import instance_record
    from storage.models import CompletionRule

    config, index = _config_of_a_node_that_ran(tmp_path)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    record = replace(instance_record(ds, str(ds.file_meta.TransferSyntaxUID), "OHIF"),
                     sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", modality="SEG")
    index.add_instance(record, "p/1", 10, "sha1")
    [progress] = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.QUIET, "modalities: SEG", 1)
    index.close()
    for extra in ([], ["--skipped"]):
        assert main(["reanalyse", "--config", str(config), record.series_instance_uid,
                     *extra]) == 1
        err = capsys.readouterr().err
        assert "holds no CT image to analyse, not queued\n" in err and "--skipped" not in err


def test_status_says_when_the_model_does_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, index = _config_of_a_node_that_ran(tmp_path)
    index.set_model_problem("checkpoint weights/modle.pt not found")
    index.close()
    assert main(["status", "--config", str(config)]) == 0
    assert "AI: the model has not loaded since" in capsys.readouterr().out
    assert main(["status", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["model_problem"]
    assert shown["reason"] == "checkpoint weights/modle.pt not found"


def test_no_config_anywhere_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A forgotten --config must not look like an empty node without a word."""
    monkeypatch.chdir(tmp_path)
    assert main(["status"]) == 0
    captured = capsys.readouterr()
    assert f"no --config and no ./config.toml: the defaults, data in {tmp_path}" in captured.err
    assert "the node has not run" in captured.out

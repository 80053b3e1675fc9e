"""The study index: idempotent instances, job lifecycle, queue, restart recovery, schema."""

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from dicomnode.assembler import SeriesAssembler, completion_rule
from dicomnode.config import SeriesConfig
from storage.index import (
    ClaimedJob,
    InstanceRecord,
    SchemaMigrationNeeded,
    SchemaVersionError,
    StudyIndex,
    fitted,
)
from storage.models import SCHEMA_VERSION, CompletionRule, JobState, RefusedInstance
from tests.conftest import complete_job

T0 = datetime(2026, 1, 1, 12, 0, 0)


def record(n: int, series: str = "1.2.3.4", study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study, series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id="PAT1", modality="CT",
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), image_type=("ORIGINAL", "PRIMARY"),
        slice_thickness_mm=1.25, instance_number=n, accession_number="ACC1",
    )


@pytest.fixture
def index(tmp_path: Path) -> StudyIndex:
    return StudyIndex(f"sqlite:///{tmp_path / 'index.sqlite'}")


def add(index: StudyIndex, n: int, at: datetime, **kw: str) -> bool:
    return index.add_instance(record(n, **kw), f"p/{n}", 10, f"sha{n}", now=at)


def test_instances_build_the_hierarchy_once(index: StudyIndex) -> None:
    assert add(index, 1, T0)
    assert add(index, 2, T0 + timedelta(seconds=1))
    assert not add(index, 2, T0 + timedelta(seconds=2))  # same SOP Instance UID: no new row
    add(index, 1, T0, series="1.2.3.5")
    counts = index.counts()
    assert (counts["patients"], counts["studies"], counts["series"], counts["instances"]) == (
        1, 1, 2, 3)
    (progress, _) = index.collecting_series()
    assert progress.instance_count == 2
    assert progress.last_received_at == T0 + timedelta(seconds=1)
    assert progress.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert progress.image_type == ("ORIGINAL", "PRIMARY")
    assert index.find_instance("1.2.3.4.2").sha256 == "sha2"
    assert index.series_instance_paths("1.2.3.4") == ["p/1", "p/2"]


def test_a_series_that_begins_with_its_localizer_is_described_by_its_slices(
    index: StudyIndex,
) -> None:
    """Some scanners file the localizer (acquired first) in the axial series: the series
    rules must judge the series by its slices, not skip it as a localizer."""
    scout = replace(record(1), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                                image_orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
                                slice_thickness_mm=None)
    assert index.add_instance(scout, "p/1", 10, "sha1", now=T0)
    [progress] = index.collecting_series()
    assert "LOCALIZER" in progress.image_type
    for n in (2, 3):
        add(index, n, T0 + timedelta(seconds=n))
        [progress] = index.collecting_series()
        assert progress.image_type == ("ORIGINAL", "PRIMARY")
        assert progress.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        assert progress.slice_thickness_mm == 1.25
        assert progress.instance_count == n
    # A localizer later in the series changes nothing.
    index.add_instance(replace(scout, sop_instance_uid="1.2.3.4.9"), "p/9", 10,
                       "sha9", now=T0 + timedelta(seconds=9))
    [progress] = index.collecting_series()
    assert progress.image_type == ("ORIGINAL", "PRIMARY") and progress.instance_count == 4


def test_the_c_store_fast_path_writes_rows_as_the_orm_does(index: StudyIndex) -> None:
    add(index, 1, T0)  # a new series: ORM
    # another instance of a collecting series: compiled driver statements, not the ORM
    assert index._add_to_collecting_series(record(2), "p/2", 10, "sha2", T0) == T0
    with index.engine.connect() as conn:
        first, second = (dict(r._mapping) for r in conn.execute(
            text("SELECT * FROM instance ORDER BY id")))  # fmt: skip
        series = conn.execute(text("SELECT instance_count, last_received_at FROM series")).one()
    assert {k for k in first if first[k] != second[k]} == {
        "id", "sop_instance_uid", "instance_number", "path", "sha256"}
    assert tuple(series) == (2, first["received_at"])


def test_complete_refuses_a_series_that_grew(index: StudyIndex) -> None:
    add(index, 1, T0)
    (progress,) = index.collecting_series()
    add(index, 2, T0)
    assert not complete_job(index, progress.job_id, CompletionRule.QUIET, None, 1)
    assert complete_job(index, progress.job_id, CompletionRule.QUIET, None, 2)
    assert index.job_state(progress.job_id) == (JobState.QUEUED, "")


def test_a_skipped_series_is_logged_at_info_by_its_rule_alone(
    index: StudyIndex, caplog: pytest.LogCaptureFixture
) -> None:
    """A skip reason may quote the series description, free text that can hold a name:
    INFO names the rule, DEBUG (and `dicomnode status`) the whole reason."""
    rec = replace(record(1), series_description="DOE JOHN chest")
    index.add_instance(rec, "p/1", 10, "sha1", now=T0)
    assembler = SeriesAssembler(index, SeriesConfig(quiet_seconds=10, min_slices=1,
                                                    description_regex="^lung"))
    assembler.started_at = T0 - timedelta(hours=1)
    caplog.set_level(logging.DEBUG, logger="dicomnode.assembler")
    assert assembler.check(now=T0 + timedelta(seconds=11)) == 1
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info == ["series 1.2.3.4 complete (quiet_period): skipped by the series rule "
                    "description_regex"]
    assert any("DOE JOHN" in r.getMessage() for r in caplog.records
               if r.levelno == logging.DEBUG)


def test_the_deadline_holds_while_instances_keep_arriving(
    index: StudyIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assembler decides again under the index's write lock: an instance that arrives
    between its read and its close ends a quiet period the read saw, and yet a series
    that grows like that on every look meets its max_wait deadline, judged on what it
    holds by then (enough slices, where the read had too few)."""
    rules = SeriesConfig(quiet_seconds=10, max_wait_seconds=60, min_slices=4)
    assembler = SeriesAssembler(index, rules)
    assembler.started_at = T0 - timedelta(hours=1)
    read = index.collecting_series
    arrivals = iter(range(2, 100))
    clock = T0

    def read_then_one_arrives() -> list[Any]:
        progress = read()
        add(index, next(arrivals), clock)
        return progress

    def check(seconds: float) -> int:
        nonlocal clock
        clock = T0 + timedelta(seconds=seconds)
        return assembler.check(now=clock)

    monkeypatch.setattr(index, "collecting_series", read_then_one_arrives)
    add(index, 1, T0)
    assert check(11) == 0  # quiet by the read, not by the index
    assert check(40) == 0
    assert check(61) == 1
    [row] = index.series_status()
    assert (row["state"], row["completion_rule"], row["instances"]) == ("queued", "max_wait", 4)


def test_late_instance_reopens_or_starts_a_new_pass(index: StudyIndex) -> None:
    add(index, 1, T0)
    (first,) = index.collecting_series()
    complete_job(index, first.job_id, CompletionRule.QUIET, "min_slices: too few", 1)
    add(index, 2, T0)  # skipped series re-opened by a late instance
    (again,) = index.collecting_series()
    assert again.job_id == first.job_id
    assert index.series_status()[0]["reopen_count"] == 1
    complete_job(index, first.job_id, CompletionRule.QUIET, None, 2)
    claimed = index.claim_next_job("w1")
    assert claimed is not None and claimed.job_id == first.job_id
    add(index, 3, T0)  # analysis already started: a new pass, the running job is untouched
    (new_pass,) = index.collecting_series()
    assert new_pass.job_id != first.job_id
    assert index.job_state(first.job_id)[0] == JobState.RUNNING


def test_queue_claims_oldest_first_and_finishes(index: StudyIndex) -> None:
    for series in ("1.1", "1.2"):
        add(index, 1, T0, series=series)
    for progress in index.collecting_series():
        complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 1)
    a, b = index.claim_next_job("w"), index.claim_next_job("w")
    assert a and b and (a.series_instance_uid, b.series_instance_uid) == ("1.1", "1.2")
    assert index.claim_next_job("w") is None
    assert index.finish_job(a.job_id, a.attempts, JobState.DONE)
    assert index.finish_job(b.job_id, b.attempts, JobState.FAILED, "NoLungsFound: no lungs")
    assert index.job_state(b.job_id) == (JobState.FAILED, "NoLungsFound: no lungs")
    assert not index.finish_job(a.job_id, a.attempts, JobState.FAILED)  # not running
    assert index.job_state(a.job_id) == (JobState.DONE, "")
    with pytest.raises(ValueError, match="done or failed"):
        index.finish_job(a.job_id, a.attempts, JobState.QUEUED)


def race(url: str, a: Callable[[StudyIndex], Any], b: Callable[[StudyIndex], Any]) -> tuple:
    """Run `a` and `b` on two handles of one index, as two worker processes hold them, with
    `a` held between its first read and its writes until `b` is done (or for 1 s: `b`
    waits for `a`'s transaction when the database serialises them)."""
    index_a, index_b = StudyIndex(url), StudyIndex(url)
    a_has_read, b_is_done = threading.Event(), threading.Event()

    def hold_a_after_its_read(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT") and not a_has_read.is_set():
            a_has_read.set()
            b_is_done.wait(timeout=1.0)

    results: dict[str, Any] = {}

    def run_b() -> None:
        a_has_read.wait(timeout=5.0)
        results["b"] = b(index_b)
        b_is_done.set()

    event.listen(index_a.engine, "after_cursor_execute", hold_a_after_its_read)
    thread = threading.Thread(target=run_b)
    thread.start()
    results["a"] = a(index_a)
    thread.join()
    index_a.close()
    index_b.close()
    return results["a"], results["b"]


def queued_jobs(url: str, *series: str) -> StudyIndex:
    index = StudyIndex(url)
    for uid in series:
        add(index, 1, T0, series=uid)
    for progress in index.collecting_series():
        complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 1)
    return index


def test_two_workers_never_claim_the_same_job(tmp_path: Path) -> None:
    """The claim's read and its update are one step for the database, not just for one
    process's lock."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    queued_jobs(url, "1.1", "1.2").close()
    a, b = race(url, lambda index: index.claim_next_job("a"),
                lambda index: index.claim_next_job("b"))
    assert a is not None and b is not None
    assert {a.series_instance_uid, b.series_instance_uid} == {"1.1", "1.2"}


def test_two_workers_finishing_one_job_queue_its_outputs_once(tmp_path: Path) -> None:
    """A node killed mid-job and restarted: its orphaned worker and the new one both finish
    the job and queue the same outputs at the same moment."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = queued_jobs(url, "1.1")
    job = index.claim_next_job("w")
    assert job is not None
    index.close()

    def queue(index: StudyIndex) -> int | None:
        return index.queue_export(job.job_id, "pacs", ["seg.dcm", "sr.dcm"], 60)

    a, b = race(url, queue, queue)
    assert (a is None) != (b is None)


def test_restart_requeues_running_jobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = StudyIndex(url)
    add(index, 1, T0)
    (progress,) = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.QUIET, None, 1)
    claimed = index.claim_next_job("w")
    index.close()
    reopened = StudyIndex(url)
    assert reopened.recover_after_restart() == (1, 0)
    assert reopened.job_state(claimed.job_id)[0] == JobState.QUEUED
    again = reopened.claim_next_job("w")
    assert again is not None and again.attempts == 2
    # the killed node's orphaned worker finishes its attempt: the new claim stands
    assert not reopened.finish_job(claimed.job_id, claimed.attempts, JobState.FAILED, "x")
    assert reopened.job_state(claimed.job_id)[0] == JobState.RUNNING
    assert reopened.finish_job(again.job_id, again.attempts, JobState.DONE)


def test_schema_version_is_recorded_and_newer_files_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = StudyIndex(url)
    assert index.schema_version() == SCHEMA_VERSION
    with index.engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"),
                     {"v": str(SCHEMA_VERSION + 1)})
    index.close()
    with pytest.raises(SchemaVersionError, match="newer than this dicomnode"):
        StudyIndex(url)


def test_sqlite_runs_in_wal_mode(index: StudyIndex) -> None:
    with index.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_status_rows_carry_state_and_reason(index: StudyIndex) -> None:
    add(index, 1, T0)
    (progress,) = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.MAX_WAIT, "modalities: MR", 1)
    (row,) = index.series_status()
    assert (row["state"], row["reason"], row["completion_rule"]) == (
        "skipped", "modalities: MR", "max_wait")
    assert row["accession_number"] == "ACC1" and row["instances"] == 1
    assert replace(record(1), modality="MR").modality == "MR"


def test_a_new_pass_waits_its_own_max_wait(index: StudyIndex) -> None:
    """A series analysed an hour ago gets a late instance: the new pass must not be
    closed at once by a max_wait counted from the series' first instance."""
    add(index, 1, T0)
    (progress,) = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.QUIET, None, 1, now=T0)
    job = index.claim_next_job("w")
    assert job is not None and index.finish_job(job.job_id, job.attempts, JobState.DONE)
    late = T0 + timedelta(hours=1)
    add(index, 2, late)
    (second_pass,) = index.collecting_series()
    assert second_pass.job_id != progress.job_id
    assert second_pass.collecting_since == late
    rules = SeriesConfig(quiet_seconds=10, release_grace_seconds=2, max_wait_seconds=600)
    assert completion_rule(second_pass, rules, late + timedelta(seconds=1)) is None
    # and a late instance that re-opens a queued job starts its pass anew too
    complete_job(index, second_pass.job_id, CompletionRule.QUIET, None, 2, now=late)
    later = late + timedelta(hours=1)
    add(index, 3, later)
    (reopened,) = index.collecting_series()
    assert reopened.job_id == second_pass.job_id and reopened.collecting_since == later


def _index_at_schema_2(tmp_path: Path, drop_column: bool = True) -> str:
    """The URL of an index with one instance, as schema version 2 left it (no
    collecting_since column; `drop_column=False`: as a migration cut short on a database
    that commits DDL on its own leaves it)."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = StudyIndex(url)
    add(index, 1, T0)
    with index.engine.begin() as conn:
        if drop_column:
            conn.execute(text("ALTER TABLE job DROP COLUMN collecting_since"))
        conn.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    index.close()
    return url


def test_a_command_does_not_migrate_an_older_schema(tmp_path: Path) -> None:
    """A CLI command of a newer dicomnode may run beside a node of the older version (an
    upgrade installed under a running service): it must not change the schema under that
    node, and says who migrates."""
    url = _index_at_schema_2(tmp_path)
    with pytest.raises(SchemaMigrationNeeded,
                       match=r"schema version 2, older than .*start this version's `dicomnode"
                             r" serve` \(after stopping the node that serves it now"):
        StudyIndex(url, schema="check")
    assert StudyIndex(url, schema="defer").schema_version() == 2  # read, not migrated
    assert StudyIndex(url).schema_version() == SCHEMA_VERSION  # as serve opens it
    assert StudyIndex(url, schema="check").schema_version() == SCHEMA_VERSION


def test_a_database_error_does_not_quote_the_values(tmp_path: Path) -> None:
    """A driver error (a full disk, a lost connection, a constraint) is logged with its
    message: the bound values, a patient's name and ID among them, stay out of it."""
    index = StudyIndex(f"sqlite:///{tmp_path / 'index.sqlite'}")
    with pytest.raises(IntegrityError) as error, index.engine.begin() as conn:
        conn.execute(text("INSERT INTO meta (key, value) VALUES (:key, :value)"),
                     {"key": "schema_version", "value": "DOE^JOHN"})
    assert "DOE^JOHN" not in str(error.value) and "hidden" in str(error.value)


def test_a_refused_older_schema_gets_no_ddl(tmp_path: Path) -> None:
    """The refusal comes before `create_all`: on a database whose DDL commits on its own
    (MySQL) a refusing command would otherwise leave a newer version's tables behind
    under the older node. Version 5 added the refused_instance table."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    StudyIndex(url).close()
    with StudyIndex(url, schema="defer").engine.begin() as conn:
        conn.execute(text("DROP TABLE refused_instance"))
        conn.execute(text("UPDATE meta SET value = '4' WHERE key = 'schema_version'"))
    sent: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        with pytest.raises(SchemaMigrationNeeded, match="schema version 4"):
            StudyIndex(url, schema="check")
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert sent and not [s for s in sent if s.lstrip().upper().startswith(("CREATE", "ALTER"))]
    assert StudyIndex(url).schema_version() == SCHEMA_VERSION  # serve still migrates it


def test_migration_from_schema_2_starts_each_pass_at_its_job_creation(tmp_path: Path) -> None:
    url = _index_at_schema_2(tmp_path)
    migrated = StudyIndex(url)
    assert migrated.schema_version() == SCHEMA_VERSION
    (progress,) = migrated.collecting_series()
    assert progress.collecting_since == T0


def test_a_release_marks_a_series_only_if_that_association_sent_its_latest_instance(
    index: StudyIndex,
) -> None:
    """Two associations send one series; the first is released while the second still
    sends: the series must keep collecting (its release grace would cut it short)."""
    add(index, 1, T0)  # association A
    add(index, 2, T0 + timedelta(seconds=1))  # association B, still open
    index.mark_released({"1.2.3.4": T0}, now=T0 + timedelta(seconds=2))  # A ends
    (progress,) = index.collecting_series()
    assert progress.released_at is None
    index.mark_released({"1.2.3.4": T0 + timedelta(seconds=1)}, now=T0 + timedelta(seconds=3))
    (progress,) = index.collecting_series()
    assert progress.released_at == T0 + timedelta(seconds=3)


def _analysed(index: StudyIndex, study: str, at: datetime, delivered: bool = True) -> int:
    """A study of one series, analysed and its output queued (and delivered) at `at`."""
    add(index, 1, at, series=f"{study}.1", study=study)
    [progress] = [p for p in index.collecting_series() if p.study_instance_uid == study]
    complete_job(index, progress.job_id, CompletionRule.QUIET, None, 1, now=at)
    claim = index.claim_next_job("w", now=at)
    assert claim is not None
    index.finish_job(claim.job_id, claim.attempts, JobState.DONE, now=at)
    export_id = index.queue_export(claim.job_id, "pacs", [f"out/{study}"], 60, now=at)
    assert export_id is not None
    if delivered:
        assert index.claim_due_export(now=at) is not None
        index.finish_export(export_id, now=at)
    return claim.job_id


def test_purge_removes_only_studies_idle_since_the_cutoff(index: StudyIndex) -> None:
    old, recent = T0, T0 + timedelta(days=40)
    _analysed(index, "9.1", old)  # idle for 40 days: goes
    _analysed(index, "9.3", recent)  # recent: stays (delivered before 9.2 is owed)
    _analysed(index, "9.2", old, delivered=False)  # its delivery still pending: stays
    add(index, 1, old, series="9.4.1", study="9.4")  # still collecting: stays
    index.record_refused("9.1.1", "9.1.99", "CT1", "disk", now=old)
    index.record_refused("9.4.1", "9.4.99", "CT1", "disk", now=old)
    cutoff = recent - timedelta(days=30)
    [idle] = index.idle_studies(cutoff)
    assert idle.study_instance_uid == "9.1" and idle.paths == ("p/1",)
    assert index.counts()["studies"] == 4  # only listed
    assert index.delete_studies(["9.1", "no.such.study"]) == 1
    assert {r["study_instance_uid"] for r in index.series_status()} == {"9.2", "9.3", "9.4"}
    assert index.counts()["patients"] == 1  # the patient has other studies
    assert all(e["study_instance_uid"] != "9.1" for e in index.export_status())
    assert index.idle_studies(cutoff) == []
    with index.engine.connect() as conn:  # the purged series' refusal went with it
        assert conn.execute(select(RefusedInstance.sop_instance_uid)).scalars().all() == [
            "9.4.99"]


def test_add_instance_returns_the_receive_time_it_wrote(index: StudyIndex) -> None:
    """The SCP keeps this time for its association's release: it must be the index's
    own, taken under the write lock (a time taken before it let a release mark a series
    that another association had just added to)."""
    first = index.add_instance(record(1), "p/1", 10, "sha1")  # ORM path
    second = index.add_instance(record(2), "p/2", 10, "sha2")  # compiled fast path
    assert first is not None and second is not None and first <= second
    [progress] = index.collecting_series()
    assert progress.last_received_at == second
    assert index.add_instance(record(2), "p/2", 10, "sha2") is None  # already indexed


def test_the_running_mark_is_in_the_database_file_not_only_in_the_wal(tmp_path: Path) -> None:
    """With synchronous=NORMAL a commit may wait in the WAL unsynced; the mark that makes
    the next start reconcile the store after a power cut must not."""
    import shutil
    import sqlite3

    index = StudyIndex(f"sqlite:///{tmp_path / 'index.sqlite'}")
    index.mark_clean_shutdown()
    index.mark_running()
    shutil.copy(tmp_path / "index.sqlite", tmp_path / "copy.sqlite")  # without its WAL
    index.close()
    conn = sqlite3.connect(tmp_path / "copy.sqlite")
    [(value,)] = conn.execute("SELECT value FROM meta WHERE key = 'clean_shutdown'").fetchall()
    conn.close()
    assert value == "0"


def test_a_restart_fails_a_job_already_claimed_max_attempts_times(tmp_path: Path) -> None:
    """A series that took the whole node down (the kernel killed the service for its
    memory) must not do it again at every start."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = StudyIndex(url)
    add(index, 1, T0)
    [progress] = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.QUIET, None, 1)
    for _ in range(2):  # claimed, the node dies, restarted: claimed again, dies again
        assert index.claim_next_job("w") is not None
        queued, failed = index.recover_after_restart(max_attempts=2)
    index.close()
    assert (queued, failed) == (0, 1)
    index = StudyIndex(url)
    state, reason = index.job_state(progress.job_id)
    index.close()
    assert state == JobState.FAILED and "interrupted by a restart on each of 2" in reason


def test_a_superseded_claim_queues_no_export(index: StudyIndex) -> None:
    """An orphaned worker of a crashed node finishes its claim after a restarted node
    queued (or re-claimed) the job: what it made must not go to the PACS."""
    add(index, 1, T0)
    [progress] = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.QUIET, None, 1)
    orphan = index.claim_next_job("w")
    assert orphan is not None
    index.recover_after_restart()  # the node restarted: the job is queued again
    assert index.queue_export(orphan.job_id, "pacs", ["a"], 60, attempt=orphan.attempts) is None
    current = index.claim_next_job("w")
    assert current is not None and current.attempts == orphan.attempts + 1
    assert index.queue_export(orphan.job_id, "pacs", ["a"], 60, attempt=orphan.attempts) is None
    assert index.queue_export(current.job_id, "pacs", ["a"], 60,
                              attempt=current.attempts) is not None


def test_only_the_uid_constraint_reads_as_a_duplicate(
    index: StudyIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other integrity error on the fast path is raised (the SCP answers 0xA700), not
    taken for an instance stored already (answered 0x0000 with nothing indexed)."""
    import sqlite3

    assert add(index, 1, T0)

    def violate(*args: Any) -> None:
        raise sqlite3.IntegrityError("FOREIGN KEY constraint failed")

    monkeypatch.setattr(index._count_instance, "execute", violate)
    with pytest.raises(sqlite3.IntegrityError):
        add(index, 2, T0 + timedelta(seconds=1))
    assert index.find_instance("1.2.3.4.2") is None
    assert not add(index, 1, T0 + timedelta(seconds=2))  # a true duplicate still is one


def test_a_migration_cut_short_leaves_the_old_version_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed (here: failing) after its ALTER TABLE: the next open migrates again."""
    import sqlite3

    import storage.index as index_module

    url = _index_at_schema_2(tmp_path)
    migrate = index_module.MIGRATIONS[2]

    def cut_short(conn: Any) -> None:
        migrate(conn)
        raise KeyboardInterrupt

    monkeypatch.setitem(index_module.MIGRATIONS, 2, cut_short)
    with pytest.raises(KeyboardInterrupt):
        StudyIndex(url)
    with sqlite3.connect(tmp_path / "index.sqlite") as conn:  # the ALTER rolled back too
        assert "collecting_since" not in {row[1] for row in conn.execute("PRAGMA table_info(job)")}
    monkeypatch.setitem(index_module.MIGRATIONS, 2, migrate)
    migrated = StudyIndex(url)
    assert migrated.schema_version() == SCHEMA_VERSION
    assert migrated.collecting_series()[0].collecting_since == T0


def test_a_migration_runs_again_over_its_own_column(tmp_path: Path) -> None:
    """A database whose DDL commits on its own (MySQL) can be left with the column added
    and the old version number."""
    url = _index_at_schema_2(tmp_path, drop_column=False)
    assert StudyIndex(url).schema_version() == SCHEMA_VERSION


def test_text_longer_than_its_column_is_cut_to_fit(index: StudyIndex) -> None:
    """PostgreSQL and MySQL refuse a value over a column's width (SQLite would keep it):
    a long SeriesDescription must not make every C-STORE of its series fail."""
    long = replace(record(1), series_description="D" * 100, accession_number="A" * 20,
                   image_type=("ORIGINAL", "PRIMARY", *(f"VALUE{i:02d}" for i in range(20))))
    assert index.add_instance(long, "p/1", 10, "sha1", now=T0)
    (row,) = index.series_status()
    assert (row["series_description"], row["accession_number"]) == ("D" * 64, "A" * 16)
    (progress,) = index.collecting_series()
    assert progress.image_type[:3] == ("ORIGINAL", "PRIMARY", "VALUE00")
    assert len("\\".join(progress.image_type)) <= 128


def test_studies_without_a_patient_id_are_not_one_patient(tmp_path: Path) -> None:
    """Anonymised studies that lack PatientID keep their own names (status shows them);
    an index of version 3, whose PatientID index was unique, is migrated to allow it."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    index = StudyIndex(url)
    with index.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_patient_patient_id"))
        conn.execute(text("CREATE UNIQUE INDEX ix_patient_patient_id ON patient (patient_id)"))
        conn.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    index.close()
    index = StudyIndex(url)
    assert index.schema_version() == SCHEMA_VERSION
    for n, name in ((1, "FIRST^ANON"), (2, "SECOND^ANON")):
        anonymous = replace(record(n, series=f"1.2.3.{n}", study=f"1.2.{n}"), patient_id="",
                            patient_name=name)
        assert index.add_instance(anonymous, f"p/{n}", 10, "sha", now=T0)
    index.add_instance(record(3, series="1.2.3.3", study="1.2.3"), "p/3", 10, "sha", now=T0)
    index.add_instance(record(4, series="1.2.3.4", study="1.2.4"), "p/4", 10, "sha", now=T0)
    assert index.counts()["patients"] == 3  # two without an ID, one PAT1 with two studies


def _claimed_job(index: StudyIndex) -> ClaimedJob:
    """One instance's series, complete, queued and claimed by a worker."""
    add(index, 1, T0)
    (progress,) = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 1)
    job = index.claim_next_job("w")
    assert job is not None
    return job


def test_an_internal_error_queues_the_job_again_until_max_attempts(index: StudyIndex) -> None:
    first = _claimed_job(index)
    assert index.retry_job(first.job_id, first.attempts, "internal error: OSError: EIO",
                           max_attempts=2) == JobState.QUEUED
    assert index.job_state(first.job_id) == (JobState.QUEUED,
                                             "re-queued: internal error: OSError: EIO")
    second = index.claim_next_job("w")
    assert second is not None and second.attempts == 2
    assert index.retry_job(first.job_id, first.attempts, "stale", 2) is None  # not that claim
    assert index.retry_job(second.job_id, second.attempts, "internal error: OSError: EIO",
                           max_attempts=2) == JobState.FAILED
    assert index.job_state(second.job_id) == (
        JobState.FAILED, "internal error: OSError: EIO on each of 2 attempts")


def test_reanalyse_queues_each_finished_series_of_a_study_again(index: StudyIndex) -> None:
    for series in ("1.1", "1.2", "1.3"):
        add(index, 1, T0, series=series)
    for progress in index.collecting_series():
        complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 1)
    done, failed = index.claim_next_job("w"), index.claim_next_job("w")
    assert done is not None and failed is not None
    index.finish_job(done.job_id, done.attempts, JobState.DONE)
    index.finish_job(failed.job_id, failed.attempts, JobState.FAILED, "internal error: x")
    queued, others = index.reanalyse("1.2.3")  # the study
    assert queued == ["1.1", "1.2"] and others == {"1.3": "queued"}
    rows = {r["series_instance_uid"]: r for r in index.series_status()}
    assert rows["1.1"]["state"] == rows["1.2"]["state"] == "queued"
    assert rows["1.1"]["job_id"] not in (done.job_id, failed.job_id)
    again = index.claim_next_job("w")
    assert again is not None and again.series_instance_uid == "1.3"  # the oldest queued first
    assert index.reanalyse("1.1") == ([], {"1.1": "queued"})  # one series, already queued
    assert index.reanalyse("9.9") == ([], {})


def test_reanalyse_takes_a_skipped_series_only_when_asked(index: StudyIndex) -> None:
    """A series the rules skipped (rules since changed, say) is analysed again only on the
    administrator's word, and otherwise shown with the reason it was skipped."""
    add(index, 1, T0, series="1.1")
    [progress] = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.QUIET, "min_slices: 1 instances", 1)
    assert index.reanalyse("1.1") == ([], {"1.1": "skipped (min_slices: 1 instances)"})
    assert index.reanalyse("1.2.3", skipped=True) == (["1.1"], {})
    job = index.claim_next_job("w")
    assert job is not None and job.series_instance_uid == "1.1"


def test_reanalyse_never_queues_a_series_without_ct_images(index: StudyIndex) -> None:
    """A radiologist's corrected SEG sent back to the node is a series the rules skip;
    `reanalyse STUDY --skipped` queued it, and its job could only fail."""
    add(index, 1, T0, series="1.1")
    seg = replace(record(1, series="1.2"), sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                  modality="SEG")
    index.add_instance(seg, "p/seg", 10, "shaseg", now=T0)
    for progress in index.collecting_series():
        reason = "modalities: SEG is not one of ['CT']" if progress.series_instance_uid == (
            "1.2") else "min_slices: 1 instances"
        complete_job(index, progress.job_id, CompletionRule.QUIET, reason, 1)
    queued, others = index.reanalyse("1.2.3", skipped=True)
    assert queued == ["1.1"]
    assert others == {"1.2": "skipped (modalities: SEG is not one of ['CT']); holds no CT"
                             " image to analyse"}


def test_a_job_whose_series_grew_while_it_ran_is_superseded(index: StudyIndex) -> None:
    job = _claimed_job(index)
    assert not index.supersede_if_grown(job.job_id, job.attempts)  # nothing new
    add(index, 2, T0)  # a late instance: a new pass
    assert not index.supersede_if_grown(job.job_id, job.attempts + 1)  # not that claim
    assert index.supersede_if_grown(job.job_id, job.attempts)
    state, reason = index.job_state(job.job_id)
    assert state == JobState.SUPERSEDED and "analyses the whole series" in reason
    assert not index.finish_job(job.job_id, job.attempts, JobState.DONE)
    [row] = index.series_status()
    assert (row["state"], row["instances"]) == ("collecting", 2)  # the new pass is shown


def test_a_job_whose_series_grew_is_superseded_not_retried(index: StudyIndex) -> None:
    """Instances arrived while the job ran (a new pass exists), then the job met an error
    of the node's own, or its worker died: it must not run again before the new pass
    (claims go oldest first) nor fail with a notice of its own."""
    job = _claimed_job(index)
    add(index, 2, T0)  # the new pass
    assert index.retry_job(job.job_id, job.attempts, "internal error: x", 2) == (
        JobState.SUPERSEDED)
    assert "job" in index.job_state(job.job_id)[1]
    crashed = index.claim_next_job("w")
    assert crashed is None  # the new pass is still collecting: nothing else to claim
    other = _claimed_job_of(index, "1.9")
    add(index, 2, T0, series="1.9")
    assert index.release_worker_jobs("w", "killed (SIGKILL)", 2) == (0, 0)
    assert index.job_state(other.job_id)[0] == JobState.SUPERSEDED


def test_a_series_grown_after_a_failed_attempt_is_a_pass_with_its_own_attempts(
    index: StudyIndex,
) -> None:
    """Queued again after an error, then re-opened by a late instance: the grown series
    is a new job, whose first failure is retried like any (the old job's attempts
    would have failed it at once), while the old claims stay fenced."""
    job = _claimed_job(index)
    assert index.retry_job(job.job_id, job.attempts, "internal error: x", 2) == JobState.QUEUED
    add(index, 2, T0)
    assert index.job_state(job.job_id)[0] == JobState.SUPERSEDED
    (progress,) = index.collecting_series()
    assert progress.job_id != job.job_id and progress.instance_count == 2
    complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 2)
    new = index.claim_next_job("w")
    assert new is not None and new.job_id == progress.job_id and new.attempts == 1
    assert index.retry_job(new.job_id, new.attempts, "internal error: x", 2) == JobState.QUEUED


def _claimed_job_of(index: StudyIndex, series: str) -> ClaimedJob:
    add(index, 1, T0, series=series)
    progress = next(p for p in index.collecting_series() if p.series_instance_uid == series)
    complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 1)
    job = index.claim_next_job("w")
    assert job is not None and job.job_id == progress.job_id
    return job


def test_status_lists_a_series_by_its_latest_activity(index: StudyIndex) -> None:
    """An older study analysed again that fails is shown, not hidden behind the series
    received since (status lists the latest `limit`)."""
    add(index, 1, T0, series="1.1")
    (progress,) = index.collecting_series()
    complete_job(index, progress.job_id, CompletionRule.RELEASE, None, 1, now=T0)
    job = index.claim_next_job("w", now=T0)
    assert job is not None
    index.finish_job(job.job_id, job.attempts, JobState.DONE, now=T0 + timedelta(hours=1))
    add(index, 1, T0 + timedelta(hours=2), series="1.2")
    assert [r["series_instance_uid"] for r in index.series_status(limit=1)] == ["1.2"]
    assert index.reanalyse("1.1", now=T0 + timedelta(hours=3))[0] == ["1.1"]
    again = index.claim_next_job("w", now=T0 + timedelta(hours=3))
    assert again is not None and again.series_instance_uid == "1.1"
    index.finish_job(again.job_id, again.attempts, JobState.FAILED, "no lungs found",
                     now=T0 + timedelta(hours=4))
    [row] = index.series_status(limit=1)
    assert (row["series_instance_uid"], row["state"]) == ("1.1", "failed")


def test_a_malformed_orientation_fits_its_column() -> None:
    """ImageOrientationPatient holds six values; a malformed one with more must still be
    indexed on a server database (`dicomnode.volume` rejects the series, with why)."""
    twelve = replace(record(1), image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0) * 2)
    assert fitted(twelve).image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert fitted(record(1)) == record(1)


def test_the_assembler_sees_each_sop_class_of_a_series(index: StudyIndex) -> None:
    enhanced = "1.2.840.10008.5.1.4.1.1.2.1"
    add(index, 1, T0)
    index.add_instance(replace(record(2), sop_class_uid=enhanced), "p/2", 10, "sha2", now=T0)
    (progress,) = index.collecting_series()
    assert progress.sop_classes == tuple(sorted({record(1).sop_class_uid, enhanced}))
    seen: list[tuple[str, ...]] = []
    index.close_collecting_job(progress.job_id, lambda s: seen.append(s.sop_classes) or None)
    assert seen == [progress.sop_classes]

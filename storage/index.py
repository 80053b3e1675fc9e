"""The study index API: what the node knows about received data and where work stands.

SQLite in WAL mode by default (any SQLAlchemy URL works). Writes from this process are
serialised by one lock, so concurrent associations never race on new patients, studies
or series and never spin on SQLite's writer lock. Every state change is a committed row,
which is what lets a restart resume exactly where the node stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, create_engine, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.models import (
    SCHEMA_VERSION,
    Base,
    CompletionRule,
    Instance,
    Job,
    JobState,
    Meta,
    Patient,
    Series,
    Study,
)

logger = logging.getLogger(__name__)

# Migrations from version N to N+1, applied in order on open. New tables need none
# (create_all adds them); changed or added columns of existing tables do.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}

_REOPENABLE = (JobState.COLLECTING, JobState.COMPLETE, JobState.SKIPPED, JobState.QUEUED)


class SchemaVersionError(RuntimeError):
    """The index was written by a newer dicomnode, or cannot be migrated."""


def utcnow() -> datetime:
    """Naive UTC now: the index stores naive UTC datetimes (SQLite has no time zones)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class InstanceRecord:
    """The attributes of a received instance that the index keeps."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_description: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    image_type: tuple[str, ...] = ()
    image_orientation: tuple[float, ...] = ()
    slice_thickness_mm: float | None = None
    instance_number: int | None = None
    calling_aet: str = ""


@dataclass(frozen=True)
class StoredInstance:
    path: str
    sha256: str


@dataclass(frozen=True)
class SeriesProgress:
    """A collecting series as the assembler sees it."""

    job_id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str
    body_part_examined: str
    image_type: tuple[str, ...]
    image_orientation: tuple[float, ...]
    slice_thickness_mm: float | None
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    released_at: datetime | None


@dataclass(frozen=True)
class ClaimedJob:
    """A job handed to an AI worker."""

    job_id: int
    series_instance_uid: str
    study_instance_uid: str
    attempts: int


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged instance survives power loss
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _split(value: str) -> tuple[str, ...]:
    return tuple(value.split("\\")) if value else ()


class StudyIndex:
    """Open (creating or migrating) the index at a SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.RLock()
        self._prepare_schema()

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ------------------------------------------------------------------------

    def _prepare_schema(self) -> None:
        with self.engine.begin() as conn:
            Base.metadata.create_all(conn)
            row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
            version = int(row) if row is not None else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"index {self.url} has schema version {version}, newer than this "
                    f"dicomnode's {SCHEMA_VERSION}: upgrade dicomnode"
                )
            while version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise SchemaVersionError(f"no migration from schema version {version}")
                logger.info("migrating index schema %d -> %d", version, version + 1)
                MIGRATIONS[version](conn)
                version += 1
            conn.execute(Meta.__table__.delete().where(Meta.key == "schema_version"))
            conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(version)))

    def schema_version(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(Meta.value).where(Meta.key == "schema_version")))

    # -- instances ---------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        with self._sessions() as session:
            row = session.execute(
                select(Instance.path, Instance.sha256).where(
                    Instance.sop_instance_uid == sop_instance_uid
                )
            ).first()
        return StoredInstance(path=row.path, sha256=row.sha256) if row else None

    def add_instance(
        self,
        record: InstanceRecord,
        path: str,
        size_bytes: int,
        sha256: str,
        now: datetime | None = None,
    ) -> bool:
        """Index a stored instance and move its series' Job back to collecting.

        Returns False (and changes nothing) when the SOP Instance UID is already indexed.
        """
        now = now or utcnow()
        with self._write_lock, self._sessions.begin() as session:
            exists = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == record.sop_instance_uid)
            )
            if exists is not None:
                return False
            series = self._series_for(session, record, now)
            series.instance_count += 1
            series.last_received_at = now
            series.released_at = None
            session.add(
                Instance(
                    sop_instance_uid=record.sop_instance_uid,
                    sop_class_uid=record.sop_class_uid,
                    series=series,
                    instance_number=record.instance_number,
                    transfer_syntax_uid=record.transfer_syntax_uid,
                    path=path,
                    size_bytes=size_bytes,
                    sha256=sha256,
                    calling_aet=record.calling_aet,
                    received_at=now,
                )
            )
            self._collect(session, series, now)
        return True

    def _series_for(self, session: Session, record: InstanceRecord, now: datetime) -> Series:
        series = session.scalar(
            select(Series).where(Series.series_instance_uid == record.series_instance_uid)
        )
        if series is not None:
            return series
        study = session.scalar(
            select(Study).where(Study.study_instance_uid == record.study_instance_uid)
        )
        if study is None:
            patient = session.scalar(select(Patient).where(Patient.patient_id == record.patient_id))
            if patient is None:
                patient = Patient(
                    patient_id=record.patient_id,
                    patient_name=record.patient_name,
                    birth_date=record.patient_birth_date,
                    sex=record.patient_sex,
                )
            study = Study(
                study_instance_uid=record.study_instance_uid,
                patient=patient,
                study_date=record.study_date,
                study_time=record.study_time,
                accession_number=record.accession_number,
                study_description=record.study_description,
                created_at=now,
            )
        series = Series(
            series_instance_uid=record.series_instance_uid,
            study=study,
            modality=record.modality,
            series_number=record.series_number,
            series_description=record.series_description,
            body_part_examined=record.body_part_examined,
            image_type="\\".join(record.image_type),
            image_orientation="\\".join(f"{v:.6g}" for v in record.image_orientation),
            slice_thickness_mm=record.slice_thickness_mm,
            calling_aet=record.calling_aet,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(series)
        return series

    def _collect(self, session: Session, series: Series, now: datetime) -> None:
        """A new instance: keep collecting, re-open a finished wait, or start a new pass."""
        job = (
            session.scalar(
                select(Job).where(Job.series_pk == series.id).order_by(Job.id.desc()).limit(1)
            )
            if series.id is not None
            else None
        )
        if job is not None and job.state == JobState.COLLECTING:
            return
        if job is not None and job.state in _REOPENABLE:
            logger.info(
                "series %s re-opened by a late instance (was %s)",
                series.series_instance_uid,
                job.state.value,
            )
            job.state = JobState.COLLECTING
            job.reopen_count += 1
            job.completion_rule = None
            job.reason = ""
            job.completed_at = None
            job.updated_at = now
            return
        session.add(Job(series=series, state=JobState.COLLECTING, created_at=now, updated_at=now))

    def mark_released(self, series_uids: Iterable[str], now: datetime | None = None) -> None:
        """The association that sent these series' latest instances was released."""
        uids = list(series_uids)
        if not uids:
            return
        with self._write_lock, self._sessions.begin() as session:
            session.execute(
                update(Series)
                .where(Series.series_instance_uid.in_(uids))
                .values(released_at=now or utcnow())
            )

    def series_instance_paths(self, series_instance_uid: str) -> list[str]:
        """Relative paths of a series' instances, in InstanceNumber order."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Instance.path)
                    .join(Series)
                    .where(Series.series_instance_uid == series_instance_uid)
                    .order_by(Instance.instance_number, Instance.id)
                )
            )

    # -- assembler ---------------------------------------------------------------------

    def collecting_series(self) -> list[SeriesProgress]:
        with self._sessions() as session:
            rows = session.execute(
                select(Job.id, Series, Study.study_instance_uid)
                .join(Series, Job.series_pk == Series.id)
                .join(Study)
                .where(Job.state == JobState.COLLECTING)
                .order_by(Job.id)
            ).all()
        return [
            SeriesProgress(
                job_id=job_id,
                series_instance_uid=s.series_instance_uid,
                study_instance_uid=study_uid,
                modality=s.modality,
                series_description=s.series_description,
                body_part_examined=s.body_part_examined,
                image_type=_split(s.image_type),
                image_orientation=tuple(float(v) for v in _split(s.image_orientation)),
                slice_thickness_mm=s.slice_thickness_mm,
                instance_count=s.instance_count,
                first_received_at=s.first_received_at,
                last_received_at=s.last_received_at,
                released_at=s.released_at,
            )
            for job_id, s, study_uid in rows
        ]

    def complete_job(
        self,
        job_id: int,
        rule: CompletionRule,
        skip_reason: str | None,
        expected_instance_count: int,
        now: datetime | None = None,
    ) -> bool:
        """Close a collecting job: queue it, or skip it with the rule that failed.

        Refuses (returns False) when an instance arrived since the assembler looked, so a
        decision is never taken on a series that has grown in the meantime.
        """
        now = now or utcnow()
        with self._write_lock, self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.COLLECTING:
                return False
            if job.series.instance_count != expected_instance_count:
                return False
            job.completion_rule = rule
            job.completed_at = now
            job.updated_at = now
            if skip_reason is None:
                job.state = JobState.QUEUED
                job.reason = ""
            else:
                job.state = JobState.SKIPPED
                job.reason = skip_reason
        return True

    # -- queue for AI workers ----------------------------------------------------------

    def claim_next_job(self, worker: str, now: datetime | None = None) -> ClaimedJob | None:
        """Atomically take the oldest queued job and mark it running."""
        now = now or utcnow()
        with self._write_lock, self._sessions.begin() as session:
            job = session.scalar(
                select(Job).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
            )
            if job is None:
                return None
            job.state = JobState.RUNNING
            job.worker = worker
            job.attempts += 1
            job.started_at = now
            job.updated_at = now
            return ClaimedJob(
                job_id=job.id,
                series_instance_uid=job.series.series_instance_uid,
                study_instance_uid=job.series.study.study_instance_uid,
                attempts=job.attempts,
            )

    def finish_job(
        self, job_id: int, state: JobState, reason: str = "", now: datetime | None = None
    ) -> None:
        """Record the end of a running job (done, or failed with a reason)."""
        if state not in (JobState.DONE, JobState.FAILED):
            raise ValueError(f"a job finishes as done or failed, not {state.value}")
        now = now or utcnow()
        with self._write_lock, self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.RUNNING:
                raise ValueError(f"job {job_id} is not running")
            job.state = state
            job.reason = reason
            job.finished_at = now
            job.updated_at = now

    def job_state(self, job_id: int) -> tuple[JobState, str]:
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            return job.state, job.reason

    # -- restart and status ------------------------------------------------------------

    def recover_after_restart(self, now: datetime | None = None) -> int:
        """Return jobs interrupted while running to the queue; returns how many."""
        now = now or utcnow()
        with self._write_lock, self._sessions.begin() as session:
            result = session.execute(
                update(Job)
                .where(Job.state == JobState.RUNNING)
                .values(
                    state=JobState.QUEUED,
                    reason="re-queued: interrupted by a restart",
                    updated_at=now,
                )
            )
        return result.rowcount or 0

    def counts(self) -> dict[str, int]:
        """Totals for a one-line summary."""
        with self._sessions() as session:
            totals = {
                "patients": session.scalar(select(func.count(Patient.id))) or 0,
                "studies": session.scalar(select(func.count(Study.id))) or 0,
                "series": session.scalar(select(func.count(Series.id))) or 0,
                "instances": session.scalar(select(func.count(Instance.id))) or 0,
            }
            for state, n in session.execute(
                select(Job.state, func.count(Job.id)).group_by(Job.state)
            ):
                totals[f"jobs_{state.value}"] = n
        return totals

    def series_status(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently active series with their current job, newest first."""
        latest_job = (
            select(Job.series_pk, func.max(Job.id).label("job_id"))
            .group_by(Job.series_pk)
            .subquery()
        )
        with self._sessions() as session:
            rows = session.execute(
                select(Series, Study, Patient, Job)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
                .outerjoin(latest_job, latest_job.c.series_pk == Series.id)
                .outerjoin(Job, Job.id == latest_job.c.job_id)
                .order_by(Series.last_received_at.desc())
                .limit(limit)
            ).all()
        return [_series_row(series, study, patient, job) for series, study, patient, job in rows]


def _series_row(series: Series, study: Study, patient: Patient, job: Job | None) -> dict[str, Any]:
    return {
        "patient_id": patient.patient_id,
        "study_instance_uid": study.study_instance_uid,
        "study_date": study.study_date,
        "accession_number": study.accession_number,
        "series_instance_uid": series.series_instance_uid,
        "series_number": series.series_number,
        "modality": series.modality,
        "series_description": series.series_description,
        "body_part_examined": series.body_part_examined,
        "instances": series.instance_count,
        "calling_aet": series.calling_aet,
        "first_received_at": series.first_received_at.isoformat(),
        "last_received_at": series.last_received_at.isoformat(),
        "state": job.state.value if job else "",
        "reason": job.reason if job else "",
        "completion_rule": job.completion_rule.value if job and job.completion_rule else "",
        "reopen_count": job.reopen_count if job else 0,
        "job_id": job.id if job else None,
    }


def counts_line(counts: dict[str, int], states: Sequence[JobState] = tuple(JobState)) -> str:
    """A one-line summary such as `3 studies, 5 series, 1200 instances; queued 1, done 2`."""
    jobs = ", ".join(
        f"{s.value} {counts[f'jobs_{s.value}']}" for s in states if counts.get(f"jobs_{s.value}")
    )
    head = (
        f"{counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances"
    )
    return f"{head}; jobs: {jobs}" if jobs else head

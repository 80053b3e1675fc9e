"""The study index API: what the node knows about received data and where work stands.

SQLite in WAL mode by default (any SQLAlchemy URL works). Writes from this process are
serialised by one lock, so concurrent associations never race on new patients, studies
or series and never spin on SQLite's writer lock. Every state change is a committed row,
which is what lets a restart resume exactly where the node stopped.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydicom.uid import CTImageStorage
from sqlalchemy import (
    Connection,
    DateTime,
    Select,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    inspect,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import URL, Dialect, Engine
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, aliased, sessionmaker
from sqlalchemy.schema import DropIndex

from storage.errors import IndexUnavailable
from storage.models import (
    SCHEMA_VERSION,
    Base,
    CompletionRule,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Meta,
    Patient,
    RefusedInstance,
    Result,
    Series,
    Study,
)

logger = logging.getLogger(__name__)

NO_CT_IMAGE = "; holds no CT image to analyse"
"""What `reanalyse` says of a series without a CT Image Storage instance (the one SOP
class the node analyses), which it never queues: a SEG or SR a viewer sent back."""

# The C-STORE hot path's statements, built once: constructing a Core statement per call
# (and its cache key) cost more than executing it.
_FIND_INSTANCE = select(Instance.path, Instance.sha256, Instance.size_bytes).where(
    Instance.sop_instance_uid == bindparam("uid")
)
_LATEST_JOB_OF_SERIES = (
    select(Series.id, Job.state, Series.image_type)
    .join(Job, Job.series_pk == Series.id)
    .where(Series.series_instance_uid == bindparam("series_uid"))
    .order_by(Job.id.desc())
    .limit(1)
)
_INSERT_INSTANCE = Instance.__table__.insert()
_INSTANCE_COLUMNS = tuple(c.key for c in Instance.__table__.columns if not c.primary_key)
_COUNT_INSTANCE = (
    update(Series)
    .where(Series.id == bindparam("pk"))
    .values(instance_count=Series.instance_count + 1, last_received_at=bindparam("now"))
    .values(released_at=None)
)

# Migrations from version N to N+1, applied in order on open, in one transaction with
# the version bump where the database has transactional DDL (SQLite, PostgreSQL). New
# tables need none (create_all adds them); changed or added columns of existing tables
# do. Each is idempotent: MySQL commits DDL on its own, so a migration cut short there
# may have to run again over what it had done.
def _add_collecting_since(conn: Connection) -> None:
    if "collecting_since" not in {c["name"] for c in inspect(conn).get_columns("job")}:
        column_type = DateTime().compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE job ADD COLUMN collecting_since {column_type}")
    conn.exec_driver_sql("UPDATE job SET collecting_since = created_at "
                         "WHERE collecting_since IS NULL")


def _patient_id_not_unique(conn: Connection) -> None:
    """Version 4 lets studies without a PatientID have a Patient row each: the PatientID
    index is no longer unique."""
    (index,) = Patient.__table__.indexes  # the model's, as version 4 has it
    found = {ix["name"]: ix for ix in inspect(conn).get_indexes("patient")}.get(index.name)
    if found is not None and found["unique"]:
        conn.execute(DropIndex(index))
        found = None
    if found is None:
        index.create(conn)


_EARLIER = aliased(Export)
_EXPORT_IN_TURN = ~exists().where(
    _EARLIER.job_pk == Export.job_pk, _EARLIER.destination == Export.destination,
    _EARLIER.id < Export.id,
    _EARLIER.state.in_((ExportState.PENDING, ExportState.SENDING)),
)
"""A job's deliveries to one destination go in the order they were queued: its SEG and
SR (queued first) before its key images and PDF, also when the first are in backoff."""

MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: lambda conn: None,  # 2 adds the result and export tables only
    2: _add_collecting_since,
    3: _patient_id_not_unique,
    4: lambda conn: None,  # 5 adds the refused_instance table only
}
OWN_OUTPUT = "output of this node (not analysed)"

_REOPENABLE = (JobState.COLLECTING, JobState.COMPLETE, JobState.SKIPPED, JobState.QUEUED)


class _DriverStatement:
    """A Core statement compiled once for the engine's dialect and run on a DBAPI cursor.

    For the C-STORE hot path only: SQLAlchemy's per-execution work (execution context,
    parameter and result objects, pool bookkeeping) cost 0.5 ms per indexed instance
    where the SQLite statements take 0.2 ms, and the receiving process pays that in GIL
    time. Values still pass the column types' bind and result processors, but column
    defaults are not applied: an INSERT names every column in `column_keys`, and a call
    without a value for one of them is refused (SQLAlchemy's "a value is required").
    """

    def __init__(
        self, statement: Any, dialect: Dialect, column_keys: Sequence[str] | None = None
    ) -> None:
        compiled = statement.compile(
            dialect=dialect,
            column_keys=list(column_keys) if column_keys else None,
            compile_kwargs={"render_postcompile": True},
        )
        self._compiled = compiled
        self._order = compiled.positiontup if compiled.positional else None
        self._bind = {
            name: process
            for name, bind in compiled.binds.items()
            if (process := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        columns = statement.selected_columns if isinstance(statement, Select) else ()
        self._result = [c.type.dialect_impl(dialect).result_processor(dialect, None)
                        for c in columns]  # fmt: skip

    def execute(self, cursor: Any, values: dict[str, Any]) -> None:
        params = self._compiled.construct_params(values)
        for name, process in self._bind.items():
            if name in params:
                params[name] = process(params[name])
        ordered = params if self._order is None else [params[n] for n in self._order]
        cursor.execute(self._compiled.string, ordered)

    def first(self, cursor: Any, values: dict[str, Any]) -> tuple[Any, ...] | None:
        """The first row of a SELECT, its values as the column types read them."""
        self.execute(cursor, values)
        row = cursor.fetchone()
        if row is None:
            return None
        return tuple(v if p is None else p(v) for v, p in zip(row, self._result, strict=True))


class SchemaVersionError(IndexUnavailable):
    """The index was written by a newer dicomnode, or cannot be migrated."""


class ExportGone(KeyError):
    """The export row a sender claimed is gone or no longer being sent."""


class SchemaMigrationNeeded(SchemaVersionError):
    """The index has an older schema and was opened with ``schema="check"``."""


def _in_memory(sqlite_url: URL) -> bool:
    """An SQLite URL of an in-memory database: each connection of the pool would get its
    own, empty one, and nothing would outlive the process."""
    database = sqlite_url.database or ""
    return (database == "" or ":memory:" in database or "mode=memory" in database
            or sqlite_url.query.get("mode") == "memory")


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
    size_bytes: int


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
    collecting_since: datetime
    """Start of this collecting pass (the job's creation, or its re-opening)."""
    last_received_at: datetime
    released_at: datetime | None
    sop_classes: tuple[str, ...] = ()
    """The distinct SOP classes of its instances."""
    refused_instances: int = 0
    """Its instances refused for want of resources and not received since."""


@dataclass(frozen=True)
class ResultRecord:
    """What a worker found for a job (see storage.models.Result)."""

    diagnosis: str
    probabilities: dict[str, float]
    lvr: float
    plr: float | None
    lesion_count: int
    lesion_volume_ml: float
    lung_volume_ml: float
    analysis: dict[str, Any]
    model_name: str
    model_version: str
    checkpoint_sha256: str
    timings: dict[str, float]
    outputs: dict[str, list[str]]


@dataclass(frozen=True)
class IdleStudy:
    """A study with no activity since a cutoff (`StudyIndex.idle_studies`), its files."""

    study_instance_uid: str
    study_date: str
    last_activity: datetime
    paths: tuple[str, ...]


@dataclass(frozen=True)
class ExportTask:
    """A delivery handed to the exporter: all of one job's outputs for one destination."""

    export_id: int
    job_id: int
    destination: str
    paths: tuple[str, ...]
    attempts: int
    give_up_at: datetime


@dataclass(frozen=True)
class ClaimedJob:
    """A job handed to an AI worker."""

    job_id: int
    series_instance_uid: str
    study_instance_uid: str
    attempts: int
    completed_at: datetime | None
    """When the series was last found complete: a re-opened series gets a new one."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit survives a process crash (kill -9); after a power loss the last
    # commits may be missing, and the reconciliation of an unclean shutdown re-indexes
    # the (fsynced) files they described. FULL would cost one more fsync per instance.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _put_meta(session: Session, key: str, value: str | None) -> None:
    session.execute(Meta.__table__.delete().where(Meta.key == key))
    if value is not None:
        session.execute(Meta.__table__.insert().values(key=key, value=value))


def _split(value: str) -> tuple[str, ...]:
    return tuple(value.split("\\")) if value else ()


def _release_running(
    session: Session, which: Any, cause: str, max_attempts: int, now: datetime
) -> tuple[int, int, int]:
    """Running jobs (those `which` selects) back to the queue, or failed once claimed
    `max_attempts` times, or superseded when their series has a newer job (instances
    arrived while they ran: that job analyses the whole series, and this one must
    neither run again before it nor send a failure notice); returns (queued, failed,
    superseded)."""
    queued = failed = superseded = 0
    for job in session.scalars(
        select(Job).where(Job.state == JobState.RUNNING, which).with_for_update()
    ):
        job.updated_at = now
        newer = session.scalar(select(Job.id).where(Job.series_pk == job.series_pk,
                                                    Job.id > job.id).limit(1))
        if newer is not None:
            job.state = JobState.SUPERSEDED
            job.reason = f"superseded ({cause}): job {newer} analyses the whole series"
            job.finished_at = now
            superseded += 1
        elif job.attempts >= max_attempts:
            job.state = JobState.FAILED
            job.reason = f"{cause} on each of {job.attempts} attempts"
            job.finished_at = now
            failed += 1
        else:
            job.state = JobState.QUEUED
            job.reason = f"re-queued: {cause}"
            queued += 1
    return queued, failed, superseded


# The record's free-text fields and the columns that keep them. The files keep every value
# as sent; the index keeps what fits, because PostgreSQL and MySQL refuse a longer value
# (a SeriesDescription over LO's 64 characters is common) where SQLite ignores widths.
_TEXT_COLUMNS = {
    "patient_id": Patient.patient_id, "patient_name": Patient.patient_name,
    "patient_birth_date": Patient.birth_date, "patient_sex": Patient.sex,
    "study_date": Study.study_date, "study_time": Study.study_time,
    "accession_number": Study.accession_number, "study_description": Study.study_description,
    "modality": Series.modality, "series_description": Series.series_description,
    "body_part_examined": Series.body_part_examined, "calling_aet": Series.calling_aet,
}
_TEXT_WIDTHS = {field: column.type.length for field, column in _TEXT_COLUMNS.items()}
_IMAGE_TYPE_WIDTH: int = Series.image_type.type.length


def fitted(record: InstanceRecord) -> InstanceRecord:
    """`record` with each text value cut to its column's width (and ImageType to the
    values that fit), so that any database keeps it."""
    cut = {field: getattr(record, field)[:width] for field, width in _TEXT_WIDTHS.items()
           if len(getattr(record, field)) > width}
    if len("\\".join(record.image_type)) > _IMAGE_TYPE_WIDTH:
        values: list[str] = []
        while len("\\".join([*values, record.image_type[len(values)]])) <= _IMAGE_TYPE_WIDTH:
            values.append(record.image_type[len(values)])
        cut["image_type"] = tuple(values)
    if len(record.image_orientation) > 6:  # malformed (`dicomnode.volume` says so): the
        cut["image_orientation"] = record.image_orientation[:6]  # column holds six
    if not cut:
        return record
    logger.debug("%s: cut to fit the index: %s", record.sop_instance_uid, ", ".join(cut))
    return replace(record, **cut)


def _is_localizer(image_type: Sequence[str]) -> bool:
    return any(v.upper() == "LOCALIZER" for v in image_type)


def _describe_by(series: Series, record: InstanceRecord) -> None:
    """The instance-level attributes the series rules judge a series by (ImageType,
    orientation, thickness): those of its first instance, or of its first slice when
    that came after a localizer (a scanner that files the localizer, acquired first, in
    the axial series would otherwise have the whole series skipped as a localizer)."""
    series.image_type = "\\".join(record.image_type)
    series.image_orientation = "\\".join(f"{v:.6g}" for v in record.image_orientation)
    series.slice_thickness_mm = record.slice_thickness_mm


def _sop_classes(session: Session, series_pks: Sequence[int]) -> dict[int, tuple[str, ...]]:
    """The distinct SOP classes of each series' instances."""
    found: dict[int, list[str]] = {pk: [] for pk in series_pks}
    if series_pks:
        for pk, sop_class in session.execute(
            select(Instance.series_pk, Instance.sop_class_uid).distinct()
            .where(Instance.series_pk.in_(series_pks))
        ):
            found[pk].append(sop_class)
    return {pk: tuple(sorted(classes)) for pk, classes in found.items()}


def _refused_counts(session: Session, series_uids: Sequence[str]) -> dict[str, int]:
    """Per series, its instances refused for want of resources and not stored since."""
    found = dict.fromkeys(series_uids, 0)
    if series_uids:
        stored = exists().where(Instance.sop_instance_uid == RefusedInstance.sop_instance_uid)
        for uid, count in session.execute(
            select(RefusedInstance.series_instance_uid, func.count())
            .where(RefusedInstance.series_instance_uid.in_(series_uids), ~stored)
            .group_by(RefusedInstance.series_instance_uid)
        ):
            found[uid] = int(count)
    return found


def _progress(job_id: int, since: datetime, series: Series, study_uid: str,
              sop_classes: tuple[str, ...], refused: int) -> SeriesProgress:
    """A collecting series as the assembler sees it, from its index row."""
    return SeriesProgress(
        job_id=job_id,
        series_instance_uid=series.series_instance_uid,
        study_instance_uid=study_uid,
        modality=series.modality,
        series_description=series.series_description,
        body_part_examined=series.body_part_examined,
        image_type=_split(series.image_type),
        image_orientation=tuple(float(v) for v in _split(series.image_orientation)),
        slice_thickness_mm=series.slice_thickness_mm,
        instance_count=series.instance_count,
        collecting_since=since,
        last_received_at=series.last_received_at,
        released_at=series.released_at,
        sop_classes=sop_classes,
        refused_instances=refused,
    )


def shown_url(text: str) -> str:
    """`text` with the password of any database URL in it masked, for messages and logs
    ("postgresql://dicom:***@host/db"): a driver's error may quote the URL too."""
    return re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", text)


SchemaAction = Literal["migrate", "check", "defer"]


class StudyIndex:
    """Open the index at a SQLAlchemy URL.

    ``schema``: "migrate" creates or migrates it; "check" creates it but refuses an older
    schema (:class:`SchemaMigrationNeeded`), for a command that may run beside a node of
    the older version, which the new schema would break under way; "defer" leaves it to
    :meth:`prepare_schema`, for a node that must first lock its data directory. Only
    the holder of that lock migrates: `dicomnode serve` as it starts, and `purge`.
    """

    def __init__(self, url: str, *, schema: SchemaAction = "migrate") -> None:
        self.url = url
        self.shown_url = shown_url(url)
        self._sqlite = url.startswith("sqlite")
        # hide_parameters: a driver error (disk full, lost connection) would otherwise
        # quote the bound values, a patient's name and ID among them, into the log.
        kwargs: dict[str, Any] = {"hide_parameters": True}
        if self._sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except (ArgumentError, ImportError) as exc:  # a malformed URL, a missing driver
            raise IndexUnavailable(
                f"cannot open the study index {self.shown_url!r}: {shown_url(str(exc))}"
            ) from None
        if self._sqlite and _in_memory(self.engine.url):
            raise IndexUnavailable(
                f"the study index {url!r} is in memory: every connection would see its own "
                "empty database and nothing would survive a restart; give a file path"
            )
        if self._sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.RLock()
        dialect = self.engine.dialect
        self._dbapi_integrity_error: type[Exception] = dialect.loaded_dbapi.IntegrityError
        self._latest_job_of_series = _DriverStatement(_LATEST_JOB_OF_SERIES, dialect)
        self._insert_instance = _DriverStatement(_INSERT_INSTANCE, dialect, _INSTANCE_COLUMNS)
        self._count_instance = _DriverStatement(_COUNT_INSTANCE, dialect)
        if schema != "defer":
            self.prepare_schema(migrate=schema == "migrate")

    def prepare_schema(self, migrate: bool = True) -> None:
        """Create, check and (with `migrate`) migrate the schema; see `_prepare_schema`."""
        try:
            self._prepare_schema(migrate)
        except OperationalError as exc:  # unreachable server, unwritable file ...
            self.engine.dispose()
            raise IndexUnavailable(
                f"cannot open the study index {self.shown_url!r}: {shown_url(str(exc.orig or exc))}"
            ) from None
        except SchemaVersionError:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A write transaction, serialised with every other writer from its first statement:
        in this process by the lock, across processes (AI workers, CLI commands on the
        same index) by the database, so that what it reads cannot change before it
        writes (two workers claiming one job). SQLite: BEGIN IMMEDIATE takes the write lock
        at once (the Python driver would begin only at the first write); other databases:
        the row locks its queries ask for (`with_for_update`)."""
        with self._write_lock, self._sessions.begin() as session:
            if self._sqlite:
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield session

    # -- schema ------------------------------------------------------------------------

    def _prepare_schema(self, migrate: bool) -> None:
        """Create, check and migrate the schema in one transaction: one killed half-way
        leaves the old version whole. On SQLite a second process opening the index at
        the same time (a CLI command while `serve` starts) waits, then finds it done; a
        server database is best migrated by starting one process first. The version is
        read before any DDL, so that a refusal changes nothing also where DDL commits on
        its own (MySQL: `create_all` would add a newer version's tables)."""
        with self.engine.begin() as conn:
            if self._sqlite:  # the driver sends no BEGIN before DDL: it would autocommit
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            row = None
            if inspect(conn).has_table(Meta.__tablename__):
                row = conn.execute(
                    select(Meta.value).where(Meta.key == "schema_version")).scalar()
            version = int(row) if row is not None else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"index {self.shown_url} has schema version {version}, newer than this "
                    f"dicomnode's {SCHEMA_VERSION}: upgrade dicomnode"
                )
            if version < SCHEMA_VERSION and not migrate:
                raise SchemaMigrationNeeded(
                    f"index {self.shown_url} has schema version {version}, older than this "
                    f"dicomnode's {SCHEMA_VERSION}: start this version's `dicomnode serve`"
                    " (after stopping the node that serves it now, if one does), which"
                    " migrates it, then run the command again")
            Base.metadata.create_all(conn)
            while version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise SchemaVersionError(f"no migration from schema version {version}")
                logger.info("migrating index schema %d -> %d", version, version + 1)
                MIGRATIONS[version](conn)
                version += 1
            conn.execute(Meta.__table__.delete().where(Meta.key == "schema_version"))
            conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(version)))

    def mark_running(self) -> bool:
        """Record that a node runs on this index; returns whether the last run ended
        cleanly (False after a crash, kill -9 or power loss, or on a new index)."""
        with self._write() as session:
            value = session.scalar(select(Meta.value).where(Meta.key == "clean_shutdown"))
            _put_meta(session, "clean_shutdown", "0")
        if self._sqlite:
            # synchronous=NORMAL leaves a commit in the WAL, unsynced, until a checkpoint:
            # after a power cut the "running" mark could be lost with the rows written
            # since, and the next start would skip the reconciliation that re-indexes
            # their acknowledged files. A checkpoint syncs it into the database first.
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(FULL)")
        return value == "1"

    def mark_clean_shutdown(self) -> None:
        with self._write() as session:
            _put_meta(session, "clean_shutdown", "1")

    def set_model_problem(self, problem: str | None, now: datetime | None = None) -> None:
        """Why the AI workers' model does not load (None: it loads), for `dicomnode
        status`: the workers are other processes, and their log may not be at hand."""
        with self._write() as session:
            _put_meta(session, "model_problem",
                      None if problem is None else f"{(now or utcnow()).isoformat()} {problem}")

    def model_problem(self) -> tuple[datetime, str] | None:
        """Since when, and why, the model does not load; None when it does."""
        with self._sessions() as session:
            value = session.scalar(select(Meta.value).where(Meta.key == "model_problem"))
        if value is None:
            return None
        since, _, problem = value.partition(" ")
        return datetime.fromisoformat(since), problem

    def indexed_paths(self) -> set[str]:
        with self._sessions() as session:
            return set(session.scalars(select(Instance.path)))

    def schema_version(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(Meta.value).where(Meta.key == "schema_version")))

    # -- instances ---------------------------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        with self.engine.connect() as conn:  # Core, not ORM: this runs for every C-STORE
            row = conn.execute(_FIND_INSTANCE, {"uid": sop_instance_uid}).first()
        return StoredInstance(row.path, row.sha256, row.size_bytes) if row else None

    def add_instance(
        self,
        record: InstanceRecord,
        path: str,
        size_bytes: int,
        sha256: str,
        now: datetime | None = None,
        node_output: bool = False,
    ) -> datetime | None:
        """Index a stored instance and move its series' Job back to collecting.

        `node_output` marks the node's own results: their series' job is skipped at once,
        so the node never analyses what it produced. Returns the receive time written
        (taken under the write lock, so instances of one series get increasing times in
        the order they are indexed: `mark_released` relies on it), or None (and changes
        nothing) when the SOP Instance UID is already indexed.
        """
        record = fitted(record)
        if not node_output:
            added = self._add_to_collecting_series(record, path, size_bytes, sha256, now)
            if added is not None:
                return added or None
        with self._write() as session:
            now = now or utcnow()
            exists = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == record.sop_instance_uid)
            )
            if exists is not None:
                return None
            series = self._series_for(session, record, now)
            if _is_localizer(_split(series.image_type)) and not _is_localizer(record.image_type):
                _describe_by(series, record)
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
            if node_output:
                self._mark_own_output(session, series, now)
            else:
                self._collect(session, series, now)
        return now

    def _add_to_collecting_series(
        self, record: InstanceRecord, path: str, size_bytes: int, sha256: str,
        now: datetime | None,
    ) -> datetime | Literal[False] | None:
        """The common case in three compiled statements on a pooled driver cursor
        (`_DriverStatement`): another instance of a known series whose job is collecting.
        Returns the receive time written, False when the UID is indexed already, None
        when the full ORM path is needed (new series, or a job to re-open)."""
        with self._write_lock:
            now = now or utcnow()
            connection = self.engine.raw_connection()  # pooled; back to the pool on close
            try:
                cursor = connection.cursor()
                row = self._latest_job_of_series.first(
                    cursor, {"series_uid": record.series_instance_uid}
                )
                if row is None or row[1] != JobState.COLLECTING:
                    return None
                if _is_localizer(_split(row[2])) and not _is_localizer(record.image_type):
                    return None  # the ORM path describes the series by this slice instead
                series_pk = row[0]
                self._insert_instance.execute(cursor, {
                    "sop_instance_uid": record.sop_instance_uid,
                    "sop_class_uid": record.sop_class_uid, "series_pk": series_pk,
                    "instance_number": record.instance_number,
                    "transfer_syntax_uid": record.transfer_syntax_uid, "path": path,
                    "size_bytes": size_bytes, "sha256": sha256,
                    "calling_aet": record.calling_aet, "received_at": now,
                })  # fmt: skip
                self._count_instance.execute(cursor, {"pk": series_pk, "now": now})
                connection.commit()
            except self._dbapi_integrity_error:
                connection.rollback()
                if self.find_instance(record.sop_instance_uid) is None:
                    raise  # another constraint: not a duplicate, so nothing acknowledged
                return False  # the UID is indexed already (UNIQUE)
            finally:
                connection.close()  # the pool rolls back whatever was not committed
        return now

    def _mark_own_output(self, session: Session, series: Series, now: datetime) -> None:
        has_job = series.id is not None and session.scalar(
            select(Job.id).where(Job.series_pk == series.id).limit(1)
        )
        if not has_job:
            session.add(Job(series=series, state=JobState.SKIPPED, reason=OWN_OUTPUT,
                            created_at=now, updated_at=now, completed_at=now))

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
            patient = None
            if record.patient_id:  # without one, a study is its own patient
                patient = session.scalar(
                    select(Patient).where(Patient.patient_id == record.patient_id).limit(1)
                )
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
            calling_aet=record.calling_aet,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
        )
        _describe_by(series, record)
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
        if job is not None and job.state == JobState.QUEUED and job.attempts:
            # queued again after a failed attempt: the grown series is a new pass with
            # attempts of its own (the old claims keep fencing the old job's late results)
            job.state = JobState.SUPERSEDED
            job.reason = "superseded: instances arrived after a failed attempt"
            job.finished_at = now
            job.updated_at = now
        elif job is not None and job.state in _REOPENABLE:
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
            job.collecting_since = now
            job.updated_at = now
            return
        session.add(Job(series=series, state=JobState.COLLECTING, created_at=now, updated_at=now,
                        collecting_since=now))

    def mark_released(
        self, last_stored: Mapping[str, datetime], now: datetime | None = None
    ) -> None:
        """An association was released; `last_stored`: per series it sent, when it stored
        its last instance. Only a series whose latest instance is no later than that is
        marked: one that another association is still sending keeps collecting."""
        if not last_stored:
            return
        now = now or utcnow()
        with self._write() as session:
            for uid, stored_at in last_stored.items():
                session.execute(
                    update(Series)
                    .where(Series.series_instance_uid == uid,
                           Series.last_received_at <= stored_at)
                    .values(released_at=now)
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
                select(Job.id, func.coalesce(Job.collecting_since, Job.created_at), Series,
                       Study.study_instance_uid)
                .join(Series, Job.series_pk == Series.id)
                .join(Study)
                .where(Job.state == JobState.COLLECTING)
                .order_by(Job.id)
            ).all()
            classes = _sop_classes(session, [s.id for _, _, s, _ in rows])
            refused = _refused_counts(session, [s.series_instance_uid for _, _, s, _ in rows])
        return [_progress(job_id, since, s, study_uid, classes[s.id],
                          refused[s.series_instance_uid])
                for job_id, since, s, study_uid in rows]

    def record_refused(self, series_instance_uid: str, sop_instance_uid: str,
                       calling_aet: str, reason: str, now: datetime | None = None) -> None:
        """Note an instance refused for want of resources: its series waits for it."""
        now = now or utcnow()
        with self._write() as session:
            row = session.scalar(select(RefusedInstance)
                                 .where(RefusedInstance.sop_instance_uid == sop_instance_uid))
            if row is None:
                row = RefusedInstance(sop_instance_uid=sop_instance_uid)
                session.add(row)
            row.series_instance_uid = series_instance_uid
            row.calling_aet = calling_aet
            row.refused_at = now
            row.reason = reason

    def close_collecting_job(
        self,
        job_id: int,
        decide: Callable[[SeriesProgress], tuple[CompletionRule, str | None] | None],
        now: datetime | None = None,
    ) -> tuple[CompletionRule, str | None] | None:
        """Close a collecting job as `decide` says, on the series as it is under the
        index's write lock: (rule, None) queues it, (rule, reason) skips it, None leaves
        it collecting. Returns the decision applied. Deciding under the lock, not on an
        earlier read, means a series that keeps growing still meets its deadline (a
        decision taken on a read would be refused on every look)."""
        now = now or utcnow()
        with self._write() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != JobState.COLLECTING:
                return None
            series = job.series
            uid = series.series_instance_uid
            decision = decide(_progress(job.id, job.collecting_since or job.created_at, series,
                                        series.study.study_instance_uid,
                                        _sop_classes(session, [series.id])[series.id],
                                        _refused_counts(session, [uid])[uid]))
            if decision is None:
                return None
            rule, skip_reason = decision
            job.completion_rule = rule
            job.completed_at = now
            job.updated_at = now
            if skip_reason is None:
                job.state = JobState.QUEUED
                job.reason = ""
            else:
                job.state = JobState.SKIPPED
                job.reason = skip_reason
        return decision

    # -- queue for AI workers ----------------------------------------------------------

    def claim_next_job(self, worker: str, now: datetime | None = None) -> ClaimedJob | None:
        """Atomically take the oldest queued job and mark it running."""
        now = now or utcnow()
        with self._write() as session:
            job = session.scalar(
                select(Job).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
                .with_for_update(skip_locked=True)
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
                completed_at=job.completed_at,
            )

    def finish_job(
        self, job_id: int, attempt: int, state: JobState, reason: str = "",
        now: datetime | None = None,
    ) -> bool:
        """Record the end of a claimed job (done, or failed with a reason).

        `attempt`: the claim's (`ClaimedJob.attempts`). Returns False, and records
        nothing, when the job is no longer that claim: a restarted node queued it again
        and may have handed it to a new worker while the killed node's orphaned worker
        finished it; the new attempt's end is the one that counts."""
        if state not in (JobState.DONE, JobState.FAILED):
            raise ValueError(f"a job finishes as done or failed, not {state.value}")
        now = now or utcnow()
        with self._write() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.attempts != attempt:
                return False
            job.state = state
            job.reason = reason
            job.finished_at = now
            job.updated_at = now
        return True

    def job_state(self, job_id: int) -> tuple[JobState, str]:
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            return job.state, job.reason

    def job_series(self, job_id: int) -> tuple[str, str]:
        """(StudyInstanceUID, SeriesInstanceUID) of a job."""
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            return job.series.study.study_instance_uid, job.series.series_instance_uid

    # -- results -------------------------------------------------------------------------

    def record_result(
        self, job_id: int, attempt: int, record: ResultRecord, now: datetime | None = None
    ) -> int | None:
        """Store what the AI found for a running job's claim `attempt` (replacing an
        earlier result of the same job); None, and nothing stored, when the job is no
        longer that claim (see `finish_job`)."""
        now = now or utcnow()
        with self._write() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.attempts != attempt:
                return None
            session.execute(Result.__table__.delete().where(Result.job_pk == job_id))
            result = Result(job_pk=job_id, created_at=now, **record.__dict__)
            session.add(result)
            session.flush()
            return result.id

    def earlier_result_at(self, series_instance_uid: str, job_id: int) -> datetime | None:
        """When the series' latest result before job `job_id` was made (an earlier pass that
        was done), or None."""
        with self._sessions() as session:
            return session.scalar(
                select(Result.created_at).join(Job, Result.job_pk == Job.id)
                .join(Series, Job.series_pk == Series.id)
                .where(Series.series_instance_uid == series_instance_uid, Job.id < job_id,
                       Job.state == JobState.DONE)
                .order_by(Job.id.desc()).limit(1)
            )

    def result_for_job(self, job_id: int) -> ResultRecord | None:
        with self._sessions() as session:
            row = session.scalar(select(Result).where(Result.job_pk == job_id))
            if row is None:
                return None
            fields = ResultRecord.__dataclass_fields__
            return ResultRecord(**{name: getattr(row, name) for name in fields})

    # -- exports -------------------------------------------------------------------------

    def queue_export(
        self, job_id: int, destination: str, paths: Sequence[str], give_up_after_s: float,
        now: datetime | None = None, attempt: int | None = None,
    ) -> int | None:
        """Owe a destination these output files; the exporter sends them together.

        Files this job already owes the destination, has delivered to it or has given up
        on (`dicomnode resend` re-queues those) are left out, so a job run again after a
        crash sends nothing twice (also when an orphaned worker of the crashed node
        finishes the same job); None when nothing is left. With `attempt`, only while
        that claim of the job is the current one (running, or failed by it: its failure
        notice): an orphaned worker's claim, superseded by a restart, queues nothing."""
        now = now or utcnow()
        with self._write() as session:
            job = session.get(Job, job_id, with_for_update=True)  # one per job at a time
            if attempt is not None and (
                job is None or job.attempts != attempt
                or job.state not in (JobState.RUNNING, JobState.FAILED)
            ):
                return None
            owed = {path for row in session.scalars(
                select(Export.paths).where(Export.job_pk == job_id,
                                           Export.destination == destination)
            ) for path in row}
            new = [path for path in paths if path not in owed]
            if not new:
                return None
            export = Export(
                job_pk=job_id, destination=destination, paths=new,
                state=ExportState.PENDING, next_attempt_at=now,
                give_up_at=now + timedelta(seconds=give_up_after_s),
                created_at=now, updated_at=now,
            )
            session.add(export)
            session.flush()
            return export.id

    def claim_due_export(
        self, now: datetime | None = None, destination: str | None = None
    ) -> ExportTask | None:
        """Atomically take the oldest pending export (to `destination`, or to any) whose
        retry time has come, and that no earlier delivery of its job to its destination
        is still waiting for (`_EXPORT_IN_TURN`)."""
        now = now or utcnow()
        due = [Export.state == ExportState.PENDING, Export.next_attempt_at <= now,
               _EXPORT_IN_TURN]
        if destination is not None:
            due.append(Export.destination == destination)
        with self._write() as session:
            export = session.scalar(
                select(Export)
                .where(*due)
                .order_by(Export.next_attempt_at, Export.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if export is None:
                return None
            export.state = ExportState.SENDING
            export.attempts += 1
            export.updated_at = now
            return ExportTask(export.id, export.job_pk, export.destination,
                              tuple(export.paths), export.attempts, export.give_up_at)

    def next_export_due(self) -> datetime | None:
        """When the earliest pending export may be tried (None when nothing is pending)."""
        with self._sessions() as session:
            return session.scalar(
                select(func.min(Export.next_attempt_at)).where(
                    Export.state == ExportState.PENDING, _EXPORT_IN_TURN
                )
            )

    def finish_export(
        self, export_id: int, error: str = "", retry_at: datetime | None = None,
        now: datetime | None = None,
    ) -> ExportState:
        """Record an attempt: no error -> done; an error -> pending until retry_at, or
        failed when retry_at is None (given up, or a rejection that will not change).
        Raises `ExportGone` when the row is no longer the claimed one (`resend` replaced
        it, or a restart put it back in the queue) rather than mark another's fate."""
        now = now or utcnow()
        with self._write() as session:
            export = session.get(Export, export_id, with_for_update=True)
            if export is None or export.state != ExportState.SENDING:
                raise ExportGone(f"export {export_id} is no longer being sent")
            export.updated_at = now
            export.last_error = error
            if not error:
                export.state = ExportState.DONE
                export.sent_at = now
            elif retry_at is None:
                export.state = ExportState.FAILED
            else:
                export.state = ExportState.PENDING
                export.next_attempt_at = retry_at
            return export.state

    def fail_exports_except(self, destinations: Sequence[str], reason: str,
                            now: datetime | None = None) -> int:
        """Fail the pending exports to every destination not in `destinations` (removed
        from the configuration: nothing would ever send them); returns how many."""
        now = now or utcnow()
        with self._write() as session:
            result = session.execute(
                update(Export)
                .where(Export.state == ExportState.PENDING,
                       Export.destination.not_in(destinations))
                .values(state=ExportState.FAILED, last_error=reason, updated_at=now)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def requeue_study_exports(
        self, study_instance_uid: str, give_up_after_s: float,
        destinations: Mapping[str, Sequence[str]], now: datetime | None = None,
        only_failed: bool = False,
    ) -> dict[str, int]:
        """`dicomnode resend`: deliver a study's results again to each configured
        destination (name -> output kinds), as it is configured now, from a fresh backoff.

        Per series, its latest job with a result or deliveries (a series analysed again
        has its latest result sent, not the earlier ones too), and per destination: the
        outputs of the job's Result that the
        destination takes (so a destination added since, or a changed `outputs` list, is
        served); for a job without a Result (a failure notice), what it owed before. The
        job's earlier deliveries to that destination are replaced by this one, unless one
        is being sent right now (left alone). `only_failed` (`resend --failed`): only the
        job's deliveries to a destination that all failed, so that a destination that has
        the results does not get them again. Returns counts: "queued", "sending" and
        "unconfigured" (deliveries recorded for destinations no longer configured)."""
        now = now or utcnow()
        counts = {"queued": 0, "sending": 0, "unconfigured": 0}
        with self._write() as session:
            jobs = session.scalars(
                select(Job)
                .join(Series, Job.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id)
                .where(Study.study_instance_uid == study_instance_uid)
                .order_by(Job.id)
            ).all()
            latest: dict[int, Job] = {}  # per series, its latest job with something to send
            for job in jobs:
                if (session.scalar(select(Export.id).where(Export.job_pk == job.id).limit(1))
                        or session.scalar(select(Result.id).where(Result.job_pk == job.id))):
                    latest[job.series_pk] = job
            for job in latest.values():
                # locked: a sender claiming one of them meanwhile (a server database)
                # would otherwise send a row this deletes
                exports = session.scalars(
                    select(Export).where(Export.job_pk == job.id).with_for_update()).all()
                counts["unconfigured"] += sum(e.destination not in destinations
                                              for e in exports)
                result = session.scalar(select(Result).where(Result.job_pk == job.id))
                for name, kinds in destinations.items():
                    earlier = [e for e in exports if e.destination == name]
                    if only_failed and not (earlier and all(
                            e.state == ExportState.FAILED for e in earlier)):
                        continue
                    if result is not None:
                        paths = [p for kind in kinds for p in result.outputs.get(kind, ())]
                    else:
                        paths = list(dict.fromkeys(p for e in earlier for p in e.paths))
                    if not paths:
                        continue
                    if any(e.state == ExportState.SENDING for e in earlier):
                        counts["sending"] += 1
                        continue
                    for export in earlier:
                        session.delete(export)
                    session.add(Export(
                        job_pk=job.id, destination=name, paths=paths,
                        state=ExportState.PENDING, next_attempt_at=now,
                        give_up_at=now + timedelta(seconds=give_up_after_s),
                        created_at=now, updated_at=now,
                    ))
                    counts["queued"] += 1
        return counts

    def idle_studies(self, inactive_since: datetime) -> list[IdleStudy]:
        """Studies with nothing received, analysed or delivered since `inactive_since` and
        no work in flight (a series collecting or waiting for AI, a delivery pending), with
        their files (received instances and the node's outputs): what `dicomnode purge`
        deletes."""
        busy_jobs = (JobState.COLLECTING, JobState.COMPLETE, JobState.QUEUED,
                     JobState.RUNNING)
        busy_exports = (ExportState.PENDING, ExportState.SENDING)
        active = (
            select(Series.study_pk).where(Series.last_received_at >= inactive_since)
            .union(
                select(Series.study_pk).join(Job, Job.series_pk == Series.id).where(
                    (Job.updated_at >= inactive_since) | Job.state.in_(busy_jobs)),
                select(Series.study_pk).join(Job, Job.series_pk == Series.id)
                .join(Export, Export.job_pk == Job.id).where(
                    (Export.updated_at >= inactive_since) | Export.state.in_(busy_exports)),
            )
        )
        with self._sessions() as session:
            studies = session.execute(
                select(Study.id, Study.study_instance_uid, Study.study_date,
                       func.max(Series.last_received_at))
                .join(Series, Series.study_pk == Study.id, isouter=True)
                .where(Study.id.not_in(active))
                .group_by(Study.id)
                .order_by(Study.id)
            ).all()
            return [
                IdleStudy(uid, study_date or "", last or inactive_since, tuple(session.scalars(
                    select(Instance.path).join(Series, Instance.series_pk == Series.id)
                    .where(Series.study_pk == study_pk)).all()))
                for study_pk, uid, study_date, last in studies
            ]

    def delete_studies(self, study_instance_uids: Sequence[str]) -> int:
        """Remove studies from the index with everything that hangs from them (series,
        instances, refusals, jobs, results, deliveries; a patient left without studies); returns
        how many were found. Their files are the caller's (`FileStore.remove`, first)."""
        found = 0
        with self._write() as session:
            for uid in study_instance_uids:
                row = session.execute(select(Study.id, Study.patient_pk).where(
                    Study.study_instance_uid == uid)).first()
                if row is None:
                    continue
                found += 1
                study_pk, patient_pk = row
                series = select(Series.id).where(Series.study_pk == study_pk)
                jobs = select(Job.id).where(Job.series_pk.in_(series))
                session.execute(delete(Export).where(Export.job_pk.in_(jobs)))
                session.execute(delete(Result).where(Result.job_pk.in_(jobs)))
                session.execute(delete(Job).where(Job.series_pk.in_(series)))
                session.execute(delete(Instance).where(Instance.series_pk.in_(series)))
                session.execute(delete(RefusedInstance).where(
                    RefusedInstance.series_instance_uid.in_(
                        select(Series.series_instance_uid).where(Series.study_pk == study_pk))))
                session.execute(delete(Series).where(Series.study_pk == study_pk))
                session.execute(delete(Study).where(Study.id == study_pk))
                if not session.scalar(select(Study.id).where(Study.patient_pk == patient_pk)
                                      .limit(1)):
                    session.execute(delete(Patient).where(Patient.id == patient_pk))
        return found

    def studies_with_failed_exports(self, since: datetime | None = None) -> list[str]:
        """Studies with a delivery that failed (given up, or refused for good), those that
        failed at or after `since` when given: what `dicomnode resend --failed` sends
        again after a PACS outage or a PACS-side configuration was fixed."""
        query = (
            select(Study.study_instance_uid).distinct()
            .join(Series, Series.study_pk == Study.id)
            .join(Job, Job.series_pk == Series.id)
            .join(Export, Export.job_pk == Job.id)
            .where(Export.state == ExportState.FAILED)
        )
        if since is not None:
            query = query.where(Export.updated_at >= since)
        with self._sessions() as session:
            return sorted(session.scalars(query))

    def export_status(self, limit: int = 50) -> list[dict[str, Any]]:
        """Every export not delivered (pending, sending, failed), then the latest `limit`
        delivered ones, each part newest first: a failure must not scroll out of
        `dicomnode status` behind the deliveries that went well after it."""
        query = (
            select(Export, Series.series_instance_uid, Study.study_instance_uid)
            .join(Job, Export.job_pk == Job.id)
            .join(Series, Job.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .order_by(Export.updated_at.desc(), Export.id.desc())
        )
        with self._sessions() as session:
            rows = [*session.execute(query.where(Export.state != ExportState.DONE)).all(),
                    *session.execute(query.where(Export.state == ExportState.DONE)
                                     .limit(limit)).all()]
        return [
            {
                "export_id": e.id, "job_id": e.job_pk, "destination": e.destination,
                "state": e.state.value, "attempts": e.attempts, "files": len(e.paths),
                "last_error": e.last_error, "next_attempt_at": e.next_attempt_at.isoformat(),
                "give_up_at": e.give_up_at.isoformat(),
                "sent_at": e.sent_at.isoformat() if e.sent_at else None,
                "series_instance_uid": series_uid, "study_instance_uid": study_uid,
            }
            for e, series_uid, study_uid in rows
        ]

    # -- restart and status ------------------------------------------------------------

    def running_since(self, worker: str) -> datetime | None:
        """When the job a worker is running was claimed (None when it runs none)."""
        with self._sessions() as session:
            return session.scalar(select(func.min(Job.started_at)).where(
                Job.state == JobState.RUNNING, Job.worker == worker))

    def release_worker_jobs(
        self, worker: str, cause: str, max_attempts: int, now: datetime | None = None
    ) -> tuple[int, int]:
        """The jobs a dead AI worker was running: queued again, or failed once they were
        claimed `max_attempts` times (a series that kills its worker, out of memory say,
        must not take every worker down in turn). Returns (queued, failed)."""
        with self._write() as session:
            return _release_running(
                session, Job.worker == worker, f"the AI worker died ({cause})",
                max_attempts, now or utcnow())[:2]

    def supersede_if_grown(self, job_id: int, attempt: int, now: datetime | None = None) -> bool:
        """End a claimed job as superseded when its series received instances since it was
        claimed (they started a new pass: a running job is not re-opened), so that a result
        of part of a series never reaches the PACS beside the whole one. Called before its
        results are stored and exported. False when the series has not grown, or the job
        is no longer that claim (see `finish_job`)."""
        now = now or utcnow()
        with self._write() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.RUNNING or job.attempts != attempt:
                return False
            newer = session.scalar(select(Job.id).where(Job.series_pk == job.series_pk,
                                                        Job.id > job.id).limit(1))
            if newer is None:
                return False
            job.state = JobState.SUPERSEDED
            job.reason = (f"superseded: instances arrived while it was analysed; job {newer}"
                          " analyses the whole series")
            job.finished_at = now
            job.updated_at = now
        return True

    def retry_job(
        self, job_id: int, attempt: int, cause: str, max_attempts: int,
        now: datetime | None = None,
    ) -> JobState | None:
        """A claimed job that ended in an error of the node's own (not a rejected series):
        queued again, or failed once claimed `max_attempts` times, like a job whose
        worker died, or superseded by a newer job of its series. Returns the new state;
        None when the job is no longer that claim (see `finish_job`)."""
        with self._write() as session:
            queued, failed, superseded = _release_running(
                session, and_(Job.id == job_id, Job.attempts == attempt), cause,
                max_attempts, now or utcnow())
        return (JobState.QUEUED if queued else JobState.FAILED if failed
                else JobState.SUPERSEDED if superseded else None)

    def reanalyse(
        self, uid: str, now: datetime | None = None, skipped: bool = False
    ) -> tuple[list[str], dict[str, str]]:
        """`dicomnode reanalyse`: queue a new analysis of each series of a study (or of
        one series) whose latest job is done or failed, e.g. after a broken model or GPU
        was fixed, or with new weights; with `skipped`, also those the `[series]` rules
        skipped (the administrator's call: the rules are not asked again). The new job's
        outputs get new UIDs: a second result beside the first. Series of the node's own
        outputs are left out. Returns the series queued, and the others with their latest
        job's state (and a skipped one's reason)."""
        now = now or utcnow()
        again = {JobState.DONE, JobState.FAILED} | ({JobState.SKIPPED} if skipped else set())
        queued: list[str] = []
        others: dict[str, str] = {}
        with self._write() as session:
            series_list = session.scalars(
                select(Series).join(Study, Series.study_pk == Study.id)
                .where(or_(Series.series_instance_uid == uid, Study.study_instance_uid == uid))
                .order_by(Series.id)
            ).all()
            for series in series_list:
                latest = session.scalar(select(Job).where(Job.series_pk == series.id)
                                        .order_by(Job.id.desc()).limit(1))
                state = latest.state if latest is not None else None
                if latest is not None and latest.reason == OWN_OUTPUT:
                    continue
                ct_images = session.scalar(select(exists().where(
                    Instance.series_pk == series.id, Instance.sop_class_uid == CTImageStorage)))
                if state not in again or not ct_images:
                    shown = state.value if state else "no job"
                    if state == JobState.SKIPPED and latest is not None and latest.reason:
                        shown += f" ({latest.reason})"
                    if not ct_images:  # a SEG or SR a viewer sent back
                        shown += NO_CT_IMAGE
                    others[series.series_instance_uid] = shown
                    continue
                session.add(Job(series=series, state=JobState.QUEUED, reason="reanalyse",
                                created_at=now, updated_at=now, collecting_since=now,
                                completed_at=now))
                queued.append(series.series_instance_uid)
        return queued, others

    def recover_after_restart(
        self, max_attempts: int = 2, now: datetime | None = None
    ) -> tuple[int, int]:
        """Return jobs interrupted while running, and exports interrupted while sending, to
        their queues; a job already claimed `max_attempts` times fails instead (a series
        that took the whole node down, out of memory say, must not do it again at every
        start). Returns (queued, failed) jobs."""
        now = now or utcnow()
        with self._write() as session:
            session.execute(
                update(Export)
                .where(Export.state == ExportState.SENDING)
                .values(state=ExportState.PENDING, next_attempt_at=now, updated_at=now)
            )
            return _release_running(session, true(), "interrupted by a restart",
                                    max_attempts, now)[:2]

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
            # The node's own outputs are stored as skipped series: counted apart, so that
            # "skipped" counts the series the rules turned down.
            own = session.scalar(select(func.count(Job.id)).where(Job.reason == OWN_OUTPUT))
            if own:
                totals["jobs_skipped"] -= own
                totals["own_output_series"] = own
            for export_state, n in session.execute(
                select(Export.state, func.count(Export.id)).group_by(Export.state)
            ):
                totals[f"exports_{export_state.value}"] = n
        return totals

    def series_status(self, limit: int = 100, own_outputs: bool = True) -> list[dict[str, Any]]:
        """The most recently active series with their current job, newest first (active:
        an instance received, or its job changed: a `reanalyse` of an older study that
        fails is listed, not hidden behind newer arrivals); without the node's own output
        series (SEG, SR, key images, PDF) unless `own_outputs`."""
        latest_job = (
            select(Job.series_pk, func.max(Job.id).label("job_id"))
            .group_by(Job.series_pk)
            .subquery()
        )
        with self._sessions() as session:
            rows = session.execute(
                select(Series, Study, Patient, Job, Result)
                .join(Study, Series.study_pk == Study.id)
                .join(Patient, Study.patient_pk == Patient.id)
                .outerjoin(latest_job, latest_job.c.series_pk == Series.id)
                .outerjoin(Job, Job.id == latest_job.c.job_id)
                .outerjoin(Result, Result.job_pk == Job.id)
                .where(true() if own_outputs else or_(Job.id.is_(None), Job.reason != OWN_OUTPUT))
                .order_by(case((Job.updated_at > Series.last_received_at, Job.updated_at),
                               else_=Series.last_received_at).desc())
                .limit(limit)
            ).all()
            refused = _refused_counts(session, [row[0].series_instance_uid for row in rows])
        return [_series_row(*row) | {"refused_instances": refused[row[0].series_instance_uid]}
                for row in rows]


def _series_row(
    series: Series, study: Study, patient: Patient, job: Job | None, result: Result | None
) -> dict[str, Any]:
    return {
        "result": None if result is None else {
            "diagnosis": result.diagnosis, "probabilities": result.probabilities,
            "lvr": result.lvr, "plr": result.plr, "lesion_count": result.lesion_count,
            "model": f"{result.model_name} {result.model_version}",
            "caveats": (result.analysis or {}).get("caveats", []),
        },
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
    """A one-line summary such as `3 studies, 5 series, 1200 instances; jobs: queued 1`."""
    head = (
        f"{counts['patients']} patients, {counts['studies']} studies, "
        f"{counts['series']} series, {counts['instances']} instances"
    )
    jobs = ", ".join(
        f"{s.value} {counts[f'jobs_{s.value}']}" for s in states if counts.get(f"jobs_{s.value}")
    )
    if counts.get("own_output_series"):
        jobs += f"{', ' if jobs else ''}own outputs {counts['own_output_series']}"
    exports = ", ".join(
        f"{s.value} {counts[f'exports_{s.value}']}" for s in ExportState
        if counts.get(f"exports_{s.value}")
    )
    parts = [head, f"jobs: {jobs}" if jobs else "", f"exports: {exports}" if exports else ""]
    return "; ".join(p for p in parts if p)

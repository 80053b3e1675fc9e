"""SQLAlchemy 2.0 ORM of the study index: the DICOM information model plus work state.

Patient -> Study -> Series -> Instance mirror the DICOM query/retrieve levels with the
attributes a PACS administrator filters on. A Job is one pass of a series through the
node (collecting -> complete -> queued/skipped -> running -> done/failed/superseded); a
late instance re-opens the series' current Job, or starts a new one once analysis has
begun (the running one then ends superseded); `dicomnode reanalyse` starts one too.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 5
"""Bumped by every change to the tables; `storage.index` migrates or refuses older files."""

UID = String(64)  # DICOM UI VR: at most 64 characters


class Base(DeclarativeBase):
    pass


class JobState(enum.StrEnum):
    """Where a series stands; the first four belong to the assembler, the rest to the AI."""

    COLLECTING = "collecting"
    COMPLETE = "complete"
    SKIPPED = "skipped"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    """More instances arrived while it ran: its result went nowhere; a new pass has them."""


class ExportState(enum.StrEnum):
    """Delivery of one job's outputs to one destination."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class CompletionRule(enum.StrEnum):
    """Which rule of `[series]` declared a series complete."""

    QUIET = "quiet_period"
    RELEASE = "association_released"
    MAX_WAIT = "max_wait"


class Meta(Base):
    """Key/value facts about the index itself (the schema version)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Patient(Base):
    __tablename__ = "patient"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Not unique: studies without a PatientID (anonymised, some emergency workflows) each
    # get their own row rather than one shared "" patient with the first one's name.
    patient_id: Mapped[str] = mapped_column(String(64), index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    birth_date: Mapped[str] = mapped_column(String(8), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_description: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    image_type: Mapped[str] = mapped_column(String(128), default="")  # backslash-joined
    image_orientation: Mapped[str] = mapped_column(String(128), default="")  # backslash-joined
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    # Set when the association that sent the latest instance is released; cleared by a new one.
    released_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # of the dataset as received
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime)
    series: Mapped[Series] = relationship(back_populates="instances")


class RefusedInstance(Base):
    """An instance refused for want of resources (0xA700: free disk below the limit, a
    write that failed): until the sender sends it again its series is incomplete, and is
    not analysed (`dicomnode.assembler`). Keyed by UIDs, not by a Series row: the first
    instance of a series may be the one refused."""

    __tablename__ = "refused_instance"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    refused_at: Mapped[datetime] = mapped_column(DateTime)
    reason: Mapped[str] = mapped_column(Text, default="")


class Job(Base):
    __tablename__ = "job"
    id: Mapped[int] = mapped_column(primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16))
    reason: Mapped[str] = mapped_column(Text, default="")
    completion_rule: Mapped[CompletionRule | None] = mapped_column(
        Enum(CompletionRule, native_enum=False, length=32), nullable=True
    )
    reopen_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    # Start of the current collecting pass (creation, or re-opening by a late instance):
    # `max_wait_seconds` counts from here, not from the series' first instance ever.
    collecting_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    series: Mapped[Series] = relationship(back_populates="jobs")

    __table_args__ = (Index("ix_job_state_id", "state", "id"),)


class Result(Base):
    """What the AI found for one job, and which output instances were made from it."""

    __tablename__ = "result"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), unique=True)
    diagnosis: Mapped[str] = mapped_column(String(32))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    lvr: Mapped[float] = mapped_column(Float)
    plr: Mapped[float | None] = mapped_column(Float, nullable=True)
    lesion_count: Mapped[int] = mapped_column(Integer)
    lesion_volume_ml: Mapped[float] = mapped_column(Float)
    lung_volume_ml: Mapped[float] = mapped_column(Float)
    analysis: Mapped[dict] = mapped_column(JSON)  # ScanAnalysis.to_dict() and "caveats"
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), default="")
    timings: Mapped[dict[str, float]] = mapped_column(JSON)  # stage -> seconds
    outputs: Mapped[dict[str, list[str]]] = mapped_column(JSON)  # kind -> instance paths
    created_at: Mapped[datetime] = mapped_column(DateTime)
    job: Mapped[Job] = relationship()


class Export(Base):
    """One job's outputs owed to one destination; retried as a whole, not per file."""

    __tablename__ = "export"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    paths: Mapped[list[str]] = mapped_column(JSON)
    state: Mapped[ExportState] = mapped_column(Enum(ExportState, native_enum=False, length=16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    give_up_at: Mapped[datetime] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    job: Mapped[Job] = relationship()

    __table_args__ = (Index("ix_export_state_next", "state", "next_attempt_at"),)

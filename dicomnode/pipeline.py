"""The job runner: a queued series -> volume -> AI analysis -> DICOM outputs -> exports.

Workers are processes that claim jobs from the index. A job that cannot be analysed ends
`failed` with the reason (the series' data are untouched) and the worker goes on. The
outputs are stored like received instances, flagged as the node's own, so they can be
re-sent and are never analysed themselves.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ai.errors import InputVolumeError
from ai.infer import Analysis, analyse, load_model
from ai.labels import CLASS_NAMES
from ai.refine import OutlineRefinement
from dicomnode import __version__
from dicomnode.config import MIRROR_CHOICES, Settings
from dicomnode.export import Exporter
from dicomnode.outputs import Provenance
from dicomnode.outputs.key_images import build_key_images, build_notice_image
from dicomnode.outputs.pdf import build_pdf_report
from dicomnode.outputs.seg import build_segmentation
from dicomnode.outputs.sr import build_failure_notice, build_report
from dicomnode.scp import instance_record
from dicomnode.volume import CTVolume, SeriesRejected, read_series
from dicomnode.warmup import self_test_analysis, self_test_volume, warm_model
from dicomnode.workers import StopFlag
from storage.filestore import FileStore
from storage.index import ClaimedJob, ResultRecord, StudyIndex
from storage.models import JobState

logger = logging.getLogger(__name__)
RESULT_RETRY_SECONDS: tuple[float | None, ...] = (1.0, 4.0, 16.0, None)
"""Waits between tries to record a job's result (the index busy or locked); None: the
last try."""

POLL_SECONDS = 0.5
ORPHAN_CHECK_SECONDS = 1.0
MODEL_RETRY_SECONDS = 30.0
"""How often a worker whose model did not load tries again (jobs wait queued meanwhile)."""
FAULT_PAUSE_SECONDS = (30.0, 600.0)
"""After two jobs in a row end in errors of the node's own, a worker waits the first
before its next claim, doubled after each further one, up to the second."""


@dataclass
class Outcome:
    """What one job produced: the analysis and the output datasets by kind."""

    analysis: Analysis
    outputs: dict[str, list[Dataset]]
    timings: dict[str, float] = field(default_factory=dict)


def node_provenance(settings: Settings, model: dict[str, object], job_key: str = "") -> Provenance:
    """The node as a device: a UID stable per installation (derived from its data dir);
    `job_key` names the job whose outputs these are (see `Provenance.uid`)."""
    seed = f"{settings.node.ae_title}:{settings.data_dir.resolve()}".encode()
    device_uid = pydicom.uid.generate_uid(entropy_srcs=[seed.decode()])
    return Provenance(
        device_uid=device_uid,
        model_name=str(model.get("name", "DeepSC-COVID")),
        model_version=model_version(model),
        station_name=settings.node.ae_title,
        job_key=job_key,
        algorithm_parameters=algorithm_parameters(settings, model),
    )


def algorithm_parameters(settings: Settings, model: dict[str, object]) -> dict[str, str]:
    """How the numbers were made (`Provenance.algorithm_parameters`): how the model ran,
    as `ai.infer.Analysis.model` records it (a GPU mirrors and overlaps windows by
    default, a CPU does not), and the analysis settings of `[ai]`."""
    ai = settings.ai
    parameters: dict[str, str] = {}
    if "device" in model:
        parameters["device"] = str(model["device"])
    if "mirror" in model:
        parameters["test_time_mirroring"] = "on" if model["mirror"] else "off"
    for key, name in (("window_overlap", "window_overlap"), ("threshold", "lesion_threshold")):
        if key in model:
            parameters[name] = f"{float(model[key]):g}"  # type: ignore[arg-type]
    if "field_of_view_mm" in model:  # the square the network saw, or the whole matrix
        fov = model["field_of_view_mm"]
        parameters["field_of_view_mm"] = "whole matrix" if fov is None else f"{fov:g}"
    # no "," or "=" in a value: the SEG joins them as "key=value,key=value"
    diseases = CLASS_NAMES[: len(ai.disease_thresholds)]
    thresholds = "; ".join(
        f"{name} {t:g}" for name, t in zip(diseases, ai.disease_thresholds, strict=True))
    return parameters | {
        "min_lesion_volume_mm3": f"{ai.min_lesion_volume_mm3:g}",
        "peripheral_thickness_mm": f"{ai.peripheral_thickness_mm:g}",
        "peripheral_outline_closing_mm": f"{ai.peripheral_outline_closing_mm:g}",
        "consolidation_hu": f"{ai.consolidation_hu:g}",
        "outline_band_mm": f"{ai.outline_band_mm:g}",
        "outline_contrast_hu": f"{ai.outline_contrast_hu:g}",
        "disease_thresholds": thresholds or "most probable class",
    }


def job_key(job: ClaimedJob, *content: bytes | str) -> str:
    """What a job's output UIDs derive from (`Provenance.uid`): the job, when its series
    was completed, and what decides the outputs' content.

    An attempt that remakes the same content (a job run again after a crash, on the same
    data with the same code and settings) gets the same key, so its outputs keep their
    UIDs and go out once. Anything else, a series re-opened by a late instance, other
    settings, an analysis that came out differently (e.g. on a GPU), gets a new key: a
    second, self-consistent result rather than a stale one under the old UIDs.
    """
    digest = hashlib.sha256()
    for part in (str(job.job_id), job.series_instance_uid, str(job.completed_at),
                 __version__, *content):
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\x1f")
    return digest.hexdigest()


def analysis_fingerprint(analysis: Analysis, settings: Settings) -> tuple[bytes, str]:
    """The parts of `job_key` that decide a result's content: the masks, the class
    probabilities and lesion statistics, and the output settings."""
    masks = np.packbits(analysis.lesion_mask).tobytes() + np.packbits(analysis.lung_mask).tobytes()
    return masks, repr((analysis.lesion_mask.shape, sorted(analysis.probabilities.items()),
                        analysis.lesions, settings.pipeline))


def model_version(model: dict[str, object]) -> str:
    """The weights' identity: a short prefix of the checkpoint's sha256."""
    return str(model.get("checkpoint_sha256", ""))[:12] or "unknown"


def analyse_volume(volume: CTVolume, settings: Settings, checkpoint: object) -> Analysis:
    ai = settings.ai
    return analyse(
        volume.hu, volume.spacing_mm, checkpoint=checkpoint,  # type: ignore[arg-type]
        device=ai.device,
        min_lesion_mm3=ai.min_lesion_volume_mm3, peripheral_mm=ai.peripheral_thickness_mm,
        outline_closing_mm=ai.peripheral_outline_closing_mm,
        consolidation_hu=ai.consolidation_hu, disease_thresholds=ai.disease_thresholds or None,
        mirror=MIRROR_CHOICES[ai.mirror],
        overlap=None if ai.window_overlap == "auto" else float(ai.window_overlap),
        refinement=OutlineRefinement(band_mm=ai.outline_band_mm,
                                     contrast_hu=ai.outline_contrast_hu),
    )


def build_outputs(
    volume: CTVolume, analysis: Analysis, settings: Settings, kinds: set[str]
) -> tuple[dict[str, list[Dataset]], dict[str, float]]:
    """The requested output objects for one analysed volume, with encoding times."""
    provenance = node_provenance(settings, analysis.model)
    out, timings = build_results(volume, analysis, settings, provenance)
    views, view_timings = build_views(volume, analysis, settings, kinds, provenance)
    return out | views, timings | view_timings


def build_results(
    volume: CTVolume, analysis: Analysis, settings: Settings, provenance: Provenance
) -> tuple[dict[str, list[Dataset]], dict[str, float]]:
    """The SEG and the TID 1500 SR (always made), with encoding times."""
    options = settings.pipeline
    timings: dict[str, float] = {}
    probabilities = [analysis.probabilities[name] for name in CLASS_NAMES]
    t = time.perf_counter()
    seg = build_segmentation(
        volume.datasets, analysis.lung_mask, analysis.lesion_mask, analysis.lesions,
        provenance, connectivity=analysis.stats.connectivity,
        max_lesion_segments=options.max_lesion_segments,
        omit_empty_frames=options.seg_omit_empty_frames, stored_flips=volume.stored_flips,
    )
    timings["encode_seg"] = time.perf_counter() - t
    t = time.perf_counter()
    sr = build_report(
        volume.datasets, seg.dataset, seg.lesion_segments, analysis.stats, probabilities,
        analysis.diagnosis, provenance, image_library=options.sr_image_library,
        caveats=[caveat.detail for caveat in analysis.caveats],
    )
    timings["encode_sr"] = time.perf_counter() - t
    return {"seg": [seg.dataset], "sr": [sr]}, timings


def build_views(
    volume: CTVolume, analysis: Analysis, settings: Settings, kinds: set[str],
    provenance: Provenance,
) -> tuple[dict[str, list[Dataset]], dict[str, float]]:
    """The key images and the PDF report, those of them in `kinds`, with encoding times."""
    options = settings.pipeline
    timings: dict[str, float] = {}
    out: dict[str, list[Dataset]] = {}
    if "key_images" in kinds and options.key_images:
        t = time.perf_counter()
        out["key_images"] = build_key_images(volume, analysis, provenance, options.key_images)
        timings["encode_key_images"] = time.perf_counter() - t
    if "pdf" in kinds:
        t = time.perf_counter()
        out["pdf"] = [build_pdf_report(volume, analysis, provenance)]
        timings["encode_pdf"] = time.perf_counter() - t
    return out, timings


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class Pipeline:
    """Runs claimed jobs: loads the model once, then volume -> analysis -> outputs."""

    def __init__(
        self, settings: Settings, index: StudyIndex, filestore: FileStore, exporter: Exporter,
        checkpoint_loader: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.index = index
        self.filestore = filestore
        self.exporter = exporter
        self._load = checkpoint_loader or self._load_checkpoint
        self._checkpoint: object | None = None
        self._checkpoint_lock = threading.Lock()
        self._next_load = 0.0
        self._load_error = ""
        self._internal_errors = 0  # jobs in a row that ended in an error of the node's own
        self.kinds = {"seg", "sr"} | {k for d in settings.destinations for k in d.outputs}

    def _load_checkpoint(self) -> object:
        path = self.settings.ai.checkpoint
        resolved = str(self.settings.base_dir / path) if path else None
        return load_model(resolved, self.settings.ai.device)

    def checkpoint(self) -> object:
        """The model, loaded once on first use."""
        with self._checkpoint_lock:
            if self._checkpoint is None:
                self._checkpoint = self._load()
            return self._checkpoint

    def model_loaded(self) -> bool:
        """Whether the model is loaded, trying to load it at most every
        `MODEL_RETRY_SECONDS`. A worker claims no job without it: a checkpoint path with a
        typo or a broken GPU driver keeps the series queued until it is fixed, instead of
        failing each of them for good. A new reason is logged once, as an error."""
        if self._checkpoint is not None:
            return True
        now = time.monotonic()
        if now < self._next_load:
            return False
        self._next_load = now + MODEL_RETRY_SECONDS
        try:
            self.checkpoint()
        except Exception as exc:
            if str(exc) != self._load_error:
                logger.error("AI worker: the model did not load (queued series wait; trying"
                             " again every %.0f s): %s", MODEL_RETRY_SECONDS, exc)
                self._load_error = str(exc)
                self._report_model_problem(str(exc))
            return False
        if self._load_error:
            logger.info("AI worker: the model loaded; analysing the queued series")
        self._report_model_problem(None)  # also a problem left by an earlier run
        return True

    def _report_model_problem(self, problem: str | None) -> None:
        try:
            self.index.set_model_problem(problem)
        except Exception:  # the log has it; a busy index must not stop the worker
            logger.exception("AI worker: could not record the model's state in the index")

    def warm_up(self) -> None:
        """Load the model (on a GPU, run it once too) and run every output encoder once on
        a made-up CT (`dicomnode.warmup`), so that the first job pays for none of it; what
        fails is logged (the worker keeps running, see `model_loaded`)."""
        t = time.perf_counter()
        model = "model loaded" if self.model_loaded() else "NO MODEL"
        if self._checkpoint is not None:
            try:
                if warm_model(self._checkpoint):
                    model += ", GPU warmed up"
            except Exception:  # the first job would meet the same error, with its reason
                logger.exception("AI worker: the model's warm-up pass on the GPU failed")
        try:
            volume = self_test_volume()
            build_outputs(volume, self_test_analysis(volume), self.settings, self.kinds)
        except Exception:
            logger.exception("AI worker self-test: the output encoders failed on a made-up CT")
            return
        logger.info("AI worker ready in %.1f s (%s, output encoders self-tested)",
                    time.perf_counter() - t, model)

    def run_job(self, job: ClaimedJob) -> JobState:
        """Analyse one claimed job and record how it ended; never raises."""
        try:
            state = self._run(job)
        except (SeriesRejected, InputVolumeError) as exc:
            self._internal_errors = 0
            return self._fail(job, str(exc))
        except Exception as exc:  # a bug or a broken file must not stop the worker
            logger.exception("job %d (series %s) failed", job.job_id, job.series_instance_uid)
            self._internal_errors += 1
            return self._retry_or_fail(job, f"internal error: {type(exc).__name__}: {exc}")
        self._internal_errors = 0
        if state == JobState.SUPERSEDED:
            return state
        self._finish(job, JobState.DONE)
        return JobState.DONE

    def fault_pause(self) -> float:
        """Seconds to wait before the next claim: none, or after two or more jobs in a row
        ended in errors of the node's own (a GPU fallen off the bus, a broken font), a
        pause doubling up to `FAULT_PAUSE_SECONDS[1]`. Without it one persistent fault
        failed every queued series within seconds (each retried at once, then failed with
        a notice); with it the queue waits for the fault to be fixed, losing at most one
        job per pause."""
        if self._internal_errors < 2:
            return 0.0
        first, longest = FAULT_PAUSE_SECONDS
        return min(longest, first * 2.0 ** min(self._internal_errors - 2, 20))

    def _retry_or_fail(self, job: ClaimedJob, reason: str) -> JobState:
        """An error of the node's own (out of GPU memory, a storage read error, a bug), not
        of the series: queued again until the job was claimed `max_attempts` times."""
        state = self.index.retry_job(job.job_id, job.attempts, reason,
                                     self.settings.pipeline.max_attempts)
        if state == JobState.QUEUED:
            logger.warning("job %d queued again (attempt %d of %d failed)", job.job_id,
                           job.attempts, self.settings.pipeline.max_attempts)
            return state
        if state == JobState.SUPERSEDED:  # the series grew: its new pass decides
            logger.info("job %d: superseded by a newer pass of series %s", job.job_id,
                        job.series_instance_uid)
            return state
        if state == JobState.FAILED:
            self._notify_failure(job, self.index.job_state(job.job_id)[1])
        return JobState.FAILED

    def _run(self, job: ClaimedJob) -> JobState:
        """Volume, analysis, then the SEG and SR, stored and queued for export before the
        key images and PDF are rendered: the findings reach the PACS first (about a
        second sooner on a CPU, most of what is left after the AI on a GPU). A failure
        of the views is logged and leaves the job done: failing it would send a failure
        notice after the results."""
        t0 = time.perf_counter()
        paths = self.index.series_instance_paths(job.series_instance_uid)
        volume = read_series([self.filestore.path(p) for p in paths],
                             min_slices=self.settings.series.min_slices)
        timings = {"volume": time.perf_counter() - t0}
        analysis = analyse_volume(volume, self.settings, self.checkpoint())
        timings |= {f"ai_{k}": v for k, v in analysis.timings.items()}
        key = job_key(job, *analysis_fingerprint(analysis, self.settings))
        provenance = node_provenance(self.settings, analysis.model, key)
        results, encode_times = build_results(volume, analysis, self.settings, provenance)
        timings |= encode_times
        if self.index.supersede_if_grown(job.job_id, job.attempts):
            logger.info("job %d: series %s received more instances while it was analysed:"
                        " this result is dropped, the new pass analyses the whole series",
                        job.job_id, job.series_instance_uid)
            return JobState.SUPERSEDED
        stored = self._store_and_queue(job, results, timings)
        try:
            views, view_times = build_views(
                volume, analysis, self.settings, self.kinds, provenance
            )
            timings |= view_times
            stored |= self._store_and_queue(job, views, timings)
        except Exception:  # the SEG and SR are already on their way: the job stands
            logger.exception("job %d: key images / PDF report failed; SEG and SR were sent",
                             job.job_id)
        self._record_result(job, result_record(analysis, stored, timings))
        logger.info("job %d: series %s -> %s (LVR %.1f %%), %d lesion(s), %.1f s", job.job_id,
                    job.series_instance_uid, analysis.diagnosis.name, 100 * analysis.lvr,
                    len(analysis.lesions), time.perf_counter() - t0)
        return JobState.DONE

    def _store_and_queue(
        self, job: ClaimedJob, outputs: dict[str, list[Dataset]], timings: dict[str, float]
    ) -> dict[str, list[str]]:
        """Store outputs like received instances and owe them to their destinations;
        adds the store time to `timings` (key "store", summed over calls)."""
        t = time.perf_counter()
        stored = {kind: [self.store_output(ds) for ds in datasets]
                  for kind, datasets in outputs.items()}
        timings["store"] = timings.get("store", 0.0) + time.perf_counter() - t
        self.exporter.queue(job.job_id, stored, attempt=job.attempts)
        return stored

    def _record_result(self, job: ClaimedJob, record: ResultRecord) -> None:
        """Record what the AI found, retried while the index is busy. The SEG and SR are
        already on their way, so a result that cannot be recorded is logged and the job
        still ends done: failing it would send a failure notice after the results."""
        for delay in RESULT_RETRY_SECONDS:
            try:
                self.index.record_result(job.job_id, job.attempts, record)
                return
            except Exception:
                if delay is None:
                    logger.exception("job %d: its result could not be recorded (its outputs"
                                     " were sent)", job.job_id)
                    return
                time.sleep(delay)

    def _finish(self, job: ClaimedJob, state: JobState, reason: str = "") -> bool:
        """Record the end of this claim; False when a restarted node queued the job again
        meanwhile (this worker is the killed node's orphan): the new attempt counts."""
        if self.index.finish_job(job.job_id, job.attempts, state, reason):
            return True
        logger.warning("job %d ended (%s) after it was queued again by a restarted node:"
                       " the new attempt records the outcome", job.job_id, state.value)
        return False

    def _fail(self, job: ClaimedJob, reason: str) -> JobState:
        """A rejected series fails with its reason, unless it grew meanwhile (a part of a
        series often has gaps): then the new pass decides, and no failure notice goes out."""
        if self.index.supersede_if_grown(job.job_id, job.attempts):
            logger.info("job %d: series %s received more instances while it was analysed;"
                        " the new pass analyses the whole series (this part: %s)", job.job_id,
                        job.series_instance_uid, reason)
            return JobState.SUPERSEDED
        logger.warning("job %d (series %s) failed: %s", job.job_id, job.series_instance_uid,
                       reason)
        if self._finish(job, JobState.FAILED, reason):  # else the attempt does not count
            self._notify_failure(job, reason)
        return JobState.FAILED

    def _notify_failure(self, job: ClaimedJob, reason: str) -> None:
        if self.settings.pipeline.failure_notice and self.settings.destinations:
            earlier = self.index.earlier_result_at(job.series_instance_uid, job.job_id)
            if earlier is not None:  # a new pass after instances came: say what stands
                reason += (f". The series was analysed on {earlier:%Y-%m-%d %H:%M} UTC; that"
                           " result refers to its instances as they were then, not to those"
                           " received since")
            try:
                self._send_failure_notice(job, reason)
            except Exception:
                logger.exception("job %d: the failure notice could not be built", job.job_id)

    def _send_failure_notice(self, job: ClaimedJob, reason: str) -> None:
        """The SR notice to every destination, and the same text as an image to those
        that take key images (viewers that show no free-form SR, OHIF, show that)."""
        paths = self.index.series_instance_paths(job.series_instance_uid)
        if not paths:
            return
        header = pydicom.dcmread(self.filestore.path(paths[0]), stop_before_pixels=True)
        provenance = node_provenance(self.settings, {}, job_key(job, "not analysed", reason))
        notice = self.store_output(build_failure_notice(header, reason, provenance))
        image = None
        if any("key_images" in d.outputs for d in self.settings.destinations):
            image = self.store_output(build_notice_image(header, reason, provenance))
        for destination in self.settings.destinations:
            owed = [notice] + ([image] if image and "key_images" in destination.outputs else [])
            self.index.queue_export(job.job_id, destination.name, owed,
                                    self.settings.export.give_up_after_seconds,
                                    attempt=job.attempts)

    def store_output(self, ds: Dataset) -> str:
        """Store an output like a received instance; returns its path in the file store.

        An output already stored under its UID (a job run again after a crash: same UIDs,
        see `Provenance.uid`) is kept as it is, since it may already be in the PACS."""
        stored = self.index.find_instance(str(ds.SOPInstanceUID))
        if stored is not None:
            logger.info("output %s was stored by an earlier attempt: kept", ds.SOPInstanceUID)
            return stored.path
        data = encode(ds)
        record = instance_record(ds, str(ds.file_meta.TransferSyntaxUID),
                                 self.settings.node.ae_title)
        relpath = self.filestore.instance_relpath(
            record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
        )
        try:
            size = self.filestore.write(relpath, data, exclusive=True)
        except FileExistsError:  # complete, from an attempt that died before indexing it
            logger.info("output %s was written by an earlier attempt: kept", ds.SOPInstanceUID)
            data = self.filestore.read(relpath)
            size = len(data)
        self.index.add_instance(record, relpath, size, hashlib.sha256(data).hexdigest(),
                                node_output=True)
        return relpath

    def run_until(self, stop: Callable[[], bool], name: str) -> None:
        """Claim and run jobs until `stop()` says so. An index that cannot be read or
        written (locked for longer than the busy timeout, a full disk) is retried before
        a claim; after one, the error ends the worker and its node's `WorkerPool` queues
        the job again and starts a new worker."""
        while not stop():
            if not self.model_loaded():
                time.sleep(POLL_SECONDS)
                continue
            pause = self.fault_pause()
            if pause:
                logger.error("AI worker %s: %d jobs in a row ended in errors of the node's"
                             " own (see above); the next claim waits %.0f s so that the"
                             " queue waits for the fault to be fixed", name,
                             self._internal_errors, pause)
                until = time.monotonic() + pause
                while not stop() and time.monotonic() < until:
                    time.sleep(POLL_SECONDS)
                if stop():
                    return
            try:
                job = self.index.claim_next_job(name)
            except Exception:
                logger.exception("AI worker %s could not claim a job; trying again", name)
                time.sleep(POLL_SECONDS)
                continue
            if job is None:
                time.sleep(POLL_SECONDS)
                continue
            self.run_job(job)


def worker_threads(workers: int) -> int:
    """Torch threads per AI worker: the cores this process may use, shared among the
    workers (torch takes every core in each, and N workers would oversubscribe them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


def worker_main(settings: Settings, name: str, stop: StopFlag, node_pid: int) -> None:
    """Entry point of one AI worker process.

    Workers are processes, not threads of the receiving node: torch and the model (one to
    several GB) stay out of the Storage SCP's memory, and a crash in native code takes
    down one worker, not the node (whose `WorkerPool` starts another). A worker whose node
    died (kill -9) exits by itself.
    """
    from dicomnode.cli import setup_logging

    setup_logging(settings.node.log_level)
    if settings.pipeline.workers > 1:
        import torch

        torch.set_num_threads(worker_threads(settings.pipeline.workers))
    threading.Thread(target=_exit_when_orphaned, args=(node_pid,), daemon=True,
                     name="orphan-watch").start()
    filestore = FileStore(settings.data_dir)
    index = StudyIndex(settings.database_url, schema="check")  # the node migrated it
    pipeline = Pipeline(settings, index, filestore, Exporter(settings, index, filestore))
    try:
        pipeline.warm_up()
        pipeline.run_until(lambda: stop.is_set() or os.getppid() != node_pid, name)
    finally:
        index.close()


def _exit_when_orphaned(node_pid: int) -> None:
    """End this worker at once when its node dies (kill -9): finishing the job it runs
    (up to `job_timeout_seconds`) would hold the memory and GPU that the restarted node's
    worker needs for the same job, and its result would be dropped anyway."""
    while os.getppid() == node_pid:
        time.sleep(ORPHAN_CHECK_SECONDS)
    logger.error("AI worker: its node (pid %d) is gone; exiting", node_pid)
    os._exit(1)


def result_record(
    analysis: Analysis, outputs: dict[str, list[str]], timings: dict[str, float]
) -> ResultRecord:
    stats = analysis.stats
    model = analysis.model
    return ResultRecord(
        diagnosis=analysis.diagnosis.name,
        probabilities=dict(analysis.probabilities),
        lvr=analysis.lvr,
        plr=analysis.plr,
        lesion_count=stats.lesion_count,
        lesion_volume_ml=stats.lesion_volume_ml,
        lung_volume_ml=stats.lung_volume_ml,
        analysis=stats.to_dict() | {"caveats": [asdict(c) for c in analysis.caveats]},
        model_name=str(model.get("name", "")),
        model_version=model_version(model),
        checkpoint_sha256=str(model.get("checkpoint_sha256", "")),
        timings={k: round(v, 4) for k, v in timings.items()},
        outputs=outputs,
    )


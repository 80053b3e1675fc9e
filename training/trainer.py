"""Two-stage training of DeepSC-COVID (paper V-A; deepsc.md "Training").

Stage 1 pre-trains the two streams separately: the L stem + lesion subnet on L_seg and
the C stem + classification subnet on L_cls (the classifier sees the true lesion map,
so it learns to use one before the lesion subnet can supply it). Their parameters are
disjoint, so one backward of L_seg + L_cls with Adam is exactly two separate trainings
on the same scans. Stage 2 trains everything jointly through the cross-stitch unit with
L = L_seg + L_cls + 10 L_ta; the classifier's whole-scan inputs come from the current
lesion subnet without gradient (``DeepSC.scan_context``, the code inference uses) with
the sampled patch recomputed with gradient and pasted in place.

One scan per step by default (``--batch-size`` for throughput on large GPUs), Adam with
linear decay, lesion-biased patches, augmentation, bf16 autocast on CUDA, gradient
accumulation, a checkpoint every epoch with exact ``--resume``, early stopping on the
validation score, k-fold splits, DDP under ``torchrun`` (only when WORLD_SIZE > 1).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from ai.analysis import analyse_lesions
from ai.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    Provenance,
    file_sha256,
    load_checkpoint,
    preprocess_config_for,
    resolve_device,
    save_checkpoint,
)
from ai.errors import InputVolumeError
from ai.infer import (
    DEFAULT_THRESHOLD,
    analyse,
    diagnose,
    lesion_mask,
    predict,
    with_overlap,
)
from ai.labels import CLASS_NAMES, Diagnosis
from ai.lungs import segment_lungs
from ai.model import (
    CLS_POOLS,
    SIZES,
    TASKS,
    ChannelAffine,
    DeepSC,
    ModelConfig,
    ScanContext,
    build_model,
    evidence_class,
)
from ai.preprocess import DEFAULT_FIELD_OF_VIEW_MM, PreprocessConfig, SlidingWindow
from ai.refine import DEFAULT_REFINEMENT, NO_REFINEMENT, OutlineRefinement
from training.datasets import (
    Augmentation,
    Case,
    CaseSource,
    DatasetError,
    Subset,
    TrainingSamples,
    kfold_indices,
    open_data,
    split_indices,
)
from training.losses import LossConfig, LossTerms, inverse_frequency_weights, total_loss
from training.metrics import (
    EvaluationSummary,
    ScanResult,
    classification_scores,
    dice_coefficient,
    format_table,
    plot_report,
    segmentation_scores,
    summarise,
)

logger = logging.getLogger(__name__)

LOSS_TERMS = ("total", "seg", "dice", "focal", "cls", "ta")
CSV_FIELDS = (
    "stage", "epoch", "lr", *(f"train_{t}" for t in LOSS_TERMS), "val_dsc", "val_accuracy",
    "val_fp_ml", "val_score", "best_score", "a11", "a12", "a21", "a22", "seconds", "data_seconds",
    "scans_per_second",
)  # fmt: skip
STAGE_FILES = {1: "stage1.pt", 2: "stage2.pt"}
FINAL_FILE = "model.pt"
LAST_FILE = "last.pt"
STATE_FILE = "train_state.pt"
VALIDATION_FILE = "validation_cases.json"
# Parameter-name prefixes of the classification stream (its own stage-2 rate, `lr2_cls`).
C_STREAM = ("stem_c.", "classifier.")
# What the classifier reads as its lesion map in stage 1 (docs/training.md, attempt 6).
STAGE1_LESION_MAPS = ("truth", "none")
DIST_TIMEOUT = datetime.timedelta(hours=2)
"""Other ranks wait this long for rank 0's validation before DDP gives up."""


def default_cache_dir() -> Path:
    """Lung masks and other derived data: ``$XDG_CACHE_HOME/dicomnode`` (~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dicomnode"


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a run depends on; saved next to the checkpoints as train_config.json."""

    data: list[str]
    out: Path
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.2
    folds: int = 0
    fold: int = 0
    stage: str = "both"
    size: str = "lite"
    task: str = "joint"
    cls_pool: str = "max"
    # The in-plane field (mm) the network sees around the lungs; None: the whole matrix.
    field_of_view_mm: float | None = None
    # Applied in order; a later checkpoint replaces the streams it holds (say a
    # classification-only run's C stream over a joint model).
    init: tuple[Path, ...] = ()
    # Then the classification stream alone (C stem and classifier) from this checkpoint:
    # a classifier fine-tuned elsewhere next to the segmenter of `init`.
    init_cls: Path | None = None
    epochs1: int = 10
    epochs2: int = 10
    lr1: float = 1e-3
    lr2: float = 1e-4
    lr2_cls: float | None = None  # the C stream's stage-2 rate; None: lr2
    # Multiplier of the rate for the L stream's per-channel affine layers (its only
    # biases): docs/training.md, attempt 9.
    lr_affine_scale: float = 1.0
    stage1_lesion_map: str = "truth"  # the classifier's lesion map in stage 1 (or "none")
    batch_size: int = 1
    accumulate: int = 1
    lesion_bias: float = 0.6
    augment: bool = True
    amp: bool = True
    device: str = "auto"
    workers: int = 2
    window_batch: int = 8
    val_every: int = 1
    seed: int = 0
    split_seed: int = 0  # the validation split and folds: apart from `seed` (see --split-seed)
    patience: int = 5
    resume: bool = False
    cache_dir: Path | None = None
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.stage not in ("1", "2", "both"):
            problems.append(f"stage {self.stage!r} must be 1, 2 or both")
        if self.size not in SIZES:
            problems.append(f"size {self.size!r} must be one of {SIZES}")
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} must be one of {TASKS}")
        for name in ("epochs1", "epochs2", "batch_size", "accumulate", "window_batch", "val_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if self.folds == 1 or self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            problems.append(f"fold {self.fold} of {self.folds}: need folds >= 2, 0 <= fold < folds")
        if self.folds and self.val_data:
            problems.append("folds validate on a fold of the data: leave out val_data")
        if self.init_cls is not None and self.task == "seg":
            problems.append("init_cls: a segmentation-only model has no classification stream")
        if self.lr1 <= 0:
            problems.append(f"lr1 {self.lr1} must be > 0")
        if self.lr2 < 0 or (self.lr2_cls is not None and self.lr2_cls < 0):
            problems.append("lr2 and lr2_cls must be >= 0 (0 freezes a stream)")
        elif self.stage != "1":
            cls_rate = self.lr2 if self.lr2_cls is None else self.lr2_cls
            rates = {"joint": (self.lr2, cls_rate), "seg": (self.lr2,), "cls": (cls_rate,)}
            if self.task in rates and not any(rate > 0 for rate in rates[self.task]):
                problems.append(f"lr2 {self.lr2:g}, lr2_cls {cls_rate:g}: stage 2 of a"
                                f" {self.task} model would train nothing (a segmentation-only"
                                " model trains at lr2, a classification-only one at lr2_cls)")
        if self.lr_affine_scale <= 0:
            problems.append(f"lr_affine_scale {self.lr_affine_scale} must be > 0")
        if not 0.0 <= self.lesion_bias <= 1.0:
            problems.append(f"lesion_bias {self.lesion_bias} must be in [0, 1]")
        if self.cls_pool not in CLS_POOLS:
            problems.append(f"cls_pool {self.cls_pool!r} must be one of {CLS_POOLS}")
        try:
            PreprocessConfig(field_of_view_mm=self.field_of_view_mm)
        except ValueError as exc:
            problems.append(str(exc))
        if self.stage1_lesion_map not in STAGE1_LESION_MAPS:
            problems.append(
                f"stage1_lesion_map {self.stage1_lesion_map!r} must be one of {STAGE1_LESION_MAPS}"
            )
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    @property
    def stages(self) -> tuple[int, ...]:
        return (1, 2) if self.stage == "both" else (int(self.stage),)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("out", "cache_dir"):
            out[key] = None if out[key] is None else str(out[key])
        out["init"] = [str(path) for path in self.init]
        out["init_cls"] = None if self.init_cls is None else str(self.init_cls)
        out["loss"]["ta_etas"] = list(self.loss.ta_etas)
        return out


# ---------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def distributed(device: str) -> Iterator[tuple[Dist, torch.device]]:
    """This process's place and device, the process group set up only under torchrun
    (each rank takes its local GPU) and torn down at the end. Once per process: every
    fold of a `--fold all` run uses the same group (set up and torn down per fold, a
    rank could hang in the next setup)."""
    info = Dist.from_env()
    if info.world == 1:
        yield info, resolve_device(device)
        return
    if torch.cuda.is_available() and device != "cpu":
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
        dist.init_process_group("nccl", device_id=dev, timeout=DIST_TIMEOUT)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    try:
        yield info, dev
    finally:
        dist.destroy_process_group()


def _broadcast_flag(flag: bool, info: Dist, device: torch.device) -> bool:
    if info.world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(value, 0)
    return bool(value.item())


# ------------------------------------------------------------------------- loading


class EpochKeys(Sampler[tuple[int, int]]):
    """(epoch, case index) keys in a seeded per-epoch order, this rank's share.

    Every rank gets the same number of keys (the order wraps around), so DDP ranks
    never wait on each other at the end of an epoch.
    """

    def __init__(self, n: int, seed: int, info: Dist, shuffle: bool = True) -> None:
        self.n, self.seed, self.info, self.shuffle = n, seed, info, shuffle
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.info.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch, 1)).permutation(self.n)
        total = len(self) * self.info.world
        order = np.resize(order, total)
        for i in order[self.info.rank :: self.info.world]:
            yield self.epoch, int(i)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-shape tensors; keep per-scan grids and ids as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if key not in ("case_id", "grid") else values
    return out


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are many; each one thread, no oversubscription


def _loader_options(workers: int, device: torch.device) -> dict[str, Any]:
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers:
        options |= {"persistent_workers": True, "prefetch_factor": 4}
        options["worker_init_fn"] = _worker_init
    return options


def _identity(case: Case) -> Case:
    return case


def iterate_cases(source: CaseSource, workers: int) -> Iterator[Case]:
    """The cases of a source in order, loaded (or generated) by a worker pool."""
    if workers == 0:
        yield from (source[i] for i in range(len(source)))
        return
    loader = DataLoader(
        source,  # type: ignore[arg-type]
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        worker_init_fn=_worker_init,
        prefetch_factor=2,
    )
    yield from loader


# ------------------------------------------------------------------------ the steps


@dataclass
class Batch:
    """A training batch on the device."""

    x_cls: Tensor
    x_seg: Tensor
    seg_target: Tensor
    seg_lung: Tensor
    box: Tensor
    lesion_map: Tensor
    label: Tensor
    grids: list[Tensor] | None

    @classmethod
    def from_samples(cls, samples: dict[str, Any], device: torch.device) -> Batch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        def volume(t: Tensor) -> Tensor:
            return move(t).contiguous(memory_format=torch.channels_last_3d)

        grids = samples.get("grid")
        return cls(
            x_cls=volume(samples["x_cls"]),
            x_seg=volume(samples["x_seg"]),
            seg_target=move(samples["seg_target"]),
            seg_lung=move(samples["seg_lung"]),
            box=samples["box"].double(),  # stays on the CPU: the model reads it as numbers
            lesion_map=volume(samples["lesion_map"]),
            label=move(samples["label"]),
            grids=None if grids is None else [move(g) for g in grids],
        )


class TrainStep(nn.Module):
    """One step's forward and loss, as a module so that DDP can wrap it.

    Every term a stage uses is always in the graph (an unknown label weighs 0, not
    absent), so DDP needs no unused-parameter search.
    """

    def __init__(
        self,
        model: DeepSC,
        stage: int,
        loss: LossConfig,
        class_weights: Tensor | None,
        stage1_lesion_map: str = "truth",
    ) -> None:
        super().__init__()
        self.model, self.stage, self.loss = model, stage, loss
        self.stage1_lesion_map = stage1_lesion_map
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, batch: Batch, context: ScanContext | None = None) -> LossTerms:
        model, task = self.model, self.model.config.task
        if self.stage == 1 or task != "joint":
            seg_logits = cls_logits = None
            if model.stem_l is not None:
                seg_logits = model.segment(model.stem_l(batch.x_seg)).logit
            if model.stem_c is not None:
                with_map = task == "joint" and self.stage1_lesion_map == "truth"
                lesion_map = batch.lesion_map if with_map else None
                cls_logits = model.classify(model.stem_c(batch.x_cls), lesion_map).logits
            return self._loss(batch, seg_logits, cls_logits, None)
        out = model(batch.x_seg, batch.x_cls, batch.box, context)
        assert out.seg is not None and out.cls is not None
        disease = (batch.label >= 0) & (batch.label != Diagnosis.NON_PNEUMONIA)
        target_class = torch.where(disease, batch.label, evidence_class(out.cls.logits.detach()))
        evidence = model.evidence_for_heads(out.cls.units, target_class, batch.box, out.seg)
        pairs = list(zip(out.seg.head_logits[:3], evidence, strict=True))
        return self._loss(batch, out.seg.logit, out.cls.logits, pairs)

    def _loss(
        self,
        batch: Batch,
        seg_logits: Tensor | None,
        cls_logits: Tensor | None,
        ta_pairs: list[tuple[Tensor, Tensor]] | None,
    ) -> LossTerms:
        return total_loss(
            seg_logits=seg_logits,
            seg_target=batch.seg_target if seg_logits is not None else None,
            lung_mask=batch.seg_lung,
            cls_logits=cls_logits,
            cls_target=batch.label,
            class_weights=self.class_weights,
            ta_pairs=ta_pairs,
            ta_from_logits=True,
            config=self.loss,
        )


def scan_contexts(
    model: DeepSC, batch: Batch, preprocess: PreprocessConfig, window_batch: int
) -> ScanContext:
    """Whole-scan classifier inputs of each scan in the batch, without gradient."""
    contexts = []
    for i, grid in enumerate(batch.grids or []):
        window = SlidingWindow(
            grid.shape,
            PreprocessConfig(
                seg_patch=preprocess.seg_patch,
                seg_inplane_size=None,
                seg_overlap=preprocess.seg_overlap,
            ),
        )

        def windows(w: SlidingWindow = window, g: Tensor = grid) -> Iterator[tuple[Tensor, Tensor]]:
            for boxes in w.batches(window_batch):
                x = w.extract_batch(g, boxes).contiguous(memory_format=torch.channels_last_3d)
                yield x, torch.tensor([b.fractions() for b in boxes], dtype=torch.float64)

        contexts.append(model.scan_context(batch.x_cls[i : i + 1], windows()))
    return ScanContext.cat(contexts)


# ------------------------------------------------------------------------ the trainer


@dataclass
class EpochResult:
    """Mean loss terms of an epoch and its timing."""

    terms: dict[str, float]
    lr: float
    """Learning rate at the start of the epoch (it decays linearly within it)."""
    seconds: float
    data_seconds: float
    scans: int


@dataclass
class StageState:
    """Where a stage stands; saved after every epoch for ``--resume``."""

    stage: int
    epochs_done: int = 0
    best_score: float = -math.inf
    bad_epochs: int = 0
    finished: bool = False


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (no loss scaling needed); full precision on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Runs the stages of one training job into ``config.out``."""

    def __init__(
        self,
        config: TrainConfig,
        train: CaseSource,
        val: CaseSource | None,
        info: Dist | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.train_source, self.val_source = train, val
        self.info = info or Dist()
        self.device = device or resolve_device(config.device)
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        self.model_config = replace(
            ModelConfig.named(config.size, config.task), cls_pool=config.cls_pool
        )
        self.model = build_model(self.model_config).to(
            self.device, memory_format=torch.channels_last_3d
        )
        self.preprocess = preprocess_config_for(
            self.model_config, field_of_view_mm=config.field_of_view_mm
        )
        # Which weights `--init` named, by content: a path alone (say the shipped
        # checkpoint) may hold other weights by the time someone reads the provenance.
        init = [*config.init, *([config.init_cls] if config.init_cls else [])]
        missing = [str(path) for path in init if not path.is_file()]
        if missing:
            raise DatasetError(f"--init {', '.join(missing)}: no such checkpoint")
        stage1 = self.out / STAGE_FILES[1]
        if config.stages == (2,) and not config.init and stage1.is_file():
            init.insert(0, stage1)  # stage 2 alone starts from another run's weights here
        self.init_sha256 = [file_sha256(path) for path in init]  # also when resumed
        labels = [int(label) for label in train.labels() if label is not None]
        self.class_weights = None
        if self.model.classifier is not None:
            if not labels:
                raise DatasetError("a model that classifies needs labelled training cases")
            weights = inverse_frequency_weights(labels, len(CLASS_NAMES))
            self.class_weights = weights.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # -- the run ------------------------------------------------------------------------

    def run(self) -> Path:
        """Train every requested stage (resuming where asked); returns the final model."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_validation_cases()
        if self.info.main:
            (self.out / "train_config.json").write_text(
                json.dumps(self.config.to_dict(), indent=2) + "\n"
            )
        resume = self._load_resume() if self.config.resume else None
        for stage in self.config.stages:
            if resume is not None and resume[0].stage > stage:
                continue
            state, saved = resume if resume and resume[0].stage == stage else (None, None)
            if state is None:
                self._init_stage(stage)  # may refuse: then the folder's rows stay as they are
                if self.info.main:  # rows of an attempt at this stage killed before its state
                    self._drop_metrics_after(stage, 0)
            if state is None or not state.finished:
                self._run_stage(stage, state, saved)
        final = self.out / STAGE_FILES[self.config.stages[-1]]
        if self.info.main:
            shutil.copyfile(final, self.out / FINAL_FILE)
            logger.info("final model: %s", self.out / FINAL_FILE)
        return self.out / FINAL_FILE

    def _init_stage(self, stage: int) -> None:
        """The first stage of the run starts from ``--init`` when given; stage 2 after
        stage 1 starts from the best stage-1 weights, and alone from this folder's.

        Stage 1 trains the streams apart, so the cross-stitch is the identity there (and
        a stage-1 model infers the same way); stage 2 starts it at its explicit init.
        """
        sources = self.config.init
        if stage == 2 and (1 in self.config.stages or not sources):
            sources = (self.out / STAGE_FILES[1],)
        for source in sources:
            self._load_init(stage, source)
        if self.config.init_cls is not None and stage == self.config.stages[0]:
            self._load_init(stage, self.config.init_cls, only=C_STREAM)
        stitch = self.model.cross_stitch
        if stitch is None:
            return
        if stage == 1:
            stitch.separate()
        elif stitch.is_separate:
            stitch.stitch(self.model_config.cross_stitch_init)
            logger.info("stage 2: cross-stitch starts at %s", self.model_config.cross_stitch_init)

    def _load_init(self, stage: int, source: Path, only: tuple[str, ...] = ()) -> None:
        """Copy the weights of `source` that this model has (those under the name
        prefixes `only`, when given)."""
        if not source.is_file():
            raise DatasetError(
                f"stage {stage} starts from {source}, which does not exist "
                "(run --stage 1 first or give --init CHECKPOINT)"
            )
        loaded = load_checkpoint(source, "cpu")
        if loaded.model_config.name != self.model_config.name:  # other widths: no weight fits
            raise DatasetError(f"{source} holds a {loaded.model_config.name!r} model; this run"
                               f" trains {self.model_config.name!r} (--size)")
        weights = loaded.model.state_dict()
        if only:
            weights = {k: v for k, v in weights.items() if k.startswith(only)}
            if not weights:
                raise DatasetError(f"{source} holds no {'/'.join(only)} weights")
        strict = not only and loaded.model_config.task == self.model_config.task
        result = self.model.load_state_dict(weights, strict=strict)
        logger.info(
            "stage %d starts from %s%s (%s/%s)%s", stage, source,
            f" ({', '.join(p.rstrip('.') for p in only)} only)" if only else "",
            loaded.model_config.name, loaded.model_config.task,
            f"; not in it: {', '.join(sorted({k.split('.')[0] for k in result.missing_keys}))}"
            if result.missing_keys and not only else "",
        )  # fmt: skip

    # -- one stage ----------------------------------------------------------------------

    def _epochs(self, stage: int) -> int:
        return self.config.epochs1 if stage == 1 else self.config.epochs2

    def _loader(self, stage: int) -> tuple[DataLoader, EpochKeys]:
        joint_context = stage == 2 and self.model_config.task == "joint"
        samples = TrainingSamples(
            self.train_source,
            self.preprocess,
            self.model_config.cls_input,
            seed=self.config.seed,
            augmentation=Augmentation() if self.config.augment else Augmentation.off(),
            lesion_bias=self.config.lesion_bias,
            with_grid=joint_context,
        )
        sampler = EpochKeys(len(samples), self.config.seed, self.info)
        loader = DataLoader(
            samples,  # type: ignore[arg-type]
            batch_size=self.config.batch_size,
            sampler=sampler,
            collate_fn=_collate,
            **_loader_options(self.config.workers, self.device),
        )
        return loader, sampler

    def _optimiser(self, stage: int, steps: int) -> tuple[torch.optim.Adam, Any]:
        """Adam (0.9, 0.999) with linear decay to zero over the stage; in stage 1 the
        cross-stitch unit is frozen (the streams train separately). In stage 2 the C
        stream (stem and classifier) may have its own rate, `lr2_cls`: a classifier that
        has to learn anew next to a segmenter that must not be disturbed. A rate of 0
        freezes its parameters (no gradient, not in the optimiser): `--lr2 0` keeps the
        segmenter exactly as it starts while the classifier fine-tunes.

        The L stream's per-channel affine layers take `lr_affine_scale` times their
        stream's rate: their shifts are the stream's only biases (its convolutions are
        bias-free), the thresholds of a density test, and at Adam's step of about one
        learning rate they barely left zero in a whole CPU run (docs/training.md)."""
        lr = self.config.lr1 if stage == 1 else self.config.lr2
        lr_cls = lr if stage == 1 or self.config.lr2_cls is None else self.config.lr2_cls
        affine = {id(p) for m in self.model.modules() if isinstance(m, ChannelAffine)
                  for p in m.parameters()}  # fmt: skip
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            rate = lr_cls if name.startswith(C_STREAM) else lr
            if id(p) in affine:
                rate *= self.config.lr_affine_scale
            p.requires_grad_(rate > 0 and (stage == 2 or not name.startswith("cross_stitch.")))
            if p.requires_grad:
                groups.setdefault(rate, []).append(p)
        if not groups:
            raise ValueError(
                f"stage {stage}: every learning rate of this {self.model_config.task} model is 0"
            )
        optimiser = torch.optim.Adam(
            [{"params": ps, "lr": rate} for rate, ps in groups.items()], betas=(0.9, 0.999)
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: max(0.0, 1.0 - step / steps)
        )
        return optimiser, schedule

    def _run_stage(
        self, stage: int, state: StageState | None, saved: dict[str, Any] | None
    ) -> None:
        epochs = self._epochs(stage)
        loader, sampler = self._loader(stage)
        steps = epochs * math.ceil(len(loader) / self.config.accumulate)
        optimiser, schedule = self._optimiser(stage, steps)
        if saved is not None:
            optimiser.load_state_dict(saved["optimiser"])
            schedule.load_state_dict(saved["schedule"])
        state = state or StageState(stage)
        step = TrainStep(self.model, stage, self.config.loss, self.class_weights,
                         self.config.stage1_lesion_map)
        runner: nn.Module = step
        if self.info.world > 1:
            # Inputs are already on this rank's device; device_ids=None keeps DDP from
            # moving the patch boxes, which the model reads on the CPU, to the GPU.
            runner = nn.parallel.DistributedDataParallel(step, device_ids=None)
        logger.info(
            "stage %d: %d epochs of %d steps (%d scans, batch %d x %d rank(s), accumulate %d), "
            "lr %g, %s/%s model on %s",
            stage, epochs, len(loader), len(self.train_source), self.config.batch_size,
            self.info.world, self.config.accumulate, optimiser.param_groups[0]["initial_lr"],
            self.model_config.name, self.model_config.task, self.device,
        )  # fmt: skip
        for epoch in range(state.epochs_done, epochs):
            sampler.epoch = stage * 100_000 + epoch  # distinct samples in each stage
            result = self._train_epoch(runner, loader, optimiser, schedule, stage, epoch)
            due = (epoch + 1) % self.config.val_every == 0 or epoch + 1 == epochs
            val = self._validate() if self.info.main and self.val_source and due else {}
            self._end_epoch(stage, epoch, state, result, val, optimiser, schedule)
            if _broadcast_flag(state.finished, self.info, self.device):
                break
        if not state.finished:
            state.finished = True
            if self.info.main:
                self._save_state(state, optimiser, schedule)

    def _train_epoch(
        self,
        runner: nn.Module,
        loader: DataLoader,
        optimiser: torch.optim.Adam,
        schedule: Any,
        stage: int,
        epoch: int,
    ) -> EpochResult:
        self.model.train()
        lr = float(optimiser.param_groups[0]["lr"])
        acc, n_steps = self.config.accumulate, len(loader)
        sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=self.device)
        data_seconds, scans = 0.0, 0
        started = tick = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"stage {stage} epoch {epoch + 1}/{self._epochs(stage)}",
            unit="step",
            disable=not self.info.main,
            dynamic_ncols=True,
            leave=False,
        )
        for i, samples in enumerate(bar):
            data_seconds += time.perf_counter() - tick
            batch = Batch.from_samples(samples, self.device)
            group_start = i - i % acc
            group = min(acc, n_steps - group_start)
            last_in_group = i - group_start == group - 1
            sync = contextlib.nullcontext()
            if self.info.world > 1 and not last_in_group:
                sync = runner.no_sync()  # type: ignore[operator]
            with sync:
                with _autocast(self.device, self.config.amp):
                    context = None
                    if stage == 2 and self.model_config.task == "joint":
                        context = scan_contexts(
                            self.model, batch, self.preprocess, self.config.window_batch
                        )
                    terms = runner(batch, context)
                (terms.total / group).backward()
            if last_in_group:
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                schedule.step()
            sums += torch.stack(
                [
                    (getattr(terms, t).detach().double() if getattr(terms, t) is not None
                     else torch.tensor(math.nan, dtype=torch.float64, device=self.device))
                    for t in LOSS_TERMS
                ]
            )  # fmt: skip
            scans += batch.label.shape[0]
            if self.info.main and (i % 10 == 9 or i == n_steps - 1):
                means = (sums / (i + 1)).tolist()
                bar.set_postfix(
                    {t: f"{v:.4f}" for t, v in zip(LOSS_TERMS, means, strict=True) if v == v}
                )
            tick = time.perf_counter()
        bar.close()
        terms_mean = dict(zip(LOSS_TERMS, (sums / max(n_steps, 1)).tolist(), strict=True))
        if self.info.world > 1:
            reduced = torch.tensor(list(terms_mean.values()), device=self.device)
            dist.all_reduce(reduced)
            terms_mean = dict(zip(LOSS_TERMS, (reduced / self.info.world).tolist(), strict=True))
        return EpochResult(terms_mean, lr, time.perf_counter() - started, data_seconds, scans)

    # -- validation ---------------------------------------------------------------------

    def as_checkpoint(self) -> Checkpoint:
        """The model being trained, in the shape `ai.infer.predict` takes."""
        return Checkpoint(
            model=self.model,
            model_config=self.model_config,
            preprocess=self.preprocess,
            class_names=CLASS_NAMES,
            provenance=self._provenance(),
            metrics={},
            format_version=FORMAT_VERSION,
            sha256="",
            path=None,
            device=self.device,
        )

    def _validate(self) -> dict[str, float]:
        """Whole-scan inference on the validation cases, as the node runs it but for the
        outline refinement (`ai.refine`): epochs are compared on the network's own outline,
        which is what training changes, and which earlier runs' logs recorded.

        Score = mean of the available DSC (scans with lesions) and accuracy. The mean
        false-positive volume on the scans without lesions (val_fp_ml) is logged beside
        it, not scored: a run that trades it for DSC shows, and the score, which picks the
        epoch every run keeps, stays comparable with earlier runs.
        """
        assert self.val_source is not None
        self.model.eval()
        ckpt = self.as_checkpoint()
        dscs: list[float] = []
        false_positive_ml: list[float] = []
        labels: list[int] = []
        probabilities: list[np.ndarray] = []
        started = time.perf_counter()
        for case in iterate_cases(self.val_source, self.config.workers):
            assert case.lung_mask is not None
            if case.refused:
                continue  # WithLungMasks has said why
            try:
                pred = predict(
                    ckpt,
                    case.volume_hu,
                    case.lung_mask,
                    case.spacing_mm,
                    batch_size=self.config.window_batch,
                )
            except InputVolumeError as exc:
                logger.warning("validation: %s skipped: %s", case.case_id, exc)
                continue
            if pred.lesion_probability is not None:
                mask = lesion_mask(pred.lesion_probability, case.lung_mask, case.volume_hu,
                                   case.spacing_mm, refinement=NO_REFINEMENT)
                if case.lesion_mask.any():
                    dscs.append(dice_coefficient(mask, case.lesion_mask))
                else:
                    voxel_ml = math.prod(case.spacing_mm) / 1000.0
                    false_positive_ml.append(float(np.count_nonzero(mask)) * voxel_ml)
            if pred.probabilities is not None and case.label is not None:
                labels.append(int(case.label))
                probabilities.append(pred.probabilities)
        self.model.train()
        out: dict[str, float] = {}
        if dscs:
            out["val_dsc"] = float(np.mean(dscs))
        if labels:
            out["val_accuracy"] = classification_scores(labels, probabilities).accuracy
        if false_positive_ml:
            out["val_fp_ml"] = float(np.mean(false_positive_ml))
        parts = [out[k] for k in ("val_dsc", "val_accuracy") if k in out]
        out["val_score"] = float(np.mean(parts)) if parts else math.nan
        logger.info(
            "validation on %d scans in %.1f s: %s",
            len(self.val_source), time.perf_counter() - started,
            ", ".join(f"{k} {v:.4f}" for k, v in out.items()),
        )  # fmt: skip
        return out

    # -- bookkeeping --------------------------------------------------------------------

    def _provenance(self, extra: dict[str, Any] | None = None) -> Provenance:
        data = "; ".join(self.config.data)
        return Provenance.now(
            data=data,
            seed=self.config.seed,
            extra={"train_config": self.config.to_dict(), "init_sha256": self.init_sha256}
            | (extra or {}),
        )

    def _end_epoch(
        self,
        stage: int,
        epoch: int,
        state: StageState,
        result: EpochResult,
        val: dict[str, float],
        optimiser: torch.optim.Adam,
        schedule: Any,
    ) -> None:
        state.epochs_done = epoch + 1
        score = val.get("val_score", math.nan)
        if math.isfinite(score):
            improved = score > state.best_score
            state.best_score = max(score, state.best_score)
            state.bad_epochs = 0 if improved else state.bad_epochs + 1
        else:
            # No validation at all, or a score-less one (no lesion, no label) while none
            # has scored yet: the latest epoch is the best. Between --val-every
            # validations nothing changes; a scored best is never replaced by an epoch
            # that could not be scored (every validation scan refused).
            improved = self.val_source is None or (bool(val) and state.best_score == -math.inf)
        patience = self.config.patience
        state.finished = state.epochs_done >= self._epochs(stage) or (
            patience > 0 and state.bad_epochs >= patience
        )
        if not self.info.main:
            return
        metrics = {"stage": stage, "epoch": epoch + 1, "train": result.terms, "validation": val}
        if improved:
            save_checkpoint(
                self.out / STAGE_FILES[stage],
                self.model,
                self.preprocess,
                self._provenance({"stage": stage, "epoch": epoch + 1}),
                metrics,
            )
        save_checkpoint(
            self.out / LAST_FILE,
            self.model,
            self.preprocess,
            self._provenance({"stage": stage, "epoch": epoch + 1}),
            metrics,
        )
        # The row first: a run killed between the two resumes from the state before this
        # epoch and drops the row (`_load_resume`), then writes it again.
        self._log_epoch(stage, epoch, state, result, val)
        self._save_state(state, optimiser, schedule)
        if state.finished and state.epochs_done < self._epochs(stage):
            logger.info("stage %d: early stop after %d epochs without improvement", stage,
                        state.bad_epochs)  # fmt: skip

    def _save_state(self, state: StageState, optimiser: torch.optim.Adam, schedule: Any) -> None:
        """Everything `--resume` needs, the weights included, in one atomically replaced
        file: a run killed between writing last.pt and this file must not resume with
        the weights of one epoch and the optimiser and schedule of the one before."""
        payload = {
            "state": asdict(state),
            "model": self.model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "world": self.info.world,
        }
        tmp = self.out / f".{STATE_FILE}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, self.out / STATE_FILE)

    def _check_validation_cases(self) -> None:
        """Record which cases validate the run; a resumed run must validate on the same
        ones. Data that changed since (more reviewed SEGs in the node's index, another
        `--val-data`) would otherwise split anew and validate on cases it trained on."""
        path = self.out / VALIDATION_FILE
        current = sorted(self.val_source.case_ids()) if self.val_source is not None else []
        if (self.config.resume or self.config.stage == "2") and path.is_file():
            saved = json.loads(path.read_text())
            if saved != current:
                new, gone = len(set(current) - set(saved)), len(set(saved) - set(current))
                raise DatasetError(
                    f"{self.out} validated on other cases ({new} of today's are new, {gone}"
                    " of its own are gone): continue it with the data it started from, or"
                    " train afresh"
                )
            return
        if self.info.main:
            path.write_text(json.dumps(current, indent=1) + "\n")

    def _load_resume(self) -> tuple[StageState, dict[str, Any]] | None:
        path = self.out / STATE_FILE
        if not path.is_file():
            logger.warning("--resume: no %s in %s; starting afresh", STATE_FILE, self.out)
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        world = saved.get("world")  # None: saved before the process count was kept
        if world is not None and world != self.info.world:
            raise DatasetError(
                f"{self.out} was trained by {world} process(es), now {self.info.world}: each"
                " step's batch (processes x --batch-size x --accumulate) and with it the"
                " learning-rate schedule would change mid-run; resume it with torchrun"
                f" --nproc_per_node {world}" + (" (or without torchrun)" if world == 1 else "")
                + ", or start a new run from its weights with --init"
            )
        state = StageState(**saved["state"])
        weights = saved.get("model")  # None: a run saved before the weights were kept here
        if weights is None:
            weights = load_checkpoint(self.out / LAST_FILE, "cpu").model.state_dict()
        self.model.load_state_dict(weights)
        if self.info.main:
            self._drop_metrics_after(state.stage, state.epochs_done)
        logger.info(
            "resuming stage %d after epoch %d%s", state.stage, state.epochs_done,
            " (stage finished)" if state.finished else "",
        )  # fmt: skip
        return state, saved

    def _drop_metrics_after(self, stage: int, epochs_done: int) -> None:
        """metrics.csv without the rows of epochs after `epochs_done` of `stage` (an
        epoch whose row was written before the run was killed, ahead of its state; or a
        stage begun again from its start)."""
        path = self.out / "metrics.csv"
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
        def done(row: dict[str, str]) -> bool:  # a row cut short by the kill: not done
            try:
                return (int(row["stage"]), int(row["epoch"])) <= (stage, epochs_done)
            except (TypeError, ValueError):
                return False

        kept = [row for row in rows if done(row)]
        if len(kept) == len(rows):
            return
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=reader.fieldnames or CSV_FIELDS)
            writer.writeheader()  # the file's own columns (an older run's may differ)
            writer.writerows(kept)
        os.replace(tmp, path)
        logger.info("metrics.csv: %d row(s) of stage %d after epoch %d dropped (written"
                    " ahead of a state that was never saved, or of a stage begun again)",
                    len(rows) - len(kept), stage, epochs_done)

    def _log_epoch(
        self,
        stage: int,
        epoch: int,
        state: StageState,
        result: EpochResult,
        val: dict[str, float],
    ) -> None:
        stitch = [math.nan] * 4
        if self.model.cross_stitch is not None:
            stitch = self.model.cross_stitch.weight.detach().flatten().tolist()
        row: dict[str, Any] = {
            "stage": stage,
            "epoch": epoch + 1,
            "lr": result.lr,
            **{f"train_{k}": v for k, v in result.terms.items()},
            "val_dsc": val.get("val_dsc", math.nan),
            "val_accuracy": val.get("val_accuracy", math.nan),
            "val_fp_ml": val.get("val_fp_ml", math.nan),
            "val_score": val.get("val_score", math.nan),
            "best_score": state.best_score,
            **dict(zip(("a11", "a12", "a21", "a22"), stitch, strict=True)),
            "seconds": result.seconds,
            "data_seconds": result.data_seconds,
            "scans_per_second": result.scans * self.info.world / max(result.seconds, 1e-9),
        }
        path = self.out / "metrics.csv"
        fields: Sequence[str] = CSV_FIELDS
        if path.exists():  # a run resumed from an older version keeps its file's columns
            with path.open(newline="") as handle:
                fields = next(csv.reader(handle), None) or CSV_FIELDS
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.terms.items() if v == v)
        logger.info(
            "stage %d epoch %d/%d: %s; %.1f s (waiting for data %.1f s), %.2f scans/s%s",
            stage, epoch + 1, self._epochs(stage), shown, result.seconds, result.data_seconds,
            row["scans_per_second"],
            "".join(f", {k} {v:.4f}" for k, v in val.items()),
        )  # fmt: skip


# ---------------------------------------------------------------------- entry points


RESUMABLE_CHANGES = frozenset({"out", "resume", "device", "amp", "workers", "window_batch",
                               "cache_dir"})
"""Settings a resumed run may change: where and how fast it runs, not what it learns."""
STAGE2_CHANGES = RESUMABLE_CHANGES | {"stage", "epochs2", "lr2", "lr2_cls", "patience", "loss",
                                      "init", "init_cls", "val_every", "epochs1", "lr1",
                                      "stage1_lesion_map"}
"""And stage 2 alone after a folder's stage 1: its own schedule, loss and start, and the
stage-1 settings it does not use."""


def _check_out_folder(config: TrainConfig) -> None:
    """A folder holding a run is continued with `--resume` (and the same settings: another
    split would validate on cases it trained on, other rates or epochs would put two runs
    under one provenance), not trained into afresh (its metrics and checkpoints would mix
    with the new run's); stage 2 alone may follow the stage 1 it holds. Runs saved before
    `split_seed` existed split with `seed`."""
    out = Path(config.out)
    may_change = RESUMABLE_CHANGES
    if not config.resume:
        if not (out / STATE_FILE).is_file():
            return
        try:
            state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)["state"]
            finished_stage1 = state["stage"] == 1 and bool(state["finished"])
        except Exception:  # unreadable: a run all the same, not to be trained over
            finished_stage1 = False
        if config.stage != "2" or not finished_stage1:
            raise ValueError(f"{out} holds a training run ({STATE_FILE}): --resume to continue"
                             " it, or give a new --out (--stage 2 alone follows a finished"
                             " stage 1 only)")
        may_change = STAGE2_CHANGES  # the stage 1 it follows: the same data, split and model
    saved_path = out / "train_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    saved.setdefault("split_seed", saved.get("seed", 0))
    saved.setdefault("field_of_view_mm", None)  # runs from before it: the whole matrix
    current = json.loads(json.dumps(config.to_dict()))
    changed = [f"{key} was {saved[key]!r}, now {current[key]!r}" for key in current
               if key in saved and key not in may_change and saved[key] != current[key]]
    if changed:
        raise ValueError(f"{out} was started with other settings ({'; '.join(changed)}):"
                         " continue it with its settings, or start a new run in another --out"
                         f" (--init {out / FINAL_FILE} starts from its weights)")


def prepare_data(config: TrainConfig) -> tuple[CaseSource, CaseSource | None]:
    """(train, validation) sources: a k-fold split, ``--val-data``, or a held-out fraction."""
    _check_out_folder(config)
    cache = config.cache_dir or default_cache_dir()
    source = open_data(config.data, cache)
    labels, patients = source.labels(), source.patients()
    if config.folds:
        train_idx, val_idx = kfold_indices(labels, config.folds, config.fold, config.split_seed,
                                           patients)
    elif config.val_data:
        val = open_data(config.val_data, cache)
        # By scan, not case id: two sites' "case001/ct" are other scans, while one series
        # exported to two folders is the same.
        val_keys = set(val.scan_keys())
        shared = sorted(c for c, k in zip(source.case_ids(), source.scan_keys(), strict=True)
                        if k in val_keys)
        if shared:
            raise DatasetError(f"--val-data shares {len(shared)} case(s) with --data"
                               f" ({', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''}):"
                               " a model would be validated on scans it trained on")
        return source, val
    elif config.val_fraction > 0:
        train_idx, val_idx = split_indices(labels, config.val_fraction, config.split_seed,
                                           patients)
    else:
        return source, None
    if not train_idx:
        raise DatasetError(f"no training cases left after holding out {len(val_idx)}")
    if not val_idx:  # say so: the run then keeps its last epoch, not its best
        logger.warning("--val-fraction %g holds out none of %d cases of %d patients: training"
                       " without validation", config.val_fraction, len(labels),
                       len(set(patients)))
    return Subset(source, train_idx), (Subset(source, val_idx) if val_idx else None)


def train(
    config: TrainConfig, place: tuple[Dist, torch.device] | None = None
) -> Path:
    """Run one training job (a torchrun rank, or the only process); returns the model path.
    `place`: from a caller's `distributed` (one process group for many jobs)."""
    if place is None:
        with distributed(config.device) as own:
            return train(config, own)
    train_source, val_source = prepare_data(config)
    logger.info(
        "training on %d scans, validating on %d",
        len(train_source), 0 if val_source is None else len(val_source),
    )  # fmt: skip
    return Trainer(config, train_source, val_source, *place).run()


def _fold_summary(out: Path, folds: int) -> dict[str, Any]:
    """Best validation metrics of each fold's final model, and their mean and std."""
    per_fold = []
    for fold in range(folds):
        metrics = load_checkpoint(out / f"fold-{fold}" / FINAL_FILE, "cpu").metrics
        per_fold.append(metrics.get("validation", {}))
    keys = sorted({k for m in per_fold for k in m})
    summary = {
        k: {
            "mean": float(np.mean([m[k] for m in per_fold if k in m])),
            "std": float(np.std([m[k] for m in per_fold if k in m])),
        }
        for k in keys
    }
    return {"folds": per_fold, "summary": summary}


# ------------------------------------------------------------------------ evaluation


def model_label(ckpt: Checkpoint) -> str:
    """The row label of a checkpoint in the Table II layout."""
    return f"DeepSC-COVID {ckpt.model_config.name}/{ckpt.model_config.task}"


@dataclass
class _Overlay:
    case_id: str
    image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray


def _case_result(
    case: Case, ckpt: Checkpoint, truth_lungs: bool, threshold: float, mirror: bool = False,
    disease_thresholds: Sequence[float] | None = None,
    refinement: OutlineRefinement = DEFAULT_REFINEMENT,
) -> tuple[ScanResult, np.ndarray, float]:
    """Score one case: (result, predicted lesion mask, seconds of inference)."""
    assert case.lung_mask is not None
    started = time.perf_counter()
    lung_in = case.lung_mask if truth_lungs else None
    probabilities = None
    if ckpt.model_config.task == "joint":
        analysis = analyse(
            case.volume_hu, case.spacing_mm, checkpoint=ckpt, lung_mask=lung_in,
            threshold=threshold, mirror=mirror, overlap=ckpt.preprocess.seg_overlap,
            disease_thresholds=disease_thresholds, refinement=refinement,
        )  # fmt: skip
        pred_mask, stats = analysis.lesion_mask, analysis.stats
        probabilities = tuple(analysis.probabilities[name] for name in CLASS_NAMES)
    else:  # single-task ablations: the network part they have, the same post-processing
        lung = case.lung_mask if truth_lungs else segment_lungs(case.volume_hu, case.spacing_mm)
        pred = predict(ckpt, case.volume_hu, lung, case.spacing_mm, mirror=mirror)
        pred_mask, stats = np.zeros(case.volume_hu.shape, dtype=bool), None
        if pred.lesion_probability is not None:
            pred_mask = lesion_mask(pred.lesion_probability, lung, case.volume_hu,
                                    case.spacing_mm, threshold=threshold, refinement=refinement)
            stats = analyse_lesions(case.volume_hu, pred_mask, lung, case.spacing_mm)
        if pred.probabilities is not None:
            probabilities = tuple(float(p) for p in pred.probabilities)
    seconds = time.perf_counter() - started
    predicted = None if probabilities is None else int(diagnose(probabilities, disease_thresholds))
    truth = analyse_lesions(case.volume_hu, case.lesion_mask, case.lung_mask, case.spacing_mm)
    segmentation = None
    lvr_pred = plr_pred = None
    if stats is not None:
        segmentation = segmentation_scores(
            pred_mask, case.lesion_mask, case.spacing_mm, lung_mask=case.lung_mask
        )
        lvr_pred = stats.lvr
        # A missed scan (no predicted lesion, true lesions) has an undefined PLR error.
        plr_pred = stats.plr if stats.plr is not None else (
            math.nan if truth.plr is not None else None)  # fmt: skip
    result = ScanResult(
        case_id=case.case_id,
        label=None if case.label is None else int(case.label),
        probabilities=probabilities,
        predicted=predicted,
        segmentation=segmentation,
        lvr_pred=lvr_pred,
        lvr_true=truth.lvr if stats is not None else None,
        plr_pred=plr_pred,
        plr_true=truth.plr if stats is not None else None,
    )
    return result, pred_mask, seconds


def _overlay(case: Case, pred_mask: np.ndarray) -> _Overlay:
    """The axial slice with the most true lesion (or predicted, or the middle)."""
    area = case.lesion_mask.sum(axis=(1, 2))
    if not area.any():
        area = pred_mask.sum(axis=(1, 2))
    z = int(np.argmax(area)) if area.any() else case.volume_hu.shape[0] // 2
    return _Overlay(case.case_id, case.volume_hu[z], case.lesion_mask[z], pred_mask[z])


def evaluate(
    checkpoint: str | Path | None,
    data: Sequence[str],
    out: Path | None = None,
    *,
    device: str = "auto",
    workers: int = 2,
    cache_dir: Path | None = None,
    truth_lungs: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    overlays: int = 4,
    mirror: bool = False,
    overlap: float | None = None,
    disease_thresholds: Sequence[float] | None = None,
    refinement: OutlineRefinement = DEFAULT_REFINEMENT,
) -> tuple[EvaluationSummary, str]:
    """Evaluate a checkpoint on every case of ``data``: (summary, Table II-style text).

    The node's own pipeline (``ai.infer.analyse``) runs on each scan, lung segmentation
    included unless ``truth_lungs``; the truth LVR and PLR come from ``ai.analysis`` on
    the true masks. With ``out``: evaluation.json and evaluation.png are written there.
    ``mirror`` and ``overlap`` (None: the checkpoint's own, on any device) and
    ``disease_thresholds`` (the operating point, as ``[ai] disease_thresholds``; None:
    the most probable class) and ``refinement`` (the outline's, as ``[ai] outline_band_mm``
    and ``outline_contrast_hu``) as in ``analyse``.
    """
    if overlays < 0:
        raise ValueError(f"overlays {overlays} must be >= 0")
    if disease_thresholds:
        diagnose((0.0, 0.0, 1.0), disease_thresholds)  # two values, or a clear error now
        if not all(0.0 <= t <= 1.0 for t in disease_thresholds):
            raise ValueError(f"disease thresholds {list(disease_thresholds)} must be in [0, 1]")
    ckpt = with_overlap(load_checkpoint(checkpoint, device), overlap)
    source = open_data(list(data), cache_dir or default_cache_dir())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)  # an unusable --out fails now, not at the end
    results: list[ScanResult] = []
    examples: list[_Overlay] = []
    seconds: list[float] = []
    cases = iterate_cases(source, workers)
    skipped: dict[str, str] = {}
    lungs_segmented: list[str] = []  # with --truth-lungs: scans without lung masks of their own
    for case in tqdm(cases, total=len(source), desc="evaluate", unit="scan", leave=False):
        if case.refused:  # its lungs could not be segmented
            skipped[case.case_id] = case.refused
            continue
        try:
            result, pred_mask, elapsed = _case_result(case, ckpt, truth_lungs, threshold,
                                                      mirror, disease_thresholds, refinement)
        except InputVolumeError as exc:  # the node would refuse this scan: say so, go on
            logger.warning("evaluate: %s skipped: %s", case.case_id, exc)
            skipped[case.case_id] = str(exc)
            continue
        results.append(result)
        seconds.append(elapsed)
        if truth_lungs and case.lungs_segmented:
            lungs_segmented.append(case.case_id)
        if len(examples) < overlays and (case.lesion_mask.any() or len(source) <= overlays):
            examples.append(_overlay(case, pred_mask))
    summary = summarise(results)
    label = model_label(ckpt)
    table = format_table(summary, label=label)
    if disease_thresholds:
        table += ("\nDiagnosis at the operating point COVID-19 >= {:g}, CAP >= {:g}"
                  " ([ai] disease_thresholds); AUC does not depend on it."
                  ).format(*disease_thresholds)
    task = ckpt.model_config.task
    if task != "joint":
        table += (f"\nA single-task ({task}) model: it does not"
                  f" {'classify' if task == 'seg' else 'segment'}.")
    if lungs_segmented:
        table += (f"\n--truth-lungs: {len(lungs_segmented)} of {len(results)} scans have no"
                  " lung mask of their own; the node's lung segmentation stood in")
    if skipped:
        table += (f"\nSkipped (the node refuses them, or they cannot be loaded):"
                  f" {', '.join(sorted(skipped))}")
    logger.info("evaluated %s on %d scans, %.2f s per scan", label, len(results),
                float(np.mean(seconds)) if seconds else math.nan)  # fmt: skip
    if out is not None:
        report = {
            "checkpoint": ckpt.info | {"path": str(ckpt.path)},
            "data": list(data),
            "truth_lungs": truth_lungs,
            "lungs_segmented": sorted(lungs_segmented),  # where truth_lungs found none
            "threshold": threshold,
            "outline_band_mm": refinement.band_mm,
            "outline_contrast_hu": refinement.contrast_hu,
            "mirror": mirror,
            "window_overlap": ckpt.preprocess.seg_overlap,
            "disease_thresholds": list(disease_thresholds or []),
            "seconds_per_scan": float(np.mean(seconds)) if seconds else None,
            "skipped": skipped,
            "device": str(ckpt.device),
            "gpu": (torch.cuda.get_device_name(ckpt.device) if ckpt.device.type == "cuda"
                    else None),
            "summary": summary.to_dict(),
        }
        (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "evaluation.txt").write_text(table + "\n")
        plot_report(
            summary,
            out / "evaluation.png",
            overlays=[(e.image, e.truth, e.pred) for e in examples],
            overlay_titles=[e.case_id for e in examples],
            window=(-1400.0, 200.0),
        )
    return summary, table


# -------------------------------------------------------------------------------- CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dicomnode train``."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", action="append", required=True, metavar="SPEC",
        help="training data, repeatable: phantoms:covid=N,cap=N,normal=N[,seed=S][,size=P"
        " (512)][,slices=Z][,thickness=MM][,spacing=MM][,cache=no][,lungs=node] |"
        " nifti:LABELS.csv | dicom:FOLDER[,labels=CSV] | index:DATA_DIR[,labels=CSV]"
        "[,url=DATABASE_URL] (docs/training.md, Data)",
    )  # fmt: skip
    data.add_argument(
        "--val-data",
        action="append",
        default=[],
        metavar="SPEC",
        help="validation data (default: hold out --val-fraction of --data)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of each class held out for validation; 0: none (0.2)",
    )
    data.add_argument(
        "--folds",
        type=int,
        default=0,
        metavar="K",
        help="k-fold cross-validation: K folds of --data (stratified)",
    )
    data.add_argument(
        "--fold",
        type=_fold,
        default=None,
        metavar="I|all",
        help="with --folds: the validation fold (0..K-1, default 0), or 'all' to train every"
        " fold",
    )
    data.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"lung masks and generated phantoms (default {default_cache_dir()})",
    )
    data.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader worker processes that load or generate scans (min(8, cores))",
    )
    model = parser.add_argument_group("model and schedule")
    model.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="checkpoints, metrics.csv and train_config.json go here",
    )
    model.add_argument(
        "--stage",
        choices=("1", "2", "both"),
        default="both",
        help="1: separate pre-training, 2: joint fine-tuning (default both)",
    )
    model.add_argument("--size", choices=SIZES, default="lite",
                       help="model widths and grid: lite (256 grid, default), paper (512), tiny")
    model.add_argument(
        "--task", choices=TASKS, default="joint", help="joint, or a single-task ablation (seg, cls)"
    )
    model.add_argument(
        "--cls-pool",
        choices=CLS_POOLS,
        default="max",
        help="classifier pooling before the FC: max (default) or mean (the paper's GAP, eq. 4)",
    )
    model.add_argument(
        "--field-of-view-mm",
        type=float,
        default=DEFAULT_FIELD_OF_VIEW_MM,
        metavar="MM",
        help="the square (mm across) around the lungs that the network sees, so that it"
        f" learns one scale whatever field a scan was reconstructed in (default"
        f" {DEFAULT_FIELD_OF_VIEW_MM:g}); 0: the whole matrix, as runs before it",
    )
    model.add_argument(
        "--stage1-lesion-map",
        choices=STAGE1_LESION_MAPS,
        default="truth",
        help="the classifier's lesion map in stage 1: the true lesions, or none (images "
        "only; stage 2 then teaches it the segmenter's own map)",
    )
    model.add_argument(
        "--init",
        type=Path,
        action="append",
        default=[],
        metavar="CHECKPOINT",
        help="start from these weights (e.g. fine-tune the shipped model); repeat to "
        "combine: each later checkpoint replaces the streams it holds",
    )
    model.add_argument(
        "--init-cls",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="then the classification stream alone (C stem and classifier) from this one",
    )
    model.add_argument("--epochs", type=int, default=10, help="epochs of each stage (10)")
    model.add_argument("--epochs1", type=int, default=None, help="stage-1 epochs (--epochs)")
    model.add_argument("--epochs2", type=int, default=None, help="stage-2 epochs (--epochs)")
    model.add_argument("--lr1", type=float, default=1e-3, help="stage-1 learning rate (1e-3)")
    model.add_argument(
        "--lr2",
        type=float,
        default=1e-4,
        help="stage-2 learning rate (1e-4; 0: the segmentation stream stays as it starts)",
    )
    model.add_argument(
        "--lr2-cls",
        type=float,
        default=None,
        help="stage-2 learning rate of the classification stream (default: --lr2)",
    )
    model.add_argument(
        "--lr-affine-scale",
        type=float,
        default=1.0,
        help="multiplier of the learning rate for the segmentation stream's per-channel "
        "scales and shifts, its only biases (1)",
    )
    model.add_argument("--batch-size", type=int, default=1, help="scans per step (1)")
    model.add_argument("--accumulate", type=int, default=1, help="steps per optimiser update")
    model.add_argument(
        "--patience",
        type=int,
        default=5,
        help="early stop after N validations without gain (5); 0: never",
    )
    model.add_argument(
        "--val-every",
        type=int,
        default=1,
        metavar="N",
        help="validate every N epochs (and after a stage's last epoch)",
    )
    model.add_argument(
        "--lesion-bias",
        type=float,
        default=0.6,
        help="probability that a patch is centred near a lesion (0.6)",
    )
    model.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no flips, rotations, scaling, slice spacing changes or noise",
    )
    model.add_argument(
        "--lambda-ta",
        type=float,
        default=10.0,
        help="task-aware loss weight (10; 0: the ablation without it)",
    )
    model.add_argument(
        "--seed",
        type=int,
        default=0,
        help="model initialisation and every random choice of a sample",
    )
    model.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="the --val-fraction split and the folds (0); apart from --seed, so that runs "
        "chained by --init with other seeds validate on cases none of them trained on",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument(
        "--no-amp",
        dest="amp",
        action="store_false",
        help="full precision on CUDA (default: bf16 autocast)",
    )
    run.add_argument(
        "--window-batch",
        type=int,
        default=8,
        help="sliding windows per batch for whole-scan passes (8)",
    )


def config_from_args(
    args: argparse.Namespace, fold: int = 0, out: Path | None = None
) -> TrainConfig:
    """A TrainConfig from parsed ``add_train_arguments`` arguments."""
    return TrainConfig(
        data=list(args.data),
        out=out or args.out,
        val_data=list(args.val_data),
        val_fraction=args.val_fraction,
        folds=args.folds,
        fold=fold,
        stage=args.stage,
        size=args.size,
        task=args.task,
        cls_pool=args.cls_pool,
        field_of_view_mm=args.field_of_view_mm or None,
        init=tuple(args.init),
        init_cls=args.init_cls,
        epochs1=args.epochs if args.epochs1 is None else args.epochs1,
        epochs2=args.epochs if args.epochs2 is None else args.epochs2,
        lr1=args.lr1,
        lr2=args.lr2,
        lr2_cls=args.lr2_cls,
        lr_affine_scale=args.lr_affine_scale,
        stage1_lesion_map=args.stage1_lesion_map,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        lesion_bias=args.lesion_bias,
        augment=args.augment,
        amp=args.amp,
        device=args.device,
        workers=args.workers,
        window_batch=args.window_batch,
        val_every=args.val_every,
        seed=args.seed,
        split_seed=args.split_seed,
        patience=args.patience,
        resume=args.resume,
        cache_dir=args.cache_dir,
        loss=LossConfig(lambda_ta=args.lambda_ta),
    )


def run_train_command(args: argparse.Namespace) -> int:
    """``dicomnode train``: 0 on success, 2 on unusable data or settings."""
    try:
        if args.fold is not None and args.folds < 2:
            raise ValueError(f"--fold {args.fold} needs --folds K (K >= 2)")
        with distributed(args.device) as place:
            if args.fold == "all":
                for fold in range(args.folds):
                    train(config_from_args(args, fold, args.out / f"fold-{fold}"), place)
                if place[0].main:
                    report = _fold_summary(args.out, args.folds)
                    (args.out / "folds.json").write_text(json.dumps(report, indent=2) + "\n")
                    logger.info("cross-validation: %s", json.dumps(report["summary"]))
                return 0
            train(config_from_args(args, args.fold or 0), place)
    except (DatasetError, ValueError, CheckpointError, OSError) as exc:
        logger.error("train: %s", exc)
        return 2
    return 0


def _fold(text: str) -> int | str:
    """`--fold`: a fold number, or "all"."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fold number or 'all'") from None


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dicomnode evaluate``."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="FILE",
        help="weights to evaluate (default: the shipped model)",
    )
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SPEC",
        help="evaluation data, repeatable (same forms as for train)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="write evaluation.json, evaluation.txt and evaluation.png here",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes that load or generate scans (min(4, cores))",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"lung masks and generated phantoms (default {default_cache_dir()})",
    )
    parser.add_argument(
        "--truth-lungs",
        action="store_true",
        help="use the data's lung masks instead of the node's lung segmentation (where a "
        "scan has none, the node's stands in, and the report says so)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="lesion probability threshold (0.5)",
    )
    parser.add_argument(
        "--outline-band-mm",
        type=float,
        default=DEFAULT_REFINEMENT.band_mm,
        metavar="MM",
        help="re-decide the lesion outline by density within MM of the network's, as [ai] "
        f"outline_band_mm ({DEFAULT_REFINEMENT.band_mm:g}; 0: the network's own outline)",
    )
    parser.add_argument(
        "--outline-contrast-hu",
        type=float,
        default=DEFAULT_REFINEMENT.contrast_hu,
        metavar="HU",
        help="HU above the local parenchyma that makes a voxel near the outline lesion, as "
        f"[ai] outline_contrast_hu ({DEFAULT_REFINEMENT.contrast_hu:g})",
    )
    parser.add_argument("--overlays", type=int, default=4, help="example slices in the PNG (4)")
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="test-time mirroring of the segmentation, as [ai] mirror",
    )
    parser.add_argument(
        "--overlap",
        type=float,
        default=None,
        metavar="F",
        help="segmentation windows overlapping by F, as [ai] window_overlap (default: the "
        "checkpoint's own, 0 for the shipped weights)",
    )
    parser.add_argument(
        "--disease-thresholds",
        type=float,
        nargs=2,
        default=None,
        metavar=("COVID", "CAP"),
        help="the operating point, as [ai] disease_thresholds: a disease is called from its "
        "threshold on (default: the most probable class)",
    )


def run_evaluate_command(args: argparse.Namespace) -> int:
    """``dicomnode evaluate``: prints the table; 0 on success, 2 on unusable input."""
    try:
        refinement = OutlineRefinement(band_mm=args.outline_band_mm,
                                       contrast_hu=args.outline_contrast_hu)
        _, table = evaluate(
            args.checkpoint, args.data, args.out, device=args.device, workers=args.workers,
            cache_dir=args.cache_dir, truth_lungs=args.truth_lungs, threshold=args.threshold,
            overlays=args.overlays, mirror=args.mirror, overlap=args.overlap,
            disease_thresholds=args.disease_thresholds, refinement=refinement,
        )  # fmt: skip
    except (DatasetError, ValueError, CheckpointError, OSError) as exc:
        logger.error("evaluate: %s", exc)
        return 2
    print(table)
    return 0

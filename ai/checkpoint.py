"""Model checkpoints: weights with everything needed to use them correctly.

A checkpoint is one `torch.save` of a plain dict (tensors, str, numbers, lists, dicts), so
it loads with `weights_only=True`: opening a file never runs code from it. Besides the
weights it holds the model and preprocessing configs (a checkpoint fixes its own input
geometry), the class names in logit order, training provenance and evaluation metrics.
`load_checkpoint` refuses anything that does not match this code: another format version,
missing keys, other class names, weights that do not fit the config, non-finite weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ai.labels import CLASS_NAMES
from ai.model import DeepSC, ModelConfig, build_model, count_parameters
from ai.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

FORMAT = "dicomnode-deepsc"
FORMAT_VERSION = 1
REQUIRED_KEYS: tuple[str, ...] = (
    "format",
    "format_version",
    "model_config",
    "preprocess_config",
    "class_names",
    "state_dict",
    "provenance",
    "metrics",
)
DEFAULT_NAME = "deepsc-lite.pt"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used with this code; the message says why."""


class WeightsMissing(CheckpointError):
    """No checkpoint file where one was expected (nothing is ever made up without weights)."""


def default_checkpoint_path() -> Path:
    """The shipped default weights (package data); the file exists only once trained."""
    return Path(__file__).resolve().parent / "weights" / DEFAULT_NAME


# --------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Provenance:
    """Where the weights come from: enough to reproduce or at least to question them."""

    data: str
    """The training data (e.g. "phantoms n=400 seed=7" or the dataset root and its split)."""
    seed: int | None
    command: str
    date: str
    """ISO 8601, UTC."""
    git_commit: str | None
    torch_version: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form plain values: epochs, stage, hyper-parameters."""

    @classmethod
    def now(
        cls,
        data: str,
        seed: int | None,
        command: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Provenance:
        """Provenance of a run happening now: date, git commit and torch version filled in."""
        return cls(
            data=data,
            seed=seed,
            command=command if command is not None else shlex.join(sys.argv),
            date=datetime.now(UTC).isoformat(timespec="seconds"),
            git_commit=git_commit(),
            torch_version=str(torch.__version__),  # TorchVersion is not plain data
            extra=dict(extra or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Provenance:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - {"extra"} - set(data))
        if missing:
            raise ValueError(f"provenance lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def git_commit() -> str | None:
    """HEAD of the source tree this package runs from, None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


# --------------------------------------------------------------------------- configs


def preprocess_config_for(model_config: ModelConfig, **overrides: Any) -> PreprocessConfig:
    """The preprocessing whose geometry matches a model config (the rest from `overrides`).

    The segmentation grid is always `seg_grid_xy` square: for the paper size (512) that
    is the native grid of a 512 x 512 scan, and other matrix sizes are resampled to the
    scale the weights were trained at.
    """
    n, h, w = model_config.cls_input
    g = model_config.seg_grid_xy
    geometry = dict(
        n_cls_slices=n,
        cls_size=(h, w),
        seg_patch=tuple(model_config.seg_patch),
        seg_inplane_size=(g, g),
    )
    clash = sorted(set(geometry) & set(overrides))
    if clash:
        raise ValueError(f"{', '.join(clash)} come from the model config, not overrides")
    return PreprocessConfig(**geometry, **overrides)


def check_compatible(model_config: ModelConfig, preprocess: PreprocessConfig) -> None:
    """Raise CheckpointError when the preprocessing would feed the model the wrong shapes."""
    expected = preprocess_config_for(model_config)
    keys = ("n_cls_slices", "cls_size", "seg_patch", "seg_inplane_size")
    bad = [
        f"{k} {getattr(preprocess, k)} != {getattr(expected, k)}"
        for k in keys
        if getattr(preprocess, k) != getattr(expected, k)
    ]
    if bad:
        raise CheckpointError(
            f"preprocessing does not match the {model_config.name!r} model: " + "; ".join(bad)
        )


# --------------------------------------------------------------------------- save / load


@dataclass
class Checkpoint:
    """A loaded, validated checkpoint; its model in eval mode on `device` (channels-last
    3D on CPU)."""

    model: DeepSC
    model_config: ModelConfig
    preprocess: PreprocessConfig
    class_names: tuple[str, ...]
    provenance: Provenance
    metrics: dict[str, Any]
    format_version: int
    sha256: str
    path: Path | None
    device: torch.device

    @property
    def info(self) -> dict[str, Any]:
        """What results should record about the model that produced them."""
        return {
            "name": f"DeepSC-COVID {self.model_config.name}",
            "size": self.model_config.name,
            "task": self.model_config.task,
            "format_version": self.format_version,
            "checkpoint_sha256": self.sha256,
            "trained": self.provenance.date,
            "git_commit": self.provenance.git_commit,
            "parameters": count_parameters(self.model),
        }


def save_checkpoint(
    path: str | os.PathLike[str],
    model: DeepSC,
    preprocess: PreprocessConfig,
    provenance: Provenance,
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint atomically (temp file + rename); returns its sha256.

    Refuses preprocessing that does not match the model, and metadata that is not plain
    data (it could not be read back with `weights_only=True`).
    """
    check_compatible(model.config, preprocess)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "preprocess_config": preprocess.to_dict(),
        "class_names": list(CLASS_NAMES),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "provenance": provenance.to_dict(),
        "metrics": dict(metrics or {}),
    }
    for key in ("model_config", "preprocess_config", "provenance", "metrics"):
        _check_plain(payload[key], key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; a checkpoint gets the mode of any new file (the
        # umask's), so that the node can serve one that another user trained.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    digest = file_sha256(path)
    log.info("saved checkpoint %s (%s/%s, sha256 %s)", path, model.config.name,
             model.config.task, digest[:12])  # fmt: skip
    return digest


def load_checkpoint(
    path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load and validate a checkpoint (None: the shipped default) onto `device`.

    Raises `WeightsMissing` when there is no file, `CheckpointError` for anything that
    does not match this code.
    """
    default = path is None or str(path) == ""
    p = default_checkpoint_path() if default else Path(path)  # type: ignore[arg-type]
    if not p.is_file():
        raise WeightsMissing(_missing_message(p, default))
    dev = resolve_device(device)
    digest = file_sha256(p)
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise CheckpointError(
            f"{p} is not a readable dicomnode checkpoint (corrupted, or it holds objects "
            f"other than plain data and tensors): {_first_error_line(exc)}"
        ) from exc
    ckpt = _from_payload(raw, p)
    model = build_model(ckpt["model_config"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{p}: weights do not fit a {ckpt['model_config'].name!r}/"
            f"{ckpt['model_config'].task!r} model: {exc}"
        ) from exc
    # Channels-last 3D makes oneDNN's 3D convs about 1.5x faster on CPU; on CUDA it made
    # GroupNorm copy every activation and was slower than the default layout (measured).
    fmt = torch.channels_last_3d if dev.type == "cpu" else torch.contiguous_format
    model.eval().to(dev, memory_format=fmt)
    log.info("loaded checkpoint %s (%s/%s, sha256 %s) on %s", p, ckpt["model_config"].name,
             ckpt["model_config"].task, digest[:12], dev)  # fmt: skip
    return Checkpoint(
        model=model,
        model_config=ckpt["model_config"],
        preprocess=ckpt["preprocess"],
        class_names=tuple(ckpt["class_names"]),
        provenance=ckpt["provenance"],
        metrics=ckpt["metrics"],
        format_version=ckpt["format_version"],
        sha256=digest,
        path=p,
        device=dev,
    )


def _from_payload(raw: Any, p: Path) -> dict[str, Any]:
    """Validate the loaded dict (everything but the state dict's fit) and parse its configs."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a dicomnode checkpoint (no format {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{p} has checkpoint format version {raw.get('format_version')!r}; this code "
            f"reads version {FORMAT_VERSION}: retrain or convert it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{p} lacks {', '.join(missing)}")
    names = tuple(raw["class_names"])
    if names != CLASS_NAMES:
        raise CheckpointError(
            f"{p} was trained for classes {list(names)}, this code expects {list(CLASS_NAMES)}"
        )
    try:
        model_config = ModelConfig.from_dict(raw["model_config"])
        preprocess = PreprocessConfig.from_dict(raw["preprocess_config"])
        provenance = Provenance.from_dict(raw["provenance"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{p}: {exc}") from exc
    check_compatible(model_config, preprocess)
    state = raw["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{p}: state_dict is not a mapping of names to tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(f"{p}: non-finite weights in {', '.join(bad[:5])}")
    return raw | {
        "model_config": model_config,
        "preprocess": preprocess,
        "provenance": provenance,
        "metrics": dict(raw["metrics"]),
    }


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting and
    restoring it would race with other threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _missing_message(p: Path, default: bool) -> str:
    if default:
        return (
            f"no model weights: the default checkpoint {p} is not installed. Train one with "
            "`dicomnode train` (docs/training.md) and set [ai] checkpoint in config.toml to "
            f"it, or install a release that ships {DEFAULT_NAME}"
        )
    if p.is_dir():  # a training run's folder
        return (f"{p} is a folder, not a checkpoint: a training run's final model is"
                f" {p / 'model.pt'}")
    return (
        f"no model weights at {p}: the file does not exist. Train one with `dicomnode"
        " train` (docs/training.md); the node serves the one [ai] checkpoint names (empty:"
        " the shipped default)"
    )


def _check_plain(value: Any, where: str) -> None:
    """Only what `torch.load(weights_only=True)` reads back: None, bool, int, float, str,
    and lists / dicts (str keys) of those."""
    if value is None or type(value) in (bool, int, float, str):  # not subclasses
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{where}: key {k!r} is not a str")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints hold plain data only")


def _first_error_line(exc: Exception) -> str:
    """The informative line of torch's long weights-only message, else the first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "Unpickler error" in ln]
    return (hits or lines or [type(exc).__name__])[0]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve "auto" to CUDA when available, else CPU; check "cpu", "cuda", "cuda:N" exist."""
    if isinstance(device, torch.device):
        return device
    if not _DEVICE_RE.fullmatch(device):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)"
            )
    return dev

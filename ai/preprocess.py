"""Preprocessing for DeepSC-COVID: input checks, HU window, lung masking, the classification
slice sample (paper eq. 12) and the sliding-window patch grid of the segmentation stream.

Everything the model sees passes through here, in training and in inference, so that both
use one definition. Arrays may be numpy or torch; results are float32 torch tensors on the
input's device (numpy inputs give CPU tensors). Volumes are (z, y, x) = (slices, rows, columns).

The segmentation stream works on a *segmentation grid*: the volume (or, with
`PreprocessConfig.field_of_view_mm`, a square of that many mm around the lungs:
`field_of_view_box`) with its in-plane size resized to `PreprocessConfig.seg_inplane_size`
(None keeps the native grid, as in the paper; the CPU "lite" model uses a downscaled
grid). Patches tile that grid; `PatchAccumulator` blends patch outputs back onto it and
resizes them to the native in-plane size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ai.errors import ImplausibleSpacing, NonFiniteVoxels, NotAVolume, TooFewSlices

ArrayLike = np.ndarray | torch.Tensor

MIN_SPACING_MM = 0.1
"""Below this a spacing is a unit or geometry error, not a CT."""
MAX_SPACING_MM = 20.0
"""Above this (per axis) a series cannot resolve lung lesions; usually broken geometry."""
MIN_INPLANE = 32
"""Smallest in-plane size (pixels) accepted as a CT image."""
BLEND_MODES = ("gaussian", "linear", "constant")
FIELD_OF_VIEW_RANGE_MM = (100.0, 700.0)
DEFAULT_FIELD_OF_VIEW_MM = 360.0
"""What `dicomnode train` uses unless told otherwise: about the median field of the
training phantoms (300-450 mm), and of adult chest CT protocols."""
FIELD_MARGIN_MM = 10.0
"""Least room between the lungs and the edge of the field of view's square."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT volume becomes model input; saved in checkpoints so training and serving agree.

    hu_window: HU range mapped linearly to [0, 1] (paper: [-1400, 200]), clipped outside.
    n_cls_slices: N slices of the classification stream (paper eq. 12: 48).
    cls_size: in-plane size (h, w) of the classification slices (code: 256 x 256).
    seg_patch: segmentation patch (d, h, w) on the segmentation grid (paper: 24 x 256 x 256).
    seg_inplane_size: in-plane size (h, w) of the segmentation grid; None keeps the native
        grid (paper, 512). The "lite" model uses e.g. (256, 256) with 24 x 128 x 128 patches.
    seg_overlap: fraction of the patch shared by neighbouring windows on every axis, in
        [0, 1); 0 tiles without overlap where the size allows it.
    blend: weights for overlapping windows: "gaussian" (sigma = patch / 8), "linear" (tent)
        or "constant" (plain mean).
    min_slices: fewer slices than this is `TooFewSlices`; from this up to one patch depth the
        volume is zero-padded (default: half of a 24-slice window).
    field_of_view_mm: the square (mm across) around the lungs' centre that the grids of
        both streams cover, so that the network sees a chest at one scale whatever field
        the scanner reconstructed it in; widened to hold lungs larger than it. None: the
        whole matrix (the scale then follows the reconstruction's field of view).
    """

    hu_window: tuple[float, float] = (-1400.0, 200.0)
    n_cls_slices: int = 48
    cls_size: tuple[int, int] = (256, 256)
    seg_patch: tuple[int, int, int] = (24, 256, 256)
    seg_inplane_size: tuple[int, int] | None = None
    seg_overlap: float = 0.0
    blend: str = "gaussian"
    min_slices: int = 12
    field_of_view_mm: float | None = None

    def __post_init__(self) -> None:
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"hu_window {self.hu_window}: low must be below high")
        if self.n_cls_slices < 1:
            raise ValueError(f"n_cls_slices {self.n_cls_slices} must be >= 1")
        if len(self.cls_size) != 2 or min(self.cls_size) < 1:
            raise ValueError(f"cls_size {self.cls_size} must be two positive sizes (h, w)")
        if len(self.seg_patch) != 3 or min(self.seg_patch) < 1:
            raise ValueError(f"seg_patch {self.seg_patch} must be three positive sizes (d, h, w)")
        if self.seg_inplane_size is not None and (
            len(self.seg_inplane_size) != 2 or min(self.seg_inplane_size) < 1
        ):
            raise ValueError(f"seg_inplane_size {self.seg_inplane_size} must be (h, w) or None")
        if not 0.0 <= self.seg_overlap < 1.0:
            raise ValueError(f"seg_overlap {self.seg_overlap} must be in [0, 1)")
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend {self.blend!r} must be one of {BLEND_MODES}")
        if self.min_slices < 1:
            raise ValueError(f"min_slices {self.min_slices} must be >= 1")
        if self.field_of_view_mm is not None and not (
            FIELD_OF_VIEW_RANGE_MM[0] <= self.field_of_view_mm <= FIELD_OF_VIEW_RANGE_MM[1]
        ):
            raise ValueError(
                f"field_of_view_mm {self.field_of_view_mm} must be None or in"
                f" {FIELD_OF_VIEW_RANGE_MM} mm (a chest's field of view)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists) for checkpoints."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Inverse of `to_dict`; unknown keys are an error (a checkpoint from another version
        must not be silently misread), missing keys take the defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown preprocessing config keys: {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


# --------------------------------------------------------------------------- input checks


def check_volume(
    volume_hu: ArrayLike,
    spacing_mm: Sequence[float],
    config: PreprocessConfig | None = None,
) -> tuple[float, float, float]:
    """Refuse input that would give a silently wrong answer; return spacing as floats.

    Raises `NotAVolume`, `ImplausibleSpacing`, `TooFewSlices` or `NonFiniteVoxels`.
    """
    cfg = config or PreprocessConfig()
    shape = tuple(volume_hu.shape)
    if len(shape) != 3:
        raise NotAVolume(f"expected a 3D (z, y, x) volume, got shape {shape}")
    if min(shape[1:]) < MIN_INPLANE:
        raise NotAVolume(
            f"in-plane size {shape[1]} x {shape[2]} is below {MIN_INPLANE} x {MIN_INPLANE} pixels"
        )
    spacing = _check_spacing(spacing_mm)
    if shape[0] < cfg.min_slices:
        raise TooFewSlices(
            f"volume has {shape[0]} slices; at least {cfg.min_slices} are needed "
            f"({cfg.seg_patch[0]}-slice segmentation windows are padded from there)"
        )
    _check_finite(volume_hu)
    return spacing


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise NotAVolume(f"spacing {spacing_mm!r} is not three numbers (dz, dy, dx)") from exc
    if len(values) != 3:
        raise NotAVolume(f"spacing {spacing_mm!r} is not three numbers (dz, dy, dx)")
    for axis, value in zip(("slice (dz)", "row (dy)", "column (dx)"), values, strict=True):
        if not math.isfinite(value) or not MIN_SPACING_MM <= value <= MAX_SPACING_MM:
            raise ImplausibleSpacing(
                f"{axis} spacing {value:g} mm is outside {MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm:"
                " geometry missing or corrupted"
            )
    return values  # type: ignore[return-value]


def _check_finite(volume: ArrayLike) -> None:
    if isinstance(volume, torch.Tensor):
        if not volume.is_floating_point():
            return
        bad = int((~torch.isfinite(volume)).sum())
    else:
        if not np.issubdtype(volume.dtype, np.floating):
            return
        bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
    if bad:
        total = math.prod(volume.shape)
        raise NonFiniteVoxels(
            f"volume has {bad} NaN/infinite voxels of {total} ({100.0 * bad / total:.3g} %):"
            " broken rescale or pixel decoding"
        )


# --------------------------------------------------------------------------- intensities


def as_tensor(x: ArrayLike) -> torch.Tensor:
    """numpy -> torch without a copy where possible; tensors pass through."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def normalise_hu(volume_hu: ArrayLike, config: PreprocessConfig | None = None) -> torch.Tensor:
    """HU -> [0, 1] float32 by the fixed window `(hu - lo) / (hi - lo)`, clipped.

    A fixed window (not the public code's per-slice min-max) so one HU means one input value
    in every scan.
    """
    lo, hi = (config or PreprocessConfig()).hu_window
    x = as_tensor(volume_hu).to(torch.float32)
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


def apply_lung_mask(x: ArrayLike, lung_mask: ArrayLike) -> torch.Tensor:
    """Zero everything outside the lungs (the paper feeds lungs only)."""
    xt = as_tensor(x)
    mask = as_tensor(lung_mask).to(device=xt.device)
    if tuple(mask.shape) != tuple(xt.shape):
        raise ValueError(f"lung mask shape {tuple(mask.shape)} != volume shape {tuple(xt.shape)}")
    return xt.to(torch.float32) * mask.to(torch.float32)


def resize_inplane(x: ArrayLike, size: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize the last two axes of a (..., h, w) array to `size` as float32.

    "bilinear" antialiases when shrinking (so a 2x downscale averages, not aliases);
    "nearest" is for label maps (returned as float32 0/1, compare > 0.5).
    """
    xt = as_tensor(x).to(torch.float32)
    size = (int(size[0]), int(size[1]))
    if tuple(xt.shape[-2:]) == size:
        return xt
    lead = xt.shape[:-2]
    flat = xt.reshape(1, -1, *xt.shape[-2:])
    if mode == "nearest":
        out = F.interpolate(flat, size=size, mode="nearest-exact")
    elif mode == "bilinear":
        shrink = size[0] < xt.shape[-2] or size[1] < xt.shape[-1]
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    else:
        raise ValueError(f"mode {mode!r} must be 'bilinear' or 'nearest'")
    return out.reshape(*lead, *size)


# --------------------------------------------------------------------------- field of view


@dataclass(frozen=True)
class InplaneBox:
    """The in-plane region, rows y0:y1 and columns x0:x1 of the native matrix, that the
    model's grids cover. It may reach beyond the matrix, where it reads zeros: outside
    the lungs the model's input is zero anyway (`apply_lung_mask`)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @classmethod
    def whole(cls, rows: int, columns: int) -> InplaneBox:
        return cls(0, int(rows), 0, int(columns))

    @property
    def size(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def overlap(self, rows: int, columns: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """(native rows, columns), (box rows, columns) of the part inside the matrix."""
        ny = slice(max(self.y0, 0), min(self.y1, rows))
        nx = slice(max(self.x0, 0), min(self.x1, columns))
        by = slice(ny.start - self.y0, ny.stop - self.y0)
        bx = slice(nx.start - self.x0, nx.stop - self.x0)
        return (ny, nx), (by, bx)

    def crop(self, x: ArrayLike) -> torch.Tensor:
        """The box of a (..., H, W) map, zeros outside the matrix; the map itself when the
        box is the whole matrix."""
        xt = as_tensor(x)
        rows, columns = xt.shape[-2:]
        if self == InplaneBox.whole(rows, columns):
            return xt
        (ny, nx), (by, bx) = self.overlap(rows, columns)
        out = xt.new_zeros((*xt.shape[:-2], *self.size))
        out[..., by, bx] = xt[..., ny, nx]
        return out

    def positions(self, native: int, box_cells: int, axis: int) -> np.ndarray:
        """Where each of `native` rows (axis 0) or columns (axis 1) of the matrix falls on a
        grid of `box_cells` cells spanning the box, in cell units (centres at integers)."""
        start, length = (self.y0, self.size[0]) if axis == 0 else (self.x0, self.size[1])
        return (np.arange(native) - start + 0.5) * box_cells / length - 0.5


def field_of_view_box(
    lung_mask: np.ndarray, spacing_mm: Sequence[float], config: PreprocessConfig
) -> InplaneBox:
    """The square of `config.field_of_view_mm` centred on the lungs' in-plane bounding box,
    widened to leave `FIELD_MARGIN_MM` around lungs larger than it; the whole matrix when
    the config has no field of view (or the mask no lungs)."""
    rows, columns = lung_mask.shape[-2:]
    if config.field_of_view_mm is None:
        return InplaneBox.whole(rows, columns)
    hit_y = np.flatnonzero(lung_mask.any(axis=(0, 2)))
    hit_x = np.flatnonzero(lung_mask.any(axis=(0, 1)))
    if hit_y.size == 0:
        return InplaneBox.whole(rows, columns)
    dy, dx = float(spacing_mm[1]), float(spacing_mm[2])
    extent_mm = max((hit_y[-1] + 1 - hit_y[0]) * dy, (hit_x[-1] + 1 - hit_x[0]) * dx)
    side_mm = max(config.field_of_view_mm, extent_mm + 2 * FIELD_MARGIN_MM)
    y0, y1 = _centred(hit_y[0], hit_y[-1] + 1, side_mm / dy)
    x0, x1 = _centred(hit_x[0], hit_x[-1] + 1, side_mm / dx)
    return InplaneBox(y0, y1, x0, x1)


def _centred(start: int, stop: int, length: float) -> tuple[int, int]:
    """About `length` cells centred exactly on start:stop (one more where the parity asks),
    so that a mirrored mask gets the mirrored box (test-time mirroring sums the two)."""
    n = max(1, round(length))
    n += (start + stop - n) % 2
    first = (start + stop - n) // 2
    return int(first), int(first + n)


# --------------------------------------------------------------------------- classification


def cls_slice_indices(n_slices: int, n: int = 48) -> np.ndarray:
    """Slice indices floor(k * S / N), k = 0..N-1 (paper eq. 12); repeats when S < N."""
    if n_slices < 1 or n < 1:
        raise ValueError(f"need n_slices >= 1 and n >= 1, got {n_slices}, {n}")
    return (np.arange(n, dtype=np.int64) * n_slices) // n


def sample_cls_slices(
    x: ArrayLike, config: PreprocessConfig | None = None, mode: str = "bilinear"
) -> torch.Tensor:
    """The classification stream's input: N eq.-12 slices resized in-plane, (N, h, w) float32.

    Works on any (S, H, W) map, so the lesion map can be sampled on the same slices.
    """
    cfg = config or PreprocessConfig()
    xt = as_tensor(x)
    idx = torch.from_numpy(cls_slice_indices(xt.shape[0], cfg.n_cls_slices)).to(xt.device)
    return resize_inplane(xt.index_select(0, idx), cfg.cls_size, mode=mode)


# --------------------------------------------------------------------------- segmentation


@dataclass(frozen=True)
class PatchBox:
    """A patch's true place on the segmentation grid, padding included.

    Ranges are half-open voxel ranges [z0, z1) x [y0, y1) x [x0, x1) that may reach outside
    [0, S) x [0, H) x [0, W) where the patch is padded. The cross-stitch unit needs this to
    align a patch with the whole-volume classification features.
    """

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int
    grid_shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0)

    def fractions(self) -> tuple[float, float, float, float, float, float]:
        """(z0/S, z1/S, y0/H, y1/H, x0/W, x1/W): the box in whole-volume fractions, the same
        on the segmentation grid and the native grid; outside [0, 1] where padded."""
        s, h, w = self.grid_shape
        return (self.z0 / s, self.z1 / s, self.y0 / h, self.y1 / h, self.x0 / w, self.x1 / w)

    def inside(self) -> tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]]:
        """(grid slices, patch slices) of the part of the box that lies on the grid."""
        grid, patch = [], []
        for a0, a1, n in zip(
            (self.z0, self.y0, self.x0), (self.z1, self.y1, self.x1), self.grid_shape, strict=True
        ):
            g0, g1 = max(a0, 0), min(a1, n)
            grid.append(slice(g0, g1))
            patch.append(slice(g0 - a0, g1 - a0))
        return tuple(grid), tuple(patch)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"grid_shape": list(self.grid_shape)}


def window_starts(length: int, patch: int, overlap: float = 0.0) -> list[int]:
    """Start positions of windows of size `patch` covering [0, length).

    length >= patch: the fewest windows with stride <= patch * (1 - overlap), spread evenly from
    0 to length - patch, so no window leaves the volume (no padding needed). length < patch:
    one window, centred, padded on both sides.
    """
    if length < patch:
        return [-((patch - length) // 2)]
    stride = max(1, int(math.floor(patch * (1.0 - overlap))))
    n = math.ceil((length - patch) / stride) + 1
    if n == 1:
        return [0]
    return [round(i * (length - patch) / (n - 1)) for i in range(n)]


def blend_weights(
    patch: Sequence[int], mode: str = "gaussian", device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-voxel weights (d, h, w) for blending overlapping windows, max 1, never 0."""
    axes = []
    for n in patch:
        pos = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        if mode == "gaussian":
            w = torch.exp(-0.5 * (pos / (n / 8.0)) ** 2)
        elif mode == "linear":
            w = 1.0 - pos.abs() / ((n + 1) / 2.0)
        elif mode == "constant":
            w = torch.ones_like(pos)
        else:
            raise ValueError(f"blend {mode!r} must be one of {BLEND_MODES}")
        axes.append(w / w.max())
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return weights.clamp_(min=1e-3)


class SlidingWindow:
    """The segmentation patch grid of one volume: windows covering every voxel of the
    segmentation grid (the field of view resized to `seg_inplane_size`; `ai.infer` maps
    it to and from the native matrix), patches cut from it and blended back onto it.
    """

    def __init__(self, volume_shape: Sequence[int], config: PreprocessConfig | None = None):
        self.config = cfg = config or PreprocessConfig()
        s, h, w = (int(n) for n in volume_shape)
        self.native_shape: tuple[int, int, int] = (s, h, w)
        gh, gw = cfg.seg_inplane_size or (h, w)
        self.grid_shape: tuple[int, int, int] = (s, gh, gw)
        pd, ph, pw = cfg.seg_patch
        zs = window_starts(s, pd, cfg.seg_overlap)
        ys = window_starts(gh, ph, cfg.seg_overlap)
        xs = window_starts(gw, pw, cfg.seg_overlap)
        self.boxes: tuple[PatchBox, ...] = tuple(
            self.box_at(z, y, x) for z in zs for y in ys for x in xs
        )

    def __len__(self) -> int:
        return len(self.boxes)

    def __iter__(self) -> Iterator[PatchBox]:
        return iter(self.boxes)

    def box_at(self, z0: int, y0: int, x0: int) -> PatchBox:
        """The patch-sized box starting at (z0, y0, x0) on the segmentation grid."""
        pd, ph, pw = self.config.seg_patch
        return PatchBox(z0, z0 + pd, y0, y0 + ph, x0, x0 + pw, self.grid_shape)

    def extract(self, grid_x: torch.Tensor, box: PatchBox, pad_value: float = 0.0) -> torch.Tensor:
        """The patch (d, h, w) of a grid map, padded with `pad_value` outside the grid."""
        _check_shape(grid_x, self.grid_shape, "segmentation grid")
        gsl, psl = box.inside()
        inner = grid_x[gsl]
        if tuple(inner.shape) == box.shape:
            return inner
        out = torch.full(box.shape, pad_value, dtype=grid_x.dtype, device=grid_x.device)
        out[psl] = inner
        return out

    def extract_batch(
        self, grid_x: torch.Tensor, boxes: Sequence[PatchBox], pad_value: float = 0.0
    ) -> torch.Tensor:
        """Patches stacked as (B, 1, d, h, w), ready for a 3D conv net."""
        return torch.stack([self.extract(grid_x, b, pad_value) for b in boxes])[:, None]

    def batches(self, batch_size: int) -> Iterator[tuple[PatchBox, ...]]:
        """The boxes in groups of at most `batch_size` (bounded memory for long scans)."""
        for i in range(0, len(self.boxes), batch_size):
            yield self.boxes[i : i + batch_size]

    def accumulator(
        self, channels: int | None = None, device: torch.device | str | None = None
    ) -> PatchAccumulator:
        return PatchAccumulator(self, channels=channels, device=device)


class PatchAccumulator:
    """Blends patch outputs onto the segmentation grid: sum(w * p) / sum(w) per voxel."""

    def __init__(
        self,
        window: SlidingWindow,
        channels: int | None = None,
        device: torch.device | str | None = None,
    ):
        self.window = window
        self.channels = channels
        lead = () if channels is None else (channels,)
        self._sum = torch.zeros(*lead, *window.grid_shape, dtype=torch.float32, device=device)
        self._weight = torch.zeros(window.grid_shape, dtype=torch.float32, device=device)
        self._w = blend_weights(window.config.seg_patch, window.config.blend, device=device)

    def add(self, box: PatchBox, output: torch.Tensor) -> None:
        """Add one patch output, (d, h, w) or (channels, d, h, w); its padded part is dropped."""
        lead = () if self.channels is None else (self.channels,)
        if tuple(output.shape) != (*lead, *box.shape):
            raise ValueError(f"patch output shape {tuple(output.shape)} != {(*lead, *box.shape)}")
        gsl, psl = box.inside()
        w = self._w[psl]
        self._sum[(..., *gsl)] += output.to(self._sum)[(..., *psl)] * w
        self._weight[gsl] += w

    def add_batch(self, boxes: Sequence[PatchBox], outputs: torch.Tensor) -> None:
        """Add a batch (B, [channels,] d, h, w); a singleton channel axis is accepted too."""
        if self.channels is None and outputs.dim() == 5:
            outputs = outputs[:, 0]
        for box, out in zip(boxes, outputs, strict=True):
            self.add(box, out)

    def result(self) -> torch.Tensor:
        """The blended map on the segmentation grid; voxels no window reached are 0."""
        return self._sum / self._weight.clamp(min=1e-12)


def _check_shape(x: ArrayLike, expected: tuple[int, int, int], what: str) -> None:
    if tuple(x.shape[-3:]) != expected:
        raise ValueError(f"map shape {tuple(x.shape)} does not end with the {what} {expected}")

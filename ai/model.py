"""The DeepSC-COVID network (Wang et al., IEEE TMI 2021; spec in docs/model.md).

Three subnets: the cross-task feature subnet (one 3D inception stem per stream and the
cross-stitch unit, paper eq. 2), the 3D lesion subnet (U-Net with four heads fused by
eq. 3) and the classification subnet (residual encoder units, multi-layer GAP + FC,
eq. 4), plus multi-layer CAM evidence masks (eq. 5).

Coordinates. The segmentation stream ("L") sees one patch of the scan; the
classification stream ("C") sees the whole scan (48 uniformly sampled slices, resized
in-plane). A patch is located by a *box* of normalised fractions of the full volume
extent, ``(z0, z1, y0, y1, x0, x1)``: the whole volume is ``[0, 1]`` on each axis and a
patch covering voxels ``a .. b-1`` of ``n`` on an axis has ``(a / n, b / n)``. Boxes may
extend beyond ``[0, 1]`` where the patch was padded. Every grid is read as cells that
tile its extent (voxel ``i`` of ``n`` covers ``[i / n, (i + 1) / n)``), so the same box
maps the C grid, the L grid and any resampled map onto each other.

Pure compute: no DICOM, no database; imports only torch and ``ai.labels``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ai.labels import Diagnosis

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("joint", "seg", "cls")
"""`joint`: the full model; `seg` / `cls`: single-task ablations (no cross-stitch)."""

SIZES: tuple[str, ...] = ("paper", "lite", "tiny")
SEG_NORMS: tuple[str, ...] = ("group", "affine")
"""Norm layers of the L stream: GroupNorm, or a learnt per-channel affine (see ChannelAffine)."""
# Pooling of the classifier's residual units before the FC: "mean" is the paper's eq. 4
# (GAP), "max" the default here (docs/model.md, "Deviations, and why").
CLS_POOLS: tuple[str, ...] = ("max", "mean")
# Fields added to ModelConfig after checkpoint format 1, with the value that reproduces a
# checkpoint written before them.
_FIELDS_ADDED_SINCE_FORMAT_1: dict[str, Any] = {"cls_pool": "mean"}

UNIT_STRIDES: tuple[int, ...] = (4, 8, 16)
"""Stride of each classification encoder unit's features w.r.t. the C-stream input (the
stem and every unit halve each axis with centred stride-2 layers): places eq.-5 maps."""

_EPS = 1e-6
_WEIGHT_TOL = 1e-9  # resampling weights below this are rounding noise


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and the input geometry the weights are trained for.

    Widths default to the paper (spec, "Network"). `cls_input` is the C-stream input
    (slices, rows, cols); `seg_patch` the L-stream window, cut from the volume resampled
    in-plane to `seg_grid_xy` (512 = native for the paper). Preprocessing and inference
    take these three from here so that a checkpoint fixes its own geometry.
    """

    name: str = "paper"
    task: str = "joint"
    # Inception stem: (b1, b2_reduce, b2, b3_reduce, b3_mid, b3, b4); out = b1+b2+b3+b4.
    stem_widths: tuple[int, ...] = (8, 8, 8, 8, 12, 12, 4)
    stem_groups: int = 2
    seg_widths: tuple[int, ...] = (64, 128, 256)  # encoder levels and bottleneck
    seg_top_width: int = 32  # last up-transition, at the patch size
    cls_in_width: int = 16  # each of the two 1^3 input convs (F_cls, lesion map)
    cls_widths: tuple[int, ...] = (64, 128, 256)  # residual encoder units
    norm_groups: int = 8  # GroupNorm groups outside the stems (gcd with the width)
    eta: tuple[float, ...] = (0.25, 0.25, 0.5, 1.0)  # eq. 3, heads coarse -> fine
    # (diagonal, off-diagonal) at the start of stage 2: the identity, so joint fine-tuning
    # starts from the pre-trained streams (docs/model.md, cross-stitch).
    cross_stitch_init: tuple[float, float] = (1.0, 0.0)
    seg_prior: float = 0.01  # initial fused lesion probability (head bias init)
    seg_norm: str = "affine"  # L stream (stem + lesion subnet): "affine" or "group"
    # Max, not the paper's GAP: lesions fill under 1 % of the C grid, and their mean
    # activation left the image path no signal (it could not fit six scans).
    cls_pool: str = "max"
    n_classes: int = 3
    cls_input: tuple[int, ...] = (48, 256, 256)
    seg_patch: tuple[int, ...] = (24, 256, 256)
    seg_grid_xy: int = 512

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {TASKS}")
        if len(self.stem_widths) != 7 or min(self.stem_widths) < 1:
            problems.append(f"stem_widths must be 7 positive ints, got {self.stem_widths}")
        elif self.stem_out % self.stem_groups:
            problems.append(f"stem width {self.stem_out} not divisible by {self.stem_groups}")
        if len(self.seg_widths) != 3 or len(self.cls_widths) != 3:
            problems.append("seg_widths and cls_widths must have 3 entries each")
        if len(self.eta) != 4:
            problems.append(f"eta must have 4 entries (eq. 3), got {self.eta}")
        if len(self.cls_input) != 3 or len(self.seg_patch) != 3:
            problems.append("cls_input and seg_patch must be (slices, rows, cols)")
        elif any(n % 8 for n in self.seg_patch):
            problems.append(f"seg_patch {self.seg_patch} must be divisible by 8 (stem + 2 pools)")
        if self.n_classes < 2:
            problems.append(f"n_classes must be >= 2, got {self.n_classes}")
        if not 0.0 < self.seg_prior < 1.0:
            problems.append(f"seg_prior must be in (0, 1), got {self.seg_prior}")
        if self.seg_norm not in SEG_NORMS:
            problems.append(f"seg_norm {self.seg_norm!r} is not one of {SEG_NORMS}")
        if self.cls_pool not in CLS_POOLS:
            problems.append(f"cls_pool {self.cls_pool!r} is not one of {CLS_POOLS}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def stem_out(self) -> int:
        """Channels of I_seg / I_cls (32 for the paper)."""
        w = self.stem_widths
        return w[0] + w[2] + w[5] + w[6]

    @classmethod
    def named(cls, name: str, task: str = "joint") -> ModelConfig:
        """One of `SIZES`: `paper` (9.1 M parameters), `lite` (2.3 M, CPU), `tiny` (tests)."""
        if name == "paper":
            return cls(name="paper", task=task)
        if name == "lite":
            return cls(
                name="lite",
                task=task,
                stem_widths=(4, 4, 4, 4, 6, 6, 2),
                seg_widths=(32, 64, 128),
                seg_top_width=16,
                cls_in_width=8,
                cls_widths=(32, 64, 128),
                cls_input=(48, 128, 128),
                seg_patch=(24, 128, 128),
                seg_grid_xy=256,
            )
        if name == "tiny":
            return cls(
                name="tiny",
                task=task,
                stem_widths=(2, 2, 2, 2, 2, 2, 2),
                seg_widths=(8, 8, 16),
                seg_top_width=4,
                cls_in_width=4,
                cls_widths=(8, 8, 16),
                norm_groups=2,
                cls_input=(8, 16, 16),
                seg_patch=(8, 16, 16),
                seg_grid_xy=32,
            )
        raise ValueError(f"unknown model size {name!r}; expected one of {SIZES}")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, not tuples) so it survives JSON and weights_only loads."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown or missing keys are an error, not a silent default,
        except a field added since format 1, which gets the value older files were made with.
        """
        data = _FIELDS_ADDED_SINCE_FORMAT_1 | dict(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"model config keys: unknown {unknown}, missing {missing}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ----------------------------------------------------------------- spatial alignment


def _box_rows(box: Tensor) -> list[list[float]]:
    """Validated boxes as Python floats: (n, 6) rows of (z0, z1, y0, y1, x0, x1)."""
    if box.ndim == 1:
        box = box[None]
    if box.ndim != 2 or box.shape[1] != 6:
        raise ValueError(f"box must have shape (n, 6) = (z0, z1, y0, y1, x0, x1), got {box.shape}")
    rows = box.detach().to("cpu", torch.float64).tolist()
    for row in rows:
        if not all(math.isfinite(v) for v in row) or any(
            row[2 * a + 1] <= row[2 * a] for a in range(3)
        ):
            raise ValueError(f"box {row} must be finite with z0 < z1, y0 < y1, x0 < x1")
    return rows


def area_weights(
    src: tuple[float, float],
    n_src: int,
    dst: tuple[float, float],
    n_dst: int,
    valid: tuple[float, float] | None = None,
):
    """Box-filter resampling matrix (n_dst, n_src): overlap of cells / destination cell.

    Everything outside the source extent counts as zero, so a destination cell half
    outside receives half the mass ("paste into a zero canvas, then average"). With
    `valid`, the edge cells are stretched to cover exactly that extent (a shifted grid
    still describes the whole volume).
    """
    se = torch.linspace(src[0], src[1], n_src + 1, dtype=torch.float64)
    if valid is not None:
        se[0], se[-1] = valid
    de = torch.linspace(dst[0], dst[1], n_dst + 1, dtype=torch.float64)
    lo = torch.maximum(de[:-1, None], se[None, :-1])
    hi = torch.minimum(de[1:, None], se[None, 1:])
    return (hi - lo).clamp(min=0.0) / (de[1:] - de[:-1])[:, None]


def linear_weights(
    src: tuple[float, float],
    n_src: int,
    dst: tuple[float, float],
    n_dst: int,
    valid: tuple[float, float] | None = None,
):
    """Linear-interpolation matrix (n_dst, n_src) at destination cell centres.

    Like `F.interpolate(mode="linear", align_corners=False)`: clamped to the edge cells
    inside the `valid` extent (default: the source extent); zero for centres outside it
    (the patch's padding).
    """
    step = (dst[1] - dst[0]) / n_dst
    centres = dst[0] + (torch.arange(n_dst, dtype=torch.float64) + 0.5) * step
    t = ((centres - src[0]) / ((src[1] - src[0]) / n_src) - 0.5).clamp(0.0, n_src - 1)
    j0 = t.floor().long()
    j1 = (j0 + 1).clamp(max=n_src - 1)
    frac = t - j0
    rows = torch.arange(n_dst)
    w = torch.zeros(n_dst, n_src, dtype=torch.float64)
    w.index_put_((rows, j0), 1.0 - frac, accumulate=True)
    w.index_put_((rows, j1), frac, accumulate=True)
    lo, hi = valid or src
    w[(centres < lo) | (centres > hi)] = 0.0
    return w


def _support(w: Tensor, dim: int) -> tuple[int, int]:
    """First and one-past-last index along `dim` with a non-negligible weight."""
    nz = (w.abs() > _WEIGHT_TOL).any(dim=1 - dim).nonzero()
    if nz.numel() == 0:
        return 0, 0
    return int(nz[0]), int(nz[-1]) + 1


def _separable(x: Tensor, wz: Tensor, wy: Tensor, wx: Tensor) -> Tensor:
    """Apply per-axis matrices to x (C, D, H, W): a differentiable separable resampling."""
    x = torch.matmul(x, wx.transpose(0, 1))
    x = torch.matmul(wy, x)
    c, d, h, w = x.shape
    return torch.matmul(wz, x.reshape(c, d, h * w)).reshape(c, wz.shape[0], h, w)


def _host_to(t: Tensor, like: Tensor) -> Tensor:
    """A CPU-built resampling matrix on like's device and dtype. On CUDA through pinned
    memory without blocking: a copy from pageable memory would synchronise the stream
    for every window, so the GPU would wait while the CPU builds the next matrices."""
    t = t.to(like.dtype).contiguous()
    if like.device.type != "cuda":
        return t.to(like.device)
    return t.pin_memory().to(like.device, non_blocking=True)


def _same_format(x: Tensor, ref: Tensor) -> Tensor:
    """x in ref's memory format (keeps channels_last_3d through the matmul resampling)."""
    if ref.dim() == 5 and ref.is_contiguous(memory_format=torch.channels_last_3d):
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def crop_to_box(x: Tensor, box: Tensor, size: Sequence[int], stride: int = 1) -> Tensor:
    """M of paper eq. 2: crop a whole-volume map to each box and resample to `size`.

    x: (1 or n, C, D, H, W) on a grid covering the whole volume; box: (n, 6).
    Returns (n, C, *size). Trilinear where the output is finer than the input (the C ->
    L case), box-filter where coarser (no aliasing); zero where the box lies outside
    the volume (padding). Also the CROP of eq. 5 (evidence mask -> patch): there x comes
    from centred stride-`stride` layers over a grid of cells (the C input), so its cell j
    is centred on input cell stride * j, not on the middle of its own cell; the source
    grid is shifted by that much (UNIT_STRIDES: half a cell for the coarsest unit).
    """
    rows = _box_rows(box)
    if x.shape[0] not in (1, len(rows)):
        raise ValueError(f"crop_to_box: batch {x.shape[0]} vs {len(rows)} boxes")
    outs = []
    for i, row in enumerate(rows):
        xi = x[i if x.shape[0] > 1 else 0]
        mats, cuts = [], []
        for a in range(3):
            n_src, n_dst = xi.shape[1 + a], int(size[a])
            dst = (row[2 * a], row[2 * a + 1])
            shift = (0.5 - stride / 2) / (n_src * stride)
            src = (shift, 1.0 + shift)
            if (dst[1] - dst[0]) / n_dst < 1.0 / n_src:  # finer: interpolate
                w = linear_weights(src, n_src, dst, n_dst, valid=(0.0, 1.0))
            else:  # coarser: average
                w = area_weights(src, n_src, dst, n_dst, valid=(0.0, 1.0))
            lo, hi = _support(w, 1)
            mats.append(_host_to(w[:, lo:hi], x))
            cuts.append((lo, hi))
        if any(hi <= lo for lo, hi in cuts):  # box entirely outside the volume
            outs.append(x.new_zeros((x.shape[1], *[int(s) for s in size])))
            continue
        (z0, z1), (y0, y1), (x0, x1) = cuts
        outs.append(_separable(xi[:, z0:z1, y0:y1, x0:x1], *mats))
    return _same_format(torch.stack(outs), x)


def paste_from_box(x: Tensor, box: Tensor, size: Sequence[int]) -> Tensor:
    """M' of paper eq. 2: paste patch maps into a zero whole-volume canvas of `size`.

    x: (n, C, d, h, w) on each patch's grid; box: (n, 6). Returns (n, C, *size): the
    canvas averaged over each output cell (exact box filter for fractional boxes), so
    contributions of non-overlapping windows add up to the whole-volume result.
    Parts of a box outside the volume (padding) are dropped.
    """
    rows = _box_rows(box)
    if x.shape[0] != len(rows):
        raise ValueError(f"paste_from_box: batch {x.shape[0]} vs {len(rows)} boxes")
    size = [int(s) for s in size]
    outs = []
    for i, row in enumerate(rows):
        mats, pads = [], []
        for a in range(3):
            w = area_weights((row[2 * a], row[2 * a + 1]), x.shape[2 + a], (0.0, 1.0), size[a])
            lo, hi = _support(w, 0)
            hi = max(hi, lo + 1)  # keep one (zero) row so shapes stay valid
            mats.append(_host_to(w[lo:hi], x))
            pads.append((lo, size[a] - hi))
        part = _separable(x[i], *mats)
        (pz, qz), (py, qy), (px, qx) = pads
        outs.append(F.pad(part, (px, qx, py, qy, pz, qz)))
    return _same_format(torch.stack(outs), x)


def box_coverage(box: Tensor, size: Sequence[int], like: Tensor) -> Tensor:
    """Fraction of each canvas cell covered by each box: `paste_from_box` of ones, (n,1,*size)."""
    rows = _box_rows(box)
    size = [int(s) for s in size]
    outs = []
    for row in rows:
        cov = [
            area_weights((row[2 * a], row[2 * a + 1]), 1, (0.0, 1.0), size[a])[:, 0]
            for a in range(3)
        ]
        outs.append(cov[0][:, None, None] * cov[1][None, :, None] * cov[2][None, None, :])
    return _host_to(torch.stack(outs)[:, None], like)


class CanvasAccumulator:
    """Accumulates M'(window) over the windows of one scan on the C grid.

    `result()` = sum of pasted windows / max(1, coverage): with non-overlapping windows
    the exact whole-volume canvas; with overlap the average; where no window reached,
    zero (as for a single pasted patch).
    """

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(int(s) for s in size)
        self._sum: Tensor | None = None
        self._cover: Tensor | None = None

    def add(self, x: Tensor, box: Tensor) -> None:
        """Add a batch of windows x (n, C, d, h, w) located by box (n, 6)."""
        part = paste_from_box(x, box, self.size).sum(0, keepdim=True)
        self._accumulate(part, box_coverage(box, self.size, part).sum(0, keepdim=True))

    def add_constant(self, value: Tensor, box: Tensor) -> None:
        """Add windows whose every voxel holds `value` (C,): value * coverage, no resampling."""
        cover = box_coverage(box, self.size, value).sum(0, keepdim=True)
        self._accumulate(value.reshape(1, -1, 1, 1, 1) * cover, cover)

    def _accumulate(self, part: Tensor, cover: Tensor) -> None:
        self._sum = part if self._sum is None else self._sum + part
        self._cover = cover if self._cover is None else self._cover + cover

    def result(self) -> Tensor:
        """(1, C, *size); raises if nothing was added."""
        if self._sum is None or self._cover is None:
            raise ValueError("CanvasAccumulator.result(): no window was added")
        return self._sum / self._cover.clamp(min=1.0)


# ---------------------------------------------------------------------- building blocks


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels)


class ChannelAffine(nn.Module):
    """A learnt per-channel scale and shift, with no statistics of the input.

    What BatchNorm computes at inference, trained directly. The L stream uses it instead
    of GroupNorm (`ModelConfig.seg_norm`): its windows are lung-masked, 83-95 % zeros,
    so GroupNorm's window statistics follow how much lung a window holds, and one HU
    value becomes a different feature in every window (docs/training.md, attempt 4).
    With this layer a voxel's output depends only on its receptive field.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    return ChannelAffine(channels) if kind == "affine" else _gn(channels, groups)


def _he_init(module: nn.Module, skip: Sequence[nn.Module] = ()) -> None:
    """He-normal weights for the convolutions (ReLU follows): without normalising
    statistics, PyTorch's default init lets activations shrink layer by layer."""
    skipped = {id(m) for part in skip for m in part.modules()}
    for m in module.modules():
        if isinstance(m, nn.Conv3d | nn.ConvTranspose3d) and id(m) not in skipped:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ConvNormAct(nn.Sequential):
    """3^3 conv (bias-free: the norm's shift follows), norm, ReLU."""

    def __init__(self, cin: int, cout: int, groups: int, norm: str = "group") -> None:
        super().__init__(_conv3(cin, cout), _norm(norm, cout, groups), nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """Two ConvNormAct: one down- or up-transition unit of the U-Net."""

    def __init__(self, cin: int, cout: int, groups: int, norm: str = "group") -> None:
        super().__init__(
            ConvNormAct(cin, cout, groups, norm), ConvNormAct(cout, cout, groups, norm)
        )


class InceptionStem(nn.Module):
    """3D inception block (paper IV-B(1)): four bias-free branches, concat, GN, ReLU.

    Branches: 1^3 s2; 1^3 -> 3^3 s2; 1^3 -> 3^3 s2 -> 3^3; 3^3 avg-pool s1 -> 3^3 s2.
    Every dimension is halved (ceil). One instance per stream, not shared.
    """

    def __init__(
        self, widths: Sequence[int], groups: int, in_channels: int = 1, norm: str = "group"
    ) -> None:
        super().__init__()
        b1, b2r, b2, b3r, b3m, b3, b4 = widths
        cin = in_channels
        self.branch1 = nn.Conv3d(cin, b1, 1, stride=2, bias=False)
        self.branch2 = nn.Sequential(nn.Conv3d(cin, b2r, 1, bias=False), _conv3(b2r, b2, 2))
        self.branch3 = nn.Sequential(
            nn.Conv3d(cin, b3r, 1, bias=False), _conv3(b3r, b3m, 2), _conv3(b3m, b3)
        )
        self.branch4 = nn.Sequential(
            nn.AvgPool3d(3, stride=1, padding=1, count_include_pad=False), _conv3(cin, b4, 2)
        )
        self.norm = _norm(norm, b1 + b2 + b3 + b4, groups)
        if norm == "affine":
            _he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)
        return F.relu(self.norm(y))

    def zero_input_output(self) -> Tensor:
        """The output (C,) at every voxel for an all-zero input, exactly: the convs are
        bias-free, so the norm sees zeros and returns its bias; then ReLU."""
        return F.relu(self.norm.bias)


class CrossStitch(nn.Module):
    """Cross-stitch unit (paper eq. 2) with explicit init and true spatial alignment.

    F_seg = a11 * I_seg + a12 * M(I_cls);  F_cls = a21 * M'(I_seg) + a22 * I_cls.
    `weight` = [[a11, a12], [a21, a22]], initialised (diagonal, off-diagonal) = `init`.
    """

    def __init__(self, init: tuple[float, float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, 2, dtype=torch.float32))
        self.stitch(init)

    @torch.no_grad()
    def separate(self) -> None:
        """Identity weights: each stream sees only its own stem (training stage 1, where
        the subnets are pre-trained apart; a stage-1 model must infer the same way)."""
        self.weight.copy_(torch.eye(2))

    @torch.no_grad()
    def stitch(self, init: tuple[float, float]) -> None:
        """The explicit (diagonal, off-diagonal) start of joint fine-tuning (stage 2)."""
        d, o = init
        self.weight.copy_(torch.tensor([[d, o], [o, d]]))

    @property
    def is_separate(self) -> bool:
        return bool(torch.equal(self.weight.detach().cpu(), torch.eye(2)))

    def to_seg(self, i_seg: Tensor, i_cls: Tensor, box: Tensor) -> Tensor:
        """F_seg for patches i_seg (n, C, d, h, w) at box (n, 6); i_cls (1 or n, C, ...)."""
        m = crop_to_box(i_cls, box, i_seg.shape[2:])
        return self.weight[0, 0] * i_seg + self.weight[0, 1] * m

    def to_cls(self, seg_canvas: Tensor, i_cls: Tensor) -> Tensor:
        """F_cls from M'(I_seg) already on the C grid (see `paste_from_box`, `ScanContext`)."""
        if seg_canvas.shape[2:] != i_cls.shape[2:]:
            raise ValueError(f"canvas {tuple(seg_canvas.shape)} vs I_cls {tuple(i_cls.shape)}")
        return self.weight[1, 0] * seg_canvas + self.weight[1, 1] * i_cls


def fuse_heads(head_logits: Sequence[Tensor], eta: Sequence[float]) -> Tensor:
    """Paper eq. 3 before the sigmoid: sum_i eta_i * UP(S_i), trilinear to the finest head."""
    size = head_logits[-1].shape[2:]
    total = None
    for e, s in zip(eta, head_logits, strict=True):
        up = (
            s
            if s.shape[2:] == size
            else F.interpolate(s, size=size, mode="trilinear", align_corners=False)
        )
        total = e * up if total is None else total + e * up
    assert total is not None
    return total


class SegOutput(NamedTuple):
    """Lesion subnet output: fused probability (eq. 3), its logit, and the four head logits
    ordered coarse -> fine (bottleneck, up1, up2, up3), i.e. S_1 .. S_4 of eq. 3."""

    prob: Tensor
    logit: Tensor
    head_logits: list[Tensor]


class LesionSubnet(nn.Module):
    """3D U-Net on F_seg (paper IV-C): 2 pooled levels + bottleneck, 3 up-transitions, 4 heads.

    The stem already halved the patch, so the last up-transition (no skip) restores the
    patch size. Heads are 1^3 convs to one lesion logit each.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w1, w2, w3 = cfg.seg_widths
        top, g, n = cfg.seg_top_width, cfg.norm_groups, cfg.seg_norm
        self.enc1 = DoubleConv(cfg.stem_out, w1, g, n)
        self.enc2 = DoubleConv(w1, w2, g, n)
        self.bottleneck = DoubleConv(w2, w3, g, n)
        self.up1 = nn.ConvTranspose3d(w3, w2, 2, stride=2, bias=False)
        self.dec1 = DoubleConv(2 * w2, w2, g, n)
        self.up2 = nn.ConvTranspose3d(w2, w1, 2, stride=2, bias=False)
        self.dec2 = DoubleConv(2 * w1, w1, g, n)
        self.up3 = nn.ConvTranspose3d(w1, top, 2, stride=2, bias=False)
        self.dec3 = DoubleConv(top, top, g, n)
        self.heads = nn.ModuleList(nn.Conv3d(c, 1, 1) for c in (w3, w2, w1, top))
        if n == "affine":
            _he_init(self, skip=[self.heads])
        self.eta = tuple(float(e) for e in cfg.eta)
        prior = math.log(cfg.seg_prior / (1.0 - cfg.seg_prior)) / sum(self.eta)
        for head in self.heads:  # fused probability starts at seg_prior (focal-loss init)
            nn.init.constant_(head.bias, prior)

    def forward(self, f_seg: Tensor) -> SegOutput:
        if any(n % 4 for n in f_seg.shape[2:]):
            raise ValueError(f"F_seg spatial {tuple(f_seg.shape[2:])} must be divisible by 4")
        e1 = self.enc1(f_seg)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        b = self.bottleneck(F.max_pool3d(e2, 2))
        d1 = self.dec1(torch.cat([self.up1(b), e2], 1))
        d2 = self.dec2(torch.cat([self.up2(d1), e1], 1))
        d3 = self.dec3(self.up3(d2))
        heads = [h(x) for h, x in zip(self.heads, (b, d1, d2, d3), strict=True)]
        logit = fuse_heads(heads, self.eta)
        return SegOutput(torch.sigmoid(logit), logit, heads)


class ResidualUnit(nn.Module):
    """3D encoder unit (paper IV-D): 3^3 s2 conv, GN, ReLU, 3^3 conv, GN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.conv1 = _conv3(cin, cout, 2)
        self.norm1 = _gn(cout, groups)
        self.conv2 = _conv3(cout, cout)
        self.norm2 = _gn(cout, groups)
        self.shortcut = nn.Sequential(
            nn.Conv3d(cin, cout, 1, stride=2, bias=False), _gn(cout, groups)
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ClsOutput(NamedTuple):
    """Classification output: logits (n, n_classes) and the three encoder-unit feature maps
    F_e1, F_e2, F_e3 that eq. 4 pools and eq. 5 weights."""

    logits: Tensor
    units: list[Tensor]


LESION_MAP_GAIN = 20.0
"""Input scale of the lesion map in the classification subnet (see ClassificationSubnet)."""


class ClassificationSubnet(nn.Module):
    """Classification subnet (paper IV-D, eq. 4) on F_cls and the C-grid lesion map.

    The lesion branch has a bias and no GroupNorm: normalising would blow an almost
    empty probability map (a non-pneumonia scan) up to unit variance. Instead the map is
    scaled by `LESION_MAP_GAIN`: on the C grid it is a lesion fraction per cell, mostly
    0-0.5, and unscaled the classifier learnt nothing from it (training accuracy stayed at
    chance on phantoms; x20 reached 0.96 in three epochs). Pooling is `cfg.cls_pool`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        g, w = cfg.norm_groups, cfg.cls_in_width
        self.feat_in = nn.Sequential(
            nn.Conv3d(cfg.stem_out, w, 1, bias=False), _gn(w, g), nn.ReLU(inplace=True)
        )
        self.lesion_in = nn.Sequential(nn.Conv3d(1, w, 1), nn.ReLU(inplace=True))
        w1, w2, w3 = cfg.cls_widths
        self.units = nn.ModuleList(
            [ResidualUnit(2 * w, w1, g), ResidualUnit(w1, w2, g), ResidualUnit(w2, w3, g)]
        )
        self.fc = nn.Linear(w1 + w2 + w3, cfg.n_classes)
        self.pool = cfg.cls_pool

    def forward(self, f_cls: Tensor, lesion_map: Tensor | None = None) -> ClsOutput:
        if lesion_map is None:
            lesion_map = f_cls.new_zeros((f_cls.shape[0], 1, *f_cls.shape[2:]))
        if lesion_map.shape[2:] != f_cls.shape[2:] or lesion_map.shape[1] != 1:
            raise ValueError(
                f"lesion map {tuple(lesion_map.shape)} must be (n, 1, *{tuple(f_cls.shape[2:])})"
            )
        x = torch.cat([self.feat_in(f_cls), self.lesion_in(lesion_map * LESION_MAP_GAIN)], 1)
        units = []
        for unit in self.units:
            x = unit(x)
            units.append(x)
        if self.pool == "max":
            pooled = torch.cat([u.amax(dim=(2, 3, 4)) for u in units], 1)
        else:
            pooled = torch.cat([u.mean(dim=(2, 3, 4)) for u in units], 1)
        # The logits in float32 under autocast too: bf16 rounds a logit of 4 by 0.03, which
        # moves the reported probabilities by a few percent.
        with full_precision(pooled):
            logits = self.fc(pooled.float())
        return ClsOutput(logits, units)


def full_precision(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off on `t`'s device (nothing to turn off on others, e.g. "meta")."""
    kind = t.device.type
    return (torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda")
            else contextlib.nullcontext())


def evidence_class(logits: Tensor) -> Tensor:
    """Class whose evidence to show (n,): the prediction, or for a non-pneumonia prediction
    the more likely disease class (spec, "Evidence masks")."""
    pred = logits.argmax(1)
    disease = [c for c in range(logits.shape[1]) if c != Diagnosis.NON_PNEUMONIA]
    best_disease = torch.tensor(disease, device=logits.device)[logits[:, disease].argmax(1)]
    return torch.where(pred == Diagnosis.NON_PNEUMONIA, best_disease, pred)


def class_activation_maps(
    fc: nn.Linear, units: Sequence[Tensor], class_idx: Tensor
) -> list[Tensor]:
    """Raw multi-layer CAMs (eq. 5 without CROP): V_k = sum_c w_{j,c} F_{e_k,c}, (n,1,...).

    With the paper's GAP (`cls_pool="mean"`), mean(V_1) + mean(V_2) + mean(V_3) + b_j =
    logit_j; with max pooling V_k is the same class-weighted sum of the features whose maxima
    the FC reads: it still shows where the evidence for class j lies, but no longer adds up
    to the logit.
    """
    w = fc.weight[class_idx]  # (n, sum of widths)
    maps, start = [], 0
    for u in units:
        wk = w[:, start : start + u.shape[1]].to(u.dtype)
        maps.append(torch.einsum("nc,ncdhw->ndhw", wk, u)[:, None])
        start += u.shape[1]
    return maps


def normalise_evidence(v: Tensor) -> Tensor:
    """ReLU, then scale each map to [0, 1] by its maximum (an all-zero map stays zero)."""
    v = F.relu(v)
    peak = v.amax(dim=(1, 2, 3, 4), keepdim=True)
    return v / peak.clamp(min=_EPS)


# ------------------------------------------------------------------------- the model


@dataclass
class ScanContext:
    """Whole-scan inputs of the classifier, on the C grid (the C stem's output grid).

    `seg_canvas` = M'(I_seg) accumulated over all windows; `lesion_map` = fused lesion
    probability accumulated the same way; `i_cls` = C stem features. Built without
    gradient by `DeepSC.scan_context`; the same object drives inference and training.
    """

    i_cls: Tensor | None
    seg_canvas: Tensor | None
    lesion_map: Tensor | None

    @staticmethod
    def cat(contexts: Sequence[ScanContext]) -> ScanContext:
        """Batch the contexts of several scans (for a training batch of n scans)."""

        def join(items: list[Tensor | None]) -> Tensor | None:
            if any(t is None for t in items):
                return None
            return torch.cat(items, 0)  # type: ignore[arg-type]

        return ScanContext(
            join([c.i_cls for c in contexts]),
            join([c.seg_canvas for c in contexts]),
            join([c.lesion_map for c in contexts]),
        )


@dataclass
class DeepSCOutput:
    """One training step's output. `lesion_map` / `seg_canvas`: what the classifier saw."""

    seg: SegOutput | None
    cls: ClsOutput | None
    lesion_map: Tensor | None = None
    seg_canvas: Tensor | None = None


def _replace_patch(context: Tensor | None, patch: Tensor, cover: Tensor) -> Tensor:
    """The patch's own (grad-carrying) contribution replaces its region of a no-grad map."""
    if context is None:
        return patch
    if context.shape[1:] != patch.shape[1:] or context.shape[0] not in (1, patch.shape[0]):
        raise ValueError(f"context {tuple(context.shape)} vs patch canvas {tuple(patch.shape)}")
    return context.detach() * (1.0 - cover) + patch


class DeepSC(nn.Module):
    """DeepSC-COVID: `stem_c`, `stem_l`, `cross_stitch`, `lesion`, `classifier`.

    Task `seg` builds only `stem_l` + `lesion`; `cls` only `stem_c` + `classifier`; their
    parameter names equal the joint model's, so single-task (stage 1) weights load into
    the joint model with `load_state_dict(..., strict=False)`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        has_seg, has_cls = config.task in ("joint", "seg"), config.task in ("joint", "cls")
        self.stem_l = (
            InceptionStem(config.stem_widths, config.stem_groups, norm=config.seg_norm)
            if has_seg else None
        )  # fmt: skip
        self.stem_c = InceptionStem(config.stem_widths, config.stem_groups) if has_cls else None
        self.cross_stitch = CrossStitch(config.cross_stitch_init) if has_seg and has_cls else None
        self.lesion = LesionSubnet(config) if has_seg else None
        self.classifier = ClassificationSubnet(config) if has_cls else None

    # -- parts -----------------------------------------------------------------------

    def _need(self, part: nn.Module | None, what: str) -> nn.Module:
        if part is None:
            raise RuntimeError(f"{what} is not part of a {self.config.task!r} model")
        return part

    def segment(self, f_seg: Tensor) -> SegOutput:
        """Lesion subnet on F_seg (n, C, d, h, w) -> fused probability at the patch size."""
        return self._need(self.lesion, "the lesion subnet")(f_seg)

    def classify(self, f_cls: Tensor, lesion_map: Tensor | None = None) -> ClsOutput:
        """Classification subnet on F_cls and the C-grid lesion map (zeros when None)."""
        return self._need(self.classifier, "the classification subnet")(f_cls, lesion_map)

    def evidence(self, units: Sequence[Tensor], class_idx: Tensor) -> list[Tensor]:
        """Eq. 5: per-unit evidence masks for class_idx (n,), ReLU'd and scaled to [0, 1]."""
        fc = self._need(self.classifier, "the classification subnet").fc
        with full_precision(units[0]):  # float32 maps, as shown
            maps = class_activation_maps(fc, [u.float() for u in units], class_idx)
        return [normalise_evidence(v) for v in maps]

    def evidence_for_heads(
        self, units: Sequence[Tensor], class_idx: Tensor, box: Tensor, seg: SegOutput
    ) -> list[Tensor]:
        """Targets V_i of the task-aware loss (eq. 10) for heads S_1 .. S_3, in head order.

        Finest unit pairs with the finest coarse head (unit 3 -> S_1 bottleneck, unit 2 ->
        S_2, unit 1 -> S_3), each cropped to the patch box at that head's size (eq. 5).
        """
        maps = self.evidence(units, class_idx)
        return [
            crop_to_box(v, box, h.shape[2:], stride)
            for v, h, stride in zip(
                reversed(maps), seg.head_logits[:3], reversed(UNIT_STRIDES), strict=True
            )
        ]

    def segment_window(
        self, x_seg: Tensor, box: Tensor | None = None, i_cls: Tensor | None = None
    ) -> tuple[SegOutput, Tensor]:
        """Windows x_seg (n, 1, *seg_patch) -> (SegOutput, I_seg).

        Joint model: needs box (n, 6) and the scan's C stem features i_cls (1 or n, ...).
        """
        i_seg = self._need(self.stem_l, "the L stem")(x_seg)
        f_seg = i_seg
        if self.cross_stitch is not None:
            if box is None or i_cls is None:
                raise ValueError("a joint model needs box and i_cls to segment a window")
            f_seg = self.cross_stitch.to_seg(i_seg, i_cls, box)
        return self.segment(f_seg), i_seg

    # -- whole scan --------------------------------------------------------------------

    @torch.no_grad()
    def scan_context(
        self,
        x_cls: Tensor | None,
        windows: Iterable[tuple[Tensor, Tensor]] = (),
        window_sink: Callable[[SegOutput, Tensor], None] | None = None,
    ) -> ScanContext:
        """Run one scan without gradient: C stem once, then every window (x (n,1,...), box).

        `window_sink(seg_output, box)` receives the segmentation of each window batch that
        was run (for the caller to stitch the full-resolution mask). Windows whose input is
        all zero (no lung in them after lung masking) are not run: their I_seg is exactly
        `stem_l.zero_input_output()`, their lesion probability is zero (no lung, no
        lesion), they still count in the canvas coverage, and the sink does not see them.
        Returns the classifier's whole-scan inputs; inference and training both build
        them here so that they agree.
        """
        i_cls = None
        if self.stem_c is not None:
            if x_cls is None:
                raise ValueError(f"a {self.config.task!r} model needs x_cls")
            if x_cls.shape[0] != 1:
                raise ValueError(f"scan_context takes one scan, got batch {x_cls.shape[0]}")
            i_cls = self.stem_c(x_cls)
        if self.stem_l is None:
            return ScanContext(i_cls, None, None)
        stem_l = self.stem_l
        size = i_cls.shape[2:] if i_cls is not None else None
        acc_f = CanvasAccumulator(size) if size is not None else None
        acc_p = CanvasAccumulator(size) if size is not None else None
        n_windows = 0
        for x_win, box in windows:
            n_windows += x_win.shape[0]
            run = x_win.flatten(1).amax(1) > 0
            if not bool(run.all()) and acc_f is not None and acc_p is not None:
                empty = box[~run]
                acc_f.add_constant(stem_l.zero_input_output().to(i_cls), empty)
                acc_p.add_constant(i_cls.new_zeros(1), empty)
            if not bool(run.any()):
                continue
            x_run, box_run = (x_win, box) if bool(run.all()) else (x_win[run], box[run])
            seg, i_seg = self.segment_window(x_run, box_run, i_cls)
            if window_sink is not None:
                window_sink(seg, box_run)
            if acc_f is not None and acc_p is not None:
                acc_f.add(i_seg, box_run)
                acc_p.add(seg.prob, box_run)
        if acc_f is None or acc_p is None:
            return ScanContext(None, None, None)
        if n_windows == 0:
            raise ValueError("scan_context: a joint model needs at least one window")
        return ScanContext(i_cls, acc_f.result(), acc_p.result())

    def classify_scan(self, context: ScanContext) -> ClsOutput:
        """Classify from a `ScanContext` (once per scan at inference)."""
        if context.i_cls is None:
            raise RuntimeError(f"a {self.config.task!r} model does not classify")
        f_cls = context.i_cls
        if self.cross_stitch is not None:
            if context.seg_canvas is None:
                raise ValueError("a joint model needs the scan's seg_canvas")
            f_cls = self.cross_stitch.to_cls(context.seg_canvas, context.i_cls)
        return self.classify(f_cls, context.lesion_map)

    # -- one training step ---------------------------------------------------------------

    def forward(
        self,
        x_seg: Tensor | None = None,
        x_cls: Tensor | None = None,
        box: Tensor | None = None,
        context: ScanContext | None = None,
    ) -> DeepSCOutput:
        """One training step on n scans: patches x_seg (n,1,*seg_patch) at box (n,6), and
        the scans' C inputs x_cls (n,1,*cls_input).

        Joint: M'(I_seg) and the lesion map for the classifier are `context`'s no-grad
        whole-scan maps with this patch's own (grad-carrying) contributions pasted over
        its region; without a context they are the patch alone on a zero canvas (the
        paper's zero-padding). Inference uses `scan_context` + `classify_scan`.
        """
        task = self.config.task
        seg = cls = lesion_map = canvas = None
        i_cls = None
        if task in ("joint", "cls"):
            if x_cls is None:
                raise ValueError(f"a {task!r} model needs x_cls")
            i_cls = self._need(self.stem_c, "the C stem")(x_cls)
        if task in ("joint", "seg"):
            if x_seg is None:
                raise ValueError(f"a {task!r} model needs x_seg")
            seg, i_seg = self.segment_window(x_seg, box, i_cls)
        if task == "joint":
            assert i_cls is not None and box is not None and seg is not None
            c_size = i_cls.shape[2:]
            cover = box_coverage(box, c_size, i_cls)
            canvas = _replace_patch(
                context.seg_canvas if context else None, paste_from_box(i_seg, box, c_size), cover
            )
            lesion_map = _replace_patch(
                context.lesion_map if context else None,
                paste_from_box(seg.prob, box, c_size),
                cover,
            )
            assert self.cross_stitch is not None
            cls = self.classify(self.cross_stitch.to_cls(canvas, i_cls), lesion_map)
        elif task == "cls":
            assert i_cls is not None
            lesion_map = context.lesion_map if context else None
            cls = self.classify(i_cls, lesion_map)
        return DeepSCOutput(seg, cls, lesion_map, canvas)


def build_model(config: ModelConfig | str) -> DeepSC:
    """A freshly initialised model for a config or a size name."""
    cfg = ModelConfig.named(config) if isinstance(config, str) else config
    model = DeepSC(cfg)
    log.debug("built DeepSC %s/%s: %d parameters", cfg.name, cfg.task, count_parameters(model))
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of learnable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

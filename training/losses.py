"""Training losses of DeepSC-COVID (paper eqs. 6-11; deepsc.md "Losses").

- Segmentation (eqs. 6-8): soft Dice + binary focal loss on the fused lesion output,
  counted only inside the lung mask. The Dice term averages over the samples that have
  lesion voxels (on a lesion-free patch it carries no usable gradient); the focal term,
  with alpha 0.5 (positives and negatives weighed alike; the first attempts, with
  0.75, over-segmented: docs/training.md), over every lung voxel.
- Classification (eq. 9): cross-entropy weighted by inverse class frequency.
- Task-aware (eq. 10): mean squared difference between the lesion head probabilities
  S_i and the normalised multi-layer CAM evidence maps V_i.
- Total (eq. 11): lambda_seg * L_seg + lambda_cls * L_cls + lambda_ta * L_ta.

Logits versus probabilities: the network fuses the head *logits* and applies one sigmoid
(eq. 3), so the stable input to the segmentation loss is the fused logit map
(``from_logits=True``): log p and log(1 - p) then come from ``logsigmoid`` and never
reach log(0). Probabilities are accepted too (``from_logits=False``); they are clamped
to [PROB_EPS, 1 - PROB_EPS] before any logarithm. The argument is keyword-only and
required, so a caller always states which one it passes.

All losses compute in float32 whatever the input dtype (safe under autocast) and return
a scalar tensor. Tensors are batch-first: dim 0 is the batch, every other dim is reduced
per sample, and per-sample values are averaged over the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

PROB_EPS = 1e-6
"""Clamp for probability inputs before log: log(1e-6) = -13.8, representable in float32."""

DICE_SMOOTH = 1.0
"""Additive smoothing of the soft Dice, in voxels (added to numerator and denominator)."""

UNKNOWN_LABEL = -1
"""Class target of a scan without a diagnosis: no classification loss from it."""

TASK_AWARE_ETAS: tuple[float, float, float] = (0.25, 0.25, 0.5)
"""eta_1..3 of eq. 10 = the first three fusion weights of eq. 3, coarsest head first."""


# --------------------------------------------------------------------------- helpers


def _check_same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shape {tuple(b.shape)} differs from prediction {tuple(a.shape)}")


def _prepare_seg(
    prediction: Tensor, target: Tensor, lung_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Cast to float32 and broadcast the mask; returns (prediction, target, mask)."""
    if prediction.ndim < 2:
        raise ValueError(f"prediction must be batch-first with ndim >= 2, got {prediction.ndim}")
    _check_same_shape("target", prediction, target)
    pred = prediction.float()
    tgt = target.to(torch.float32)
    if lung_mask is None:
        mask = torch.ones_like(pred)
    else:
        mask = lung_mask.to(device=pred.device, dtype=torch.float32).expand_as(pred)
    return pred, tgt, mask


def _probabilities(pred: Tensor, from_logits: bool) -> Tensor:
    if from_logits:
        return torch.sigmoid(pred)
    lo, hi = float(pred.detach().min()), float(pred.detach().max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"from_logits=False but values span [{lo:.3g}, {hi:.3g}]; pass logits with "
            "from_logits=True"
        )
    return pred


def _per_sample_sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)


# ---------------------------------------------------------------------- segmentation


def soft_dice_loss(
    prediction: Tensor,
    target: Tensor,
    lung_mask: Tensor | None = None,
    *,
    from_logits: bool,
    smooth: float = DICE_SMOOTH,
) -> Tensor:
    """Soft Dice loss (eq. 6) inside the lung, with additive smoothing.

    L = 1 - (2 * sum(p*t*m) + smooth) / (sum(p*m) + sum(t*m) + smooth), per sample, then
    averaged over the batch. ``smooth`` (default 1 voxel) makes an empty target finite:
    the loss is then 1 - smooth / (sum(p*m) + smooth), 0 for an empty prediction and
    rising as false-positive mass grows; for real lesions (thousands of voxels) it
    shifts the value by well under 0.1 %.
    """
    pred, tgt, mask = _prepare_seg(prediction, target, lung_mask)
    prob = _probabilities(pred, from_logits) * mask
    tgt = tgt * mask
    intersection = _per_sample_sum(prob * tgt)
    denominator = _per_sample_sum(prob) + _per_sample_sum(tgt)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return (1.0 - dice).mean()


def lesion_dice_loss(
    prediction: Tensor,
    target: Tensor,
    lung_mask: Tensor | None = None,
    *,
    from_logits: bool,
    smooth: float = DICE_SMOOTH,
) -> Tensor:
    """:func:`soft_dice_loss` over the samples whose target has lesion voxels (0 if none).

    On a sample without lesion the soft Dice is 1 - smooth / (sum(p) + smooth): about 1
    for any false-positive mass, with a gradient that vanishes as that mass grows, so it
    teaches nothing and pins the logged mean near the share of lesion-free patches. The
    focal term handles those samples. A batch without lesion gives 0, still in the graph.
    """
    pred, tgt, mask = _prepare_seg(prediction, target, lung_mask)
    has_lesion = _per_sample_sum(tgt * mask) > 0
    if not bool(has_lesion.any()):
        return pred.sum() * 0.0
    return soft_dice_loss(
        pred[has_lesion], tgt[has_lesion], mask[has_lesion], from_logits=from_logits, smooth=smooth
    )


def focal_loss(
    prediction: Tensor,
    target: Tensor,
    lung_mask: Tensor | None = None,
    *,
    from_logits: bool,
    alpha: float = 0.5,
    gamma: float = 2.0,
) -> Tensor:
    """Binary focal loss (eq. 7), averaged over the lung voxels of each sample.

    l = -alpha (1-p)^gamma t log p - (1-alpha) p^gamma (1-t) log(1-p); alpha weighs the
    lesion (positive) class. From logits, log p = logsigmoid(x), log(1-p) = logsigmoid(-x)
    and p^gamma = exp(gamma log p), so no term overflows or has an infinite gradient.
    A sample with an empty lung mask contributes 0.
    """
    pred, tgt, mask = _prepare_seg(prediction, target, lung_mask)
    if from_logits:
        log_p = F.logsigmoid(pred)
        log_q = F.logsigmoid(-pred)
    else:
        prob = _probabilities(pred, from_logits=False).clamp(PROB_EPS, 1.0 - PROB_EPS)
        log_p = torch.log(prob)
        log_q = torch.log1p(-prob)
    positive = alpha * torch.exp(gamma * log_q) * tgt * log_p
    negative = (1.0 - alpha) * torch.exp(gamma * log_p) * (1.0 - tgt) * log_q
    voxel_loss = -(positive + negative) * mask
    n_voxels = _per_sample_sum(mask).clamp_min(1.0)
    return (_per_sample_sum(voxel_loss) / n_voxels).mean()


def _segmentation_terms(
    prediction: Tensor,
    target: Tensor,
    lung_mask: Tensor | None,
    *,
    from_logits: bool,
    alpha: float,
    gamma: float,
    smooth: float,
) -> tuple[Tensor, Tensor]:
    dice = lesion_dice_loss(prediction, target, lung_mask, from_logits=from_logits, smooth=smooth)
    focal = focal_loss(
        prediction, target, lung_mask, from_logits=from_logits, alpha=alpha, gamma=gamma
    )
    return dice, focal


def segmentation_loss(
    prob_or_logits: Tensor,
    target: Tensor,
    lung_mask: Tensor | None,
    lambda_dice: float = 1.0,
    lambda_focal: float = 1.0,
    *,
    from_logits: bool,
    alpha: float = 0.5,
    gamma: float = 2.0,
    smooth: float = DICE_SMOOTH,
) -> Tensor:
    """L_seg = lambda_dice * L_dice + lambda_focal * L_focal (eq. 8) inside the lung.

    ``prob_or_logits`` is the fused lesion output: pass the fused logits
    sum_i eta_i UP(S_i) with ``from_logits=True`` (stable, preferred), or the
    probability sigmoid(...) of eq. 3 with ``from_logits=False``. ``target`` is the
    binary (or soft) lesion mask, ``lung_mask`` the lung (None: every voxel counts);
    all three share one batch-first shape (the mask may broadcast).
    """
    dice, focal = _segmentation_terms(
        prob_or_logits,
        target,
        lung_mask,
        from_logits=from_logits,
        alpha=alpha,
        gamma=gamma,
        smooth=smooth,
    )
    return lambda_dice * dice + lambda_focal * focal


# -------------------------------------------------------------------- classification


def inverse_frequency_weights(
    labels: Sequence[int] | np.ndarray | Tensor, n_classes: int
) -> Tensor:
    """Class weights xi_c of eq. 9: inverse class frequency over the training set.

    xi_c = N / (K * n_c) for the K classes present (n_c samples of class c out of N), so
    the weights average 1 over the training samples (sum_n xi_{y_n} = N) and the loss
    keeps the scale of plain cross-entropy. A class absent from the training set has no
    frequency; it gets the largest present weight (treated as the rarest class seen),
    never inf, and a warning is logged.
    """
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    array = array.reshape(-1)
    if array.size == 0:
        raise ValueError("inverse_frequency_weights: no training labels")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError("inverse_frequency_weights: labels must be integers")
        array = array.astype(np.int64)
    if array.min() < 0 or array.max() >= n_classes:
        raise ValueError(f"inverse_frequency_weights: labels outside [0, {n_classes - 1}]")
    counts = np.bincount(array, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes, dtype=np.float64)
    weights[present] = array.size / (present.sum() * counts[present])
    if not present.all():
        missing = np.flatnonzero(~present).tolist()
        logger.warning(
            "classes %s absent from the training labels; giving them the largest weight", missing
        )
        weights[~present] = weights[present].max()
    return torch.as_tensor(weights, dtype=torch.float32)


def weighted_cross_entropy(
    logits: Tensor, target: Tensor, class_weights: Tensor | None = None
) -> Tensor:
    """L_cls = mean over the batch of xi_y * (-log softmax(logits)_y) (eq. 9).

    ``logits`` (B, C), ``target`` (B,) class indices, ``class_weights`` (C,) from
    :func:`inverse_frequency_weights` (None: unweighted). This is
    ``F.cross_entropy(..., weight=w, reduction="sum") / B``, not torch's default
    ``"mean"``, which divides by sum(w_y) and so cancels the weights entirely at the
    batch size of 1 the trainer uses. A target of ``UNKNOWN_LABEL`` (a scan with a lesion
    mask but no diagnosis) contributes 0 yet stays in the graph and in B, so a batch
    without any label gives 0, not NaN.
    """
    logits = logits.float()
    target = target.to(device=logits.device, dtype=torch.long)
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    per_sample = F.cross_entropy(
        logits, target, weight=weight, reduction="none", ignore_index=UNKNOWN_LABEL
    )
    return per_sample.mean()


# ------------------------------------------------------------------------ task-aware


def _resample_like(source: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """Trilinear resampling of the last three dims (align_corners=False)."""
    lead = source.shape[:-3]
    volume = source.reshape(-1, 1, *source.shape[-3:])
    volume = F.interpolate(volume, size=tuple(spatial_shape), mode="trilinear", align_corners=False)
    return volume.reshape(*lead, *spatial_shape)


def task_aware_loss(
    pairs: Sequence[tuple[Tensor, Tensor]],
    etas: Sequence[float] = TASK_AWARE_ETAS,
    *,
    from_logits: bool = False,
    detach_evidence: bool = False,
) -> Tensor:
    """L_ta = sum_i eta_i * mean((S_i - V_i)^2) (eq. 10).

    ``pairs`` holds (S_i, V_i) in the order of ``etas`` (default: the three coarse heads,
    coarsest first): S_i the lesion head *probability* on the patch region (or its logit
    with ``from_logits=True``), V_i the CAM evidence map already ReLU'd, scaled to [0, 1]
    and cropped to the same region by the caller. Where the spatial shapes (last three
    dims) differ, V_i is resampled to S_i's grid with trilinear interpolation
    (align_corners=False), i.e. the loss lives at the head's resolution. The paper's
    squared L2 norm is replaced by the mean over voxels (and batch), so heads of different
    sizes are weighed by eta_i alone and lambda_ta = 10 works on an O(1) scale.
    Gradients reach both S and V (the tasks guide each other) unless ``detach_evidence``.
    """
    if len(pairs) != len(etas):
        raise ValueError(f"task_aware_loss: {len(pairs)} pairs but {len(etas)} eta weights")
    if not pairs:
        raise ValueError("task_aware_loss: no (S, V) pairs")
    total = torch.zeros((), dtype=torch.float32, device=pairs[0][0].device)
    for index, ((head, evidence), eta) in enumerate(zip(pairs, etas, strict=True)):
        if head.ndim < 3 or evidence.ndim < 3:
            raise ValueError(f"task_aware_loss pair {index}: need at least 3 spatial dims")
        if head.shape[:-3] != evidence.shape[:-3]:
            raise ValueError(
                f"task_aware_loss pair {index}: leading dims {tuple(head.shape[:-3])} vs "
                f"{tuple(evidence.shape[:-3])}"
            )
        prob = _probabilities(head.float(), from_logits)
        target = evidence.float().to(prob.device)
        if detach_evidence:
            target = target.detach()
        if target.shape[-3:] != prob.shape[-3:]:
            target = _resample_like(target, prob.shape[-3:])
        total = total + float(eta) * torch.mean((prob - target) ** 2)
    return total


# ----------------------------------------------------------------------------- total


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of eqs. 6-11 (deepsc.md "Losses"; the paper's are not public)."""

    lambda_seg: float = 1.0
    lambda_cls: float = 1.0
    lambda_ta: float = 10.0
    lambda_dice: float = 1.0
    lambda_focal: float = 1.0
    focal_alpha: float = 0.5
    focal_gamma: float = 2.0
    dice_smooth: float = DICE_SMOOTH
    ta_etas: tuple[float, ...] = TASK_AWARE_ETAS


@dataclass
class LossTerms:
    """The total loss (to back-propagate) and each term (for logging); None = not computed."""

    total: Tensor
    seg: Tensor | None = None
    dice: Tensor | None = None
    focal: Tensor | None = None
    cls: Tensor | None = None
    ta: Tensor | None = None

    def to_dict(self) -> dict[str, float]:
        """Detached floats for logging; terms not computed are NaN so columns stay fixed."""
        out: dict[str, float] = {}
        for name in ("total", "seg", "dice", "focal", "cls", "ta"):
            value = getattr(self, name)
            out[name] = float("nan") if value is None else float(value.detach())
        return out


def total_loss(
    *,
    seg_logits: Tensor | None = None,
    seg_probs: Tensor | None = None,
    seg_target: Tensor | None = None,
    lung_mask: Tensor | None = None,
    cls_logits: Tensor | None = None,
    cls_target: Tensor | None = None,
    class_weights: Tensor | None = None,
    ta_pairs: Sequence[tuple[Tensor, Tensor]] | None = None,
    ta_from_logits: bool = False,
    config: LossConfig | None = None,
) -> LossTerms:
    """L = lambda_seg * L_seg + lambda_cls * L_cls + lambda_ta * L_ta (eq. 11).

    Each term is computed when its inputs are given, so stage 1 can pass only the
    segmentation inputs (or only the classification ones) and stage 2 everything.
    Segmentation takes the fused output as ``seg_logits`` (preferred) or ``seg_probs``,
    exactly one, with ``seg_target`` and ``lung_mask``. ``ta_pairs`` are (S_i, V_i) in
    the order of ``config.ta_etas``; S_i are probabilities unless ``ta_from_logits``.
    """
    cfg = config or LossConfig()
    device = next(
        (t.device for t in (seg_logits, seg_probs, cls_logits) if t is not None),
        ta_pairs[0][0].device if ta_pairs else torch.device("cpu"),
    )
    total = torch.zeros((), dtype=torch.float32, device=device)
    terms = LossTerms(total=total)
    if seg_logits is not None or seg_probs is not None:
        if seg_logits is not None and seg_probs is not None:
            raise ValueError("total_loss: pass seg_logits or seg_probs, not both")
        if seg_target is None:
            raise ValueError("total_loss: segmentation output given without seg_target")
        from_logits = seg_logits is not None
        prediction = seg_logits if from_logits else seg_probs
        assert prediction is not None
        terms.dice, terms.focal = _segmentation_terms(
            prediction,
            seg_target,
            lung_mask,
            from_logits=from_logits,
            alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma,
            smooth=cfg.dice_smooth,
        )
        terms.seg = cfg.lambda_dice * terms.dice + cfg.lambda_focal * terms.focal
        total = total + cfg.lambda_seg * terms.seg
    if cls_logits is not None:
        if cls_target is None:
            raise ValueError("total_loss: cls_logits given without cls_target")
        terms.cls = weighted_cross_entropy(cls_logits, cls_target, class_weights)
        total = total + cfg.lambda_cls * terms.cls
    if ta_pairs:
        terms.ta = task_aware_loss(ta_pairs, cfg.ta_etas, from_logits=ta_from_logits)
        total = total + cfg.lambda_ta * terms.ta
    terms.total = total
    return terms

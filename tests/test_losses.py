"""Losses of training/losses.py against hand-computed values (paper eqs. 6-11)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import (
    TASK_AWARE_ETAS,
    UNKNOWN_LABEL,
    LossConfig,
    focal_loss,
    inverse_frequency_weights,
    lesion_dice_loss,
    segmentation_loss,
    soft_dice_loss,
    task_aware_loss,
    total_loss,
    weighted_cross_entropy,
)

torch.set_num_threads(1)


def _vol(values: list[float]) -> torch.Tensor:
    """A (1, 1, 1, 1, n) batch-first volume from a list."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, 1, -1)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------------------- Dice


def test_dice_known_overlap_without_and_with_smoothing() -> None:
    prob = _vol([1.0, 1.0, 0.0, 0.0])
    target = _vol([1.0, 0.0, 1.0, 0.0])
    # 1 - 2*1 / (2 + 2) = 0.5; with smooth 1: 1 - 3 / 5 = 0.4
    assert soft_dice_loss(prob, target, from_logits=False, smooth=0.0).item() == pytest.approx(0.5)
    assert soft_dice_loss(prob, target, from_logits=False).item() == pytest.approx(0.4)


def test_dice_soft_probabilities_from_logits() -> None:
    probs = [0.8, 0.3, 0.6]
    target = _vol([1.0, 0.0, 1.0])
    logits = _vol([_logit(p) for p in probs])
    # intersection 0.8 + 0.6 = 1.4; sums 1.7 + 2 -> 1 - (2.8 + 1) / (3.7 + 1)
    expected = 1.0 - 3.8 / 4.7
    assert soft_dice_loss(logits, target, from_logits=True).item() == pytest.approx(expected)


def test_dice_is_per_sample_mean_over_batch() -> None:
    prob = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).reshape(2, 1, 1, 1, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 1, 2)
    # sample 0: perfect -> 0; sample 1: 1 - 2 / 3
    expected = (0.0 + (1.0 - 2.0 / 3.0)) / 2.0
    loss = soft_dice_loss(prob, target, from_logits=False, smooth=0.0)
    assert loss.item() == pytest.approx(expected)


def test_probabilities_out_of_range_are_rejected() -> None:
    with pytest.raises(ValueError, match="from_logits"):
        soft_dice_loss(_vol([2.0, -1.0]), _vol([1.0, 0.0]), from_logits=False)


# --------------------------------------------------------------------------- focal


def _focal_formula(p: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    p, t = p.double(), t.double()
    value = -alpha * (1 - p) ** gamma * t * torch.log(p)
    value = value - (1 - alpha) * p**gamma * (1 - t) * torch.log(1 - p)
    return value.mean()


def test_focal_equals_its_formula_from_logits_and_probabilities() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 3, 4, 5, generator=generator) * 3
    target = (torch.rand(2, 1, 3, 4, 5, generator=generator) > 0.7).float()
    expected = _focal_formula(torch.sigmoid(logits), target, 0.5, 2.0).item()
    assert focal_loss(logits, target, from_logits=True).item() == pytest.approx(expected, rel=1e-5)
    probs = torch.sigmoid(logits)
    assert focal_loss(probs, target, from_logits=False).item() == pytest.approx(expected, rel=1e-4)


def test_focal_single_voxel_by_hand() -> None:
    # p = 0.8 on a lesion voxel: -0.75 * 0.2^2 * log 0.8; p = 0.8 on background:
    # -0.25 * 0.8^2 * log 0.2; mean of the two.
    loss = focal_loss(
        _vol([_logit(0.8), _logit(0.8)]), _vol([1.0, 0.0]), from_logits=True, alpha=0.75
    )
    expected = (-0.75 * 0.04 * math.log(0.8) - 0.25 * 0.64 * math.log(0.2)) / 2.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_extreme_logits_give_finite_loss_and_gradients() -> None:
    logits = _vol([100.0, -100.0, 100.0, -100.0]).requires_grad_(True)
    target = _vol([0.0, 1.0, 1.0, 0.0])
    loss = segmentation_loss(logits, target, None, from_logits=True)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # A confidently wrong voxel costs ~alpha * |logit| (focal) - no clamp at log(eps).
    wrong = focal_loss(_vol([-100.0]), _vol([1.0]), from_logits=True)
    assert wrong.item() == pytest.approx(0.5 * 100.0, rel=1e-4)


def test_saturated_probabilities_are_clamped() -> None:
    prob = _vol([1.0, 0.0]).requires_grad_(True)
    loss = segmentation_loss(prob, _vol([0.0, 1.0]), None, from_logits=False)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prob.grad).all()


def test_lesion_dice_counts_only_samples_with_lesions() -> None:
    logits = torch.full((2, 1, 1, 1, 4), -2.0)
    logits[0, ..., :2] = 3.0  # sample 0: lesion partly found; sample 1: no lesion at all
    logits[1] = 5.0  # ... and a lot of false positive mass there
    target = torch.zeros(2, 1, 1, 1, 4)
    target[0, ..., :2] = 1.0
    lung = torch.ones(2, 1, 1, 1, 4, dtype=torch.bool)
    with_lesion = soft_dice_loss(logits[:1], target[:1], lung[:1], from_logits=True)
    assert lesion_dice_loss(logits, target, lung, from_logits=True).item() == pytest.approx(
        with_lesion.item()
    )
    # A lesion outside the lung mask does not count as a lesion.
    assert lesion_dice_loss(logits, target, lung & (target == 0), from_logits=True).item() == 0.0
    empty = logits.clone().requires_grad_(True)
    loss = lesion_dice_loss(empty, torch.zeros_like(target), lung, from_logits=True)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None and not empty.grad.any()


# ------------------------------------------------------------------ lung mask, empty


def test_lung_mask_excludes_outside_voxels() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 1, 2, 3, 4, generator=generator)
    target = (torch.rand(1, 1, 2, 3, 4, generator=generator) > 0.5).float()
    lung = torch.zeros(1, 1, 2, 3, 4, dtype=torch.bool)
    lung[..., :2] = True
    base = segmentation_loss(logits, target, lung, from_logits=True)
    # Changing anything outside the lung changes nothing...
    logits2, target2 = logits.clone(), target.clone()
    logits2[..., 2:] = 50.0
    target2[..., 2:] = 1.0 - target2[..., 2:]
    assert segmentation_loss(logits2, target2, lung, from_logits=True).item() == pytest.approx(
        base.item()
    )
    # ...and the value is that of the inside voxels alone.
    inside = segmentation_loss(
        logits[..., :2].contiguous(), target[..., :2].contiguous(), None, from_logits=True
    )
    assert base.item() == pytest.approx(inside.item(), rel=1e-6)
    # No gradient flows to voxels outside the lung.
    leaf = logits.clone().requires_grad_(True)
    segmentation_loss(leaf, target, lung, from_logits=True).backward()
    assert torch.all(leaf.grad[..., 2:] == 0) and torch.any(leaf.grad[..., :2] != 0)


def test_lung_mask_broadcasts_over_channel() -> None:
    logits = torch.zeros(2, 1, 2, 2, 2)
    target = torch.zeros(2, 1, 2, 2, 2)
    lung = torch.ones(2, 1, 2, 2, 2)
    a = segmentation_loss(logits, target, lung, from_logits=True)
    b = segmentation_loss(logits, target, lung[:, :1], from_logits=True)
    assert a.item() == pytest.approx(b.item())


def test_empty_target_is_finite_and_sensible() -> None:
    target = torch.zeros(1, 1, 4, 4, 4)
    confident_empty = torch.full((1, 1, 4, 4, 4), -20.0, requires_grad=True)
    loss = segmentation_loss(confident_empty, target, None, from_logits=True)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() < 1e-6
    assert torch.isfinite(confident_empty.grad).all()
    # Predicting lesion mass on an empty patch costs more than predicting none.
    half = torch.zeros(1, 1, 4, 4, 4)  # p = 0.5 everywhere: dice = 1 - 1 / (32 + 1)
    dice = soft_dice_loss(half, target, from_logits=True)
    assert dice.item() == pytest.approx(1.0 - 1.0 / 33.0, rel=1e-6)


def test_empty_lung_mask_gives_zero_not_nan() -> None:
    logits = torch.randn(1, 1, 2, 2, 2, requires_grad=True)
    loss = segmentation_loss(
        logits, torch.ones(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2), from_logits=True
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_segmentation_loss_combines_with_lambdas() -> None:
    logits = _vol([1.0, -2.0, 0.5])
    target = _vol([1.0, 0.0, 0.0])
    dice = soft_dice_loss(logits, target, from_logits=True)
    focal = focal_loss(logits, target, from_logits=True)
    loss = segmentation_loss(logits, target, None, 0.3, 2.0, from_logits=True)
    assert loss.item() == pytest.approx(0.3 * dice.item() + 2.0 * focal.item())


# ----------------------------------------------------------------- classification


def test_inverse_frequency_weights_average_one_and_absent_class() -> None:
    weights = inverse_frequency_weights([0, 0, 0, 1], n_classes=3)
    # N / (K n_c) with N = 4, K = 2 present: 4 / 6 and 4 / 2; absent class -> max
    assert weights.tolist() == pytest.approx([2.0 / 3.0, 2.0, 2.0])
    assert torch.isfinite(weights).all()
    labels = torch.tensor([0, 0, 0, 1])
    assert weights[labels].mean().item() == pytest.approx(1.0)


def test_inverse_frequency_weights_balanced_set_is_ones() -> None:
    weights = inverse_frequency_weights(torch.tensor([0, 1, 2, 2, 1, 0]), 3)
    assert weights.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_inverse_frequency_weights_rejects_bad_labels() -> None:
    with pytest.raises(ValueError):
        inverse_frequency_weights([], 3)
    with pytest.raises(ValueError):
        inverse_frequency_weights([0, 3], 3)


def test_weighted_cross_entropy_matches_torch_and_hand_value() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
    target = torch.tensor([0, 2, 1])
    weights = torch.tensor([0.5, 2.0, 1.5])
    loss = weighted_cross_entropy(logits, target, weights)
    torch_sum = F.cross_entropy(logits, target, weight=weights, reduction="sum") / 3
    assert loss.item() == pytest.approx(torch_sum.item(), rel=1e-6)
    hand = (
        sum(
            weights[y].item() * -torch.log_softmax(logits[i], 0)[y].item()
            for i, y in enumerate(target.tolist())
        )
        / 3
    )
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_weighted_cross_entropy_keeps_weight_at_batch_size_one() -> None:
    logits = torch.tensor([[0.3, 0.1, -0.2]])
    target = torch.tensor([1])
    weights = torch.tensor([1.0, 3.0, 1.0])
    plain = F.cross_entropy(logits, target)
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(
        3.0 * plain.item(), rel=1e-6
    )
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(plain.item())


def test_weighted_cross_entropy_unknown_labels_weigh_zero() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], requires_grad=True)
    weights = torch.tensor([0.5, 2.0, 1.5])
    mixed = weighted_cross_entropy(logits, torch.tensor([0, UNKNOWN_LABEL]), weights)
    alone = weighted_cross_entropy(logits[:1], torch.tensor([0]), weights)
    assert mixed.item() == pytest.approx(alone.item() / 2, rel=1e-6)  # counted in B
    none = weighted_cross_entropy(logits, torch.tensor([UNKNOWN_LABEL] * 2), weights)
    assert none.item() == 0.0
    none.backward()  # still in the graph, with zero gradient
    assert logits.grad is not None and not logits.grad.any()


# ---------------------------------------------------------------------- task-aware


def test_task_aware_zero_when_equal() -> None:
    s = torch.rand(1, 1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    pairs = [(s, s.clone()), (s[..., :2, :2], s[..., :2, :2].clone()), (s, s.clone())]
    assert task_aware_loss(pairs).item() == 0.0


def test_task_aware_hand_value_and_etas() -> None:
    ones = torch.ones(1, 1, 2, 2, 2)
    half = torch.full((1, 1, 2, 2, 2), 0.5)
    # pair 1: mean (1 - 0)^2 = 1; pair 2: 0.25; pair 3: 0 -> 0.25 * 1 + 0.25 * 0.25 + 0
    pairs = [(ones, torch.zeros_like(ones)), (half, torch.zeros_like(half)), (ones, ones)]
    assert TASK_AWARE_ETAS == (0.25, 0.25, 0.5)
    assert task_aware_loss(pairs).item() == pytest.approx(0.25 + 0.0625)
    assert task_aware_loss(pairs[:1], [2.0]).item() == pytest.approx(2.0)


def test_task_aware_from_logits() -> None:
    logit = torch.full((1, 1, 1, 1, 2), _logit(0.8))
    evidence = torch.full((1, 1, 1, 1, 2), 0.3)
    loss = task_aware_loss([(logit, evidence)], [1.0], from_logits=True)
    assert loss.item() == pytest.approx(0.25, rel=1e-5)


def test_task_aware_resamples_evidence_to_head_grid() -> None:
    head = torch.full((1, 1, 2, 4, 4), 0.9)
    constant = torch.full((1, 1, 1, 2, 2), 0.4)  # trilinear keeps a constant constant
    loss = task_aware_loss([(head, constant)], [1.0])
    assert loss.item() == pytest.approx(0.25, rel=1e-6)
    ramp = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 2, 2) / 8
    expected_v = F.interpolate(ramp, size=(2, 4, 4), mode="trilinear", align_corners=False)
    expected = torch.mean((head - expected_v) ** 2).item()
    assert task_aware_loss([(head, ramp)], [1.0]).item() == pytest.approx(expected, rel=1e-6)


def test_task_aware_gradients_reach_both_and_detach_option() -> None:
    s = torch.full((1, 1, 2, 2, 2), 0.7, requires_grad=True)
    v = torch.full((1, 1, 1, 1, 1), 0.2, requires_grad=True)
    task_aware_loss([(s, v)], [1.0]).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert v.grad is not None and v.grad.abs().sum() > 0
    v.grad = None
    s2 = s.detach().clone().requires_grad_(True)
    task_aware_loss([(s2, v)], [1.0], detach_evidence=True).backward()
    assert v.grad is None and s2.grad.abs().sum() > 0


def test_task_aware_rejects_mismatched_inputs() -> None:
    s = torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError):
        task_aware_loss([(s, s)], [1.0, 2.0])
    with pytest.raises(ValueError):
        task_aware_loss([(s, torch.zeros(2, 1, 2, 2, 2))], [1.0])


# --------------------------------------------------------------------------- total


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "seg_logits": torch.randn(1, 1, 4, 8, 8, generator=generator, requires_grad=True),
        "seg_target": (torch.rand(1, 1, 4, 8, 8, generator=generator) > 0.8).float(),
        "lung_mask": torch.rand(1, 1, 4, 8, 8, generator=generator) > 0.2,
        "cls_logits": torch.randn(1, 3, generator=generator, requires_grad=True),
        "cls_target": torch.tensor([1]),
    }


def test_total_loss_is_weighted_sum_of_terms() -> None:
    x = _inputs()
    heads = [torch.rand(1, 1, 1, 2, 2, requires_grad=True) for _ in range(3)]
    cams = [torch.rand(1, 1, 2, 4, 4) for _ in range(3)]
    weights = torch.tensor([1.0, 2.0, 0.5])
    terms = total_loss(**x, class_weights=weights, ta_pairs=list(zip(heads, cams, strict=True)))
    seg = segmentation_loss(x["seg_logits"], x["seg_target"], x["lung_mask"], from_logits=True)
    cls = weighted_cross_entropy(x["cls_logits"], x["cls_target"], weights)
    ta = task_aware_loss(list(zip(heads, cams, strict=True)))
    assert terms.seg.item() == pytest.approx(seg.item())
    assert terms.dice.item() + terms.focal.item() == pytest.approx(seg.item())
    assert terms.cls.item() == pytest.approx(cls.item())
    assert terms.ta.item() == pytest.approx(ta.item())
    assert terms.total.item() == pytest.approx(seg.item() + cls.item() + 10.0 * ta.item())
    terms.total.backward()
    for tensor in (x["seg_logits"], x["cls_logits"], *heads):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    logged = terms.to_dict()
    assert set(logged) == {"total", "seg", "dice", "focal", "cls", "ta"}
    assert all(isinstance(v, float) for v in logged.values())


def test_total_loss_stage_one_parts_and_config() -> None:
    x = _inputs()
    seg_only = total_loss(
        seg_logits=x["seg_logits"],
        seg_target=x["seg_target"],
        lung_mask=x["lung_mask"],
        config=LossConfig(lambda_seg=2.0),
    )
    assert seg_only.cls is None and seg_only.ta is None
    assert seg_only.total.item() == pytest.approx(2.0 * seg_only.seg.item())
    assert math.isnan(seg_only.to_dict()["cls"])
    cls_only = total_loss(cls_logits=x["cls_logits"], cls_target=x["cls_target"])
    assert cls_only.seg is None and cls_only.total.item() == pytest.approx(cls_only.cls.item())


def test_total_loss_probabilities_path_and_argument_checks() -> None:
    x = _inputs()
    probs = torch.sigmoid(x["seg_logits"].detach())
    from_probs = total_loss(seg_probs=probs, seg_target=x["seg_target"], lung_mask=x["lung_mask"])
    from_logits = total_loss(
        seg_logits=x["seg_logits"], seg_target=x["seg_target"], lung_mask=x["lung_mask"]
    )
    assert from_probs.total.item() == pytest.approx(from_logits.total.item(), rel=1e-4)
    with pytest.raises(ValueError):
        total_loss(seg_logits=x["seg_logits"], seg_probs=probs, seg_target=x["seg_target"])
    with pytest.raises(ValueError):
        total_loss(seg_logits=x["seg_logits"])

"""DeepSC network: sizes, shapes, spatial alignment of the cross-stitch, gradients, CAMs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ai.labels import Diagnosis
from ai.model import (
    SIZES,
    TASKS,
    CanvasAccumulator,
    DeepSC,
    ModelConfig,
    ScanContext,
    build_model,
    class_activation_maps,
    count_parameters,
    crop_to_box,
    evidence_class,
    paste_from_box,
)

torch.set_num_threads(1)

PARAMETERS = {
    ("paper", "joint"): 9_093_139,
    ("paper", "seg"): 5_553_464,
    ("paper", "cls"): 3_539_671,
    ("lite", "joint"): 2_275_207,
    ("lite", "seg"): 1_389_210,
    ("lite", "cls"): 885_993,
    ("tiny", "joint"): 49_231,
    ("tiny", "seg"): 30_952,
    ("tiny", "cls"): 18_275,
}


def tiny(task: str = "joint", seed: int = 0) -> DeepSC:
    torch.manual_seed(seed)
    return build_model(ModelConfig.named("tiny", task))


def inputs(cfg: ModelConfig, n: int = 2, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x_seg = torch.rand(n, 1, *cfg.seg_patch, generator=g)
    x_cls = torch.rand(n, 1, *cfg.cls_input, generator=g)
    box = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.5, 1.0], [0.25, 0.75, 0.5, 1.0, 0.0, 0.5]])[:n]
    return x_seg, x_cls, box


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("size", "task"), list(PARAMETERS))
def test_parameter_counts_are_pinned(size: str, task: str) -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig.named(size, task))
    assert count_parameters(model) == PARAMETERS[(size, task)]


def test_single_task_weights_load_into_the_joint_model() -> None:
    joint = tiny("joint")
    for task in ("seg", "cls"):
        part = tiny(task, seed=5)
        result = joint.load_state_dict(part.state_dict(), strict=False)
        assert not result.unexpected_keys
        assert set(result.missing_keys) == set(joint.state_dict()) - set(part.state_dict())
    assert torch.equal(joint.stem_l.norm.weight, tiny("seg", seed=5).stem_l.norm.weight)


@pytest.mark.parametrize("size", ["paper", "lite"])
def test_shapes_of_the_real_sizes(size: str) -> None:
    cfg = ModelConfig.named(size)
    with torch.device("meta"):
        model = build_model(cfg)
        x_seg = torch.empty(1, 1, *cfg.seg_patch)
        x_cls = torch.empty(1, 1, *cfg.cls_input)
    out = model(x_seg, x_cls, torch.tensor([[0.0, 0.1, 0.0, 0.5, 0.5, 1.0]]))
    d, h, w = cfg.seg_patch
    n, hc, wc = cfg.cls_input
    assert out.seg.prob.shape == (1, 1, d, h, w)
    assert [tuple(s.shape[2:]) for s in out.seg.head_logits] == [
        (d // 8, h // 8, w // 8),
        (d // 4, h // 4, w // 4),
        (d // 2, h // 2, w // 2),
        (d, h, w),
    ]
    assert out.cls.logits.shape == (1, 3)
    assert [tuple(u.shape[1:]) for u in out.cls.units] == [
        (c, n // f, hc // f, wc // f) for c, f in zip(cfg.cls_widths, (4, 8, 16), strict=True)
    ]
    assert out.lesion_map.shape == (1, 1, n // 2, hc // 2, wc // 2)
    assert out.seg_canvas.shape == (1, cfg.stem_out, n // 2, hc // 2, wc // 2)
    if size == "paper":  # the spec's numbers
        assert cfg.stem_out == 32 and out.seg_canvas.shape[2:] == (24, 128, 128)


def test_config_round_trip_and_validation() -> None:
    for size in SIZES:
        for task in TASKS:
            cfg = ModelConfig.named(size, task)
            assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model size"):
        ModelConfig.named("huge")
    with pytest.raises(ValueError, match="task"):
        ModelConfig.named("tiny", "both")
    with pytest.raises(ValueError, match="divisible by 8"):
        dataclasses.replace(ModelConfig.named("tiny"), seg_patch=(6, 16, 16))
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items() if k != "eta"})
    with pytest.raises(ValueError, match="cls_pool"):
        dataclasses.replace(ModelConfig.named("tiny"), cls_pool="median")


def test_a_config_from_before_cls_pool_reads_as_the_papers_gap() -> None:
    """Checkpoints written before the field were trained with GAP; they must keep it."""
    old = {k: v for k, v in ModelConfig.named("lite").to_dict().items() if k != "cls_pool"}
    assert ModelConfig.from_dict(old).cls_pool == "mean"
    assert ModelConfig.named("lite").cls_pool == "max"


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_classifier_logits_are_the_fc_of_the_pooled_units(pool: str) -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(ModelConfig.named("tiny", "cls"), cls_pool=pool))
    _, x_cls, _ = inputs(model.config)
    with torch.no_grad():
        out = model.classify(model.stem_c(x_cls), None)
        reduce = torch.amax if pool == "max" else torch.mean
        pooled = torch.cat([reduce(u, dim=(2, 3, 4)) for u in out.units], 1)
        assert torch.allclose(out.logits, model.classifier.fc(pooled), atol=1e-6)


def test_logits_and_evidence_stay_float32_under_autocast() -> None:
    """On a GPU the model runs under bf16 autocast; the reported probabilities and the
    shown evidence must not be bf16-rounded (a logit of 4 would move by 0.03)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.named("tiny", "cls")).eval()
    _, x_cls, _ = inputs(model.config)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.classify(model.stem_c(x_cls), None)
        evidence = model.evidence(out.units, evidence_class(out.logits))
    assert out.logits.dtype == torch.float32
    assert out.units[0].dtype == torch.bfloat16  # the rest of the subnet did run in bf16
    assert all(v.dtype == torch.float32 for v in evidence)


@pytest.mark.parametrize("seg_norm", ["affine", "group"])
def test_lesion_output_depends_only_on_its_receptive_field(seg_norm: str) -> None:
    """With the per-channel affine of the named sizes, what a window holds far from a
    voxel (here: more or less lung) leaves its lesion logit alone; GroupNorm's window
    statistics do not (why the L stream does not use them)."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(ModelConfig.named("tiny", "seg"), seg_norm=seg_norm))
    model.eval()
    g = torch.Generator().manual_seed(3)
    window = torch.rand(1, 1, 8, 16, 256, generator=g) * 0.5
    more_lung = window.clone()
    more_lung[..., 192:] = 0.4 + 0.1 * torch.rand(1, 1, 8, 16, 64, generator=g)
    with torch.no_grad():
        a, b = (model.segment(model.stem_l(x)).logit[..., :32] for x in (window, more_lung))
    if seg_norm == "affine":
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    else:
        assert float((a - b).abs().max()) > 1e-3


def test_cross_stitch_initialisation_is_explicit() -> None:
    """Identity by default (stage 2 starts from the pre-trained streams); any explicit
    (diagonal, off-diagonal) start is taken as given."""
    stitch = tiny().cross_stitch
    assert torch.equal(stitch.weight, torch.eye(2)) and stitch.is_separate
    stitch.stitch((0.8, 0.2))
    assert torch.equal(stitch.weight, torch.tensor([[0.8, 0.2], [0.2, 0.8]]))


def test_single_task_models_have_only_their_parts() -> None:
    seg, cls = tiny("seg"), tiny("cls")
    assert seg.stem_c is None and seg.classifier is None and seg.cross_stitch is None
    assert cls.stem_l is None and cls.lesion is None and cls.cross_stitch is None
    x_seg, x_cls, _ = inputs(seg.config)
    out = seg(x_seg=x_seg)
    assert out.cls is None and out.seg.prob.shape == x_seg.shape
    out = cls(x_cls=x_cls)
    assert out.seg is None and out.cls.logits.shape == (2, 3)
    with pytest.raises(ValueError, match="needs x_seg"):
        seg(x_cls=x_cls)


# --------------------------------------------------------------------------- alignment


def test_crop_of_the_whole_volume_is_the_identity() -> None:
    x = torch.rand(1, 3, 4, 6, 8)
    assert torch.allclose(crop_to_box(x, torch.tensor([0, 1, 0, 1, 0, 1.0]), (4, 6, 8)), x)


def test_crop_resamples_at_the_true_positions() -> None:
    """A linear ramp over the volume, cropped to a box and upsampled, is the same ramp."""
    n = 16
    ramp = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # value = fraction of the centre
    x = ramp.view(1, 1, 1, 1, n).expand(1, 1, 2, 2, n).contiguous()
    out = crop_to_box(x, torch.tensor([0, 1, 0, 1, 0.25, 0.75]), (2, 2, 16))[0, 0, 0, 0]
    centres = 0.25 + (torch.arange(16) + 0.5) * 0.5 / 16
    inner = (centres > ramp[0]) & (centres < ramp[-1])  # linear interpolation, no clamping
    assert torch.allclose(out[inner], centres[inner], atol=1e-6)


def test_crop_of_a_strided_map_places_cell_j_on_input_cell_stride_times_j() -> None:
    """CAMs come from centred stride-2 layers: unit cell j sits on C-input cell 4 j."""
    x = torch.zeros(1, 1, 1, 1, 4)
    x[..., 1] = 1.0
    out = crop_to_box(x, torch.tensor([0, 1, 0, 1, 0, 1.0]), (1, 1, 16), stride=4)[0, 0, 0, 0]
    assert int(out.argmax()) == 4 and out[4] == pytest.approx(1.0)
    x[..., 1], x[..., 3] = 0.0, 1.0  # the last cell: clamped up to the volume's edge
    out = crop_to_box(x, torch.tensor([0, 1, 0, 1, 0, 1.0]), (1, 1, 16), stride=4)[0, 0, 0, 0]
    assert torch.allclose(out[12:], torch.ones(4)) and out[8] == 0


def test_crop_outside_the_volume_is_zero() -> None:
    x = torch.ones(1, 1, 4, 4, 4)
    out = crop_to_box(x, torch.tensor([-0.5, 0.5, 0, 1, 0, 1.0]), (4, 4, 4))
    assert torch.all(out[:, :, :2] == 0) and torch.allclose(out[:, :, 2:], torch.ones(1))


def test_paste_places_a_patch_in_a_zero_canvas() -> None:
    patch = torch.rand(1, 2, 4, 4, 4)
    canvas = paste_from_box(patch, torch.tensor([[0.25, 0.75, 0.5, 1.0, 0.0, 0.5]]), (8, 8, 8))
    expected = torch.zeros(1, 2, 8, 8, 8)
    expected[:, :, 2:6, 4:8, 0:4] = patch
    assert torch.allclose(canvas, expected, atol=1e-6)


def test_paste_averages_a_finer_patch_and_drops_padding() -> None:
    patch = torch.rand(1, 1, 8, 8, 8)
    box = torch.tensor([[-0.25, 0.25, 0.0, 0.5, 0.5, 1.0]])  # half of the patch is padding
    canvas = paste_from_box(patch, box, (4, 4, 4))
    expected = torch.zeros(1, 1, 4, 4, 4)
    expected[:, :, 0:1, 0:2, 2:4] = F.avg_pool3d(patch, 4)[:, :, 1:2]
    assert torch.allclose(canvas, expected, atol=1e-6)


def test_canvas_of_tiling_windows_is_the_whole_volume_downsampled() -> None:
    volume = torch.rand(1, 3, 8, 16, 16)
    acc = CanvasAccumulator((4, 4, 4))
    for z in (0, 4):
        for y in (0, 8):
            xs, boxes = [], []
            for x in (0, 8):
                xs.append(volume[:, :, z : z + 4, y : y + 8, x : x + 8])
                boxes.append([z / 8, (z + 4) / 8, y / 16, (y + 8) / 16, x / 16, (x + 8) / 16])
            acc.add(torch.cat(xs), torch.tensor(boxes))
    expected = F.adaptive_avg_pool3d(volume, (4, 4, 4))
    assert torch.allclose(acc.result(), expected, atol=1e-6)


# --------------------------------------------------------------------------- joint model


def test_scan_context_matches_the_training_forward() -> None:
    """One window covering the scan: training forward and inference path agree."""
    model = tiny().eval()
    x_seg, x_cls, _ = inputs(model.config, n=1)
    box = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    context = model.scan_context(x_cls, [(x_seg, box)])
    with torch.no_grad():
        direct = model(x_seg, x_cls, box)
        with_context = model(x_seg, x_cls, box, context=context)
        inferred = model.classify_scan(context)
    assert torch.allclose(direct.cls.logits, inferred.logits, atol=1e-5)
    assert torch.allclose(with_context.cls.logits, inferred.logits, atol=1e-5)
    assert torch.allclose(direct.lesion_map, context.lesion_map, atol=1e-6)


def test_empty_windows_are_skipped_exactly() -> None:
    """An all-zero window adds the stem's exact zero-input features and zero lesion."""
    model = tiny().eval()
    with torch.no_grad():
        model.stem_l.norm.bias.uniform_(-0.5, 0.5)
    x_seg, x_cls, box = inputs(model.config)
    x_seg[1] = 0.0
    zero = torch.zeros(1, 1, *model.config.seg_patch)
    with torch.no_grad():
        assert torch.allclose(
            model.stem_l(zero),
            model.stem_l.zero_input_output()
            .view(1, -1, 1, 1, 1)
            .expand(1, -1, *[s // 2 for s in model.config.seg_patch]),
        )
    seen: list[int] = []
    context = model.scan_context(x_cls[:1], [(x_seg, box)], lambda seg, b: seen.append(len(b)))
    assert seen == [1]
    with torch.no_grad():
        i_cls = model.stem_c(x_cls[:1])
        seg, i_seg = model.segment_window(x_seg, box, i_cls)
    size = i_cls.shape[2:]
    canvas, lesion = CanvasAccumulator(size), CanvasAccumulator(size)
    canvas.add(i_seg, box)
    lesion.add(seg.prob * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1, 1), box)
    assert torch.allclose(context.seg_canvas, canvas.result(), atol=1e-6)
    assert torch.allclose(context.lesion_map, lesion.result(), atol=1e-6)


def test_gradients_reach_every_parameter_of_all_three_subnets() -> None:
    model = tiny().train()
    x_seg, x_cls, box = inputs(model.config)
    out = model(x_seg, x_cls, box)
    loss = out.seg.prob.mean() + out.cls.logits.pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in ("stem_l", "stem_c", "lesion", "classifier"):
        norm = sum(p.grad.norm() for p in getattr(model, part).parameters())
        assert norm > 0, part
    assert torch.all(model.cross_stitch.weight.grad != 0)


def test_classification_loss_reaches_the_lesion_subnet() -> None:
    """The classifier sees the lesion map, so its loss trains the lesion subnet too."""
    model = tiny().train()
    x_seg, x_cls, box = inputs(model.config)
    model(x_seg, x_cls, box).cls.logits.pow(2).mean().backward()
    assert sum(p.grad.norm() for p in model.lesion.parameters()) > 0
    assert model.cross_stitch.weight.grad[0].abs().sum() > 0  # via F_seg -> lesion map


def test_eq3_fuses_the_heads_with_eta() -> None:
    model = tiny().eval()
    x_seg, x_cls, box = inputs(model.config)
    with torch.no_grad():
        seg, _ = model.segment_window(x_seg, box, model.stem_c(x_cls))
    size = seg.head_logits[-1].shape[2:]
    fused = sum(
        e * F.interpolate(h, size=size, mode="trilinear", align_corners=False)
        for e, h in zip((0.25, 0.25, 0.5, 1.0), seg.head_logits, strict=True)
    )
    assert torch.allclose(seg.prob, torch.sigmoid(fused), atol=1e-6)


# --------------------------------------------------------------------------- evidence


def test_cams_equal_a_direct_computation_from_the_fc_weights() -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(ModelConfig.named("tiny"), cls_pool="mean")).eval()
    x_seg, x_cls, box = inputs(model.config)
    with torch.no_grad():
        out = model(x_seg, x_cls, box).cls
        j = torch.tensor([1, 0])
        maps = class_activation_maps(model.classifier.fc, out.units, j)
        weight = model.classifier.fc.weight
        start = 0
        for unit, v in zip(out.units, maps, strict=True):
            for n in range(2):
                direct = sum(weight[j[n], start + c] * unit[n, c] for c in range(unit.shape[1]))
                assert torch.allclose(v[n, 0], direct, atol=1e-5)
            start += unit.shape[1]
        # Eq. 4 is GAP then FC, so the CAM means add up to the logit.
        total = sum(v.mean(dim=(1, 2, 3, 4)) for v in maps) + model.classifier.fc.bias[j]
        assert torch.allclose(total, out.logits[torch.arange(2), j], atol=1e-5)
        for v, raw in zip(model.evidence(out.units, j), maps, strict=True):
            assert v.min() >= 0 and v.max() <= 1
            positive = (raw.amax(dim=(1, 2, 3, 4)) > 0).float()
            assert torch.allclose(v.amax(dim=(1, 2, 3, 4)), positive)  # ReLU, then / peak
            assert torch.allclose(
                v, F.relu(raw) / raw.amax(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-6)
            )


def test_evidence_class_is_the_prediction_or_the_likelier_disease() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 2.0, 5.0], [2.0, 1.0, 5.0]])
    expected = [Diagnosis.COVID19, Diagnosis.CAP, Diagnosis.CAP, Diagnosis.COVID19]
    assert evidence_class(logits).tolist() == [int(d) for d in expected]


def test_evidence_for_heads_matches_the_head_shapes() -> None:
    model = tiny().eval()
    x_seg, x_cls, box = inputs(model.config)
    with torch.no_grad():
        out = model(x_seg, x_cls, box)
        targets = model.evidence_for_heads(
            out.cls.units, evidence_class(out.cls.logits), box, out.seg
        )
    assert [t.shape for t in targets] == [h.shape for h in out.seg.head_logits[:3]]


def test_scan_context_batches_several_scans() -> None:
    model = tiny().eval()
    x_seg, x_cls, box = inputs(model.config)
    contexts = [
        model.scan_context(x_cls[i : i + 1], [(x_seg[i : i + 1], box[i : i + 1])]) for i in range(2)
    ]
    batched = ScanContext.cat(contexts)
    with torch.no_grad():
        logits = model.classify_scan(batched).logits
        one = model.classify_scan(contexts[1]).logits
    assert logits.shape == (2, 3) and torch.allclose(logits[1], one[0], atol=1e-5)

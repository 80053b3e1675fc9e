"""Two-stage training and evaluation on tiny phantoms with the tiny model."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch

from ai.checkpoint import file_sha256, load_checkpoint, preprocess_config_for, save_checkpoint
from ai.errors import NoLungsFound
from ai.labels import Diagnosis
from ai.model import ChannelAffine, ModelConfig, build_model
from training import trainer as trainer_module
from training.datasets import (
    Augmentation,
    DatasetError,
    LungMaskCache,
    TrainingSamples,
    open_data,
)
from training.losses import LossConfig
from training.trainer import (
    STATE_FILE,
    Batch,
    Dist,
    EpochResult,
    StageState,
    TrainConfig,
    Trainer,
    TrainStep,
    _collate,
    add_evaluate_arguments,
    add_train_arguments,
    evaluate,
    prepare_data,
    run_evaluate_command,
    run_train_command,
    scan_contexts,
)

torch.set_num_threads(1)

TRAIN = "phantoms:covid=2,cap=1,normal=1,seed=500,size=64,slices=24"
HELD_OUT = "phantoms:covid=1,cap=1,normal=1,seed=9000,size=64,slices=24"
TOO_THIN = "phantoms:normal=1,seed=77,size=64,slices=8"  # fewer slices than the node takes
NO_LUNGS = "phantoms:normal=1,seed=78,size=64,slices=24,lungs=node"  # the segmenter refuses
TIMING = ("seconds", "data_seconds", "scans_per_second")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantoms generated once for the whole module."""
    return tmp_path_factory.mktemp("cache")


def _config(out: Path, cache: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        data=[TRAIN], out=out, size="tiny", epochs1=2, epochs2=2, workers=0,
        val_fraction=0.0, patience=0, cache_dir=cache, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(handle)]


def _batch(cache: Path, stage: int, index: int = 0) -> tuple[Batch, ModelConfig]:
    cfg = ModelConfig.named("tiny")
    samples = TrainingSamples(
        open_data([TRAIN], cache), preprocess_config_for(cfg), cfg.cls_input, seed=1,
        augmentation=Augmentation.off(), with_grid=stage == 2,
    )  # fmt: skip
    return Batch.from_samples(_collate([samples[(0, index)]]), torch.device("cpu")), cfg


def test_loss_decreases_when_fitting_a_scan(cache: Path) -> None:
    batch, cfg = _batch(cache, stage=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    step = TrainStep(model, 1, LossConfig(), torch.ones(3))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        terms = step(batch)
        optimiser.zero_grad()
        terms.total.backward()
        optimiser.step()
        losses.append(float(terms.total.detach()))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("source", ["truth", "none"])
def test_stage_one_classifier_reads_the_true_lesion_map_or_none(cache: Path, source: str) -> None:
    batch, cfg = _batch(cache, stage=1, index=0)  # a COVID-19 scan: its map has lesions
    assert float(batch.lesion_map.sum()) > 0
    torch.manual_seed(0)
    model = build_model(cfg)
    step = TrainStep(model, 1, LossConfig(), torch.ones(3), stage1_lesion_map=source)
    step(batch).total.backward()
    weight_grad = model.classifier.lesion_in[0].weight.grad  # zero exactly when the map is
    assert weight_grad is not None and bool((weight_grad != 0).any()) == (source == "truth")


def test_stage_two_gradients_reach_every_subnet_and_the_cross_stitch(cache: Path) -> None:
    batch, cfg = _batch(cache, stage=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    context = scan_contexts(model, batch, preprocess_config_for(cfg), window_batch=4)
    terms = TrainStep(model, 2, LossConfig(), torch.ones(3))(batch, context)
    assert terms.ta is not None and float(terms.ta.detach()) > 0
    terms.total.backward()
    for name in ("stem_l", "stem_c", "lesion", "classifier"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert model.cross_stitch is not None
    stitch = model.cross_stitch.weight.grad
    assert stitch is not None and bool((stitch != 0).all())  # all four of a11..a22


def test_stage_two_can_give_the_classification_stream_its_own_rate(cache: Path) -> None:
    trainer = Trainer(_config(Path("unused"), cache, lr2=1e-5, lr2_cls=1e-3), *_sources(cache))
    names = {id(p): n.split(".")[0] for n, p in trainer.model.named_parameters()}
    optimiser, _ = trainer._optimiser(2, steps=10)
    modules = {g["lr"]: {names[id(p)] for p in g["params"]} for g in optimiser.param_groups}
    assert modules == {1e-5: {"stem_l", "lesion", "cross_stitch"}, 1e-3: {"stem_c", "classifier"}}
    optimiser, _ = trainer._optimiser(1, steps=10)  # stage 1: one rate, no cross-stitch
    assert [g["lr"] for g in optimiser.param_groups] == [1e-3]
    assert "cross_stitch" not in {names[id(p)] for p in optimiser.param_groups[0]["params"]}


def test_a_zero_stage_two_rate_freezes_the_segmentation_stream(cache: Path) -> None:
    trainer = Trainer(_config(Path("unused"), cache, lr2=0.0, lr2_cls=1e-3), *_sources(cache))
    model = trainer.model
    optimiser, _ = trainer._optimiser(2, steps=10)
    names = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
    assert {names[id(p)] for g in optimiser.param_groups for p in g["params"]} == {
        "stem_c", "classifier"
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch, cfg = _batch(cache, stage=2)
    context = scan_contexts(model, batch, preprocess_config_for(cfg), window_batch=4)
    TrainStep(model, 2, LossConfig(), torch.ones(3))(batch, context).total.backward()
    optimiser.step()
    after = model.state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed == {"stem_c", "classifier"}
    for bad in (dict(lr2=0.0), dict(lr2=0.0, lr2_cls=0.0), dict(lr2=-1e-4), dict(lr1=0.0)):
        with pytest.raises(ValueError, match="lr"):
            _config(Path("unused"), cache, **bad)


def test_the_per_channel_affine_layers_can_take_a_larger_rate(cache: Path) -> None:
    trainer = Trainer(
        _config(Path("unused"), cache, lr2=1e-4, lr2_cls=1e-3, lr_affine_scale=20.0),
        *_sources(cache),
    )
    affine = {id(p) for m in trainer.model.modules() if isinstance(m, ChannelAffine)
              for p in m.parameters()}  # fmt: skip
    assert affine  # the L stream's norm layers
    for stage, rate in ((1, 1e-3), (2, 1e-4)):
        optimiser, _ = trainer._optimiser(stage, steps=10)
        rates = {id(p): g["lr"] for g in optimiser.param_groups for p in g["params"]}
        assert all(math.isclose(rates[i], 20 * rate) for i in affine)
        others = {r for i, r in rates.items() if i not in affine}
        assert others == ({1e-3} if stage == 1 else {1e-4, 1e-3})  # unscaled
    with pytest.raises(ValueError, match="lr_affine_scale"):
        _config(Path("unused"), cache, lr_affine_scale=0.0)


def test_provenance_names_the_init_weights_by_content(tmp_path: Path, cache: Path) -> None:
    first = Trainer(
        _config(tmp_path / "first", cache, stage="1", epochs1=1), *_sources(cache)
    ).run()
    assert load_checkpoint(first).provenance.extra["init_sha256"] == []
    tuned = Trainer(
        _config(tmp_path / "tuned", cache, stage="2", epochs2=1, init=(first,)), *_sources(cache)
    ).run()
    assert load_checkpoint(tuned).provenance.extra["init_sha256"] == [file_sha256(first)]
    # stage 2 alone after the folder's own stage 1: that stage-1 model named too
    stage1 = tmp_path / "first" / "stage1.pt"
    alone = Trainer(
        _config(tmp_path / "first", cache, stage="2", epochs2=1), *_sources(cache)
    ).run()
    assert load_checkpoint(alone).provenance.extra["init_sha256"] == [file_sha256(stage1)]


def test_later_init_checkpoints_replace_the_streams_they_hold(
    tmp_path: Path, cache: Path
) -> None:
    joint = Trainer(
        _config(tmp_path / "joint", cache, stage="1", epochs1=1), *_sources(cache)
    ).run()
    image_only = Trainer(
        _config(tmp_path / "cls", cache, stage="1", epochs1=1, task="cls", seed=3),
        *_sources(cache),
    ).run()
    combined = Trainer(
        _config(tmp_path / "both", cache, stage="2", init=(joint, image_only)), *_sources(cache)
    )
    combined._init_stage(2)
    weights = combined.model.state_dict()
    for source in (joint, image_only):
        loaded = load_checkpoint(source).model.state_dict()
        expected = {"stem_l", "lesion"} if source == joint else {"stem_c", "classifier"}
        for name, tensor in loaded.items():
            if name.split(".")[0] in expected:
                assert torch.equal(weights[name], tensor), name
    # and the classification stream did come from the second run, not the first
    first = load_checkpoint(joint).model.state_dict()
    assert not all(torch.equal(weights[n], first[n]) for n in first if n.startswith("stem_c"))
    # --init-cls takes the classification stream alone, even from a joint checkpoint
    picked = Trainer(
        _config(tmp_path / "picked", cache, stage="2", init=(image_only,), init_cls=joint),
        *_sources(cache),
    )
    picked._init_stage(2)
    weights = picked.model.state_dict()
    for name, tensor in first.items():
        if name.split(".")[0] in ("stem_c", "classifier"):
            assert torch.equal(weights[name], tensor), name
    with pytest.raises(ValueError, match="init_cls"):
        _config(tmp_path / "seg", cache, task="seg", init_cls=joint)


def test_resume_continues_exactly(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(val_data=[HELD_OUT], epochs1=2, epochs2=2)
    whole = Trainer(_config(tmp_path / "whole", cache, **settings), *_sources(cache)).run()

    original = Trainer._end_epoch
    calls = {"n": 0}

    def interrupted(self: Trainer, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] in (1, 3):  # mid stage 1, then mid stage 2
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_end_epoch", interrupted)
    out = tmp_path / "parts"
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(out, cache, **settings), *_sources(cache)).run()
    # killed after the next epoch wrote last.pt and before it wrote its resume state
    ahead = load_checkpoint(out / "last.pt")
    with torch.no_grad():
        for parameter in ahead.model.parameters():
            parameter.add_(0.01)
    save_checkpoint(out / "last.pt", ahead.model, ahead.preprocess, ahead.provenance)
    with (out / "metrics.csv").open() as handle:  # and its metrics row, ahead of the state
        *_, last_row = handle.read().splitlines()
    with (out / "metrics.csv").open("a") as handle:
        handle.write(last_row.replace("1,1,", "1,2,", 1) + "\n")
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(out, cache, resume=True, **settings), *_sources(cache)).run()
    parts = Trainer(_config(out, cache, resume=True, **settings), *_sources(cache)).run()

    assert _rows(out / "metrics.csv") == _rows(tmp_path / "whole" / "metrics.csv")
    assert len(_rows(out / "metrics.csv")) == 4
    a, b = load_checkpoint(whole).model.state_dict(), load_checkpoint(parts).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _sources(cache: Path) -> tuple[object, object]:
    return open_data([TRAIN], cache), open_data([HELD_OUT], cache)


def test_train_and_evaluate_commands_end_to_end(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    out = tmp_path / "run"
    args = parser.parse_args(
        ["--data", TRAIN, "--val-data", HELD_OUT, "--out", str(out), "--size", "tiny",
         "--epochs", "1", "--workers", "1", "--device", "cpu", "--cache-dir", str(cache)]
    )  # fmt: skip
    assert run_train_command(args) == 0
    for name in ("model.pt", "stage1.pt", "stage2.pt", "last.pt", "metrics.csv"):
        assert (out / name).is_file(), name
    rows = _rows(out / "metrics.csv")
    assert [r["stage"] for r in rows] == ["1", "2"]
    assert float(rows[1]["train_ta"]) > 0 and rows[0]["train_ta"] == "nan"
    # the held-out scan without disease gives the false positives their column
    assert all(float(r["val_fp_ml"]) >= 0 for r in rows)
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.provenance.data == TRAIN and ckpt.metrics["stage"] == 2
    assert ckpt.preprocess.field_of_view_mm == 360.0  # the command's default
    # Stage 1 trains the streams apart (identity cross-stitch, and infers that way);
    # stage 2 starts the unit at its explicit init (the identity) and fine-tunes it.
    stage1 = load_checkpoint(out / "stage1.pt").model.cross_stitch
    assert stage1 is not None and torch.equal(stage1.weight.detach(), torch.eye(2))
    assert ckpt.model.cross_stitch is not None and not ckpt.model.cross_stitch.is_separate
    assert torch.allclose(ckpt.model.cross_stitch.weight.detach().cpu(), torch.eye(2), atol=0.05)
    assert json.loads((out / "train_config.json").read_text())["size"] == "tiny"

    def no_lungs(volume: object, spacing: object) -> None:
        raise NoLungsFound("no aerated lung found")

    monkeypatch.setattr(LungMaskCache, "_segment", staticmethod(no_lungs))
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    report = tmp_path / "eval"
    args = parser.parse_args(
        ["--checkpoint", str(out / "model.pt"), "--data", HELD_OUT, "--out", str(report),
         "--data", TOO_THIN, "--data", NO_LUNGS, "--device", "cpu", "--workers", "0",
         "--cache-dir", str(cache)]
    )  # fmt: skip
    assert run_evaluate_command(args) == 0
    result = json.loads((report / "evaluation.json").read_text())
    assert result["skipped"] == {  # too thin for the node; lungs refused when the data loaded
        "phantom-normal-77": ANY, "phantom-normal-78": "no aerated lung found"}
    summary = result["summary"]
    assert summary["n_scans"] == 3
    assert summary["classification"]["n"] == 3
    assert summary["lvr_abs_error_points"]["n"] == 3
    assert (report / "evaluation.png").stat().st_size > 10_000
    assert "DSC" in (report / "evaluation.txt").read_text()


@pytest.mark.parametrize("task", ["seg", "cls"])
def test_single_task_ablations_train_and_evaluate(tmp_path: Path, cache: Path, task: str) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["--data", TRAIN, "--out", str(tmp_path / "run"), "--size", "tiny", "--task", task,
         "--epochs", "1", "--val-fraction", "0", "--workers", "0", "--device", "cpu",
         "--cache-dir", str(cache), "--cls-pool", "mean", "--field-of-view-mm", "0"]
    )  # fmt: skip
    assert run_train_command(args) == 0
    trained = load_checkpoint(tmp_path / "run" / "model.pt")
    assert trained.model_config.cls_pool == "mean"
    assert trained.preprocess.field_of_view_mm is None  # 0: the whole matrix
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", str(tmp_path / "run" / "model.pt"), "--data", HELD_OUT,
         "--out", str(tmp_path / "eval"), "--device", "cpu", "--workers", "0",
         "--truth-lungs", "--cache-dir", str(cache)]
    )  # fmt: skip
    assert run_evaluate_command(args) == 0
    summary = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["summary"]
    assert (summary["classification"] is None) == (task == "seg")
    table = (tmp_path / "eval" / "evaluation.txt").read_text()  # says why a part is empty
    assert f"A single-task ({task}) model: it does not" in table
    assert (summary["lvr_abs_error_points"] is None) == (task == "cls")
    if task == "cls":  # at an operating point that calls a disease at any probability
        args.disease_thresholds = [0.0, 0.0]
        assert run_evaluate_command(args) == 0
        report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
        assert report["disease_thresholds"] == [0.0, 0.0]
        confusion = report["summary"]["classification"]["confusion"]
        assert [row[Diagnosis.NON_PNEUMONIA] for row in confusion] == [0, 0, 0]
        assert "operating point COVID-19 >= 0, CAP >= 0" in (
            tmp_path / "eval" / "evaluation.txt").read_text()
        args.disease_thresholds = [1.5, 0.5]
        assert run_evaluate_command(args) == 2


def test_kfold_trains_every_fold(tmp_path: Path, cache: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["--data", TRAIN, "--out", str(tmp_path), "--size", "tiny", "--stage", "1",
         "--epochs", "1", "--folds", "2", "--fold", "all", "--workers", "0",
         "--device", "cpu", "--cache-dir", str(cache)]
    )  # fmt: skip
    assert run_train_command(args) == 0
    report = json.loads((tmp_path / "folds.json").read_text())
    assert len(report["folds"]) == 2 and "val_score" in report["summary"]
    assert (tmp_path / "fold-1" / "model.pt").is_file()


def test_an_unscored_validation_never_replaces_a_scored_best(tmp_path: Path, cache: Path) -> None:
    """An epoch whose validation could not be scored (every scan refused) is no better
    than the best one so far: stage1.pt keeps that one."""
    tmp_path.mkdir(exist_ok=True)
    trainer = Trainer(_config(tmp_path, cache, stage="1"), *_sources(cache))
    optimiser = torch.optim.Adam(trainer.model.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0)
    state = StageState(stage=1)
    result = EpochResult({"total": 1.0}, 1e-4, 1.0, 0.0, 1)
    trainer._end_epoch(1, 0, state, result, {"val_score": math.nan}, optimiser, schedule)
    assert load_checkpoint(tmp_path / "stage1.pt").metrics["epoch"] == 1  # none scored yet
    scored = {"val_dsc": 0.5, "val_score": 0.5}
    trainer._end_epoch(1, 1, state, result, scored, optimiser, schedule)
    trainer._end_epoch(1, 2, state, result, {"val_score": math.nan}, optimiser, schedule)
    assert load_checkpoint(tmp_path / "stage1.pt").metrics["epoch"] == 2


def test_a_run_resumed_from_an_older_version_keeps_its_metrics_columns(
    tmp_path: Path, cache: Path
) -> None:
    """Rows appended under an older header (no val_fp_ml) stay aligned with it; a new
    file gets every column."""
    trainer = Trainer(_config(tmp_path, cache, stage="1"), *_sources(cache))
    result = EpochResult({"total": 1.0}, 1e-4, 1.0, 0.0, 1)
    val = {"val_dsc": 0.5, "val_fp_ml": 2.5, "val_score": 0.5}
    trainer._log_epoch(1, 0, StageState(stage=1), result, val)
    assert _rows(tmp_path / "metrics.csv")[0]["val_fp_ml"] == "2.5"
    older = "stage,epoch,lr,val_dsc,val_score\n1,1,0.1,0.4,0.4\n"
    (tmp_path / "metrics.csv").write_text(older)
    trainer._log_epoch(1, 1, StageState(stage=1), result, val)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[:2] == older.splitlines() and lines[2] == "1,2,0.0001,0.5,0.5"


def test_the_validation_split_does_not_follow_the_seed(cache: Path) -> None:
    """Runs chained by --init with other seeds validate on the same cases."""
    validated = [
        prepare_data(_config(Path("unused"), cache, val_fraction=0.5, seed=seed))[1].indices
        for seed in (0, 1, 2)
    ]
    assert validated[0] == validated[1] == validated[2]
    other = prepare_data(_config(Path("unused"), cache, val_fraction=0.5, split_seed=4))[1]
    assert sorted(other.indices) != sorted(validated[0])
    with pytest.raises(ValueError, match="leave out val_data"):
        _config(Path("unused"), cache, folds=2, val_data=[HELD_OUT])


def test_a_resumed_run_keeps_its_split(tmp_path: Path, cache: Path) -> None:
    """A run saved before --split-seed existed split with --seed: resumed with another
    split seed it would validate on cases it trained on. One saved before
    --field-of-view-mm saw the whole matrix."""
    (tmp_path / "train_config.json").write_text(json.dumps({"seed": 3, "val_fraction": 0.5}))
    with pytest.raises(ValueError, match="split_seed was 3, now 0"):
        prepare_data(_config(tmp_path, cache, val_fraction=0.5, seed=3, resume=True))
    assert prepare_data(_config(tmp_path, cache, val_fraction=0.5, seed=3, split_seed=3,
                                resume=True))
    # Nor did it have a field of view: it saw the whole matrix.
    with pytest.raises(ValueError, match="field_of_view_mm was None, now 360.0"):
        prepare_data(_config(tmp_path, cache, val_fraction=0.5, split_seed=3, seed=3,
                             resume=True, field_of_view_mm=360.0))


def test_a_resumed_run_is_the_run_it_resumes(tmp_path: Path, cache: Path) -> None:
    """Other rates, epochs or sizes on --resume would train one run under another's
    provenance: refused, naming what changed; where and how fast it runs may change."""
    started = _config(tmp_path, cache, resume=True)
    (tmp_path / "train_config.json").write_text(json.dumps(started.to_dict()))
    with pytest.raises(ValueError, match=r"epochs1 was 2, now 3; lr1 was 0.001, now 0.05\)"):
        prepare_data(_config(tmp_path, cache, resume=True, lr1=0.05, epochs1=3))
    assert prepare_data(_config(tmp_path, cache, resume=True, workers=1, device="cpu",
                                window_batch=2))


def test_a_folder_holding_a_run_is_not_trained_into_afresh(tmp_path: Path, cache: Path) -> None:
    """Only stage 2 alone may follow the folder's finished stage 1, and with the data,
    split and model that stage 1 had."""
    def saved_state(stage: int, finished: bool) -> None:
        torch.save({"state": {"stage": stage, "finished": finished}}, tmp_path / STATE_FILE)

    (tmp_path / "train_config.json").write_text(json.dumps(_config(tmp_path, cache).to_dict()))
    saved_state(1, finished=True)
    with pytest.raises(ValueError, match="holds a training run .* --resume to continue it"):
        prepare_data(_config(tmp_path, cache))
    assert prepare_data(_config(tmp_path, cache, stage="2", lr2=5e-4, epochs2=4, epochs1=9))
    with pytest.raises(ValueError, match="split_seed was 0, now 7"):
        prepare_data(_config(tmp_path, cache, stage="2", split_seed=7))
    for stage, finished in ((1, False), (2, False)):
        saved_state(stage, finished)
        with pytest.raises(ValueError, match="follows a finished stage 1 only"):
            prepare_data(_config(tmp_path, cache, stage="2"))
    (tmp_path / STATE_FILE).write_bytes(b"not a state")
    with pytest.raises(ValueError, match="holds a training run"):
        prepare_data(_config(tmp_path, cache, stage="2"))


def test_validation_data_that_is_training_data_is_refused(cache: Path) -> None:
    with pytest.raises(DatasetError, match=r"--val-data shares 1 case\(s\) with --data"):
        prepare_data(_config(Path("unused"), cache, val_data=[
            "phantoms:covid=1,seed=500,size=64,slices=24"]))


def test_fold_and_epoch_arguments_are_checked(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--data", TRAIN, "--out", str(tmp_path), "--fold", "abc"])
    base = ["--data", TRAIN, "--out", str(tmp_path), "--device", "cpu"]
    assert run_train_command(parser.parse_args([*base, "--fold", "1"])) == 2  # no --folds
    assert run_train_command(parser.parse_args([*base, "--epochs1", "0"])) == 2
    assert run_train_command(parser.parse_args([*base, "--device", "cuda:7"])) == 2
    assert run_train_command(parser.parse_args([*base, "--field-of-view-mm", "40"])) == 2


def test_a_split_that_holds_out_no_one_says_so(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four phantoms, a fifth of each class: none held out, and the log says so (with
    anonymised data whose PatientID is one value for all, every case is one patient)."""
    _, val = prepare_data(_config(Path("unused"), cache, val_fraction=0.2))
    assert val is None
    assert "holds out none of 4 cases of 4 patients" in caplog.text


def test_a_resumed_run_validates_on_the_same_cases(tmp_path: Path, cache: Path) -> None:
    """The validation cases are recorded; resumed on data that now splits otherwise (a
    node index with more reviewed SEGs, another --val-data) the run stops, as it would
    validate on cases it trained on."""
    train, val = _sources(cache)
    Trainer(_config(tmp_path, cache), train, val)._check_validation_cases()
    assert json.loads((tmp_path / "validation_cases.json").read_text()) == sorted(
        val.case_ids())
    Trainer(_config(tmp_path, cache, resume=True), train, val)._check_validation_cases()
    other = open_data(["phantoms:covid=1,cap=1,normal=1,seed=9001,size=64,slices=24"], cache)
    with pytest.raises(DatasetError, match="validated on other cases .3 of today's are new"):
        Trainer(_config(tmp_path, cache, resume=True), train, other).run()


def test_bad_data_is_a_clean_error(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data", "phantoms:flu=3", "--out", str(tmp_path)])
    assert run_train_command(args) == 2


def test_resume_drops_metrics_rows_ahead_of_its_state(tmp_path: Path, cache: Path) -> None:
    """Rows of epochs after the resumed state, a row cut short by the kill among them,
    go; the file's own columns stay."""
    (tmp_path / "metrics.csv").write_text("stage,epoch,lr\n1,1,0.1\n1,2,0.1\n2,1,0.01\n2")
    trainer = Trainer(_config(tmp_path, cache), *_sources(cache))
    trainer._drop_metrics_after(1, 2)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "stage,epoch,lr", "1,1,0.1", "1,2,0.1"]


def test_a_first_epoch_killed_before_its_state_leaves_one_row_per_epoch(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after its metrics row and before any resume state, a run starts afresh on
    `--resume` (nothing to resume from); the row of the killed epoch was kept and the
    epoch written twice. So was a `--stage 2` begun again after its stage 1."""
    def killed(self: Trainer, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_state", killed)
        with pytest.raises(KeyboardInterrupt):
            Trainer(_config(tmp_path, cache, stage="1"), *_sources(cache)).run()
    assert [(r["stage"], r["epoch"]) for r in _rows(tmp_path / "metrics.csv")] == [("1", "1")]
    Trainer(_config(tmp_path, cache, stage="1", resume=True), *_sources(cache)).run()
    assert [(r["stage"], r["epoch"]) for r in _rows(tmp_path / "metrics.csv")] == [
        ("1", "1"), ("1", "2")]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_state", killed)
        with pytest.raises(KeyboardInterrupt):
            Trainer(_config(tmp_path, cache, stage="2"), *_sources(cache)).run()
    Trainer(_config(tmp_path, cache, stage="2"), *_sources(cache)).run()
    rows = [(r["stage"], r["epoch"]) for r in _rows(tmp_path / "metrics.csv")]
    assert rows == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    # a stage 2 begun again but refused (weights of another size) leaves the rows alone
    tiny = tmp_path / "stage1.pt"
    with pytest.raises(DatasetError, match="holds a 'tiny' model"):
        Trainer(_config(tmp_path, cache, stage="2", size="lite", init=(tiny,)),
                *_sources(cache)).run()
    assert [(r["stage"], r["epoch"]) for r in _rows(tmp_path / "metrics.csv")] == rows


def test_a_resumed_stage_two_alone_still_names_its_stage_one_weights(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hash of the folder's stage-1 model was taken only where stage 2 began, so a
    resumed stage 2 recorded none: its provenance differed from the uninterrupted run's."""
    train = open_data([TRAIN], cache)  # no validation: the last epoch, the resumed run's
    Trainer(_config(tmp_path, cache, stage="1", epochs1=1), train, None).run()
    stage1_sha = file_sha256(tmp_path / "stage1.pt")
    end_epoch = Trainer._end_epoch

    def interrupted(self: Trainer, *args: object, **kwargs: object) -> None:
        end_epoch(self, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_end_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            Trainer(_config(tmp_path, cache, stage="2"), train, None).run()
    final = Trainer(_config(tmp_path, cache, stage="2", resume=True), train, None).run()
    assert load_checkpoint(final).provenance.extra["init_sha256"] == [stage1_sha]


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path: Path, cache: Path) -> None:
    """Each step takes one batch per process: resumed by another process count (GPUs
    under torchrun), the effective batch and the schedule would change mid-run."""
    train = open_data([TRAIN], cache)
    Trainer(_config(tmp_path, cache, stage="1", epochs1=1), train, None).run()
    two = Dist(rank=0, world=2)
    refused = r"trained by 1 process\(es\), now 2.*--nproc_per_node 1"
    with pytest.raises(DatasetError, match=refused):
        Trainer(_config(tmp_path, cache, stage="1", epochs1=1, resume=True), train, None,
                info=two).run()


def test_a_stage_two_that_would_train_nothing_is_refused_before_stage_one() -> None:
    """A segmentation-only model trains at --lr2 alone: --lr2 0 with --lr2-cls passed the
    check and failed only after stage 1 had trained."""
    with pytest.raises(ValueError, match="stage 2 of a seg model would train nothing"):
        TrainConfig(data=[TRAIN], out=Path("x"), task="seg", lr2=0.0, lr2_cls=1e-3)
    with pytest.raises(ValueError, match="stage 2 of a cls model would train nothing"):
        TrainConfig(data=[TRAIN], out=Path("x"), task="cls", lr2=1e-4, lr2_cls=0.0)
    TrainConfig(data=[TRAIN], out=Path("x"), task="joint", lr2=0.0, lr2_cls=1e-3)
    TrainConfig(data=[TRAIN], out=Path("x"), task="seg", lr2=0.0, stage="1")


def test_init_weights_of_another_size_are_refused_by_name(tmp_path: Path, cache: Path) -> None:
    train = open_data([TRAIN], cache)
    tiny = Trainer(_config(tmp_path / "tiny", cache, stage="1", epochs1=1), train, None).run()
    lite = _config(tmp_path / "lite", cache, size="lite", stage="2", init=(tiny,))
    with pytest.raises(DatasetError, match="holds a 'tiny' model; this run trains 'lite'"):
        Trainer(lite, train, None).run()


def test_an_out_that_cannot_be_a_folder_fails_before_any_scan(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --out that is a file failed with a traceback-like status 1 after every scan."""
    checkpoint = Trainer(_config(tmp_path / "run", cache, stage="1", epochs1=1),
                         open_data([TRAIN], cache), None).run()
    (tmp_path / "afile").write_text("")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a scan was evaluated")

    monkeypatch.setattr(trainer_module, "_case_result", never)
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(checkpoint), "--data", HELD_OUT, "--out",
                              str(tmp_path / "afile"), "--device", "cpu", "--workers", "0",
                              "--cache-dir", str(cache)])
    assert run_evaluate_command(args) == 2
    args.out, args.overlays = tmp_path / "eval", -1  # nor a negative number of examples
    assert run_evaluate_command(args) == 2
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data", TRAIN, "--out", str(tmp_path / "afile"), "--size",
                              "tiny", "--device", "cpu", "--cache-dir", str(cache)])
    assert run_train_command(args) == 2


def test_truth_lungs_says_where_the_data_had_none(tmp_path: Path, cache: Path) -> None:
    """Data without lung masks get the node's; --truth-lungs recorded true regardless."""
    checkpoint = Trainer(_config(tmp_path / "run", cache, stage="1", epochs1=1),
                         open_data([TRAIN], cache), None).run()
    for spec, segmented in ((HELD_OUT, False), (f"{HELD_OUT},lungs=node", True)):
        out = tmp_path / ("node" if segmented else "own")
        evaluate(checkpoint, [spec], out, device="cpu", workers=0, cache_dir=cache,
                 truth_lungs=True)
        report = json.loads((out / "evaluation.json").read_text())
        n = report["summary"]["n_scans"]
        assert len(report["lungs_segmented"]) == (n if segmented else 0)
        said = "have no lung mask of their own" in (out / "evaluation.txt").read_text()
        assert said == segmented

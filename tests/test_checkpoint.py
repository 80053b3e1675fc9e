"""Checkpoints: round trip, provenance, and refusal of anything that does not match."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from ai.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    Provenance,
    WeightsMissing,
    check_compatible,
    default_checkpoint_path,
    file_sha256,
    load_checkpoint,
    preprocess_config_for,
    resolve_device,
    save_checkpoint,
)
from ai.labels import CLASS_NAMES
from ai.model import ModelConfig, build_model
from ai.preprocess import PreprocessConfig

torch.set_num_threads(1)


class Foreign:
    """Any class: unpickling it would mean running code named by the file."""


def make(task: str = "joint") -> Any:
    torch.manual_seed(0)
    return build_model(ModelConfig.named("tiny", task))


def provenance() -> Provenance:
    return Provenance.now("phantoms n=4 seed=1", seed=1, command="test", extra={"epochs": 2})


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = make()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, preprocess_config_for(model.config), provenance(), {"dsc": 0.5})
    return path


def rewrite(path: Path, change: Any) -> None:
    """Load the raw dict, let `change` edit it, save it back."""
    raw = torch.load(path, weights_only=True)
    change(raw)
    torch.save(raw, path)


def test_round_trip(saved: Path) -> None:
    ckpt = load_checkpoint(saved, "cpu")
    model = make()
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v), k
    assert ckpt.model_config == model.config
    assert ckpt.preprocess == preprocess_config_for(model.config)
    assert ckpt.class_names == CLASS_NAMES
    assert ckpt.metrics == {"dsc": 0.5}
    assert ckpt.provenance.data == "phantoms n=4 seed=1" and ckpt.provenance.seed == 1
    assert ckpt.provenance.extra == {"epochs": 2} and ckpt.provenance.command == "test"
    assert ckpt.format_version == FORMAT_VERSION
    assert ckpt.sha256 == file_sha256(saved) and ckpt.info["checkpoint_sha256"] == ckpt.sha256
    assert not ckpt.model.training
    assert ckpt.info["parameters"] == 49_231 and ckpt.info["size"] == "tiny"


def test_save_returns_the_file_hash_and_leaves_no_temp_files(tmp_path: Path) -> None:
    model = make()
    path = tmp_path / "sub" / "m.pt"
    digest = save_checkpoint(path, model, preprocess_config_for(model.config), provenance())
    assert digest == file_sha256(path)
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]


def test_a_checkpoint_gets_the_mode_of_any_new_file(tmp_path: Path) -> None:
    """mkstemp made stage1.pt, stage2.pt and last.pt 0600: a node run by another user
    could not serve them."""
    model = make()
    mask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "m.pt", model, preprocess_config_for(model.config),
                        provenance())
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o644


def test_single_task_checkpoints_round_trip(tmp_path: Path) -> None:
    model = make("seg")
    save_checkpoint(tmp_path / "s.pt", model, preprocess_config_for(model.config), provenance())
    assert load_checkpoint(tmp_path / "s.pt").model.classifier is None


def test_missing_file_names_how_to_get_weights(tmp_path: Path, monkeypatch: Any) -> None:
    with pytest.raises(WeightsMissing, match="dicomnode train"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(WeightsMissing, match="is a folder, not a checkpoint: .*model.pt"):
        load_checkpoint(tmp_path)  # a training run's folder
    monkeypatch.setattr("ai.checkpoint.default_checkpoint_path", lambda: tmp_path / "d.pt")
    with pytest.raises(WeightsMissing, match="default checkpoint .* not installed"):
        load_checkpoint(None)


def test_default_path_is_package_data() -> None:
    path = default_checkpoint_path()
    assert path.parts[-3:] == ("ai", "weights", "deepsc-lite.pt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.update(format_version=FORMAT_VERSION + 1), "format version"),
        (lambda raw: raw.pop("metrics"), "lacks metrics"),
        (lambda raw: raw.update(format="other"), "not a dicomnode checkpoint"),
        (lambda raw: raw.update(class_names=["COVID-19", "other", "normal"]), "classes"),
        (lambda raw: raw["state_dict"].pop("classifier.fc.bias"), "do not fit"),
        (
            lambda raw: raw["state_dict"].update({"classifier.fc.bias": torch.zeros(4)}),
            "do not fit",
        ),
        (lambda raw: raw["state_dict"]["classifier.fc.bias"].fill_(float("nan")), "non-finite"),
        (lambda raw: raw["model_config"].update(seg_widths=[8, 8, 32]), "do not fit"),
        (lambda raw: raw["model_config"].pop("eta"), "missing"),
        (lambda raw: raw["preprocess_config"].update(cls_size=[32, 32]), "preprocessing"),
        (lambda raw: raw["provenance"].pop("seed"), "provenance lacks seed"),
    ],
)
def test_mismatched_files_are_refused(saved: Path, change: Any, message: str) -> None:
    rewrite(saved, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)


def test_non_tensor_objects_are_never_unpickled(saved: Path) -> None:
    raw = torch.load(saved, weights_only=True)
    raw["metrics"] = {"when": Foreign()}
    torch.save(raw, saved)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(saved)
    saved.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(saved)


def test_save_refuses_what_could_not_be_loaded(tmp_path: Path) -> None:
    model = make()
    prep = preprocess_config_for(model.config)
    with pytest.raises(TypeError, match="plain data"):
        save_checkpoint(tmp_path / "m.pt", model, prep, provenance(), {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="preprocessing"):
        save_checkpoint(tmp_path / "m.pt", model, PreprocessConfig(), provenance())
    assert not (tmp_path / "m.pt").exists()


def test_preprocessing_follows_the_model_geometry() -> None:
    lite = ModelConfig.named("lite")
    prep = preprocess_config_for(lite, seg_overlap=0.25)
    assert prep.cls_size == (128, 128) and prep.n_cls_slices == 48
    assert prep.seg_patch == (24, 128, 128) and prep.seg_inplane_size == (256, 256)
    assert prep.seg_overlap == 0.25
    check_compatible(lite, prep)
    paper = preprocess_config_for(ModelConfig.named("paper"))
    assert paper.seg_inplane_size == (512, 512) and paper.cls_size == (256, 256)
    with pytest.raises(ValueError, match="come from the model config"):
        preprocess_config_for(lite, seg_patch=(24, 64, 64))


def test_provenance_records_when_and_what() -> None:
    p = provenance()
    assert p.date.endswith("+00:00") and type(p.torch_version) is str
    assert p.git_commit is None or len(p.git_commit) == 40


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="expected auto"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")

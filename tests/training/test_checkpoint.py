"""Checkpoints: architecture + weights only, loaded with weights_only=True; pruned models round-trip."""

from __future__ import annotations

import pickle

import pytest
import torch

from pf_ray.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, sha256_of
from pf_ray.config import ModelConfig
from pf_ray.errors import CheckpointError
from pf_ray.models import build_model
from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.pruning import prune_channels_

SHAPE = (1, 8, 8)


def _model(name: str = "resnet20"):
    torch.manual_seed(0)
    return build_model(ModelConfig(name), in_channels=1, num_classes=10).eval()


def _save(path, model, name: str = "resnet20"):
    return save_checkpoint(path, model, model_config=ModelConfig(name), input_shape=SHAPE, num_classes=10,
                           metrics={"accuracy": 0.5}, extra={"note": "test"})


def test_round_trip_gives_identical_outputs(tmp_path):
    model = _model()
    path = _save(tmp_path / "model.pt", model)
    loaded, info = load_checkpoint(path)
    inputs = torch.randn(4, *SHAPE)
    assert torch.equal(model(inputs), loaded(inputs))
    assert info.metrics == {"accuracy": 0.5} and info.extra == {"note": "test"}
    assert info.sha256 == sha256_of(path) and len(info.sha256) == 64


def test_pruned_model_is_rebuilt_with_its_smaller_layers(tmp_path):
    model = _model()
    prune_channels_(model, SHAPE, [0.5] * len(prunable_groups(model, SHAPE)), round_to=4)
    path = _save(tmp_path / "pruned.pt", model)
    loaded, _ = load_checkpoint(path)
    inputs = torch.randn(4, *SHAPE)
    assert torch.allclose(model(inputs), loaded(inputs))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_depth_and_width_pruned_model_is_rebuilt_from_its_checkpoint(tmp_path):
    from pf_ray.ops.blocks import remove_blocks_, removed_blocks

    model = _model()
    remove_blocks_(model, SHAPE, ["layer1.1", "layer3.2"])
    prune_channels_(model, SHAPE, [0.5] * len(prunable_groups(model, SHAPE)), round_to=4)
    path = _save(tmp_path / "depth.pt", model)
    loaded, info = load_checkpoint(path)
    assert info.removed_blocks == ("layer1.1", "layer3.2") == tuple(removed_blocks(loaded))
    inputs = torch.randn(4, *SHAPE)
    assert torch.allclose(model(inputs), loaded(inputs))
    assert read_checkpoint(_save(tmp_path / "plain.pt", _model()))[0].removed_blocks == ()


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    _save(tmp_path / "model.pt", _model())
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_missing_corrupt_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(corrupt)
    foreign = tmp_path / "state_dict.pt"
    torch.save(_model().state_dict(), foreign)
    with pytest.raises(CheckpointError, match="is not a pf-ray checkpoint"):
        read_checkpoint(foreign)


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: run code on load
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "pf-ray-checkpoint/1", "payload": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_wrong_input_shape_classes_or_architecture(tmp_path):
    path = _save(tmp_path / "model.pt", _model())
    with pytest.raises(CheckpointError, match=r"trained on inputs \(1, 8, 8\); the dataset gives \(3, 32, 32\)"):
        load_checkpoint(path, expect_input_shape=(3, 32, 32))
    with pytest.raises(CheckpointError, match="has 10 classes; the dataset has 5"):
        load_checkpoint(path, expect_num_classes=5)
    # MobileNet weights under a ResNet-20 header.
    wrong = save_checkpoint(tmp_path / "wrong.pt", _model("mobilenet_v2"), model_config=ModelConfig("resnet20"),
                            input_shape=SHAPE, num_classes=10)
    with pytest.raises(CheckpointError, match="does not match model 'resnet20'"):
        load_checkpoint(wrong)


def test_a_user_model_named_by_a_checkpoint_runs_only_when_the_caller_names_it(tmp_path):
    marker = tmp_path / "imported"
    module = tmp_path / "net.py"
    module.write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()  # importing this file leaves a trace\n"
        "import torch\n"
        "def build(in_channels, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(4 * 6 * 6, num_classes))\n")
    name = f"{module}:build"
    # The same network built here, so that writing the checkpoint does not import the file.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    path = save_checkpoint(tmp_path / "user.pt", model, model_config=ModelConfig(name), input_shape=(1, 8, 8),
                           num_classes=3)
    for named in (None, f"{tmp_path / 'other.py'}:build"):
        with pytest.raises(CheckpointError, match="names the user model .*imports only when you name it"):
            load_checkpoint(path, user_model=named)
        assert not marker.exists()  # refused before any import
    loaded, info = load_checkpoint(path, user_model=name)
    assert marker.exists() and info.model.name == name
    assert torch.equal(loaded(torch.ones(1, 1, 8, 8)), model.eval()(torch.ones(1, 1, 8, 8)))

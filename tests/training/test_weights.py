"""The user's own weights (``pf_ray.weights``, ``baseline.checkpoint`` naming a plain state dict): loaded with
``weights_only=True``, head and stem adapted and said so, another architecture's weights refused by key."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pf_ray.checkpoint import load_checkpoint
from pf_ray.cli import EXIT_BAD_INPUT, main
from pf_ray.config import ModelConfig, load_experiment
from pf_ray.errors import CheckpointError
from pf_ray.launch.preflight import preflight
from pf_ray.models import build_model
from pf_ray.weights import load_state_dict_into, plain_state_dict, read_weights_file

DIGITS = (1, 8, 8)


def _train(tmp_path, weights, model: str, *extra: str) -> list[str]:
    """``pf-ray train`` on digits with ``baseline.checkpoint`` = ``weights``: a tiny, one-epoch schedule."""
    argv = ["train"]
    for override in (f"storage.path={tmp_path / 'runs'}", "dataset.name=digits", f"model.name={model}",
                     f"baseline.checkpoint={weights}", "baseline.train.epochs=1", "baseline.train.train_subset=64",
                     "baseline.train.batch_size=32", "resources.num_cpus=1", *extra):
        argv += ["--set", override]
    return argv


def test_an_untrained_torchvision_state_dict_from_disk_becomes_the_baseline(tmp_path, capsys):
    """ImageNet's shapes (3 channels, 1000 classes) onto digits (1 channel, 10 classes): the stem is summed over
    RGB, the head re-initialised, both logged with their shapes, and the result trained and cached."""
    torch.manual_seed(0)
    given = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(given, path)
    assert main(_train(tmp_path, path, "torchvision_resnet18")) == 0
    out = capsys.readouterr().out
    assert "conv1.weight: (64, 3, 7, 7) in the file -> (64, 1, 7, 7) summed over its 3 input channels" in out
    assert "fc.weight: (1000, 512) in the file -> (10, 512) re-initialised (classifier head, 10 classes)" in out
    assert "fc.bias: (1000,) in the file -> (10,) re-initialised" in out
    assert "layers were re-initialised; from the given weights, training torchvision_resnet18 on " in out
    [saved] = (tmp_path / "runs" / "baselines").glob("torchvision_resnet18-digits-imported-*.pt")
    model, info = load_checkpoint(saved, expect_input_shape=DIGITS, expect_num_classes=10)
    assert info.extra["weights"]["file"] == str(path) and len(info.extra["weights"]["changes"]) == 3
    assert model.fc.out_features == 10 and model.conv1.in_channels == 1
    # cached: a second run uses it without loading or training again
    assert main(_train(tmp_path, path, "torchvision_resnet18")) == 0
    assert f"baseline: using {saved} (imported from {path})" in capsys.readouterr().out
    # and `pf-ray compress` (its preflight) takes the same file as the baseline: the imported one, cached
    overrides = _train(tmp_path, path, "torchvision_resnet18", "learner.options.mode=uniform")[2::2]
    prepared = preflight(load_experiment(None, overrides), log=lambda line: None)
    assert prepared.baseline_path == saved


def test_weights_that_fit_are_the_baseline_as_they_are(tmp_path, capsys):
    torch.manual_seed(1)
    net = build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10)
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)  # wrapped, DDP keys
    assert main(_train(tmp_path, path, "resnet20")) == 0
    out = capsys.readouterr().out
    assert "every tensor as stored" in out and "training" not in out
    [saved] = (tmp_path / "runs" / "baselines").glob("resnet20-digits-imported-*.pt")
    model, _ = load_checkpoint(saved)
    for key, value in net.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_state_dict_of_another_architecture_names_the_first_key_and_both_shapes(tmp_path):
    model = build_model(ModelConfig("torchvision_mobilenet_v2"), in_channels=3, num_classes=10)
    other = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).state_dict()
    with pytest.raises(CheckpointError) as raised:
        load_state_dict_into(model, other, (3, 16, 16), model_name="torchvision_mobilenet_v2", path="w.pt")
    assert str(raised.value) == ("baseline.checkpoint: 'w.pt' is not a state dict of model 'torchvision_mobilenet_v2'"
                                 ": tensor 'features.0.0.weight' has shape (16, 3, 3, 3) in the file and "
                                 "(32, 3, 3, 3) in the model")
    resnet20 = build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10)
    resnet32 = build_model(ModelConfig("resnet32"), in_channels=1, num_classes=10)
    with pytest.raises(CheckpointError, match=r"has a tensor 'layer1.3.conv1.weight' \(shape \(16, 16, 3, 3\)\) "
                                              r"the model has not, and \d+ more"):
        load_state_dict_into(resnet20, resnet32.state_dict(), DIGITS, model_name="resnet20", path="w.pt")
    with pytest.raises(CheckpointError, match=r"has no tensor 'layer1.3.conv1.weight' \(shape \(16, 16, 3, 3\)\)"):
        load_state_dict_into(resnet32, resnet20.state_dict(), DIGITS, model_name="resnet32", path="w.pt")


def test_a_head_mismatch_outside_the_class_dimension_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    net(torch.zeros(1, 3, 6, 6))
    state = net.state_dict()
    state["2.weight"] = torch.zeros(5, 7)  # the features, not the classes, differ
    with pytest.raises(CheckpointError, match=r"tensor '2.weight' has shape \(5, 7\) in the file and \(5, 64\)"):
        load_state_dict_into(net, state, (3, 6, 6), model_name="net", path="w.pt")
    state = net.state_dict()
    state["0.weight"] = torch.zeros(4, 3, 3, 3)
    state["0.weight"][:, 0] = 1.0
    reference = {k: v.clone() for k, v in state.items()}
    two = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    loaded = load_state_dict_into(two, reference, (2, 6, 6), model_name="net", path="w.pt")
    assert loaded.changes == ("0.weight: (4, 3, 3, 3) in the file -> (4, 2, 3, 3) re-initialised (first layer, "
                              "2-channel input)",) and loaded.reinitialised
    assert torch.equal(two[2].weight, reference["2.weight"])


def test_a_whole_pickled_model_is_refused_pointing_to_the_state_dict(tmp_path, capfd):
    path = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(weights=None), path)
    with pytest.raises(CheckpointError) as raised:
        read_weights_file(path)
    message = str(raised.value)
    assert message.startswith(f"baseline.checkpoint: {str(path)!r} is a whole pickled model (a torchvision.models."
                              "resnet.ResNet), which only unpickling code could load")
    assert "save them with torch.save(model.state_dict(), path)" in message
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(_train(tmp_path, path, "torchvision_resnet18")) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "is a whole pickled model" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("payload", "what"), [
    ([torch.zeros(1)], "a list"),
    ({}, "an empty dict"),
    ({"weight": torch.zeros(1), "epoch": 3}, "a dict whose values are not all tensors"),
])
def test_what_is_not_a_state_dict_is_named(payload, what):
    with pytest.raises(CheckpointError, match=f"'w.pt' holds {what}; expected a pf-ray checkpoint or a state dict"):
        plain_state_dict(payload, "w.pt")

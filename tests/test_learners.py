"""Learner contract: every registered learner goes through prepare -> two SGD steps -> finalize."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pf_ray.config import ModelConfig, from_dict
from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, ModelError
from pf_ray.learners import build_learner, learner_config_class
from pf_ray.learners.channel_pruning import ChannelPruning, ChannelPruningConfig, search_dimensions
from pf_ray.models import build_model
from pf_ray.registry import LEARNERS

SHAPE = (1, 16, 16)


def _data(n: int = 16) -> DataBundle:
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(
        torch.randn(n, *SHAPE, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )
    return DataBundle(
        name="synthetic",
        train=dataset,
        validation=dataset,
        test=dataset,
        input_shape=SHAPE,
        num_classes=10,
        mean=(0.0,),
        std=(1.0,),
    )


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10)


@pytest.mark.parametrize("name", LEARNERS.names())
def test_learner_contract(name):
    data = _data()
    learner = build_learner(name, from_dict(learner_config_class(name), {}, path="learner.options"))
    model = learner.prepare(_resnet20(), data)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, labels = data.train.tensors
    for step in (1, 2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[:8]), labels[:8])
        loss.backward()
        optimizer.step()
        learner.on_step(model, step)
        assert torch.isfinite(loss)
    model = learner.finalize(model)
    model.eval()
    with torch.no_grad():
        assert model(inputs).shape == (16, 10)


def test_channel_pruning_prunes_in_prepare():
    learner = ChannelPruning(ChannelPruningConfig(keep_ratio=0.5, round_to=8))
    model = learner.prepare(_resnet20(), _data())
    assert model.conv1.out_channels == 8 and model.fc.in_features == 32
    assert learner.kept_channels["layer3.0.conv2"] == 32


def test_search_dimensions_are_the_group_names():
    names = search_dimensions(_resnet20(), SHAPE)
    assert len(names) == 12 and names[0] == "conv1" and "layer2.0.conv2" in names


def test_layer_keep_ratios_of_the_wrong_length_name_the_field():
    learner = ChannelPruning(ChannelPruningConfig(layer_keep_ratios=(0.5, 0.5)))
    with pytest.raises(ConfigError, match=r"learner\.options\.layer_keep_ratios: got 2 values; expected 12"):
        learner.prepare(_resnet20(), _data())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layer_keep_ratios": [0.5, 0.0]}, r"learner\.options\.layer_keep_ratios\[1\]: got 0\.0"),
        ({"keep_ratio": 1.5}, r"learner\.options\.keep_ratio: got 1\.5; allowed range is \(0, 1\]"),
        ({"round_to": 0}, r"learner\.options\.round_to: got 0"),
        ({"criterion": "lasso"}, r"learner\.options\.criterion: got 'lasso'; allowed: l1"),
        ({"min_keep_ratio": 0.0}, r"learner\.options\.min_keep_ratio: got 0\.0"),
        ({"keep_ratios": 0.5}, r"unknown field learner\.options\.keep_ratios"),
    ],
)
def test_channel_pruning_config_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ChannelPruningConfig, options, path="learner.options")


def test_list_becomes_a_tuple_of_ratios():
    config = from_dict(ChannelPruningConfig, {"layer_keep_ratios": [0.5, 1]}, path="learner.options")
    assert config.layer_keep_ratios == (0.5, 1.0)


def test_a_model_with_nothing_to_prune_is_a_model_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))  # its only layer produces the output
    with pytest.raises(ModelError, match="no prunable channel group"):
        ChannelPruning(ChannelPruningConfig()).prepare(model, _data())

"""The tiny setting the learner tests share: a synthetic DataBundle, ResNet-20 on 1x16x16, two SGD steps; and the
tiny CNN that uniform quantization's ops and learner tests both use."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pf_ray.config import ModelConfig
from pf_ray.data import DataBundle
from pf_ray.models import build_model

SHAPE = (1, 16, 16)


def tiny_data(shape: tuple[int, int, int] = SHAPE, n: int = 16) -> DataBundle:
    """``n`` random images of ``shape`` with random labels of 10 classes, the same set for every split."""
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(n, *shape, generator=generator),
                            torch.randint(0, 10, (n,), generator=generator))
    return DataBundle(name="synthetic", train=dataset, validation=dataset, test=dataset, input_shape=shape,
                      num_classes=10, mean=(0.0,), std=(1.0,))


def tiny_resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10)


def tiny_cnn() -> nn.Module:
    """conv (first, float) -> conv -> conv -> linear -> linear (last, float) on 1x8x8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )


def train_two_steps(learner, model: nn.Module, data: DataBundle, *, images: int = 8,
                    learning_rate: float = 0.01) -> nn.Module:
    """The learner contract's fine-tuning: two SGD steps on the first ``images`` images, ``on_step`` after each."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    inputs, labels = data.train.tensors
    for step in (1, 2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[:images]), labels[:images])
        loss.backward()
        optimizer.step()
        learner.on_step(model, step)
        assert torch.isfinite(loss)
    return model

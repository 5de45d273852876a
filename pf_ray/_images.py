"""Image tensors as ``load_data`` keeps them: per-channel statistics, normalisation, and uint8 images normalised
as they are read (a quarter of float32's memory)."""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


def _channel_statistics(
    images: torch.Tensor, index: torch.Tensor, chunk_values: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float64 sums, in chunks of about ``chunk_values`` pixel values: 32 MB of float64
    at any resolution) of ``images[index]``, scaled."""
    channels = images.shape[1]
    chunk = max(1, chunk_values // math.prod(images.shape[1:]))  # images per chunk
    total = torch.zeros(channels, dtype=torch.float64)
    total_squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(index), chunk):
        batch = _scaled(images[index[start : start + chunk]]).double()  # (n, C, H, W)
        total += batch.sum(dim=(0, 2, 3))
        total_squares += batch.square().sum(dim=(0, 2, 3))
    count = len(index) * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_squares / count - mean.square()).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)  # a constant channel would divide by zero


def _scaled(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((_scaled(images) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).contiguous()


class NormalisedImages(Dataset):
    """uint8 images (N, C, H, W) and their labels, given as normalised float32 ``(image, label)`` pairs when read:
    the same values as a ``TensorDataset`` of ``_normalise(images)``, in a quarter of the memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _normalise(self.images[index].unsqueeze(0), self.mean, self.std)[0], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch normalised at once (the DataLoader asks for batches this way)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(_normalise(self.images[index], self.mean, self.std), self.labels[index], strict=True))

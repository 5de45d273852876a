"""Memory of an image folder read at a given size: a generated folder of RGB JPEGs loaded with ``load_data``.

Usage: python bench/imagefolder_memory.py [--images 2000] [--size 96] [--folder DIR]

Prints the bytes the splits hold (uint8 images, normalised as they are read) next to what float32 tensors of the
same images would take, and the process's peak resident memory before and after loading (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def write_folder(root: Path, images: int, size: int, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(images):
        split = "val" if (index // classes) % 10 == 0 else "train"  # a tenth of each class held out
        folder = root / split / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size + 32, size + 48, 3), dtype=np.uint8)  # larger than size: resized
        Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--folder", help="an existing image folder (default: generate one in a temporary folder)")
    args = parser.parse_args()

    import torch

    from pf_ray.config import DatasetConfig
    from pf_ray.data import load_data

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(args.folder or temporary)
        if not args.folder:
            write_folder(root, args.images, args.size)
        import torchvision.datasets  # noqa: F401  (the libraries' own memory counted before loading)
        import torchvision.transforms  # noqa: F401

        torch.zeros(1)
        before = peak_mb()
        started = time.perf_counter()
        bundle = load_data(DatasetConfig("imagefolder", data_dir=str(root), image_size=args.size))
        seconds = time.perf_counter() - started
        after = peak_mb()
    splits = (bundle.train, bundle.validation, bundle.test)
    count = sum(len(split) for split in splits)
    held = sum(split.images.numel() * split.images.element_size() for split in splits)
    print(f"{count} images at {bundle.input_shape}: held {held / 2**20:.1f} MiB as uint8 "
          f"(float32: {4 * held / 2**20:.1f} MiB); peak RSS {before:.0f} -> {after:.0f} MiB "
          f"(+{after - before:.0f}); loaded in {seconds:.1f} s")


if __name__ == "__main__":
    main()

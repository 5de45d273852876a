"""Datasets: fashion_mnist, cifar10, imagefolder, digits (embedded), synthetic (tests).

Xiao et al., "Fashion-MNIST", 2017; Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
``load_data`` returns a ``DataBundle`` of datasets that give normalised float32 images; nothing is downloaded
unless a dataset is found nowhere on disk (see each loader).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from pf_ray._images import NormalisedImages, _channel_statistics, _normalise
from pf_ray.config import DatasetConfig
from pf_ray.errors import ConfigError, DataError
from pf_ray.registry import DATASETS


@dataclass(frozen=True)
class DataBundle:
    name: str
    train: Dataset  # the training set minus the validation split
    validation: Dataset  # carved from the training set: what the search scores on
    test: Dataset  # used only for the final report
    input_shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int
    mean: tuple[float, ...]  # per-channel normalisation already applied to the tensors
    std: tuple[float, ...]


# --------------------------------------------------------------------------------------------------------------
# load_data: the one entry point. Loaders return the raw train/test split; the splitting, subsetting and
# normalisation below are shared, so every dataset follows the same rules.


@dataclass(frozen=True)
class RawData:
    """What a loader returns: images (N, C, H, W), uint8 in [0, 255] or float32 already scaled."""

    train_images: torch.Tensor
    train_labels: torch.Tensor  # (N,) integer class indices
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def load_data(config: DatasetConfig, *, seed: int = 0) -> DataBundle:
    """Load ``config.name`` as normalised float32 TensorDatasets: train, validation, test.

    - The train/test split is the dataset's own and is the same for every ``seed``.
    - The validation split is the first ``round(validation_fraction * N)`` (at least 1) training examples after a
      permutation seeded by ``seed``; ``train_subset`` keeps at most the first N of the rest, ``test_subset``
      at most the first N test examples.
    - uint8 images are scaled to [0, 1]; then each channel is normalised with the mean and standard deviation of
      the training split (after the validation split is removed, before ``train_subset``, so a subset does not
      change the normalisation). They are recorded in ``DataBundle.mean`` / ``std``.
    - uint8 images (fashion_mnist, cifar10, imagefolder) stay uint8 in memory and are normalised when read
      (``NormalisedImages``); float32 ones (digits, synthetic) are normalised once into a ``TensorDataset``.

    Raises:
        ConfigError: unknown dataset name.
        DataError: files missing or corrupt, wrong shapes, empty splits.
    """
    try:
        loader = DATASETS.get(config.name)
    except ConfigError as error:
        raise ConfigError(f"dataset.name: {error}") from None
    raw = loader(config)
    _check_raw(config.name, raw)

    generator = torch.Generator().manual_seed(seed)
    num_train = len(raw.train_labels)
    order = torch.randperm(num_train, generator=generator)
    num_validation = max(1, round(config.validation_fraction * num_train))
    if num_validation >= num_train:
        raise DataError(
            f"dataset {config.name!r} has {num_train} training examples: too few to carve a "
            f"validation split of {config.validation_fraction:g} (dataset.validation_fraction)"
        )
    validation_index = order[:num_validation]
    train_pool = order[num_validation:]
    train_index = train_pool[: config.train_subset]  # None keeps all
    num_test = len(raw.test_labels) if config.test_subset is None else min(config.test_subset, len(raw.test_labels))

    mean, std = _channel_statistics(raw.train_images, train_pool)

    def dataset(images: torch.Tensor, labels: torch.Tensor) -> Dataset:
        if images.dtype == torch.uint8:  # a quarter of float32's memory: normalised as it is read
            return NormalisedImages(images, labels.long(), mean, std)
        return TensorDataset(_normalise(images, mean, std), labels.long())

    return DataBundle(
        name=config.name,
        train=dataset(raw.train_images[train_index], raw.train_labels[train_index]),
        validation=dataset(raw.train_images[validation_index], raw.train_labels[validation_index]),
        test=dataset(raw.test_images[:num_test], raw.test_labels[:num_test]),
        input_shape=tuple(raw.train_images.shape[1:]),
        num_classes=raw.num_classes,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


def _check_raw(name: str, raw: RawData) -> None:
    for split in ("train", "test"):
        images, labels = getattr(raw, f"{split}_images"), getattr(raw, f"{split}_labels")
        if images.dim() != 4:
            raise DataError(
                f"dataset {name!r}: {split} images have shape {tuple(images.shape)}; "
                "expected (N, channels, height, width)"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise DataError(
                f"dataset {name!r}: {len(images)} {split} images but labels of shape "
                f"{tuple(labels.shape)}; expected ({len(images)},)"
            )
        if len(images) == 0:
            raise DataError(f"dataset {name!r}: the {split} split is empty")
        if labels.is_floating_point() or labels.min() < 0 or labels.max() >= raw.num_classes:
            raise DataError(
                f"dataset {name!r}: {split} labels must be integers in [0, {raw.num_classes}); "
                f"got {labels.min().item()}..{labels.max().item()}"
            )
    if raw.train_images.shape[1:] != raw.test_images.shape[1:]:
        raise DataError(
            f"dataset {name!r}: train images are {tuple(raw.train_images.shape[1:])} but test "
            f"images {tuple(raw.test_images.shape[1:])}"
        )


# --------------------------------------------------------------------------------------------------------------
# Where datasets are looked for.


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "pf_ray"


def _data_folder(data_dir: str) -> Path:
    """``dataset.data_dir`` as a folder that exists (DataError naming what is there instead)."""
    folder = Path(data_dir).expanduser()
    if folder.is_file():
        raise DataError(f"dataset.data_dir: {data_dir!r} is a file; expected a folder holding the dataset's files")
    if not folder.is_dir():
        raise DataError(f"dataset.data_dir: {data_dir!r} does not exist")
    return folder


def _search_roots(config: DatasetConfig) -> list[Path]:
    """``config.data_dir`` alone when given (it must exist); else $PF_RAY_DATA, then the shared cache."""
    if config.data_dir is not None:
        return [_data_folder(config.data_dir)]
    roots = []
    if os.environ.get("PF_RAY_DATA"):
        roots.append(Path(os.environ["PF_RAY_DATA"]).expanduser())
    return roots


def _not_found(name: str, searched: list[Path], hint: str, error: Exception | None = None) -> DataError:
    """One line (the CLI prints bad input as one line): the places searched, the download's failure, a hint."""
    places = ", ".join(str(place) for place in searched)
    reason = f"; the download failed too: {type(error).__name__}: {_first_line(error)}" if error else ""
    return DataError(f"dataset {name!r} not found; searched: {places}{reason}; {hint}")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------------------------------------------
# fashion_mnist: the original IDX files (Xiao et al. 2017), read directly.

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


@DATASETS.register("fashion_mnist")
def fashion_mnist(config: DatasetConfig) -> RawData:
    """Fashion-MNIST: 60000 + 10000 grayscale 28x28 images, 10 classes.

    Looked for, in order: ``data_dir`` (only there when given), ``$PF_RAY_DATA``, Debian's
    ``/usr/share/datasets/fashion-mnist``, torchvision's ``FashionMNIST/raw`` layout in ``~/.cache/pf_ray``;
    each folder also as ``<folder>/fashion-mnist`` and ``<folder>/FashionMNIST/raw``. Only as a last resort is it
    downloaded (torchvision) into that cache. Files may be gzip'd or not.
    """
    roots = _search_roots(config)
    if config.data_dir is None:
        roots += [DEBIAN_FASHION_MNIST, _cache_dir()]
    searched = [folder for root in roots for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw")]
    for folder in searched:
        files = _find_idx_files(folder)
        if files is not None:
            return _read_fashion_mnist(files)
    hint = (
        "hint: apt-get install dataset-fashion-mnist, or set dataset.data_dir / $PF_RAY_DATA to a folder "
        "holding " + ", ".join(f"{name}(.gz)" for name in FASHION_MNIST_FILES.values())
    )
    if config.data_dir is not None:
        raise _not_found("fashion_mnist", searched, hint)
    try:
        _download_fashion_mnist(_cache_dir())
    except Exception as error:
        raise _not_found("fashion_mnist", searched, hint, error) from error
    files = _find_idx_files(_cache_dir() / "FashionMNIST" / "raw")
    if files is None:
        raise _not_found("fashion_mnist", searched, hint)
    return _read_fashion_mnist(files)


def _download_fashion_mnist(root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (plain preferred over .gz), or None unless all four are there."""
    found = {}
    for key, stem in FASHION_MNIST_FILES.items():
        candidates = [folder / stem, folder / f"{stem}.gz"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _read_fashion_mnist(files: dict[str, Path]) -> RawData:
    train_images = _read_idx(files["train_images"], IDX_IMAGES_MAGIC)
    train_labels = _read_idx(files["train_labels"], IDX_LABELS_MAGIC)
    test_images = _read_idx(files["test_images"], IDX_IMAGES_MAGIC)
    test_labels = _read_idx(files["test_labels"], IDX_LABELS_MAGIC)
    for images, labels, split in ((train_images, train_labels, "train"), (test_images, test_labels, "test")):
        if len(images) != len(labels):
            raise DataError(
                f"fashion_mnist: {files[f'{split}_images']} holds {len(images)} images but "
                f"{files[f'{split}_labels']} {len(labels)} labels"
            )
    return RawData(
        train_images.unsqueeze(1), train_labels.long(), test_images.unsqueeze(1), test_labels.long(), num_classes=10
    )


def _read_idx(path: Path, magic: int) -> torch.Tensor:
    """An IDX file of unsigned bytes: big-endian int32 magic, one int32 size per dimension, then the data."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as file:
            content = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    num_dims = magic - 2048  # 2049 -> 1 dimension (labels), 2051 -> 3 (images)
    header = 4 + 4 * num_dims
    if len(content) < header or int.from_bytes(content[:4], "big") != magic:
        found = int.from_bytes(content[:4], "big") if len(content) >= 4 else None
        raise DataError(f"{path}: not an IDX file of this kind: magic number {found}, expected {magic}")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    expected = header + math.prod(shape)
    if len(content) != expected:
        raise DataError(f"{path}: {len(content)} bytes; the header's shape {shape} needs {expected}")
    data = torch.frombuffer(bytearray(content[header:]), dtype=torch.uint8)
    return data.view(shape)


# --------------------------------------------------------------------------------------------------------------
# cifar10: torchvision's "cifar-10-batches-py" folder (Krizhevsky 2009), read directly.

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


@DATASETS.register("cifar10")
def cifar10(config: DatasetConfig) -> RawData:
    """CIFAR-10: 50000 + 10000 colour 32x32 images, 10 classes.

    Looked for as ``cifar-10-batches-py`` (or the folder itself) in ``data_dir`` (only there when given),
    ``$PF_RAY_DATA`` and ``~/.cache/pf_ray``; only as a last resort downloaded (torchvision) into that cache.
    The batches are Python pickles: load only folders you trust.
    """
    roots = _search_roots(config)
    if config.data_dir is None:
        roots.append(_cache_dir())
    searched = [folder for root in roots for folder in (root / CIFAR10_FOLDER, root)]
    for folder in searched:
        if (folder / CIFAR10_TEST_FILE).is_file():
            return _read_cifar10(folder)
    hint = (
        f"hint: set dataset.data_dir or $PF_RAY_DATA to a folder holding {CIFAR10_FOLDER}/ "
        "(torchvision's CIFAR10 layout)"
    )
    if config.data_dir is not None:
        raise _not_found("cifar10", searched, hint)
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(str(_cache_dir()), train=True, download=True)
    except Exception as error:
        raise _not_found("cifar10", searched, hint, error) from error
    return _read_cifar10(_cache_dir() / CIFAR10_FOLDER)


def _read_cifar10(folder: Path) -> RawData:
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    test_images, test_labels = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    return RawData(
        torch.cat([images for images, _ in train]),
        torch.cat([labels for _, labels in train]),
        test_images,
        test_labels,
        num_classes=10,
    )


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch: ``data`` (N, 3072) uint8 rows (R, G, B planes of 32x32), ``labels`` (N,)."""
    try:
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="latin1")
        data, labels = batch["data"], batch["labels"]
    except FileNotFoundError:
        raise DataError(
            f"{path}: missing (a CIFAR-10 folder holds {', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE})"
        ) from None
    except Exception as error:
        raise DataError(f"{path}: not a CIFAR-10 batch ({type(error).__name__}: {error})") from error
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(
            f"{path}: data of shape {data.shape} with {len(labels)} labels; expected (N, 3072) and N labels"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------------------------------------------
# imagefolder: class subfolders, as torchvision's ImageFolder reads them.

IMAGEFOLDER_SIZE = 32  # without dataset.image_size: at most this many pixels square (CIFAR's size)


@DATASETS.register("imagefolder")
def imagefolder(config: DatasetConfig) -> RawData:
    """``data_dir/train/<class>/*.png`` and ``data_dir/val/<class>/...`` (or ``test/``), held in memory as uint8.

    Every image becomes a square of ``dataset.image_size`` pixels (its shorter side resized to that, up or down,
    and the centre cropped); without one, of ``min(32, smallest side among all images)``: small datasets stay at
    their own resolution, large photos shrink to CIFAR size. Grayscale folders (every image in mode "L" or "1")
    give 1 channel, all others RGB (3). Memory: N x C x size x size bytes (2000 RGB images at 96: 55 MB).
    """
    if config.data_dir is None:
        raise DataError(
            "dataset.data_dir: got None; the imagefolder dataset needs a folder with train/ and "
            "val/ (or test/) class subfolders"
        )
    root = _data_folder(config.data_dir)
    train_dir = root / "train"
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"dataset.data_dir: {config.data_dir!r} needs subfolders train/ and val/ (or test/); "
            f"found: {', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())) or 'none'}"
        )

    from PIL import Image
    from torchvision import datasets, transforms

    folders = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        try:
            folders[split] = datasets.ImageFolder(str(folder))
        except (FileNotFoundError, OSError) as error:
            raise DataError(f"{folder}: {error}") from error
    if folders["train"].classes != folders["test"].classes:
        raise DataError(
            f"{train_dir} has classes {folders['train'].classes} but {test_dir} "
            f"{folders['test'].classes}; they must match"
        )

    # One pass over the headers (PIL reads no pixels here) decides the size and the channel count.
    smallest, grayscale = IMAGEFOLDER_SIZE, True
    for folder in folders.values():
        for path, _ in folder.samples:
            try:
                with Image.open(path) as image:
                    smallest = min(smallest, *image.size)
                    grayscale = grayscale and image.mode in ("L", "1")
            except OSError as error:
                raise DataError(f"{path}: not a readable image ({error})") from error
    size = config.image_size or smallest
    mode = "L" if grayscale else "RGB"
    transform = transforms.Compose(
        [transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()]
    )  # uint8 (C, size, size)

    def read(folder: datasets.ImageFolder) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.empty(len(folder.samples), 1 if grayscale else 3, size, size, dtype=torch.uint8)
        for index, (path, _) in enumerate(folder.samples):  # filled in place: no second copy to stack
            with Image.open(path) as image:
                images[index] = transform(image.convert(mode))
        return images, torch.as_tensor(folder.targets, dtype=torch.long)

    train_images, train_labels = read(folders["train"])
    test_images, test_labels = read(folders["test"])
    return RawData(train_images, train_labels, test_images, test_labels, num_classes=len(folders["train"].classes))


# --------------------------------------------------------------------------------------------------------------
# digits and synthetic: embedded, nothing to find.

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed: the test set is the same for every run, like the other datasets' test sets


@DATASETS.register("digits")
def digits(config: DatasetConfig) -> RawData:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes, values 0-16 scaled to [0, 1]).

    It has no test split of its own: a fixed stratified 20% (seed 0) is held out.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16  # (1797, 1, 8, 8)
    labels = torch.as_tensor(data.target, dtype=torch.long)
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=data.target
    )
    train_index, test_index = torch.as_tensor(train_index), torch.as_tensor(test_index)
    return RawData(images[train_index], labels[train_index], images[test_index], labels[test_index], num_classes=10)


SYNTHETIC_SHAPE = (1, 8, 8)
SYNTHETIC_CLASSES = 10
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 512, 128
SYNTHETIC_SEED = 0


@DATASETS.register("synthetic")
def synthetic(config: DatasetConfig) -> RawData:
    """Gaussian 1x8x8 images labelled by the argmax of a fixed random linear map: a linearly separable task.

    512 train + 128 test, 10 classes, always the same tensors (generated with seed 0), for tests.
    """
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    features = math.prod(SYNTHETIC_SHAPE)
    weights = torch.randn(SYNTHETIC_CLASSES, features, generator=generator)
    weights /= weights.norm(dim=1, keepdim=True)  # equal norms: no class is favoured
    images = torch.randn(SYNTHETIC_TRAIN + SYNTHETIC_TEST, *SYNTHETIC_SHAPE, generator=generator)
    labels = (images.flatten(1) @ weights.T).argmax(dim=1)  # (N,)
    return RawData(
        images[:SYNTHETIC_TRAIN],
        labels[:SYNTHETIC_TRAIN],
        images[SYNTHETIC_TRAIN:],
        labels[SYNTHETIC_TRAIN:],
        num_classes=SYNTHETIC_CLASSES,
    )

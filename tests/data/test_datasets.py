"""Datasets: every loader on tiny local files, split sizes and determinism, and the errors."""

from __future__ import annotations

import gzip
import pickle
import re
import struct

import numpy as np
import pytest
import torch

from pf_ray import data as data_module
from pf_ray.config import DatasetConfig
from pf_ray.data import DataBundle, RawData, load_data
from pf_ray.errors import ConfigError, DataError
from pf_ray.registry import DATASETS, Entry

# ---------------------------------------------------------------------------------------------------------------
# Fake files.


def write_idx(path, array: np.ndarray, magic: int | None = None, compress: bool = False) -> None:
    magic = 2048 + array.ndim if magic is None else magic
    content = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)


def write_fashion_mnist(folder, num_train=40, num_test=12, size=6, compress=True, seed=0) -> dict:
    """Four IDX files of random images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, size, size)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, size, size)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test),
    }
    for name, array in arrays.items():
        write_idx(folder / (f"{name}.gz" if compress else name), array, compress=compress)
    return arrays


@pytest.fixture
def no_shared_data(tmp_path, monkeypatch):
    """No $PF_RAY_DATA, no Debian folder, an empty home cache, and no download."""
    monkeypatch.delenv("PF_RAY_DATA", raising=False)
    monkeypatch.setattr(data_module, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def offline(root):
        raise OSError("network unreachable")

    monkeypatch.setattr(data_module, "_download_fashion_mnist", offline)


def as_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole dataset as (images, labels), read as a DataLoader reads it."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.stack(labels)


def unnormalise(bundle: DataBundle, tensor: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return tensor * std + mean


# ---------------------------------------------------------------------------------------------------------------
# fashion_mnist


DEBIAN = data_module.DEBIAN_FASHION_MNIST


@pytest.mark.skipif(not (DEBIAN / "t10k-labels-idx1-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent")
def test_fashion_mnist_from_debian(monkeypatch):
    monkeypatch.delenv("PF_RAY_DATA", raising=False)
    bundle = load_data(DatasetConfig("fashion_mnist", train_subset=100, test_subset=50))
    assert (len(bundle.train), len(bundle.validation), len(bundle.test)) == (100, 6000, 50)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert bundle.mean[0] == pytest.approx(0.286, abs=0.002) and bundle.std[0] == pytest.approx(0.353, abs=0.002)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_fake_idx_files(tmp_path, compress, layout):
    arrays = write_fashion_mnist(tmp_path / layout, compress=compress)
    bundle = load_data(DatasetConfig("fashion_mnist", data_dir=str(tmp_path), validation_fraction=0.25))
    assert (len(bundle.train), len(bundle.validation), len(bundle.test)) == (30, 10, 12)
    assert bundle.input_shape == (1, 6, 6)
    images, labels = as_tensors(bundle.test)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(labels, torch.as_tensor(arrays["t10k-labels-idx1-ubyte"]))
    expected = torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32).unsqueeze(1) / 255
    assert torch.allclose(unnormalise(bundle, images), expected, atol=1e-5)


def test_pf_ray_data_comes_before_debian(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "fashion-mnist", num_train=20)
    monkeypatch.setenv("PF_RAY_DATA", str(tmp_path))
    bundle = load_data(DatasetConfig("fashion_mnist", validation_fraction=0.5))
    assert len(bundle.train) + len(bundle.validation) == 20


def test_home_cache_in_torchvision_layout(tmp_path, no_shared_data):
    write_fashion_mnist(tmp_path / "home" / ".cache" / "pf_ray" / "FashionMNIST" / "raw", num_train=20)
    assert len(load_data(DatasetConfig("fashion_mnist", validation_fraction=0.5)).train) == 10


def test_nothing_found_and_no_download_lists_the_places_and_the_apt_hint(tmp_path, no_shared_data):
    with pytest.raises(DataError) as error:
        load_data(DatasetConfig("fashion_mnist"))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "network unreachable" in message
    assert str(tmp_path / "no-debian") in message and str(tmp_path / "home" / ".cache" / "pf_ray") in message


def test_missing_data_dir_names_the_field(tmp_path):
    missing = tmp_path / "nope"
    for name in ("fashion_mnist", "cifar10", "imagefolder"):
        with pytest.raises(DataError, match=f"dataset.data_dir: '{missing}' does not exist"):
            load_data(DatasetConfig(name, data_dir=str(missing)))


def test_data_dir_without_the_files_does_not_fall_through(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "elsewhere")
    monkeypatch.setenv("PF_RAY_DATA", str(tmp_path / "elsewhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not found; searched: .*empty") as error:
        load_data(DatasetConfig("fashion_mnist", data_dir=str(tmp_path / "empty")))
    assert "elsewhere" not in str(error.value)


def corrupt_wrong_magic(folder):
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(40), magic=2051, compress=True)
    return "train-labels-idx1-ubyte.gz", "magic number 2051, expected 2049"


def corrupt_truncated(folder):
    path = folder / "t10k-images-idx3-ubyte"
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    write_idx(path, np.zeros((12, 6, 6)))
    path.write_bytes(path.read_bytes()[:-5])
    return "t10k-images-idx3-ubyte", "443 bytes; the header's shape (12, 6, 6) needs 448"  # 16-byte header


def corrupt_bad_gzip(folder):
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip")
    return "train-images-idx3-ubyte.gz", "cannot be read"


def corrupt_count_mismatch(folder):
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(11), compress=True)
    return "t10k-images-idx3-ubyte.gz holds 12 images", "11 labels"


def corrupt_label_range(folder):
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(12, 10), compress=True)
    return "test labels must be integers in [0, 10)", "got 10..10"


@pytest.mark.parametrize(
    "corrupt", [corrupt_wrong_magic, corrupt_truncated, corrupt_bad_gzip, corrupt_count_mismatch, corrupt_label_range]
)
def test_corrupt_idx_files(tmp_path, corrupt):
    write_fashion_mnist(tmp_path)
    where, what = corrupt(tmp_path)
    with pytest.raises(DataError, match="(?s)" + ".*".join(map(re.escape, (where, what)))):
        load_data(DatasetConfig("fashion_mnist", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------
# cifar10


def write_cifar10(folder, per_batch=4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
        images[:, 0] = rng.integers(128, 256, (per_batch, 32, 32))  # red bright, green dark, blue zero
        images[:, 1] = rng.integers(0, 128, (per_batch, 32, 32))
        batch = {"data": images.reshape(per_batch, -1), "labels": list(rng.integers(0, 10, per_batch))}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)


def test_cifar10_fake_batches(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    bundle = load_data(DatasetConfig("cifar10", data_dir=str(tmp_path), validation_fraction=0.25))
    assert (len(bundle.train), len(bundle.validation), len(bundle.test)) == (15, 5, 4)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    assert bundle.mean[0] > 0.5 > bundle.mean[1] > bundle.mean[2] == 0  # channel order is R, G, B


def test_cifar10_missing_batch(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: missing"):
        load_data(DatasetConfig("cifar10", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------
# imagefolder


def write_images(root, split, classes=("cat", "dog"), per_class=3, size=(12, 10), mode="RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in classes:
        folder = root / split / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            channels = (3,) if mode == "RGB" else ()
            pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(folder / f"{i}.png")


def test_imagefolder_keeps_small_images_small(tmp_path):
    write_images(tmp_path, "train")
    write_images(tmp_path, "val", per_class=2)
    bundle = load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path), validation_fraction=0.2))
    assert bundle.input_shape == (3, 10, 10)  # the smaller side of 12x10
    assert (len(bundle.train), len(bundle.validation), len(bundle.test)) == (5, 1, 4)
    assert bundle.num_classes == 2 and as_tensors(bundle.test)[1].tolist() == [0, 0, 1, 1]


def test_imagefolder_shrinks_large_grayscale_images_to_32(tmp_path):
    write_images(tmp_path, "train", size=(48, 40), mode="L")
    write_images(tmp_path, "test", size=(40, 40), mode="L")
    bundle = load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path)))
    assert bundle.input_shape == (1, 32, 32)


def test_imagefolder_reads_at_the_image_size_up_or_down(tmp_path):
    write_images(tmp_path, "train", size=(48, 40))
    write_images(tmp_path, "val", size=(40, 40), per_class=2)
    for size in (40, 64):  # above the old 32-pixel cap, and above the images' own size
        bundle = load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path), image_size=size))
        assert bundle.input_shape == (3, size, size)
        assert as_tensors(bundle.train)[0].shape[1:] == (3, size, size)


def test_imagefolder_images_stay_uint8_and_read_as_the_normalised_floats(tmp_path):
    """A quarter of float32's memory, the same values a TensorDataset of the normalised images gave."""
    from torch.utils.data import DataLoader

    from pf_ray.data import NormalisedImages, _normalise

    write_images(tmp_path, "train", per_class=5)
    write_images(tmp_path, "val", per_class=2)
    bundle = load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path), image_size=16, validation_fraction=0.2))
    assert isinstance(bundle.train, NormalisedImages) and bundle.train.images.dtype == torch.uint8
    mean, std = torch.tensor(bundle.mean), torch.tensor(bundle.std)
    expected = _normalise(bundle.train.images, mean, std)
    assert torch.equal(as_tensors(bundle.train)[0], expected)
    batched, labels = next(iter(DataLoader(bundle.train, batch_size=len(bundle.train))))  # __getitems__
    assert torch.equal(batched, expected) and torch.equal(labels, bundle.train.labels)
    assert batched.dtype == torch.float32 and abs(float(batched.mean())) < 0.1


def test_the_image_size_reaches_macs_and_the_exported_model(tmp_path):
    import onnx

    from pf_ray.config import ModelConfig
    from pf_ray.export.onnx import export_onnx
    from pf_ray.metrics import model_stats
    from pf_ray.models import build_model

    write_images(tmp_path, "train", size=(40, 40))
    write_images(tmp_path, "val", size=(40, 40), per_class=2)
    macs = {}
    for size in (16, 32):
        bundle = load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path), image_size=size))
        model = build_model(ModelConfig("resnet20"), in_channels=3, num_classes=bundle.num_classes)
        macs[size] = model_stats(model, bundle.input_shape).macs
        path = export_onnx(model, bundle.input_shape, tmp_path / f"{size}.onnx")
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims][1:] == [3, size, size]
    assert macs[32] == pytest.approx(4 * macs[16], rel=0.01)  # convolutions: MACs grow with the pixels


def test_image_size_is_checked_where_it_enters():
    with pytest.raises(ConfigError, match=r"dataset.image_size: got 96 with dataset 'cifar10'; only the imagefolder"):
        DatasetConfig("cifar10", image_size=96)
    with pytest.raises(ConfigError, match=r"dataset.image_size: got 0; allowed range is \[1, 4096\]"):
        DatasetConfig("imagefolder", image_size=0)


def test_imagefolder_errors(tmp_path):
    write_images(tmp_path, "train")
    with pytest.raises(DataError, match=r"needs subfolders train/ and val/ \(or test/\); found: train"):
        load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path)))
    write_images(tmp_path, "val", classes=("cat", "cow"))
    with pytest.raises(DataError, match="classes.*must match"):
        load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path)))
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    with pytest.raises(DataError, match="train: Found no valid file for the classes cat"):
        load_data(DatasetConfig("imagefolder", data_dir=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="dataset.data_dir: got None"):
        load_data(DatasetConfig("imagefolder"))


# ---------------------------------------------------------------------------------------------------------------
# digits and synthetic


def test_digits():
    bundle = load_data(DatasetConfig("digits", validation_fraction=0.1))
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert len(bundle.train) + len(bundle.validation) == 1437 and len(bundle.test) == 360
    assert len(bundle.validation) == 144  # round(0.1 * 1437)
    other_seed = load_data(DatasetConfig("digits", validation_fraction=0.1), seed=1)
    assert torch.equal(bundle.test.tensors[1], other_seed.test.tensors[1])  # the test split never moves


def test_synthetic_is_deterministic_and_learnable():
    from sklearn.linear_model import LogisticRegression

    bundle = load_data(DatasetConfig("synthetic"))
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert len(bundle.train) + len(bundle.validation) == 512 and len(bundle.test) == 128
    again = load_data(DatasetConfig("synthetic"))
    assert all(torch.equal(a, b) for a, b in zip(bundle.train.tensors, again.train.tensors, strict=True))
    assert bundle.train.tensors[1].bincount(minlength=10).min() > 20  # every class present
    train_x, train_y = bundle.train.tensors
    test_x, test_y = bundle.test.tensors
    classifier = LogisticRegression(max_iter=500).fit(train_x.flatten(1).numpy(), train_y.numpy())
    assert classifier.score(test_x.flatten(1).numpy(), test_y.numpy()) > 0.7


# ---------------------------------------------------------------------------------------------------------------
# Splits and normalisation (on synthetic: fast, every image distinct)


def rows(tensor: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in tensor}


def test_validation_split_sizes_disjointness_and_seeds():
    config = DatasetConfig("synthetic", validation_fraction=0.25)
    bundle = load_data(config, seed=3)
    assert (len(bundle.train), len(bundle.validation)) == (384, 128)
    assert not rows(bundle.train.tensors[0]) & rows(bundle.validation.tensors[0])
    same = load_data(config, seed=3)
    assert torch.equal(bundle.validation.tensors[0], same.validation.tensors[0])
    other = load_data(config, seed=4)
    assert not torch.equal(bundle.validation.tensors[0], other.validation.tensors[0])


def test_subsets_take_the_first_examples_and_keep_the_normalisation():
    full = load_data(DatasetConfig("synthetic"), seed=7)
    subset = load_data(DatasetConfig("synthetic", train_subset=100, test_subset=10), seed=7)
    assert torch.equal(subset.train.tensors[0], full.train.tensors[0][:100])
    assert torch.equal(subset.validation.tensors[0], full.validation.tensors[0])
    assert torch.equal(subset.test.tensors[0], full.test.tensors[0][:10])
    assert subset.mean == full.mean and subset.std == full.std
    larger = load_data(DatasetConfig("synthetic", train_subset=10_000, test_subset=10_000), seed=7)
    assert len(larger.train) == len(full.train) and len(larger.test) == 128  # "at most N"


def test_training_split_is_normalised_per_channel():
    images = load_data(DatasetConfig("digits")).train.tensors[0]
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_unknown_dataset_names_the_field():
    with pytest.raises(ConfigError, match=r"dataset.name: unknown dataset 'mnist'.*fashion_mnist"):
        load_data(DatasetConfig("mnist"))


def fake_loader(raw: RawData):
    return lambda config: raw


GOOD = torch.zeros(10, 1, 4, 4)
LABELS = torch.zeros(10, dtype=torch.long)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (RawData(GOOD[:, 0], LABELS, GOOD, LABELS, 10), r"train images have shape \(10, 4, 4\)"),
        (RawData(GOOD, LABELS[:9], GOOD, LABELS, 10), r"10 train images but labels of shape \(9,\)"),
        (RawData(GOOD[:0], LABELS[:0], GOOD, LABELS, 10), "the train split is empty"),
        (RawData(GOOD, LABELS, GOOD[:, :, :2], LABELS, 10), r"train images are \(1, 4, 4\) but test"),
        (RawData(GOOD[:1], LABELS[:1], GOOD, LABELS, 10), "1 training examples: too few"),
    ],
)
def test_wrong_shapes_and_empty_sets_are_data_errors(monkeypatch, raw, message):
    monkeypatch.setitem(DATASETS._entries, "broken", Entry("broken", fake_loader(raw)))
    with pytest.raises(DataError, match=message):
        load_data(DatasetConfig("broken"))

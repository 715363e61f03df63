"""The data layer reads small fixtures written in the real on-disk formats through the real torchvision readers."""

import gzip
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets

from experiments import data, datafiles
from experiments.data import DataConfig, build_datasets, build_loaders
from experiments.datafiles import CorruptDatasetError, DatasetNotFoundError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def unnormalize_to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Invert ToTensor + Normalize back to 0..255 pixel values."""
    mean, std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return (x * std + mean).mul(255).round().to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------------- Fashion-MNIST fixtures


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """IDX encoding: big-endian magic number, big-endian dimensions, then the uint8 data."""
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_gzipped(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.fixture
def fmnist_source(tmp_path, monkeypatch):
    """A directory laid out like Debian's dataset-fashion-mnist (gzipped IDX files), selected by the env var."""
    rng = np.random.default_rng(0)
    source = tmp_path / "debian-fashion-mnist"
    source.mkdir()
    arrays = {}
    for split, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_gzipped(source / f"{split}-images-idx3-ubyte.gz", idx_bytes(images, 2051))
        write_gzipped(source / f"{split}-labels-idx1-ubyte.gz", idx_bytes(labels, 2049))
        arrays[split] = (images, labels)
    monkeypatch.setenv(datafiles.FASHION_MNIST_DIR_ENV, str(source))
    return source, arrays


def test_fashion_mnist_extracts_debian_files_and_loads_them(fmnist_source, tmp_path):
    _, arrays = fmnist_source
    root = tmp_path / "cache"
    train, test, info = build_datasets(DataConfig(root=str(root)))
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(datafiles.FASHION_MNIST_FILES)  # no temporary files left
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    assert (info.train_size, info.test_size) == (len(train), len(test)) == (20, 10)
    assert isinstance(train, datasets.FashionMNIST)
    np.testing.assert_array_equal(train.data.numpy(), arrays["train"][0])
    images, labels = arrays["t10k"]
    for i in range(len(test)):
        x, y = test[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert y == labels[i]
        np.testing.assert_array_equal(unnormalize_to_uint8(x, info.mean, info.std)[0], images[i])
    # a second build reuses the extracted files
    mtime = (raw / "t10k-images-idx3-ubyte").stat().st_mtime_ns
    build_datasets(DataConfig(root=str(root)))
    assert (raw / "t10k-images-idx3-ubyte").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "corruption, message",
    [
        ("magic", "magic number 2049"),
        ("truncated", "bytes, but its IDX header"),
        ("not_gzip", "cannot gunzip"),
    ],
)
def test_corrupt_debian_file_is_named(fmnist_source, tmp_path, corruption, message):
    source, arrays = fmnist_source
    bad = source / "t10k-images-idx3-ubyte.gz"
    images = arrays["t10k"][0]
    if corruption == "magic":
        write_gzipped(bad, idx_bytes(images, 2049))
    elif corruption == "truncated":
        write_gzipped(bad, idx_bytes(images, 2051)[:-28])
    else:
        bad.write_bytes(idx_bytes(images, 2051))
    with pytest.raises(CorruptDatasetError, match=message) as err:
        build_datasets(DataConfig(root=str(tmp_path / "cache")))
    assert str(bad) in str(err.value)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "cache" / "FashionMNIST" / "raw").iterdir())


def test_corrupt_extracted_file_is_named_or_replaced(fmnist_source, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    build_datasets(DataConfig(root=str(root)))
    extracted = root / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    extracted.write_bytes(extracted.read_bytes()[:-1])
    monkeypatch.setenv(datafiles.FASHION_MNIST_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(CorruptDatasetError, match="IDX header") as err:
        build_datasets(DataConfig(root=str(root)))
    assert str(extracted) in str(err.value)
    monkeypatch.setenv(datafiles.FASHION_MNIST_DIR_ENV, str(fmnist_source[0]))  # source back: re-extracted
    train, _, _ = build_datasets(DataConfig(root=str(root)))
    np.testing.assert_array_equal(train.targets.numpy(), fmnist_source[1]["train"][1])


def test_missing_fashion_mnist_falls_back_to_download_and_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(datafiles.FASHION_MNIST_DIR_ENV, str(tmp_path / "no-debian-copy"))
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [empty_mirror.as_uri() + "/"])  # fails without network
    root = tmp_path / "cache"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        build_datasets(DataConfig(root=str(root)))
    message = str(err.value)
    assert str(root) in message and str(tmp_path / "no-debian-copy") in message
    assert "apt-get install dataset-fashion-mnist" in message and "network" in message
    # an explicit root that does not exist and cannot be prepared is an error naming it, and is not created
    missing = tmp_path / "typo"
    with pytest.raises(DatasetNotFoundError, match=rf"data\.root '{re.escape(str(missing))}' does not exist"):
        build_datasets(DataConfig(root=str(missing)))
    assert not missing.exists()


def test_where_fashion_mnist_came_from_is_said(fmnist_source, tmp_path, monkeypatch, capsys):
    """A root that does not exist yet is prepared from the Debian copy, and the run says so (and where it reads
    the data from), once per process."""
    source, _ = fmnist_source
    monkeypatch.setattr(datafiles, "_NOTED", set())
    build_datasets(DataConfig(root=str(tmp_path / "new")))
    err = capsys.readouterr().err
    assert f"Fashion-MNIST from {tmp_path / 'new' / 'FashionMNIST' / 'raw'} (prepared now from {source})" in err


# --------------------------------------------------------------------------------------------------- CIFAR fixtures


class Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 ``str`` (BINSTRING), as in the official CIFAR files written by Python 2's cPickle."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def dump_python2_pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Python2Pickler(f, protocol=2).dump(obj)


def cifar_batch(rng, n: int, num_classes: int, label_key: bytes, name: bytes) -> dict:
    """One batch dict as in the official files: uint8 rows of 3072 (R, G, B planes of 32x32), integer labels."""
    batch = {
        b"batch_label": name,
        label_key: [int(v) for v in np.arange(n) % num_classes],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"image_%d.png" % i for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v % 20 for v in batch[label_key]]
    return batch


def write_cifar10(root: Path) -> dict:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {
        f"data_batch_{i}": cifar_batch(rng, 4, 10, b"labels", b"training batch %d of 5" % i) for i in range(1, 6)
    }
    batches["test_batch"] = cifar_batch(rng, 6, 10, b"labels", b"testing batch 1 of 1")
    for name, batch in batches.items():
        dump_python2_pickle(batch, folder / name)
    label_names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump_python2_pickle(
        {b"num_cases_per_batch": 4, b"label_names": label_names, b"num_vis": 3072}, folder / "batches.meta"
    )
    return batches


def write_cifar100(root: Path) -> dict:
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    batches = {
        "train": cifar_batch(rng, 12, 100, b"fine_labels", b"training batch 1 of 1"),
        "test": cifar_batch(rng, 5, 100, b"fine_labels", b"testing batch 1 of 1"),
    }
    for name, batch in batches.items():
        dump_python2_pickle(batch, folder / name)
    meta = {
        b"fine_label_names": [b"class_%d" % i for i in range(100)],
        b"coarse_label_names": [b"super_%d" % i for i in range(20)],
    }
    dump_python2_pickle(meta, folder / "meta")
    return batches


def test_cifar_fixture_has_the_official_pickle_layout(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        as_documented = pickle.load(f, encoding="bytes")  # how the CIFAR page says to read the files
    assert set(as_documented) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert as_documented[b"data"].dtype == np.uint8 and as_documented[b"data"].shape == (4, 3072)
    # torchvision itself compares md5 sums even with download=False, so it rejects any file it did not download
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        datasets.CIFAR10(str(tmp_path), train=False, download=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_through_torchvision_parsing(tmp_path, name):
    batches = write_cifar10(tmp_path) if name == "cifar10" else write_cifar100(tmp_path)
    train, test, info = build_datasets(DataConfig(name=name, root=str(tmp_path)))
    expected_classes = 10 if name == "cifar10" else 100
    assert (info.num_classes, info.in_chans, info.img_size) == (expected_classes, 3, 32)
    assert isinstance(train, datasets.CIFAR10)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    train_batches = [b for key, b in batches.items() if "test" not in key]
    assert len(train) == info.train_size == sum(len(b[label_key]) for b in train_batches)
    test_batch = batches["test_batch" if name == "cifar10" else "test"]
    assert len(test) == info.test_size == len(test_batch[label_key])
    for i in range(len(test)):
        x, y = test[i]
        assert x.shape == (3, 32, 32)
        assert y == test_batch[label_key][i]
        expected = test_batch[b"data"][i].reshape(3, 32, 32)
        np.testing.assert_array_equal(unnormalize_to_uint8(x, info.mean, info.std), expected)


def test_missing_cifar_names_root_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path / "data")))
    message = str(err.value)
    assert str(tmp_path / "data") in message and "download=True" in message and "cifar-10-batches-py" in message


def test_truncated_cifar_batch_is_reported(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(CorruptDatasetError, match="cifar-10-batches-py"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))


def test_cifar_batch_with_arbitrary_pickle_is_refused_not_run(tmp_path):
    """The CIFAR files are pickles; a batch that names any callable other than numpy's array rebuilding is
    refused (CorruptDatasetError naming the folder), and the callable never runs."""
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(CorruptDatasetError, match=r"cifar-10-batches-py.*(posix|os)\.system is not allowed"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- ImageFolder fixtures


def write_image_tree(root: Path, splits=("train", "val"), classes=("cat", "dog", "fish")) -> None:
    rng = np.random.default_rng(3)
    for split in splits:
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.parametrize("eval_split", ["val", "test"])
def test_imagefolder_tree_loads_with_the_224_recipe(tmp_path, eval_split):
    write_image_tree(tmp_path, splits=("train", eval_split))
    train, test, info = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))
    assert (info.num_classes, info.in_chans, info.img_size) == (3, 3, 224)
    assert (info.train_size, info.test_size) == (6, 6)
    assert info.mean == tuple(data.IMAGENET_DEFAULT_MEAN)
    x, y = train[5]
    assert x.shape == (3, 224, 224) and y == 2
    assert test[0][0].shape == (3, 224, 224)


def test_imagefolder_missing_paths_are_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "absent")):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "absent")))
    write_image_tree(tmp_path, splits=("train",))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "val")):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))
    with pytest.raises(DatasetNotFoundError, match=r"Food-101 \(split by meta/train.txt"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_an_unreadable_image_is_named(tmp_path):
    write_image_tree(tmp_path)
    (tmp_path / "train" / "dog" / "2.png").write_text("not an image")
    train, _, _ = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))
    bad = next(i for i, (path, _) in enumerate(train.samples) if path.endswith("2.png"))
    assert train[bad - 1][0].shape == (3, 224, 224)
    with pytest.raises(CorruptDatasetError, match=rf"image {tmp_path / 'train' / 'dog' / '2.png'} cannot be read"):
        train[bad]


# ------------------------------------------------------------------------------------------------------- transforms


def test_small_recipe_with_rand_augment_and_erasing(fmnist_source, tmp_path):
    write_cifar10(tmp_path / "cifar")
    for cfg in (
        DataConfig(root=str(tmp_path / "cache"), crop_pad=2, aa=RAND_AUGMENT, reprob=0.25),
        DataConfig(name="cifar10", root=str(tmp_path / "cifar"), crop_pad=4, aa=RAND_AUGMENT, reprob=0.25),
    ):
        train, _, info = build_datasets(cfg)
        step_names = [type(step).__name__ for step in train.transform.transforms]
        assert step_names[:3] == ["RandomCrop", "RandomHorizontalFlip", "RandAugment"]
        assert step_names[-1] == "RandomErasing"
        for i in range(len(train)):
            x, _ = train[i]
            assert x.shape == (info.in_chans, 28 if cfg.name == "fashion_mnist" else 32, info.img_size)
            assert torch.isfinite(x).all()


def test_posterize_at_zero_bits_does_not_raise(fmnist_source, tmp_path):
    # magnitude 10 with "inc1" asks Posterize for 0 bits, which recent Pillow refuses
    train, _, _ = build_datasets(DataConfig(root=str(tmp_path / "cache"), aa="rand-m10-n15-mstd0-p1.0-inc1"))
    for i in range(len(train)):
        train[i]
    black = data._posterize_zero_bits_allowed(Image.new("L", (4, 4), 200), 0)
    assert np.asarray(black).max() == 0


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_resized_recipe_upsamples_to_224(fmnist_source, tmp_path, name):
    if name == "cifar10":
        write_cifar10(tmp_path / "cifar")
    root = tmp_path / ("cifar" if name == "cifar10" else "cache")
    cfg = DataConfig(name=name, root=str(root), img_size=224, aa=RAND_AUGMENT, reprob=0.25)
    train, test, info = build_datasets(cfg)
    chans = 1 if name == "fashion_mnist" else 3
    assert (info.in_chans, info.img_size) == (chans, 224)
    for i in range(3):
        assert train[i][0].shape == test[i][0].shape == (chans, 224, 224)


# -------------------------------------------------------------------------------------------- config and subsets


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="fashion_mnist, cifar10, cifar100, imagefolder"):
        build_datasets(DataConfig(name="mnist"))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"name": "cifar10", "root": None}, "root"),
        ({"img_size": 0}, "img_size"),
        ({"train_subset": -3}, "train_subset"),
        ({"test_subset": 2.5}, "test_subset"),
        ({"crop_pad": -1}, "crop_pad"),
        ({"crop_pad": 4, "img_size": 224}, "crop_pad"),
        ({"hflip": 1.5}, "hflip"),
        ({"reprob": -0.1}, "reprob"),
        ({"aa": ""}, "aa"),
        ({"aa": "not-a-policy"}, "aa"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_config_value_names_the_field(tmp_path, changes, field):
    with pytest.raises(ValueError, match=f"DataConfig.{field}"):
        build_datasets(DataConfig(**{"root": str(tmp_path), **changes}))


def test_subsets_are_seeded_and_class_balanced(fmnist_source, tmp_path):
    cfg = DataConfig(root=str(tmp_path / "cache"), train_subset=10, test_subset=5)
    train, test, info = build_datasets(cfg, seed=3)
    assert (len(train), len(test), info.train_size, info.test_size) == (10, 5, 10, 5)
    labels = train.dataset.targets[train.indices].tolist()
    assert sorted(labels) == list(range(10))  # one image of each class
    assert len(set(test.dataset.targets[test.indices].tolist())) == 5
    assert build_datasets(cfg, seed=3)[0].indices == train.indices
    assert any(build_datasets(cfg, seed=s)[0].indices != train.indices for s in (4, 5, 6))
    assert all(build_datasets(cfg, seed=s)[1].indices == test.indices for s in (4, 5))  # same test images
    with pytest.raises(ValueError, match=r"DataConfig\.train_subset=21 exceeds the 20"):
        build_datasets(DataConfig(root=str(tmp_path / "cache"), train_subset=21))


# ---------------------------------------------------------------------------------------------------------- loaders


def first_batch_order(loader) -> list[int]:
    return next(iter(loader))[0].tolist()


def test_loader_order_depends_only_on_seed():
    train_ds, test_ds = TensorDataset(torch.arange(40)), TensorDataset(torch.arange(10))
    orders = [first_batch_order(build_loaders(train_ds, test_ds, 8, num_workers=0, seed=s)[0]) for s in (7, 7, 8)]
    assert orders[0] == orders[1] != orders[2]
    train_loader, test_loader, sampler = build_loaders(train_ds, test_ds, 8, num_workers=0, seed=7)
    assert sampler is None and len(train_loader) == 5 and first_batch_order(test_loader) == list(range(8))
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 40"):
        build_loaders(train_ds, test_ds, 64, num_workers=0, seed=0)


def test_loader_with_workers_is_deterministic():
    train_ds, test_ds = TensorDataset(torch.arange(16)), TensorDataset(torch.arange(4))
    train_loader, _, _ = build_loaders(train_ds, test_ds, 4, num_workers=1, seed=1)
    assert not train_loader.persistent_workers and train_loader.worker_init_fn is data.seed_worker
    in_process_loader = build_loaders(train_ds, test_ds, 4, num_workers=0, seed=1)[0]
    assert first_batch_order(train_loader) == first_batch_order(in_process_loader)


def test_distributed_loaders_shard_both_splits():
    train_ds, test_ds = TensorDataset(torch.arange(40)), TensorDataset(torch.arange(11))
    shards, tests = [], []
    for rank in (0, 1):
        train_loader, test_loader, sampler = build_loaders(
            train_ds, test_ds, 4, num_workers=0, seed=5, distributed=True, num_replicas=2, rank=rank
        )
        assert isinstance(sampler, DistributedSampler) and train_loader.sampler is sampler
        shards.append([i for (batch,) in train_loader for i in batch.tolist()])
        tests.append([i for (batch,) in test_loader for i in batch.tolist()])
    assert sorted(shards[0] + shards[1]) == list(range(40))
    assert tests == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]  # 11 test images, each scored once (no padding)


# ---------------------------------------------------------------------------------------------------- real dataset


def test_real_debian_fashion_mnist_test_split(tmp_path, monkeypatch):
    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").is_file() for name in datafiles.FASHION_MNIST_FILES):
        pytest.fail(f"Debian's Fashion-MNIST is not in {DEBIAN_FASHION_MNIST}; `bash scripts/setup.sh` installs it")
    monkeypatch.delenv(datafiles.FASHION_MNIST_DIR_ENV, raising=False)
    train, test, info = build_datasets(DataConfig(root=str(tmp_path)))
    assert (len(train), len(test), info.num_classes) == (60000, 10000, 10)
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    x, _ = test[0]
    assert x.shape == (1, 28, 28)
    mean = test.data.float().div(255).mean().item()
    assert abs(mean - info.mean[0]) < 0.01

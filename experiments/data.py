"""Datasets, transforms and data loaders for the training script.

Supported datasets (``DataConfig.name``):

* ``fashion_mnist``: read with ``torchvision.datasets.FashionMNIST``. Debian's ``dataset-fashion-mnist`` package
  ships the four IDX files gzipped in ``/usr/share/datasets/fashion-mnist`` (overridable with the environment
  variable ``FASHION_MNIST_DIR``). Debian re-gzipped them, so their checksums are not torchvision's and its download
  path cannot verify them; instead they are gunzipped here into ``<root>/FashionMNIST/raw/`` (atomically, after
  checking the IDX headers). torchvision's reader checks only that the raw files exist, then parses them. Without
  Debian's files, torchvision's own download is tried.
* ``cifar10`` / ``cifar100``: torchvision's python-pickle format under ``root`` (``cifar-10-batches-py`` or
  ``cifar-100-python``). torchvision verifies the md5 of every batch file (and of the meta file) even with
  ``download=False``, so files not byte-identical to the official archive cannot be read by it. They are read here by
  subclasses of torchvision's classes whose file lists carry no md5: only that check is dropped, torchvision still
  parses the files, and the parsed arrays are checked for shape and label range.
* ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``root/test``), read with
  ``torchvision.datasets.ImageFolder`` as RGB.

Two transform recipes:

* small-image recipe (28x28 / 32x32 datasets at native size): RandomCrop with padding, horizontal flip, timm's
  auto-augment (RandAugment, AugMix or AutoAugment, from the ``aa`` spec), normalisation, timm's RandomErasing.
* resized recipe (``imagefolder``, or a different ``img_size``): ``timm.data.create_transform`` (RandomResizedCrop
  for training, resize + center crop for evaluation).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import random
import signal
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
DEFAULT_FASHION_MNIST_ROOT = "~/.cache/hopfield-mixers/data"
# Where Debian's dataset-fashion-mnist package puts the gzipped IDX files; the environment variable wins.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "FASHION_MNIST_DIR"
IMAGEFOLDER_DEFAULT_SIZE = 224


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where the config says; the message says how to get them."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but does not hold what its format requires; the message names the file."""


@dataclass
class DataConfig:
    """Which dataset to load and how to augment it."""

    name: str = "fashion_mnist"  # one of DATASET_NAMES
    root: str | None = None  # fashion_mnist: defaults to DEFAULT_FASHION_MNIST_ROOT; others: required
    img_size: int | None = None  # None: native size (28 or 32; imagefolder: 224); else resize/crop to it
    train_subset: int | None = None  # seeded class-balanced random subset of this many train images
    test_subset: int | None = None  # same for the test split
    crop_pad: int = 0  # small-image recipe: RandomCrop(size, padding=crop_pad) when > 0
    hflip: float = 0.5  # horizontal flip probability
    aa: str | None = None  # timm auto-augment spec, e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    reprob: float = 0.0  # random erasing probability (timm RandomErasing, mode "pixel")
    interpolation: str = "bicubic"
    num_workers: int = 2


@dataclass
class DataInfo:
    """What the model and the training loop need to know about the loaded data."""

    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int


@dataclass(frozen=True)
class _DatasetSpec:
    num_classes: int
    in_chans: int
    native_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[int, int] | None = None  # (train, test) images, where the dataset fixes them


_SPECS = {
    "fashion_mnist": _DatasetSpec(10, 1, 28, (0.2860,), (0.3530,), (60000, 10000)),
    "cifar10": _DatasetSpec(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (50000, 10000)),
    "cifar100": _DatasetSpec(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), (50000, 10000)),
    # number of classes and images read from the tree
    "imagefolder": _DatasetSpec(0, 3, None, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)),
}


def split_size(cfg: DataConfig, split: str) -> int | None:
    """The number of images of the dataset's ``"train"`` or ``"test"`` split where the dataset fixes it (None
    for imagefolder)."""
    sizes = _SPECS[cfg.name].splits
    return None if sizes is None else sizes[0 if split == "train" else 1]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _uses_small_recipe(cfg: DataConfig) -> bool:
    native = _SPECS[cfg.name].native_size
    return native is not None and cfg.img_size in (None, native)


def validate_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the first field with an invalid value."""
    if cfg.name not in DATASET_NAMES:
        valid = ", ".join(DATASET_NAMES)
        raise ValueError(f"DataConfig.name={cfg.name!r} is not a known dataset; valid names: {valid}")
    if cfg.root is None and cfg.name != "fashion_mnist":
        raise ValueError(f"DataConfig.root is required for name={cfg.name!r}")
    if cfg.root is not None and (not isinstance(cfg.root, str | os.PathLike) or not str(cfg.root)):
        raise ValueError(f"DataConfig.root must be a non-empty path, got {cfg.root!r}")
    for field in ("img_size", "train_subset", "test_subset"):
        value = getattr(cfg, field)
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"DataConfig.{field} must be None or a positive integer, got {value!r}")
    for field, split in (("train_subset", "train"), ("test_subset", "test")):
        value, size = getattr(cfg, field), split_size(cfg, split)
        if value is not None and size is not None and value > size:
            raise ValueError(f"DataConfig.{field}={value} exceeds the {size} images of {cfg.name}'s {split} split")
    if not _is_int(cfg.crop_pad) or cfg.crop_pad < 0:
        raise ValueError(f"DataConfig.crop_pad must be a non-negative integer, got {cfg.crop_pad!r}")
    if cfg.crop_pad > 0 and not _uses_small_recipe(cfg):
        raise ValueError(
            f"DataConfig.crop_pad={cfg.crop_pad} applies only to the small-image recipe (28x28/32x32 datasets at "
            f"native size); name={cfg.name!r}, img_size={cfg.img_size!r} uses timm's RandomResizedCrop instead"
        )
    for field in ("hflip", "reprob"):
        value = getattr(cfg, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"DataConfig.{field} must be a probability in [0, 1], got {value!r}")
    if cfg.aa is not None and (not isinstance(cfg.aa, str) or not cfg.aa):
        raise ValueError(f"DataConfig.aa must be None or a timm auto-augment spec string, got {cfg.aa!r}")
    if cfg.interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"DataConfig.interpolation={cfg.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        )
    if not _is_int(cfg.num_workers) or cfg.num_workers < 0:
        raise ValueError(f"DataConfig.num_workers must be a non-negative integer, got {cfg.num_workers!r}")


# ----------------------------------------------------------------------------------------------------- transforms


def _posterize_zero_bits_allowed(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, keeping its 0-bit case (an all-zero image), which recent Pillow (13 here) rejects."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform: transforms.Compose) -> None:
    """Route timm's Posterize ops through `_posterize_zero_bits_allowed`.

    timm's RandAugment "inc1" (at magnitude 10, reached by m9 with mstd noise) and AutoAugment's v0 policy map some
    levels to 0 bits; older Pillow turned that into a black image, recent Pillow raises ValueError mid-epoch.
    """
    for step in transform.transforms:
        if isinstance(step, timm_auto_augment.AutoAugment):
            ops = [op for sub_policy in step.policy for op in sub_policy]
        else:
            ops = getattr(step, "ops", [])
        for op in ops:
            if isinstance(op, timm_auto_augment.AugmentOp) and op.aug_fn is timm_auto_augment.posterize:
                op.aug_fn = _posterize_zero_bits_allowed


def build_transforms(cfg: DataConfig, img_size: int, mean, std, in_chans: int):
    """Return (train_transform, test_transform) for PIL images of the configured dataset."""
    mean, std = tuple(mean), tuple(std)
    try:
        if _uses_small_recipe(cfg):
            geometric = []
            if cfg.crop_pad > 0:
                geometric.append(transforms.RandomCrop(img_size, padding=cfg.crop_pad))
            if cfg.hflip > 0:
                geometric.append(transforms.RandomHorizontalFlip(cfg.hflip))
            # timm's own train pipeline, split into (crop+flip, auto-augment, tensor+normalize+erase); the
            # RandomResizedCrop part is replaced by the small-image crop and flip above.
            _, augment, finish = transforms_imagenet_train(
                img_size,
                hflip=0.0,
                color_jitter=None,
                auto_augment=cfg.aa,
                interpolation=cfg.interpolation,
                mean=mean,
                std=std,
                re_prob=cfg.reprob,
                re_mode="pixel",
                separate=True,
            )
            train_tf = transforms.Compose(geometric + augment.transforms + finish.transforms)
        else:
            train_tf = create_transform(
                input_size=(in_chans, img_size, img_size),
                is_training=True,
                auto_augment=cfg.aa,
                re_prob=cfg.reprob,
                re_mode="pixel",
                interpolation=cfg.interpolation,
                mean=mean,
                std=std,
                hflip=cfg.hflip,
            )
    except (AssertionError, KeyError, ValueError) as err:
        if cfg.aa is None:
            raise
        raise ValueError(f"DataConfig.aa={cfg.aa!r} is not a valid timm auto-augment spec: {err!r}") from err
    _allow_zero_bit_posterize(train_tf)

    if _uses_small_recipe(cfg):
        test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    else:
        test_tf = create_transform(
            input_size=(in_chans, img_size, img_size),
            is_training=False,
            interpolation=cfg.interpolation,
            mean=mean,
            std=std,
        )
    return train_tf, test_tf


# -------------------------------------------------------------------------------------------------- Fashion-MNIST

# file name -> (IDX magic number, trailing dimensions after the sample count)
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (28, 28)),
    "train-labels-idx1-ubyte": (2049, ()),
    "t10k-images-idx3-ubyte": (2051, (28, 28)),
    "t10k-labels-idx1-ubyte": (2049, ()),
}


def fashion_mnist_source_dir() -> Path:
    """Directory with Debian's gzipped IDX files (``$FASHION_MNIST_DIR`` or ``FASHION_MNIST_DIR``)."""
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DIR)


def check_idx_file(path: Path, name: str, shown_as: Path | None = None) -> int:
    """Check the IDX header and size of `path` against the Fashion-MNIST file `name`; return the sample count."""
    magic, tail = FASHION_MNIST_FILES[name]
    shown_as = shown_as or path
    ndim = 1 + len(tail)
    header_len = 4 * (1 + ndim)
    with open(path, "rb") as f:
        header = f.read(header_len)
        if len(header) < header_len:
            raise CorruptDatasetError(f"{shown_as}: truncated IDX header ({len(header)} of {header_len} bytes)")
        got_magic, *dims = struct.unpack(f">{1 + ndim}I", header)
        if got_magic != magic:
            raise CorruptDatasetError(
                f"{shown_as}: IDX magic number {got_magic} where {name} needs {magic} (uint8, {ndim} dimensions)"
            )
        if tuple(dims[1:]) != tail:
            expected = ", ".join(map(str, ("N", *tail)))
            raise CorruptDatasetError(f"{shown_as}: IDX dimensions {tuple(dims)}, expected ({expected})")
        expected_size = header_len + math.prod(dims)
        actual_size = os.fstat(f.fileno()).st_size
        if actual_size != expected_size:
            raise CorruptDatasetError(
                f"{shown_as}: {actual_size} bytes, but its IDX header {tuple(dims)} implies {expected_size}"
            )
        if not tail:
            labels = np.frombuffer(f.read(), dtype=np.uint8)
            if labels.size and labels.max() >= _SPECS["fashion_mnist"].num_classes:
                raise CorruptDatasetError(f"{shown_as}: label {labels.max()} outside 0..9")
    return dims[0]


def _extract_idx(source: Path, target: Path, name: str) -> None:
    """Gunzip `source` to `target` through a temporary file in the same directory, checked before the rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(source, "rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        check_idx_file(tmp, name, shown_as=source)
        os.replace(tmp, target)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise CorruptDatasetError(f"{source}: cannot gunzip ({err}); reinstall dataset-fashion-mnist") from err
    finally:
        tmp.unlink(missing_ok=True)


def prepare_fashion_mnist(root: Path, source_dir: Path | None = None) -> bool:
    """Make ``root/FashionMNIST/raw`` hold the four IDX files; False when neither they nor a source exist."""
    source_dir = source_dir or fashion_mnist_source_dir()
    raw = root / "FashionMNIST" / "raw"
    counts = {}
    for name in FASHION_MNIST_FILES:
        target, source = raw / name, source_dir / f"{name}.gz"
        if target.is_file():
            try:
                counts[name] = check_idx_file(target, name)
                continue
            except CorruptDatasetError:
                if not source.is_file():
                    raise
        if not source.is_file():
            return False
        raw.mkdir(parents=True, exist_ok=True)
        _extract_idx(source, target, name)
        counts[name] = check_idx_file(target, name)
    for split in ("train", "t10k"):
        images, labels = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
        if images != labels:
            raise CorruptDatasetError(f"{raw}: {split} split has {images} images but {labels} labels")
    return True


_NOTED: set[str] = set()


def _note(msg: str) -> None:
    """Say once per process where data came from (stderr: stdout may carry a run's JSON)."""
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(f"[data] {msg}", file=sys.stderr, flush=True)


def _fashion_mnist(root: Path, train_tf, test_tf, explicit: bool = False):
    raw = root / "FashionMNIST" / "raw"
    had = all((raw / name).is_file() for name in FASHION_MNIST_FILES)
    if explicit and not root.exists():
        source = fashion_mnist_source_dir()
        if not all((source / f"{name}.gz").is_file() for name in FASHION_MNIST_FILES):
            raise DatasetNotFoundError(
                f"data.root {str(root)!r} does not exist, and there is no Debian copy of Fashion-MNIST in {source} to "
                f"prepare it from (set ${FASHION_MNIST_DIR_ENV}, or `apt-get install dataset-fashion-mnist`)")
    origin = f"prepared now from {fashion_mnist_source_dir()}"
    if not prepare_fashion_mnist(root):
        origin = "downloaded now"
        try:
            datasets.FashionMNIST(str(root), train=True, download=True)
            datasets.FashionMNIST(str(root), train=False, download=True)
        except (RuntimeError, OSError) as err:
            raise DatasetNotFoundError(
                f"Fashion-MNIST not found: no IDX files in {root / 'FashionMNIST' / 'raw'}, no Debian copy in "
                f"{fashion_mnist_source_dir()} (set ${FASHION_MNIST_DIR_ENV} to another directory), and the download "
                f"failed ({err}). Install it with `apt-get install dataset-fashion-mnist` (`bash scripts/setup.sh` "
                "does), or run once with network access."
            ) from err
    _note(f"Fashion-MNIST from {raw}" + ("" if had else f" ({origin})"))
    train = datasets.FashionMNIST(str(root), train=True, transform=train_tf, download=False)
    test = datasets.FashionMNIST(str(root), train=False, transform=test_tf, download=False)
    return train, test


# ---------------------------------------------------------------------------------------------------------- CIFAR


class _CIFARUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles of dicts, lists, strings and one uint8 numpy array. Only the callables that
    rebuild such an array are resolved; any other global (``os.system``, ...) raises instead of running."""

    ALLOWED: ClassVar[set] = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                              ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        entry = _CIFARUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise pickle.UnpicklingError(f"{path} holds a {type(entry).__name__}, not a CIFAR batch dict")
    return entry


class _SafeCIFAR:
    """torchvision's CIFAR dataset (its ``__getitem__``, ``data`` and ``targets``) read with `_CIFARUnpickler` and
    without the md5 comparison: the files are required to exist, then parsed as torchvision parses them."""

    def __init__(self, root: str, train: bool = True, transform=None, target_transform=None, download=False):
        datasets.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        folder = Path(root) / self.base_folder
        data, targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            entry = _read_cifar_pickle(folder / name)
            data.append(entry["data"])
            targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = targets
        self.classes = _read_cifar_pickle(folder / self.meta["filename"])[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10Unchecked(_SafeCIFAR, datasets.CIFAR10):
    """CIFAR-10 in torchvision's python format, read without arbitrary pickle and without md5 sums."""


class CIFAR100Unchecked(_SafeCIFAR, datasets.CIFAR100):
    """CIFAR-100 in torchvision's python format, read without arbitrary pickle and without md5 sums."""


def _cifar(name: str, root: Path, train_tf, test_tf):
    cls = CIFAR10Unchecked if name == "cifar10" else CIFAR100Unchecked
    torchvision_cls = "CIFAR10" if name == "cifar10" else "CIFAR100"
    folder = root / cls.base_folder
    files = [entry[0] for entry in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found under root {root}: {folder} lacks {', '.join(missing)}. Get it with "
            f"`torchvision.datasets.{torchvision_cls}({str(root)!r}, download=True)` on a machine with network "
            f"access, or copy the extracted {cls.base_folder}/ folder (from {cls.filename}) into {root}."
        )
    splits = []
    for train, tf in ((True, train_tf), (False, test_tf)):
        try:
            ds = cls(str(root), train=train, transform=tf, download=False)
        except (pickle.UnpicklingError, OSError, EOFError, ValueError, KeyError, TypeError) as err:  # unreadable
            raise CorruptDatasetError(f"{folder}: cannot parse the {name} batches ({err!r})") from err
        num_classes = _SPECS[name].num_classes
        targets = np.asarray(ds.targets)
        if ds.data.shape[1:] != (32, 32, 3) or len(targets) != len(ds.data):
            raise CorruptDatasetError(
                f"{folder}: {len(ds.data)} images of shape {ds.data.shape[1:]}, {len(targets)} labels"
            )
        if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
            raise CorruptDatasetError(f"{folder}: labels outside 0..{num_classes - 1}")
        splits.append(ds)
    return splits[0], splits[1]


# ---------------------------------------------------------------------------------------------------- ImageFolder


def _imagefolder(root: Path, train_tf, test_tf):
    hint = ("expected root/train/<class>/<image> and root/val/<class>/<image> (or root/test/...); the archives of "
            "Food-101 (split by meta/train.txt, meta/test.txt), Stanford Cars (by its devkit's annotations) and "
            "ImageNet (val/ by its devkit's labels) must first be sorted into class folders")
    if not root.is_dir():
        raise DatasetNotFoundError(f"imagefolder root {root} does not exist; {hint}")
    train_dir = root / "train"
    eval_dir = next((root / split for split in ("val", "test") if (root / split).is_dir()), None)
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"imagefolder train split {train_dir} does not exist; {hint}")
    if eval_dir is None:
        raise DatasetNotFoundError(
            f"imagefolder evaluation split not found: neither {root / 'val'} nor {root / 'test'} exists; {hint}"
        )
    splits = []
    for split_dir, tf in ((train_dir, train_tf), (eval_dir, test_tf)):
        try:
            splits.append(datasets.ImageFolder(str(split_dir), transform=tf))
        except FileNotFoundError as err:
            raise DatasetNotFoundError(f"imagefolder split {split_dir}: {err}; {hint}") from err
    train, test = splits
    if train.classes != test.classes:
        raise ValueError(
            f"imagefolder class folders differ: {train_dir} has {len(train.classes)}, {eval_dir} has "
            f"{len(test.classes)}; only in one of them: {sorted(set(train.classes) ^ set(test.classes))[:10]}"
        )
    return train, test


# --------------------------------------------------------------------------------------------------------- public


def balanced_subset_indices(targets, size: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """Sorted indices of a seeded random subset with class counts as equal as the classes allow."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    rank_in_class = np.empty(len(order), dtype=np.int64)
    shuffled = targets[order]
    for label in np.unique(targets):
        in_class = shuffled == label
        rank_in_class[in_class] = np.arange(int(in_class.sum()))
    chosen = order[np.argsort(rank_in_class, kind="stable")[:size]]
    return np.sort(chosen)


def _subset(ds, size: int | None, seed: tuple[int, ...], field: str):
    if size is None:
        return ds
    if size > len(ds):
        raise ValueError(f"DataConfig.{field}={size} exceeds the {len(ds)} images of that split")
    return Subset(ds, balanced_subset_indices(ds.targets, size, seed).tolist())


def dataset_info(cfg: DataConfig) -> DataInfo:
    """What the config fixes without reading any file: channels, image size, normalisation, and the number of
    classes (0 for imagefolder, whose classes are its folders); sizes are 0."""
    validate_config(cfg)
    spec = _SPECS[cfg.name]
    img_size = cfg.img_size or spec.native_size or IMAGEFOLDER_DEFAULT_SIZE
    return DataInfo(spec.num_classes, spec.in_chans, img_size, spec.mean, spec.std, 0, 0)


def build_datasets(cfg: DataConfig, seed: int = 0) -> tuple[Dataset, Dataset, DataInfo]:
    """Load the train and test splits with their transforms. A ``train_subset`` is drawn with `seed`; a
    ``test_subset`` does not depend on it, so runs with different seeds are scored on the same test images."""
    img_size, spec = dataset_info(cfg).img_size, _SPECS[cfg.name]
    train_tf, test_tf = build_transforms(cfg, img_size, spec.mean, spec.std, spec.in_chans)
    root = Path(cfg.root or DEFAULT_FASHION_MNIST_ROOT).expanduser()
    if cfg.name == "fashion_mnist":
        train, test = _fashion_mnist(root, train_tf, test_tf, explicit=cfg.root is not None)
    elif cfg.name in ("cifar10", "cifar100"):
        train, test = _cifar(cfg.name, root, train_tf, test_tf)
    else:
        train, test = _imagefolder(root, train_tf, test_tf)
    num_classes = len(train.classes)
    train = _subset(train, cfg.train_subset, (seed, 0), "train_subset")
    test = _subset(test, cfg.test_subset, (0, 1), "test_subset")
    info = DataInfo(
        num_classes=num_classes,
        in_chans=spec.in_chans,
        img_size=img_size,
        mean=spec.mean,
        std=spec.std,
        train_size=len(train),
        test_size=len(test),
    )
    return train, test, info


def seed_worker(worker_id: int) -> None:
    """Seed `random` and numpy in a loader worker from the seed torch gave it (loader generator + worker id), and
    leave SIGTERM/SIGINT to the main process: a signal sent to the whole process group (Ctrl-C, ``kill -- -PGID``, a
    scheduler's preemption) would otherwise kill the worker, and torch's SIGCHLD handler would then raise in the
    main process at an arbitrary point instead of letting it save its stop checkpoint. The loader still shuts its
    workers down through its own queues, and they exit when the main process is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_seed = torch.utils.data.get_worker_info().seed % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)  # noqa: NPY002 (the global state is what worker code draws from)


def build_loaders(
    train_ds: Dataset,
    test_ds: Dataset,
    batch_size: int,
    *,
    num_workers: int,
    seed: int,
    distributed: bool = False,
    drop_last: bool = True,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> tuple[DataLoader, DataLoader, DistributedSampler | None]:
    """Return (train_loader, test_loader, train_sampler); train_sampler is None unless `distributed`.

    The shuffle order depends only on `seed` (and, when distributed, on the epoch passed to
    ``train_sampler.set_epoch``). When distributed, the test split is sharded too, without padding (process r
    sees images r, r + world, ...), so every image is scored exactly once: sum the metrics over processes
    (``all_reduce``) and divide by the summed counts. `num_replicas` and `rank` default to the initialised
    process group's.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not _is_int(num_workers) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    train_sampler = None
    if distributed:
        train_sampler = DistributedSampler(train_ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        # not a DistributedSampler: it would pad the last shard with repeats, counting some images twice
        test_ds = Subset(test_ds, range(train_sampler.rank, len(test_ds), train_sampler.num_replicas))
    per_process = len(train_sampler) if train_sampler is not None else len(train_ds)
    if drop_last and per_process < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {per_process} training images per process; with drop_last the "
            "training loader would yield no batch"
        )
    # distinct augmentation streams per process; the sampler alone fixes the order when distributed
    generator = torch.Generator().manual_seed(seed + (train_sampler.rank if train_sampler is not None else 0))
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # workers restart every epoch and take their seeds from the (re-seedable) loader generator, so an epoch's
        # augmentations depend only on that seed: what makes a resumed run replay an interrupted one exactly
        persistent_workers=False,
        worker_init_fn=seed_worker if num_workers > 0 else None,
    )
    train_loader = DataLoader(
        train_ds,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        drop_last=drop_last,
        generator=generator,
        **common,
    )
    test_loader = DataLoader(test_ds, shuffle=False, drop_last=False, **common)
    return train_loader, test_loader, train_sampler

"""Reading the image datasets from disk, checked: a missing file or a malformed one is an error that names it.

* Fashion-MNIST: read with ``torchvision.datasets.FashionMNIST``. Debian's ``dataset-fashion-mnist`` package
  ships the four IDX files gzipped in ``/usr/share/datasets/fashion-mnist`` (overridable with the environment
  variable ``FASHION_MNIST_DIR``). Debian re-gzipped them, so their checksums are not torchvision's and its download
  path cannot verify them; instead they are gunzipped here into ``<root>/FashionMNIST/raw/`` (atomically, after
  checking the IDX headers). torchvision's reader checks only that the raw files exist, then parses them. Without
  Debian's files, torchvision's own download is tried.
* CIFAR-10 / CIFAR-100: torchvision's python-pickle format under ``root`` (``cifar-10-batches-py`` or
  ``cifar-100-python``). torchvision verifies the md5 of every batch file (and of the meta file) even with
  ``download=False``, so files not byte-identical to the official archive cannot be read by it. They are read here by
  subclasses of torchvision's classes whose file lists carry no md5 and whose unpickler resolves only what a numpy
  array needs: only that check is dropped, torchvision still parses the files, and the parsed arrays are checked for
  shape and label range.
* ImageFolder: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``root/test``), read with
  ``torchvision.datasets.ImageFolder`` as RGB.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
from torchvision import datasets

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_DIR_ENV",
    "FASHION_MNIST_FILES",
    "CIFAR10Unchecked",
    "CIFAR100Unchecked",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "check_idx_file",
    "cifar_splits",
    "fashion_mnist_source_dir",
    "fashion_mnist_splits",
    "imagefolder_splits",
    "prepare_fashion_mnist",
]


# Where Debian's dataset-fashion-mnist package puts the gzipped IDX files; the environment variable wins.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "FASHION_MNIST_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where the config says; the message says how to get them."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but does not hold what its format requires; the message names the file."""


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
            if labels.size and labels.max() >= 10:
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


def fashion_mnist_splits(root: Path, train_tf, test_tf, explicit: bool = False):
    """Fashion-MNIST's train and test splits under ``root`` (prepared from Debian's files, or downloaded, when
    missing); ``explicit``: ``root`` was given, so a missing ``root`` without a source to fill it is an error."""
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


def cifar_splits(name: str, root: Path, train_tf, test_tf, num_classes: int):
    """CIFAR-10 / CIFAR-100 train and test splits from torchvision's python format under ``root``, checked for
    shape and label range (< ``num_classes``)."""
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


def load_image(path: str):
    """torchvision's ``default_loader`` (an RGB PIL image), with an error naming the file it cannot read."""
    from PIL import UnidentifiedImageError

    try:
        return datasets.folder.default_loader(path)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise CorruptDatasetError(f"image {path} cannot be read ({type(e).__name__}: {e}); remove or replace "
                                  "it") from None


def imagefolder_splits(root: Path, train_tf, test_tf):
    """``root/train`` and ``root/val`` (or ``root/test``) as ImageFolder datasets with the same classes."""
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
            splits.append(datasets.ImageFolder(str(split_dir), transform=tf, loader=load_image))
        except FileNotFoundError as err:
            raise DatasetNotFoundError(f"imagefolder split {split_dir}: {err}; {hint}") from err
    train, test = splits
    if train.classes != test.classes:
        raise ValueError(
            f"imagefolder class folders differ: {train_dir} has {len(train.classes)}, {eval_dir} has "
            f"{len(test.classes)}; only in one of them: {sorted(set(train.classes) ^ set(test.classes))[:10]}"
        )
    return train, test

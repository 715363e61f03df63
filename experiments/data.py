"""Datasets, transforms and data loaders for the training script.

Datasets (``DataConfig.name``): ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagefolder``, read from disk by
`experiments.datafiles`.

Two transform recipes:

* small-image recipe (28x28 / 32x32 datasets at native size): RandomCrop with padding, horizontal flip, timm's
  auto-augment (RandAugment, AugMix or AutoAugment, from the ``aa`` spec), normalisation, timm's RandomErasing.
* resized recipe (``imagefolder``, or a different ``img_size``): ``timm.data.create_transform`` (RandomResizedCrop
  for training, resize + center crop for evaluation).
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms

from .datafiles import cifar_splits, fashion_mnist_splits, imagefolder_splits

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "imagefolder")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
DEFAULT_FASHION_MNIST_ROOT = "~/.cache/hopfield-mixers/data"
IMAGEFOLDER_DEFAULT_SIZE = 224


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
        train, test = fashion_mnist_splits(root, train_tf, test_tf, explicit=cfg.root is not None)
    elif cfg.name in ("cifar10", "cifar100"):
        train, test = cifar_splits(cfg.name, root, train_tf, test_tf, spec.num_classes)
    else:
        train, test = imagefolder_splits(root, train_tf, test_tf)
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

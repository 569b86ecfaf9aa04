"""`build_dataset`: a `DataConfig` and a split -> the dataset (every source: IDX files, ImageFolder, CIFAR,
MNIST / torchvision / HF folders, streamed shards), with label subsets and the held-out validation split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from . import extra
from beit.config import DataConfig

from .datasets import (FASHION_MNIST_CLASSES, ImageDataset, ImageFolderDataset, SubsetDataset, _scan_folder,
                       _split_off_val, balanced_subset, load_fashion_mnist)
from .scan_cache import cached_scan
from .shards import build_shard_dataset
from .transforms import pil_mode

log = logging.getLogger("beit.data.datasets")  # where build_dataset lived: the same logger name


def training_classes(root: Path) -> list[str] | None:
    """The class names of an ImageFolder root's training split (`root/train`), the index every split of a run
    is read with; None without a labelled training folder."""
    if not (root / "train").is_dir():
        return None
    classes, _ = cached_scan(root / "train", _scan_folder)
    return None if classes == [""] else list(classes)


def build_dataset(cfg, split: str, transform: Callable | None = None, label_seed: int = 0,
                  classes: Sequence[str] | None = None) -> Dataset:
    """Dataset of `(transform(pil_img), label)` for a `DataConfig` and split "train" | "val" | "test".

    With `transform=None` items are PIL images (mode 'L' if cfg.in_chans == 1 else 'RGB'), as `MIMDataset`
    expects. `label_fraction` (train only) keeps a class-balanced subset seeded by `label_seed`;
    `train_subset` / `eval_subset` then keep the first N samples. `dataset: webdataset` gives an iterable
    `ShardDataset` (beit/data/shards.py) instead. An ImageFolder evaluation split is numbered by `classes`
    (default: the training folder's classes), never by its own folders.
    """
    _check_split(cfg, split)
    if cfg.dataset == "webdataset":  # streamed: no random access, so no subsets (the reader says so)
        return build_shard_dataset(cfg, split, transform, seed=label_seed, classes=classes)
    # with data.val_size, "train" and "val" are two parts of the source's training split
    from_train = bool(cfg.val_size) and split != "test"
    ds = _source_dataset(cfg, "train" if from_train else split, transform, classes)
    return _subsets(cfg, ds, split, from_train, label_seed)


def _check_split(cfg, split: str) -> None:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if cfg.val_size and cfg.dataset == "webdataset":
        raise ValueError("data.val_size needs random access, which streamed shards do not have; write the "
                         "validation images as their own shards and name them in data.val_shards")
    if split == "val" and not cfg.val_size and cfg.dataset != "webdataset":
        raise ValueError("the 'val' split needs data.val_size > 0 (training images held out for validation)")


def _source_dataset(cfg, split: str, transform: Callable | None, classes: Sequence[str] | None) -> Dataset:
    """The whole `split` ("train" | "test") of the map-style source `cfg.dataset`."""
    mode = pil_mode(cfg.in_chans)
    if cfg.dataset == "fashion_mnist":
        return ImageDataset(*load_fashion_mnist(cfg.root, split), mode, transform, FASHION_MNIST_CLASSES)
    if cfg.dataset == "image_folder":
        return _image_folder(cfg, split, mode, transform, classes)
    if cfg.dataset in extra.TORCHVISION_NAMES or cfg.dataset.startswith("torchvision:"):
        return extra.torchvision_dataset(cfg.dataset, cfg.root, split, mode, transform)
    if cfg.dataset == "mnist":
        return ImageDataset(*extra.load_mnist(cfg.root, split), mode, transform, extra.MNIST_CLASSES)
    if cfg.dataset == "hf":
        return extra.hf_dataset(cfg.root, split, mode, transform)
    raise ValueError(f"unknown data.dataset {cfg.dataset!r}")  # unreachable through DataConfig's Literal


def _image_folder(cfg, split: str, mode: str, transform: Callable | None,
                  classes: Sequence[str] | None) -> ImageFolderDataset:
    """`root/<split>/<class>/*.jpg` (evaluation: `root/val` when there is no `root/test`; training: `root`
    itself when there is no `root/train`)."""
    if not cfg.root:
        raise ValueError("data.root must be set for dataset 'image_folder' (root/<split>/<class>/*.jpg)")
    root = Path(cfg.root).expanduser()
    train = split == "train"
    folder = root / split
    if not train and not folder.is_dir() and (root / "val").is_dir():
        folder = root / "val"  # ImageNet-style layout: val/ is the evaluation split
    if not folder.is_dir():
        if not train:
            raise FileNotFoundError(
                f"no '{split}' (or 'val') folder under data.root '{root}' (expected {folder}/<class>/*.jpg)"
            )
        log.info("'%s' does not exist; using '%s' itself as the training folder", folder, root)
        folder = root
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root '{root}' is not a directory")
    if not train and classes is None:
        classes = training_classes(root)
    return ImageFolderDataset(folder, mode, transform, cfg.on_bad_file, classes,
                              getattr(cfg, "on_unknown_class", "fail"))


def _subsets(cfg, ds: Dataset, split: str, from_train: bool, label_seed: int) -> Dataset:
    """`ds` cut to `split`: when `ds` is the training split that data.val_size divides (`from_train`), its
    held-out part ("val") or the rest ("train"); then the training label fraction, then the first
    train_subset / eval_subset samples."""
    if from_train:
        ds = _split_off_val(ds, split, cfg.val_size)
    train = split == "train"
    if train and cfg.label_fraction < 1:
        ds = SubsetDataset(ds, balanced_subset(ds.targets, cfg.label_fraction, label_seed))
    n = cfg.train_subset if train else cfg.eval_subset
    if n is not None and n < len(ds):
        ds = SubsetDataset(ds, np.arange(n))
    return ds



def shard_source(src: str, dataset: str | None, split: str, in_chans: int | None):
    """What `beit data shard SRC` writes: (dataset of PIL images, class names, dataset name) for SRC read as
    `dataset` (None: Fashion-MNIST if SRC holds its IDX files, else an ImageFolder)."""
    root = Path(src).expanduser()
    if dataset is None:
        dataset = "fashion_mnist" if root.is_dir() and any(root.glob("*-idx3-ubyte*")) else "image_folder"
    if dataset == "webdataset":
        raise ValueError("--dataset webdataset: SRC is already shards")
    in_chans = in_chans or (1 if dataset in ("fashion_mnist", "mnist") else 3)
    ds = build_dataset(DataConfig(dataset=dataset, root=str(root), in_chans=in_chans), split)
    base = ds
    while not getattr(base, "classes", None) and hasattr(base, "base"):
        base = base.base
    classes = list(getattr(base, "classes", None) or []) or [str(c) for c in range(int(max(ds.targets)) + 1)]
    return ds, classes, dataset

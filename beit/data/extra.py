"""Datasets people already have, beside Fashion-MNIST / ImageFolder / CIFAR (beit/data/datasets.py):

    data.dataset=mnist                 MNIST IDX files (the Fashion-MNIST reader) in data.root
    data.dataset=torchvision:STL10     any torchvision dataset class, read from data.root (never downloads)
    data.dataset=hf                    a Hugging Face `datasets` dataset on disk at data.root: a
                                       `save_to_disk` folder, or parquet files (`<split>-*.parquet`,
                                       `<split>/*.parquet`, also under `data/`, the hub layout)

Each returns a `PILDataset`; `beit.data.build.build_dataset` picks the reader from `data.dataset`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .datasets import load_idx_split
from .transforms import to_mode

log = logging.getLogger(__name__)

MNIST_CLASSES = [str(i) for i in range(10)]
# The split names each source uses for our "test" (evaluation) split, in order of preference.
_EVAL_SPLITS = ("test", "validation", "val", "valid")


class PILDataset(Dataset):
    """`load_image(i)` (PIL, any mode) + `targets` -> (transform(image in `mode`), label); the interface
    `build_dataset` gives every dataset (MIMDataset and SubsetDataset need load_image and targets)."""

    def __init__(self, get_image: Callable[[int], Image.Image], targets, classes: list[str], mode: str,
                 transform: Callable | None = None):
        self.get_image, self.targets, self.classes = get_image, np.asarray(targets, dtype=np.int64), list(classes)
        self.mode, self.transform = mode, transform

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, i: int) -> Image.Image:
        img = self.get_image(int(i))
        return to_mode(img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)), self.mode)

    def __getitem__(self, i: int):
        img = self.load_image(i)
        return (self.transform(img) if self.transform else img), int(self.targets[i])


# ------------------------------------------------------------------------------------------------ MNIST
def load_mnist(root: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) from IDX files in root, root/MNIST/raw or root/raw."""
    if not root:
        raise ValueError("data.root must be set for dataset 'mnist' (a folder holding the four IDX files)")
    r = Path(root).expanduser()
    return load_idx_split([r, r / "MNIST" / "raw", r / "raw"], split, "MNIST",
                          "Set data.root to the folder holding them")


# ------------------------------------------------------------------------------------------------ torchvision
def torchvision_dataset(name: str, root: str | None, split: str, mode: str, transform=None) -> PILDataset:
    """`torchvision.datasets.<Class>(root, train=... | split=..., download=False)` as a PILDataset."""
    import inspect

    from torchvision import datasets as tvd

    cls_name = name.split(":", 1)[1]
    cls = getattr(tvd, cls_name, None)
    if not inspect.isclass(cls):
        raise ValueError(f"data.dataset={name}: torchvision.datasets has no class {cls_name!r}")
    if not root:
        raise ValueError(f"data.root must be set for data.dataset={name} (the folder the dataset class reads)")
    params = inspect.signature(cls).parameters
    kwargs = {"download": False} if "download" in params else {}
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    try:
        base = cls(root, **kwargs)
    except (RuntimeError, ValueError) as e:
        raise FileNotFoundError(f"{name} not found or incomplete under '{root}' ({e}); beit never downloads: "
                                f"fetch it once with torchvision.datasets.{cls_name}(root, download=True)") from None
    targets = next((getattr(base, a) for a in ("targets", "labels", "_labels") if hasattr(base, a)), None)
    if targets is None:
        raise ValueError(f"{name}: the dataset has no targets/labels attribute, so labels are unknown")
    return PILDataset(lambda i: base[i][0], targets, getattr(base, "classes", []), mode, transform)


# ------------------------------------------------------------------------------------------------ HF datasets
def _parquet_files(root: Path, split: str) -> list[str]:
    for base in (root, root / "data"):
        files = sorted(base.glob(f"{split}-*.parquet")) + sorted(base.glob(f"{split}.parquet")) + \
            sorted(base.glob(f"{split}/*.parquet"))
        if files:
            return [str(f) for f in files]
    return []


def _hf_split(root: Path, split: str):
    """The `datasets.Dataset` of our split ("train" | "test", test also as validation/val) at `root`."""
    import datasets

    names = ("train",) if split == "train" else _EVAL_SPLITS
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.Dataset):
            return ds if split == "train" else None
        name = next((n for n in names if n in ds), None)
        return ds[name] if name else None
    for name in names:
        files = _parquet_files(root, name)
        if files:
            return datasets.load_dataset("parquet", data_files={name: files}, split=name)
    return None


def hf_dataset(root: str | None, split: str, mode: str, transform=None) -> PILDataset:
    if not root:
        raise ValueError("data.root must be set for dataset 'hf' (a save_to_disk folder or parquet files)")
    try:
        import datasets
    except ImportError:
        raise ImportError("data.dataset=hf needs the `datasets` package: pip install datasets") from None
    ds = _hf_split(Path(root).expanduser(), split)
    if ds is None:
        raise FileNotFoundError(f"no '{split}' split at '{root}': expected a datasets.save_to_disk folder or "
                                f"<split>-*.parquet / <split>/*.parquet files")
    image_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    label_col = label_col or next((k for k in ("label", "labels") if k in ds.features), None)
    if image_col is None or label_col is None:
        raise ValueError(f"'{root}' ({split}): need an Image column and a label column; features are "
                         f"{dict(ds.features)}")
    feature = ds.features[label_col]
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else []
    return PILDataset(lambda i: ds[i][image_col], ds[label_col], classes, mode, transform)

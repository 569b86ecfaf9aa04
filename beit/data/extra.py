"""Datasets people already have, beside Fashion-MNIST / ImageFolder (beit/data/datasets.py):

    data.dataset=cifar10 | cifar100    torchvision's CIFAR-10 / CIFAR-100 files in data.root
    data.dataset=mnist                 MNIST IDX files (the Fashion-MNIST reader) in data.root
    data.dataset=torchvision:STL10     any torchvision dataset class, read from data.root (never downloads)
    data.dataset=hf                    a Hugging Face `datasets` dataset on disk at data.root: a
                                       `save_to_disk` folder, or parquet files (`<split>-*.parquet`,
                                       `<split>/*.parquet`, also under `data/`, the hub layout)

Each is an `ImageDataset`; `beit.data.build.build_dataset` picks the reader from `data.dataset`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .datasets import Field, ImageDataset, load_idx_split

log = logging.getLogger(__name__)

MNIST_CLASSES = [str(i) for i in range(10)]
# The split names each source uses for our "test" (evaluation) split, in order of preference.
_EVAL_SPLITS = ("test", "validation", "val", "valid")
# The torchvision class each of our dataset names reads.
TORCHVISION_NAMES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


# ------------------------------------------------------------------------------------------------ MNIST
def load_mnist(root: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) from IDX files in root, root/MNIST/raw or root/raw."""
    if not root:
        raise ValueError("data.root must be set for dataset 'mnist' (a folder holding the four IDX files)")
    r = Path(root).expanduser()
    return load_idx_split([r, r / "MNIST" / "raw", r / "raw"], split, "MNIST",
                          "Set data.root to the folder holding them")


# ------------------------------------------------------------------------------------------------ torchvision
def torchvision_dataset(name: str, root: str | None, split: str, mode: str, transform=None) -> ImageDataset:
    """`torchvision.datasets.<Class>(root, train=... | split=..., download=False)` as an ImageDataset, for
    data.dataset=torchvision:<Class> and for the names in TORCHVISION_NAMES (cifar10 is CIFAR10)."""
    import inspect

    from torchvision import datasets as tvd

    cls_name = TORCHVISION_NAMES.get(name) or name.split(":", 1)[1]
    cls = getattr(tvd, cls_name, None)
    if not inspect.isclass(cls):
        raise ValueError(f"data.dataset={name}: torchvision.datasets has no class {cls_name!r}")
    if not root:
        raise ValueError(f"data.root must be set for data.dataset={name} (the folder torchvision.datasets."
                         f"{cls_name} reads)")
    params = inspect.signature(cls).parameters
    kwargs = {"download": False} if "download" in params else {}
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    try:
        base = cls(root, **kwargs)
    except (RuntimeError, ValueError) as e:
        raise FileNotFoundError(
            f"{name} not found or incomplete under '{root}' ({e}); beit never downloads: fetch it once with "
            f"`python -c \"import torchvision; torchvision.datasets.{cls_name}('{root}', download=True)\"`"
        ) from None
    targets = next((getattr(base, a) for a in ("targets", "labels", "_labels") if hasattr(base, a)), None)
    if targets is None:
        raise ValueError(f"{name}: the dataset has no targets/labels attribute, so labels are unknown")
    return ImageDataset(Field(base, 0), targets, mode, transform, getattr(base, "classes", []))


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


def hf_dataset(root: str | None, split: str, mode: str, transform=None) -> ImageDataset:
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
    return ImageDataset(Field(ds, image_col), ds[label_col], mode, transform, classes)

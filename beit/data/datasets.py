"""Datasets: `ImageDataset`, the one dataset of every labelled image source (Fashion-MNIST IDX files and
ImageFolder here; CIFAR, MNIST, torchvision:<Class> and HF `datasets` folders in beit/data/extra.py;
`build_dataset`, which picks one from a config, in beit/data/build.py), `SubsetDataset` for label subsets and
held-out splits, and the masked-image-modeling dataset that yields (patch view, tokenizer view, mask).

Bad image files (ImageFolder). With `on_bad_file="fail"` the first file that cannot be decoded raises, naming
it. With "skip" (default) `__getitem__` logs a warning with the path and returns a `BadSample(path, error)`
instead of an item -- never a silent resample, which would change the sample order and break exact resume.
`collate_skip_bad` (use it as the DataLoader's collate_fn) drops those and records them in the batch:
`batch.num_bad` / `batch.bad_paths` on (images, labels) batches, `batch["num_bad"]` / `batch["bad_paths"]`
on MIM batches. The collate runs inside the worker, so the count travels to the main process with the batch;
feed every batch to a `BadFileTracker` for the run summary.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from .masking import MaskingGenerator
from .scan_cache import cached_scan
from .transforms import TwoViewTransform, pil_mode, to_mode

log = logging.getLogger(__name__)

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadSample(NamedTuple):
    """Placeholder item for an image that could not be decoded (dropped by `collate_skip_bad`)."""

    path: str
    error: str


class BadFileError(RuntimeError, ValueError):
    """A file that cannot be read, under data.on_bad_file=fail: bad input (a ValueError, reported as one line by
    the CLI), and a RuntimeError as it always was for callers that catch that."""


def skip_or_fail(on_bad_file: str, name: str, problem: str, quiet: bool = False) -> BadSample:
    """A sample that cannot be used, under `data.on_bad_file`: "fail" raises one error naming it and what to do;
    "skip" logs it (unless `quiet`: already reported) and returns the placeholder that the collate functions
    drop and the loop counts."""
    if on_bad_file == "fail":
        raise BadFileError(f"{problem}: '{name}'. Fix or remove it, or set data.on_bad_file=skip to skip (and "
                           f"count) such samples")
    if not quiet and get_worker_info() is None:  # a worker's warning would repeat every epoch:
        warn_bad_files([name], problem)  # the main process warns for those, once per file (`BadFileTracker`)
    return BadSample(name, problem)


def decode_or_skip(read: Callable[[], Any], on_bad_file: str, name: str, what: str = "image",
                   quiet: bool = False) -> Any:
    """`read()`, which decodes one file or sample; if it raises, the bad sample "cannot decode <what> (<error>)"
    named `name`, under `data.on_bad_file` (`skip_or_fail`). The one decode-or-skip of every dataset:
    ImageFolder files, segmentation images and masks, shard samples. A `BadFileError` from `read` (its own
    verdict under on_bad_file=fail) passes through as it is."""
    try:
        return read()
    except BadFileError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return skip_or_fail(on_bad_file, name, f"cannot decode {what} ({type(e).__name__}: {e})", quiet)


def open_image(src, mode: str) -> Image.Image:
    """The image file `src` (a path or a file object) in PIL mode `mode`, decoded in full: convert() reads
    every pixel, so a truncated file fails here rather than later in a transform."""
    with Image.open(src) as f:
        return f.convert(mode)



def load_image_files(paths: list[str], in_chans: int, size: int | None = None, multiple: int = 1) -> torch.Tensor:
    """Image files -> [B, C, S, S] floats in [0, 1] with `in_chans` channels, resized (antialiased) to S = `size`,
    else the first image's short side rounded down to a multiple of `multiple` (a tokenizer's downsample)."""
    imgs = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image '{p}' does not exist")
        try:
            img = open_image(p, pil_mode(in_chans))
        except Exception as e:  # PIL: UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError, ...
            raise ValueError(f"'{p}' is not an image PIL can read ({type(e).__name__}: {e}); pass image files "
                             f"(.png, .jpg, ...)") from None
        if size is None:
            size = max(min(img.size) // multiple * multiple, multiple)
        imgs.append(TF.pil_to_tensor(TF.resize(img, [size, size], antialias=True)).float() / 255)
    return torch.stack(imgs)  # [B, C, S, S]

_WARNED: set[str] = set()  # bad files this process has warned about


def warn_bad_files(paths, problem: str = "undecodable") -> None:
    """Warn about each bad file once per process (a run sees a bad file every epoch)."""
    for path in paths:
        if path not in _WARNED:
            _WARNED.add(path)
            log.warning("skipping '%s': %s (warned once; counted in the run summary)", path, problem)


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): uint8 data with big-endian int32 dims after a 4-byte magic."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(*dims)


def _find_idx(dirs: Sequence[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


_IDX_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def load_idx_split(dirs: Sequence[Path], split: str, name: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels int64 [N]) of an MNIST-format split (`train-*` / `t10k-*` IDX files,
    optionally .gz) from the first of `dirs` holding them, read once per process."""
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(f"{name} '{prefix}-images-idx3-ubyte[.gz]' / '{prefix}-labels-idx1-ubyte[.gz]' not "
                                f"found in {', '.join(map(str, dirs))}. {hint}")
    key = (str(img_path), str(lbl_path))
    if key not in _IDX_CACHE:
        images, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"{img_path} / {lbl_path}: {images.shape} images vs {labels.shape} labels")
        _IDX_CACHE[key] = (images, labels)
    return _IDX_CACHE[key]


def load_fashion_mnist(root: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) read once per process from the IDX files.

    Looks in `root`, `root/FashionMNIST/raw` (torchvision layout) and `root/raw`; without a root, in the Debian
    package path. A root given is used or refused, never replaced by another copy.
    """
    if not root:
        return load_idx_split([Path(FASHION_MNIST_DEBIAN)], split, "Fashion-MNIST", "Install them with `apt-get "
                              "install dataset-fashion-mnist` (as root) or set data.root to a directory holding them")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise FileNotFoundError(f"data.root '{root}' does not exist; point it at the folder holding the Fashion-MNIST "
                                f"IDX files, or set data.root=null to read the system copy ({FASHION_MNIST_DEBIAN})")
    return load_idx_split([r, r / "FashionMNIST" / "raw", r / "raw"], split, "Fashion-MNIST",
                          "Set data.root to the folder holding them, or data.root=null for the system copy")


class ImageDataset(Dataset):
    """One image source as a labelled dataset: item i is (transform(image i in PIL mode `mode`), targets[i]).

    `images[i]` is a PIL image, a uint8 array ([H, W] grayscale or [H, W, 3]) or the path of an image file,
    decoded here; a file that cannot be decoded gives a `BadSample` or an error under `on_bad_file`
    (`decode_or_skip`). Every labelled source is one: Fashion-MNIST and MNIST arrays, ImageFolder files,
    CIFAR and other torchvision datasets, HF `datasets` folders (those two through `Field`). `load_image` (the
    image alone) is what `MIMDataset` reads; augmentation keyed by (seed, epoch, index) is `KeyedItems` around
    the dataset a run trains on, so that the key is that dataset's index, also for a subset.
    """

    def __init__(self, images: Sequence, targets: Sequence[int], mode: str, transform: Callable | None = None,
                 classes: Sequence[str] = (), on_bad_file: str = "skip"):
        self.images, self.targets, self.classes = images, np.asarray(targets, dtype=np.int64), list(classes)
        self.mode, self.transform, self.on_bad_file = mode, transform, on_bad_file

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, i: int) -> Image.Image | BadSample:
        img = self.images[int(i)]
        if isinstance(img, (str, os.PathLike)):
            return decode_or_skip(lambda: open_image(img, self.mode), self.on_bad_file, str(img))
        return to_mode(img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)), self.mode)

    def __getitem__(self, i: int):
        img = self.load_image(i)
        if isinstance(img, BadSample):
            return img
        return (self.transform(img) if self.transform else img), int(self.targets[i])


class Field:
    """`source[i][key]` as a sequence: the images of a source whose items are (image, label) tuples (key 0)
    or dicts (key: the image column), read one at a time."""

    def __init__(self, source, key):
        self.source, self.key = source, key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.source[i][self.key]


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes = sorted sub-directories (files found recursively); images directly in `root` form one class."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:  # a flat folder of images (unlabelled pretraining data)
        classes = [""]
        samples = [(str(root / f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(IMG_EXTENSIONS)]
    return classes, samples


class UnknownClassError(ValueError):
    """An evaluation split holds a class the run's class index (the training split's) does not know."""


def reindex_samples(root: Path, found: list[str], samples: list[tuple[str, int]], classes: list[str],
                    on_unknown_class: str = "fail") -> tuple[list[tuple[str, int]], dict[str, int]]:
    """`samples` labelled by their folder's position in `classes` (the run's class index) instead of in `found`
    (this split's own sorted folders), so a split lacking a class shifts no label. A folder not in `classes`
    is an error, or with on_unknown_class="skip" its images are dropped. Returns (samples, {skipped class:
    images})."""
    if found == classes:
        return samples, {}
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in found if name not in index]
    if unknown and on_unknown_class != "skip":
        raise UnknownClassError(
            f"'{root}' has class folders the training split does not: {unknown} (the run's classes, fixed by the "
            f"training split: {classes}); remove those folders, or set data.on_unknown_class=skip to skip (and "
            f"count) their images")
    kept, skipped = [], {}
    for path, label in samples:
        name = found[label]
        if name in index:
            kept.append((path, index[name]))
        else:
            skipped[name] = skipped.get(name, 0) + 1
    if skipped:
        log.warning("'%s': skipped the images of classes the training split does not have (data.on_unknown_class="
                    "skip): %s", root, ", ".join(f"{k} ({v} images)" for k, v in skipped.items()))
    return kept, skipped


class ImageFolderDataset(ImageDataset):
    """`root/<class>/**/*.jpg` -> (transform(PIL image), class index); undecodable files are skipped or fail.

    `classes` (the training split's class names) fixes the index: an evaluation split is read with the
    training split's numbering, whatever folders it lacks (`reindex_samples`)."""

    def __init__(self, root: str | Path, mode: str, transform: Callable | None = None, on_bad_file: str = "skip",
                 classes: Sequence[str] | None = None, on_unknown_class: str = "fail"):
        self.root = Path(root)
        found, samples = cached_scan(self.root, _scan_folder)  # a 14M-file tree is listed once
        self.skipped_classes: dict[str, int] = {}
        if classes is not None and samples:
            samples, self.skipped_classes = reindex_samples(self.root, list(found), samples, list(classes),
                                                            on_unknown_class)
            found = classes
        if not samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) under '{self.root}'; expected {self.root}/<class>/*.jpg"
            )
        self.samples = samples  # [(path, label)]
        super().__init__(Field(samples, 0), [label for _, label in samples], mode, transform, found, on_bad_file)


# ---------------------------------------------------------------------------------------------------------------
# Subsets


class SubsetDataset(Dataset):
    """`base` restricted to `indices`, in that order: label subsets, held-out validation splits and the first
    N samples, of labelled and segmentation datasets alike. It keeps `targets` (the subset's), `load_image`,
    and the base's `classes`, `transform` and `set_epoch`, where the base has them (torch's Subset drops them).
    """

    _FROM_BASE = ("classes", "transform", "set_epoch")

    def __init__(self, base, indices: Sequence[int]):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        if hasattr(base, "targets"):
            self.targets = np.asarray(base.targets)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, i: int):
        return self.base.load_image(int(self.indices[i]))

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def __getattr__(self, name: str):
        if name in SubsetDataset._FROM_BASE:  # only these: e.g. an ImageFolder's `samples` are not the subset's
            return getattr(self.base, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def balanced_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced (stratified), seeded subset: round(fraction * n_c) of each class c.

    Raises ValueError naming the class when the fraction leaves a class without samples.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"data.label_fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, 0x5EB5E7])  # fixed stream, independent of the training seed's uses
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        if k == 0:
            raise ValueError(
                f"data.label_fraction={fraction} keeps no sample of class {c} ({len(idx)} samples); "
                f"use a fraction >= {1 / len(idx):.4g}"
            )
        picked.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(picked))


def stratified_holdout(labels: Sequence[int], size: int) -> np.ndarray:
    """Sorted indices of `size` samples held out for validation, stratified: each class gives its share
    (largest remainders make the total exact). The draw is fixed (seed 0 of its own stream): every run, seed
    and label fraction sees the same validation split."""
    labels = np.asarray(labels)
    if not 0 < size < len(labels):
        raise ValueError(f"data.val_size={size} must be between 1 and the training split's size - 1 ({len(labels) - 1})")
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * size / len(labels)
    take = np.floor(share).astype(int)
    take[np.argsort(-(share - take), kind="stable")[: size - take.sum()]] += 1
    rng = np.random.default_rng([0, 0x7A11D])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _split_off_val(ds, split: str, val_size: int):
    """The training split's rest ("train") or its held-out part ("val") under data.val_size."""
    held = stratified_holdout(ds.targets, val_size)
    if split == "val":
        return SubsetDataset(ds, held)
    return SubsetDataset(ds, np.setdiff1d(np.arange(len(ds)), held))


def num_labels(ds) -> int:
    """Number of classes a labelled dataset holds: max label + 1, or for shards (streamed, no label array)
    the class count of the index `beit data shard` wrote."""
    return ds.num_classes if hasattr(ds, "num_classes") else int(np.max(ds.targets)) + 1


# ---------------------------------------------------------------------------------------------------------------
# Masked image modeling


class MIMDataset(Dataset):
    """Pretraining items: {"image": [C,H,W] normalised, "tok_image": [C,h,w] in [0,1], "mask": bool [gh,gw]}.

    Item i of epoch e draws everything (jitter, flip, crop, mask) from `np.random.default_rng([seed, e, i])`,
    so a sample depends only on (seed, epoch, index): no worker seeding, identical after a resume.
    `set_epoch` must be called before the DataLoader iterator is created (workers copy the dataset then).
    `base` must yield PIL images (build it with transform=None); labels are ignored.
    """

    def __init__(self, base, two_view: TwoViewTransform, mask_gen: MaskingGenerator, seed: int = 0):
        if not hasattr(base, "load_image"):
            raise ValueError("MIMDataset: base must come from build_dataset(cfg, split) (it needs load_image); "
                             "streamed shards (data.dataset=webdataset) have no random access: use the source "
                             "dataset for this command")
        self.base, self.item, self.epoch = base, MIMItem(two_view, mask_gen, seed), 0

    @property
    def seed(self) -> int:
        return self.item.seed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | BadSample:
        img = self.base.load_image(i)
        if isinstance(img, BadSample):
            return img
        return self.item(img, None, i, self.epoch)


class MIMItem:
    """One pretraining item from a PIL image, drawn from `np.random.default_rng([seed, epoch, index])` (shared
    by `MIMDataset` and the shard reader, so a sample gets the same views and mask from either)."""

    def __init__(self, two_view: TwoViewTransform, mask_gen: MaskingGenerator, seed: int = 0):
        self.two_view, self.mask_gen, self.seed = two_view, mask_gen, int(seed)

    def __call__(self, img: Image.Image, label, index: int, epoch: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        image, tok_image = self.two_view(img, rng)
        mask = torch.from_numpy(self.mask_gen(rng))
        return {"image": image, "tok_image": tok_image, "mask": mask}


# ---------------------------------------------------------------------------------------------------------------
# Keyed augmentation for transforms that draw from the global RNGs (timm's and torchvision's)


@contextlib.contextmanager
def keyed_global_rng(seed: int, epoch: int, index: int):
    """torch's, Python's and numpy's global RNGs seeded by (seed, epoch, index) for the block.

    timm and torchvision transforms draw from these global streams, whose position would otherwise depend on
    how many samples this process (or loader worker) drew before: a run resumed inside an epoch, or with
    another `data.num_workers`, would see other crops. In the main process (`num_workers=0`) the states are
    put back afterwards, since they also drive training (drop path, mixing) and the caller's own draws; a
    loader worker's streams serve nothing else.
    """
    restore = get_worker_info() is None
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if restore else None
    torch_seed, np_seed = np.random.SeedSequence([int(seed), int(epoch), int(index), 0xA06]).generate_state(2)
    torch.default_generator.manual_seed(int(torch_seed))  # CPU only: transforms run on CPU tensors
    random.seed(int(torch_seed))
    np.random.seed(int(np_seed))
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class KeyedItems(Dataset):
    """`base[i]` drawn in epoch e under `keyed_global_rng(seed, e, i)`: a fine-tuning or probing sample's
    augmentation depends only on (seed, epoch, index), as pretraining's does (`MIMItem`). The loader calls
    `set_epoch` (also inside persistent workers, see beit/data/loader.py); other attributes (`targets`,
    `classes`, `load_image`, ...) are the base dataset's."""

    def __init__(self, base, seed: int):
        self.base, self.seed, self.epoch = base, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with keyed_global_rng(self.seed, self.epoch, i):
            return self.base[i]

    def __getattr__(self, name: str):
        if name == "base" or name.startswith("__"):  # unpickling (spawned workers) before `base` is set
            raise AttributeError(name)
        return getattr(self.base, name)


def keyed_items(ds, seed: int):
    """A training set whose transform draws from the global RNGs, keyed by (seed, epoch, index). Streamed
    shards key their items themselves (`shards.LabeledItem`) and are returned as they are."""
    return ds if isinstance(ds, IterableDataset) else KeyedItems(ds, seed)


# ---------------------------------------------------------------------------------------------------------------
# Collation and bad-file accounting


class LabeledBatch(tuple):
    """`(images, labels)` that also carries `num_bad` / `bad_paths` (survives DataLoader pin_memory)."""

    num_bad: int
    bad_paths: list[str]

    def __new__(cls, items, num_bad: int = 0, bad_paths: list[str] | None = None):
        self = super().__new__(cls, items)
        self.num_bad, self.bad_paths = num_bad, list(bad_paths or [])
        return self

    def pin_memory(self):
        return LabeledBatch([x.pin_memory() if torch.is_tensor(x) else x for x in self], self.num_bad, self.bad_paths)


def collate_mim_skip_bad(batch: list) -> dict:
    """DataLoader collate for `MIMDataset`: drops `BadSample`s; adds "num_bad" (int) and "bad_paths" (list[str]).

    If every item of the batch was bad, the dict holds only those two keys (no "image"): skip that step.
    """
    bad = [s.path for s in batch if isinstance(s, BadSample)]
    good = [s for s in batch if not isinstance(s, BadSample)]
    out = default_collate(good) if good else {}
    out["num_bad"], out["bad_paths"] = len(bad), bad
    return out


def collate_skip_bad(batch: list) -> Any:
    """DataLoader collate for `(x, y)` datasets: drops `BadSample`s and returns a `LabeledBatch`.

    It unpacks as `x, y` and carries `.num_bad` / `.bad_paths`; if every item was bad, `x` and `y` are None
    (skip that step). Dict items (MIM) are handed to `collate_mim_skip_bad`.
    """
    good = [s for s in batch if not isinstance(s, BadSample)]
    if good and isinstance(good[0], dict):
        return collate_mim_skip_bad(batch)
    bad = [s.path for s in batch if isinstance(s, BadSample)]
    items = default_collate(good) if good else (None, None)
    return LabeledBatch(items, len(bad), bad)


class BadFileTracker:
    """Main-process tally of skipped files for the run summary: call `update(batch)` on every batch."""

    def __init__(self):
        self.num_skipped = 0  # skip events (a bad file counts once per epoch it is drawn)
        self.paths: set[str] = set()  # distinct bad files

    def update(self, batch) -> int:
        """Record the batch's bad files; returns how many were skipped in it."""
        if isinstance(batch, dict):
            n, paths = batch.get("num_bad", 0), batch.get("bad_paths", [])
        else:
            n, paths = getattr(batch, "num_bad", 0), getattr(batch, "bad_paths", [])
        self.num_skipped += int(n)
        self.paths.update(paths)
        warn_bad_files(paths)
        return int(n)

    def summary(self) -> dict:
        """Distinct files: one drawn in every epoch counts once."""
        return {"num_bad_skipped": len(self.paths), "bad_files": sorted(self.paths)}

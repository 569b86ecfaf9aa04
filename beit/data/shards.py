"""Streaming tar shards (WebDataset format): writing them from any dataset `beit` reads, and reading them
for training with exact sample counts, rank/worker splitting, buffer shuffling and exact resume.

Format. `beit data shard SRC OUT` writes `OUT/<split>-000000.tar, ...`; sample `<key>` of a shard is the
files `<key>.<ext>` (the encoded image: the original bytes of an ImageFolder file, PNG for in-memory
datasets such as Fashion-MNIST) and `<key>.cls` (the class index as text). The key is the sample's index in
the source dataset, zero-padded (`00001234`). `OUT/shards.json` lists every shard's sample count (and each
split's class names): the reader needs those counts to know an epoch's length before reading anything.
Evaluation shards are read with the training shards' class index, by name (`shard_label_map`).

Order of an epoch e (training split). The shard list is permuted by (seed, e); rank r of W takes shards
r, r+W, r+2W, ... of that permutation; loader worker w of N takes every N-th of the rank's shards. Each
worker streams its shards in order through a shuffle buffer (`data.shuffle_buffer` samples) seeded by
(seed, e, r, w). The DataLoader batches inside each worker (drop_last) and takes batches from the workers
in turn. So each sample is assigned to exactly one (rank, worker) per epoch: none is read twice, none is
left out of the assignment. What an epoch consumes is `batches_per_rank` batches on every rank, the
minimum over ranks and epochs of what the assignment provides, so that all ranks take the same number of
steps; the surplus of the other ranks (less than a shard per worker when shards are of equal size) is left
unread that epoch, a different surplus each epoch.

Resume. A run resumed k batches into epoch e rebuilds the same assignment and buffer order; each worker
works out how many of its own batches the loader had taken (the loader takes them in turn) and discards
that many samples from its raw stream -- reading the tar bytes again but decoding nothing -- before it
decodes the rest; the fresh loader's workers are rotated so that the first one asked is the one whose turn
it was. The resumed run therefore sees exactly the batches an uninterrupted run would have seen:
no sample twice within an epoch, none lost. This needs the same world size and `data.num_workers` as the
interrupted run (the order of an epoch depends on both).

Bad samples are `BadSample("<shard>/<key>", error)`, counted by the same collate functions and
`BadFileTracker` as undecodable ImageFolder files: an undecodable image, a sample without an image or
label, or the samples an unreadable or truncated shard is missing (one per missing sample, so batch
boundaries and the resume arithmetic do not move).
"""

from __future__ import annotations

import io
import json
import logging
import random
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .datasets import (BadFileError, BadSample, ImageFolderDataset, UnknownClassError, decode_or_skip,
                       keyed_global_rng, open_image)
from .transforms import pil_mode

log = logging.getLogger(__name__)

INDEX_NAME = "shards.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "pgm", "tif", "tiff")


# ---------------------------------------------------------------------------------------------------------------
# Index


def expand_shards(pattern: str, root: str | None = None) -> list[Path]:
    """`"train-{000000..000009}.tar"` (brace-expanded, as WebDataset does; relative to `root`) -> paths."""
    from braceexpand import braceexpand

    base = Path(root).expanduser() if root else None
    paths = []
    for p in braceexpand(pattern):
        path = Path(p).expanduser()
        paths.append(base / path if base is not None and not path.is_absolute() else path)
    if not paths:
        raise ValueError(f"data.shards '{pattern}' names no file")
    return paths


def read_index(paths: list[Path]) -> tuple[list[int], list[str]]:
    """(sample count of each shard, class names) from the `shards.json` beside each shard."""
    indexes: dict[Path, dict] = {}
    counts = []
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"shard '{p}' does not exist; check data.shards (and data.root)")
        index_path = p.parent / INDEX_NAME
        if index_path not in indexes:
            if not index_path.is_file():
                raise FileNotFoundError(f"'{index_path}' (the sample count of each shard) is missing: write shards "
                                        f"with `beit data shard SRC OUT`, which writes it beside them")
            indexes[index_path] = json.loads(index_path.read_text())
        entry = indexes[index_path]["shards"].get(p.name)
        if entry is None:
            raise ValueError(f"'{index_path}' has no entry for shard '{p.name}'; rewrite the shards with "
                             f"`beit data shard` or fix data.shards")
        counts.append(int(entry))
    # each split's own class list (`classes` alone: indexes written before splits kept their own)
    split = paths[0].name.split("-")[0]
    listed = [ix.get("split_classes", {}).get(split) or ix.get("classes") for ix in indexes.values()]
    classes = next((c for c in listed if c), [])
    return counts, list(classes)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _encoded(ds, i: int) -> tuple[bytes, str]:
    """(encoded image, extension) of item i: the file's own bytes for ImageFolder, PNG otherwise."""
    while not hasattr(ds, "samples") and hasattr(ds, "indices"):  # SubsetDataset
        ds, i = ds.base, int(ds.indices[i])
    if isinstance(ds, ImageFolderDataset):
        path = Path(ds.samples[i][0])
        ext = path.suffix.lower().lstrip(".")
        return path.read_bytes(), ext  # undecodable files are written as they are and counted when read
    buf = io.BytesIO()
    ds.load_image(i).save(buf, format="PNG")
    return buf.getvalue(), "png"


def write_shards(ds, out: Path, split: str, per_shard: int, classes: list[str], shuffle_seed: int | None = 0,
                 overwrite: bool = False) -> dict[str, int]:
    """Write `ds` (from `build_dataset(cfg, split)`, transform=None) as `out/<split>-NNNNNN.tar` shards of
    `per_shard` samples, in a seeded random order (`shuffle_seed=None` keeps the source order, which for
    ImageFolder is class by class), and record their sample counts in `out/shards.json`."""
    import webdataset as wds

    if per_shard < 1:
        raise ValueError(f"--images-per-shard must be >= 1, got {per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{split}-*.tar"))
    if existing and not overwrite:
        raise FileExistsError(f"'{out}' already holds {len(existing)} '{split}-*.tar' shards; "
                              f"pass --overwrite to replace them or choose another OUT")
    for p in existing:
        p.unlink()
    n = len(ds)
    order = np.arange(n) if shuffle_seed is None else np.random.default_rng([shuffle_seed, 0x5A4D]).permutation(n)
    targets = np.asarray(ds.targets)
    written: dict[str, int] = {}
    for s, start in enumerate(range(0, n, per_shard)):
        name = f"{split}-{s:06d}.tar"
        tmp = out / (name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for i in order[start : start + per_shard]:
                data, ext = _encoded(ds, int(i))
                sink.write({"__key__": f"{int(i):08d}", ext: data, "cls": str(int(targets[i]))})
        tmp.replace(out / name)  # a shard exists under its name only once it is complete
        written[name] = len(order[start : start + per_shard])
    index_path = out / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"shards": {}}
    index["shards"] = {k: v for k, v in index["shards"].items() if not k.startswith(f"{split}-")} | written
    index["split_classes"] = index.get("split_classes", {}) | {split: classes}  # a test split may list others
    if split == "train" or "classes" not in index:
        index["classes"] = classes
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
    tmp.replace(index_path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# Reading


def sample_index(key: str) -> int:
    """The integer that seeds a sample's augmentation: its source index (our keys), else a stable hash."""
    return int(key) if key.isdigit() else zlib.crc32(key.encode())


def round_robin_taken(per_worker: list[int], k: int) -> tuple[list[int], int]:
    """(batches taken from each worker, the worker whose turn is next) after the DataLoader took `k` batches,
    when worker w yields `per_worker[w]` batches and the loader takes them in turn, skipping finished workers."""
    n = len(per_worker)
    taken, w = [0] * n, 0
    for _ in range(k):
        for _ in range(n):  # the next worker that still has a batch
            if taken[w] < per_worker[w]:
                break
            w = (w + 1) % n
        else:
            raise ValueError(f"resume point {k} is beyond the end of the epoch ({sum(per_worker)} batches)")
        taken[w] += 1
        w = (w + 1) % n
    return taken, w


class ShardDataset(IterableDataset):
    """Samples from tar shards: `make_item(pil_img, label, index, epoch)` or a `BadSample`, split over
    ranks and loader workers (see the module docstring for the order and the resume rule).

    `shuffle=False` (evaluation) keeps the shard order, no buffer, one rank. `configure(...)` sets the
    rank, world size, epoch, batch size and resume point; it must be called before the loader's iterator
    is created (workers copy the dataset then).
    """

    def __init__(self, paths: list[Path], counts: list[int], classes: list[str], mode: str,
                 make_item: Callable[[Image.Image, int, int, int], Any], shuffle: bool = True, seed: int = 0,
                 shuffle_buffer: int = 2000, on_bad_file: str = "skip"):
        self.paths, self.counts, self.classes = [str(p) for p in paths], np.asarray(counts, dtype=np.int64), classes
        self.mode, self.make_item, self.shuffle, self.seed = mode, make_item, shuffle, int(seed)
        self.shuffle_buffer, self.on_bad_file = shuffle_buffer, on_bad_file
        self.rank, self.world_size, self.epoch, self.batch_size, self.start_batch = 0, 1, 0, 1, 0
        # [shards] whether a shard's missing samples were warned about: shared memory, so that loader workers
        # (forked anew each epoch) and the main process warn once per shard per run, not once per epoch
        self.warned = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()
        self.label_map: np.ndarray | None = None  # [shard classes] -> the run's index (`shard_label_map`)

    def with_items(self, make_item: Callable[[Image.Image, int, int, int], Any], seed: int) -> "ShardDataset":
        """Make `make_item(img, label, index, epoch)` items (e.g. `MIMItem` for pretraining) with order seed `seed`."""
        self.make_item, self.seed = make_item, int(seed)
        return self

    def __len__(self) -> int:  # samples in all shards (one epoch of all ranks)
        return int(self.counts.sum())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def configure(self, rank: int, world_size: int, epoch: int, batch_size: int, start_batch: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.check_world_size(world_size)
        self.rank, self.world_size, self.epoch = rank, world_size, int(epoch)
        self.batch_size, self.start_batch = batch_size, start_batch

    def check_world_size(self, world_size: int) -> None:
        if world_size > len(self.paths):
            raise ValueError(f"{len(self.paths)} shards cannot feed {world_size} ranks; write at least "
                             f"world_size x data.num_workers shards (`beit data shard --images-per-shard`)")

    # -- the assignment -----------------------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        """The epoch's shard order (all ranks), a function of (seed, epoch) only."""
        n = len(self.paths)
        return np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(n) if self.shuffle else np.arange(n)

    def worker_shards(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> np.ndarray:
        """Indices (into self.paths) of the shards worker `worker` of rank `rank` reads in `epoch`, in order."""
        return self.shard_order(epoch)[rank::world_size][worker :: max(num_workers, 1)]  # 0 workers: main reads

    def worker_batches(self, epoch: int, rank: int, world_size: int, num_workers: int, batch_size: int) -> list[int]:
        """Full batches each worker of `rank` yields in `epoch` (the loader drops each worker's last partial one)."""
        return self.epoch_batches(epoch, world_size, num_workers, batch_size)[rank].tolist()

    def epoch_batches(self, epoch: int, world_size: int, num_workers: int, batch_size: int) -> np.ndarray:
        """[world_size, workers] full batches of every worker in `epoch`: `worker_shards` for all at once
        (position p of the epoch's shard order goes to rank p % W, worker (p // W) % N)."""
        nw, p = max(num_workers, 1), np.arange(len(self.paths))
        owner = (p % world_size) * nw + (p // world_size) % nw
        samples = np.bincount(owner, weights=self.counts[self.shard_order(epoch)], minlength=world_size * nw)
        return (samples.astype(np.int64) // batch_size).reshape(world_size, nw)

    # -- iteration ----------------------------------------------------------------------------------------------
    def _raw_shard(self, i: int) -> Iterator[dict]:
        """Raw samples of shard i; a read error or a short shard yields placeholders for the missing samples."""
        import webdataset as wds

        path, want, got, error = self.paths[i], int(self.counts[i]), 0, []

        def handler(exn):
            error.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
            return False  # stop reading this shard

        for sample in wds.tarfile_samples([{"url": path}], handler=handler):
            got += 1
            if got > want:
                raise ValueError(f"shard '{path}' holds more samples than its {INDEX_NAME} says ({want}); "
                                 f"rewrite the shards with `beit data shard`")
            yield sample
        if got < want:
            why = error[0] if error else f"{got} of {want} samples present"
            if self.on_bad_file == "fail":
                raise BadFileError(f"cannot read shard '{path}': {why}. Rewrite it, or set data.on_bad_file=skip "
                                   f"to skip (and count) its missing samples")
            if not self.warned[i]:
                self.warned[i] = True
                log.warning("shard '%s': %d of %d samples missing (%s; warned once, counted in the run summary)",
                            path, want - got, want, why)
            for j in range(want - got):
                yield {"__key__": f"missing-{j}", "__url__": path, "__bad__": why}

    def _parse(self, raw: dict) -> tuple[Image.Image, int]:
        """(image in `mode`, label in the run's index) of a raw sample; raises if it has none or is bad."""
        if "__bad__" in raw:
            raise OSError(raw["__bad__"])
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None or "cls" not in raw:
            raise KeyError(f"sample has no image ({'/'.join(IMAGE_EXTS)}) or no 'cls' (files: "
                           f"{sorted(k for k in raw if not k.startswith('__'))})")
        label = int(raw["cls"]) if self.label_map is None else int(self.label_map[int(raw["cls"])])
        return open_image(io.BytesIO(raw[ext]), self.mode), label

    def _decode(self, raw: dict) -> Any:
        name = f"{Path(raw['__url__']).name}/{raw['__key__']}"
        # a missing sample's shard was reported once, not once per sample
        parsed = decode_or_skip(lambda: self._parse(raw), self.on_bad_file, name, f"sample of {raw['__url__']}",
                                quiet="__bad__" in raw)
        if isinstance(parsed, BadSample):
            return parsed
        img, label = parsed
        return self.make_item(img, label, sample_index(raw["__key__"]), self.epoch)

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = 0
        if self.start_batch:
            per_worker = self.worker_batches(self.epoch, self.rank, self.world_size, num_workers, self.batch_size)
            taken, turn = round_robin_taken(per_worker, self.start_batch)
            # A fresh loader asks its worker 0 first: let it play the worker whose turn it was.
            worker = (worker + turn) % num_workers
            skip = taken[worker] * self.batch_size
        shards = self.worker_shards(self.epoch, self.rank, self.world_size, worker, num_workers)
        raw: Iterator[dict] = (s for i in shards for s in self._raw_shard(int(i)))
        if self.shuffle and self.shuffle_buffer > 1:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker]).generate_state(1)[0])
            raw = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(seed))(raw)
        for _ in range(skip):  # consumed before the interruption: read again, not decoded
            next(raw)
        for sample in raw:
            yield self._decode(sample)


class LabeledItem:
    """`make_item` of labelled shards: (transform(img), label). With `seed` (the training split), the transform
    draws under `keyed_global_rng(seed, epoch, index)`, as map-style training sets do (`KeyedItems`)."""

    def __init__(self, transform: Callable | None, seed: int | None = None):
        self.transform, self.seed = transform, seed

    def __call__(self, img: Image.Image, label: int, index: int, epoch: int):
        if self.transform is None:
            return img, label
        if self.seed is None:
            return self.transform(img), label
        with keyed_global_rng(self.seed, epoch, index):
            return self.transform(img), label


def training_shard_classes(cfg, split: str) -> list[str] | None:
    """The class names of the training shards (`data.shards`), the index every other split is read with."""
    if split == "train" or not cfg.shards:
        return None
    return read_index(expand_shards(cfg.shards, cfg.root))[1] or None


def shard_label_map(key: str, found: list[str], classes: list[str] | None) -> np.ndarray | None:
    """[len(found)] labels of shards whose index lists `found` renumbered by the run's `classes` (None when
    they agree or either is unknown); a class the run does not know is an error before any work."""
    if not classes or not found or found == list(classes):
        return None
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise UnknownClassError(f"{key} hold classes the training split does not: {unknown} (the run's classes, "
                                f"fixed by the training split: {list(classes)}); write those shards without them "
                                f"(data.on_unknown_class=skip applies to image folders only)")
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[name] for name in found], dtype=np.int64)


def build_shard_dataset(cfg, split: str, transform: Callable | None = None, seed: int = 0,
                        classes: list[str] | None = None) -> ShardDataset:
    """`ShardDataset` of `data.shards` (train, shuffled), `data.val_shards` (val) or `data.eval_shards` (test, in
    order). An evaluation split is numbered by `classes` (default: the training shards' class names), never by
    the class list its own shards were written with."""
    key = {"train": "data.shards", "val": "data.val_shards", "test": "data.eval_shards"}[split]
    pattern = getattr(cfg, key.split(".")[1])
    if not pattern:
        raise ValueError(f"data.dataset=webdataset needs {key} for the '{split}' split, e.g. "
                         f"{key}='{split}-{{000000..000009}}.tar' (written by `beit data shard SRC OUT --split {split}`)")
    if split == "train" and (cfg.label_fraction < 1 or cfg.train_subset is not None):
        raise ValueError("data.label_fraction / data.train_subset need random access; with data.dataset=webdataset "
                         "write the subset as its own shards instead")
    paths = expand_shards(pattern, cfg.root)
    counts, found = read_index(paths)
    run_classes = list(classes) if classes is not None else training_shard_classes(cfg, split)
    label_map = shard_label_map(f"{key} '{pattern}'", found, run_classes)
    item = LabeledItem(transform, seed if split == "train" else None)  # training augmentation keyed by (seed, e, i)
    ds = ShardDataset(paths, counts, run_classes or found, pil_mode(cfg.in_chans), item,
                      shuffle=split == "train", seed=seed, shuffle_buffer=cfg.shuffle_buffer,
                      on_bad_file=cfg.on_bad_file)
    ds.label_map = label_map
    return ds

"""Tar shards (data.dataset=webdataset): writing, reading, rank/worker splitting, bad samples, exact resume,
and pretraining / fine-tuning from shards written from Fashion-MNIST."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from beit.config import DataConfig, load_config
from beit.data import (BadFileTracker, ImageDataset, MIMDataset, MIMItem, ShardDataset, batches_per_rank,
                       build_dataset, build_mask_generator, build_two_view_transform, collate_skip_bad, make_loader,
                       optimizer_steps_per_epoch, write_shards)
from beit.data.shards import read_index, round_robin_taken

from test_pretrain import TINY, write_config


class KeyItem:
    """make_item that returns (sample index, pixel sum, label): enough to identify a sample."""

    def __call__(self, img, label, index, epoch):
        return torch.tensor([index, int(np.asarray(img).sum()), label])


def beit(*args: str):
    from beit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 0


def array_dataset(n: int, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    return ImageDataset(rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 5, n), "L")


def shard_keys(path) -> set[int]:
    with tarfile.open(path) as tar:
        return {int(name.split(".")[0]) for name in tar.getnames()}


def shards_of(tmp_path: Path, n: int, per_shard: int, **kw) -> tuple[ShardDataset, ImageDataset]:
    src = array_dataset(n)
    write_shards(src, tmp_path, "train", per_shard, [f"c{i}" for i in range(5)])
    paths = sorted(tmp_path.glob("train-*.tar"))
    counts, classes = read_index(paths)
    return ShardDataset(paths, counts, classes, "L", KeyItem(), **kw), src


def test_write_then_read_round_trip(tmp_path):
    ds, src = shards_of(tmp_path, 23, per_shard=5, shuffle=False)
    index = json.loads((tmp_path / "shards.json").read_text())
    assert index["shards"] == {f"train-{i:06d}.tar": c for i, c in enumerate([5, 5, 5, 5, 3])}
    assert index["classes"] == [f"c{i}" for i in range(5)]
    assert len(ds) == 23 and ds.num_classes == 5
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 10 and all(n.endswith((".png", ".cls")) for n in names)
    items = torch.stack(list(ds))  # [23, 3]: written in a seeded random order, every sample once
    assert sorted(items[:, 0].tolist()) == list(range(23))
    for idx, pix, label in items.tolist():  # the decoded PNG is the source image, with its label
        assert pix == int(src.images[idx].sum()) and label == int(src.targets[idx])
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(src, tmp_path, "train", 5, [])


def test_cli_writes_image_folder_and_reader_names_bad_samples(tmp_path):
    root = tmp_path / "folder"
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (40 * i, 80 * c, 7)).save(root / cls / f"{i}.jpg")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "shards"
    beit("data", "shard", str(root), str(out), "--images-per-shard", "3", "--no-shuffle")
    cfg = DataConfig(dataset="webdataset", shards=str(out / "train-{000000..000002}.tar"), img_size=8,
                     in_chans=3, num_workers=0)
    ds = build_dataset(cfg, "train", transform=torchvision.transforms.PILToTensor())
    assert len(ds) == 7 and ds.classes == ["cat", "dog"]
    tracker = BadFileTracker()
    ds.configure(0, 1, epoch=0, batch_size=7)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=7, collate_fn=collate_skip_bad))
    for b in batches:
        tracker.update(b)
    assert len(batches) == 1 and batches[0][0].shape[0] == 6  # the bad one is dropped from the batch
    # broken.jpg sorts last among dog's files: source index 6, written as key 00000006 of the third shard
    assert tracker.summary() == {"num_bad_skipped": 1, "bad_files": ["train-000002.tar/00000006"]}
    assert sorted(batches[0][1].tolist()) == [0, 0, 0, 1, 1, 1]
    ds.on_bad_file = "fail"
    with pytest.raises(RuntimeError, match=r"train-000002.tar/00000006.*on_bad_file=skip"):
        list(ds)


def test_truncated_shard_counts_each_missing_sample(tmp_path):
    ds, _ = shards_of(tmp_path, 12, per_shard=6, shuffle=False)
    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 5 * 1024 + 100])  # cut inside the third sample (1 KiB per file)
    items = list(ds)
    bad = [x for x in items if not torch.is_tensor(x)]
    assert len(items) == 12  # one placeholder per missing sample: batch boundaries stay where the index puts them
    assert 4 <= len(bad) <= 5 and all(b.path.startswith("train-000001.tar/") for b in bad)


def test_missing_index_or_shard_is_a_clear_error(tmp_path):
    shards_of(tmp_path, 10, per_shard=5)
    cfg = DataConfig(dataset="webdataset", root=str(tmp_path), shards="train-{000000..000002}.tar")
    with pytest.raises(FileNotFoundError, match="train-000002.tar' does not exist"):
        build_dataset(cfg, "train")
    (tmp_path / "shards.json").unlink()
    with pytest.raises(FileNotFoundError, match="shards.json.*beit data shard"):
        build_dataset(cfg.model_copy(update={"shards": "train-{000000..000001}.tar"}), "train")
    with pytest.raises(ValueError, match="data.eval_shards"):
        build_dataset(cfg, "test")


def test_epoch_length_covers_every_epoch_the_run_reaches():
    ds = ShardDataset([""] * 7, [10, 10, 10, 10, 10, 10, 3], [], "L", None)
    poorest = [int(ds.epoch_batches(e, 2, 2, 4).sum(1).min()) for e in range(200)]  # per epoch, 2 ranks
    assert batches_per_rank(ds, 4, 2, 2, epochs=1) == poorest[0] == 7
    # train.steps=200 spans 200 / k epochs: k must fit in all of them, and is the largest such k.
    k = optimizer_steps_per_epoch(ds, 4, 1, 2, 2, epochs=1, steps=200)
    reached = -(-200 // k)
    assert all(poorest[e] >= k for e in range(reached))
    assert min(poorest[: -(-200 // (k + 1))]) < k + 1


def test_round_robin_accounting():
    # batches in order come from workers 0 1 2 0 2 0 (worker 1 holds one batch)
    assert round_robin_taken([3, 1, 2], 0) == ([0, 0, 0], 0)
    assert round_robin_taken([3, 1, 2], 3) == ([1, 1, 1], 0)
    assert round_robin_taken([3, 1, 2], 4) == ([2, 1, 1], 1)
    assert round_robin_taken([3, 1, 2], 5) == ([2, 1, 2], 0)
    assert round_robin_taken([3, 1, 2], 6) == ([3, 1, 2], 1)
    with pytest.raises(ValueError):
        round_robin_taken([1, 1], 3)


def _epoch_keys(ds, world, workers, batch, epoch, start=0, steps=None):
    """Sample indices per rank, batch by batch, as the training loop would take them."""
    steps = batches_per_rank(ds, batch, world, workers, epochs=3) if steps is None else steps
    out = []
    for r in range(world):
        it = iter(make_loader(ds, batch, workers, 0, r, world, epoch, start, None, False))
        out.append([next(it)[:, 0].tolist() for _ in range(steps - start)])
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 1)])
def test_split_over_ranks_and_workers_no_sample_twice(tmp_path, world, workers):
    ds, _ = shards_of(tmp_path, 61, per_shard=6, shuffle=True, shuffle_buffer=8)  # 10 shards of 6, one of 1
    # The assignment: every sample goes to exactly one (rank, worker) per epoch.
    for epoch in (0, 1):
        assigned = np.concatenate([ds.worker_shards(epoch, r, world, w, max(workers, 1))
                                   for r in range(world) for w in range(max(workers, 1))])
        assert sorted(assigned.tolist()) == list(range(11))
        for r in range(world):  # the batch counts the epoch length is computed from follow the assignment
            held = [int(ds.counts[ds.worker_shards(epoch, r, world, w, workers)].sum()) // 4
                    for w in range(max(workers, 1))]
            assert ds.worker_batches(epoch, r, world, workers, 4) == held
    # What the loader yields: the same number of batches on every rank, each rank only samples of its own
    # shards, no sample twice within an epoch.
    batch = 4
    steps = batches_per_rank(ds, batch, world, workers, epochs=3)
    for epoch in (0, 1):
        per_rank = _epoch_keys(ds, world, workers, batch, epoch)
        for r, batches in enumerate(per_rank):
            assert len(batches) == steps
            own = {k for w in range(max(workers, 1)) for i in ds.worker_shards(epoch, r, world, w, workers)
                   for k in shard_keys(ds.paths[i])}
            assert {k for b in batches for k in b} <= own
        keys = [k for rank in per_rank for b in rank for k in b]
        assert len(keys) == len(set(keys)) == world * steps * batch
    assert _epoch_keys(ds, world, workers, batch, 0) != _epoch_keys(ds, world, workers, batch, 1)
    with pytest.raises(ValueError, match="11 shards cannot feed 12 ranks"):
        batches_per_rank(ds, batch, 12, workers, epochs=1)
    assert _epoch_keys(ds, world, workers, batch, 1) == _epoch_keys(ds, world, workers, batch, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(tmp_path, workers):
    # Shards of unequal size, so that the workers hold different numbers of batches.
    src = array_dataset(50)
    write_shards(src, tmp_path, "train", 7, ["a"])
    paths = sorted(tmp_path.glob("train-*.tar"))
    ds = ShardDataset(paths, read_index(paths)[0], [], "L", KeyItem(), shuffle=True, shuffle_buffer=5)
    full = _epoch_keys(ds, 2, workers, 3, epoch=1)
    steps = len(full[0])
    for start in (1, steps // 2, steps - 1):
        resumed = _epoch_keys(ds, 2, workers, 3, epoch=1, start=start, steps=steps)
        assert resumed == [rank[start:] for rank in full], start


def test_shard_mim_items_equal_map_style_items(tmp_path):
    """A sample gets the same views and mask from shards as from the IDX reader (same seed, epoch, index)."""
    cfg = DataConfig(**{**TINY["data"], "train_subset": 20})
    base = build_dataset(cfg, "train")
    write_shards(base, tmp_path, "train", 8, [])
    two_view, masks = build_two_view_transform(cfg, 32), build_mask_generator(cfg, (8, 8))
    ref = MIMDataset(base, two_view, masks, seed=3)
    shard_cfg = cfg.model_copy(update={"dataset": "webdataset", "train_subset": None,
                                       "shards": str(tmp_path / "train-{000000..000002}.tar")})
    ds = build_dataset(shard_cfg, "train").with_items(MIMItem(two_view, masks, 3), seed=3)
    ds.configure(0, 1, epoch=2, batch_size=1)
    ref.set_epoch(2)
    got = list(ds)
    assert len(got) == 20
    order = np.random.default_rng([0, 0x5A4D]).permutation(20)  # write_shards' order (seed 0), shard by shard
    seen = set()
    for item in got:  # identify each item by its source index through the written order
        matches = [i for i in order if i not in seen and torch.equal(item["image"], ref[int(i)]["image"])]
        assert matches, "a shard item matches no map-style item"
        i = int(matches[0])
        seen.add(i)
        assert torch.equal(item["mask"], ref[i]["mask"]) and torch.equal(item["tok_image"], ref[i]["tok_image"])
    assert len(seen) == 20


def test_shard_training_augmentation_equals_map_style_items_in_any_worker(tmp_path):
    """Fine-tuning from shards draws a sample's crop and flip under RNGs keyed by (seed, epoch, index): the
    tensors of the map-style training set (`KeyedItems`) in that epoch, whichever of 2 workers reads it."""
    from torchvision import transforms as T

    from beit.data import KeyedItems
    from beit.data.shards import LabeledItem

    tf = T.Compose([T.RandomCrop(8, padding=3), T.RandomHorizontalFlip(), T.PILToTensor()])
    src = array_dataset(30)
    write_shards(src, tmp_path, "train", 7, [f"c{i}" for i in range(5)])
    paths = sorted(tmp_path.glob("train-*.tar"))
    counts, classes = read_index(paths)
    ds = ShardDataset(paths, counts, classes, "L", LabeledItem(tf, seed=3), shuffle=True, shuffle_buffer=5)
    ref = KeyedItems(ImageDataset(src.images, src.targets, "L", tf), seed=3)

    def items(pairs):  # the multiset of (pixels, label): the shard order differs from the source order
        return sorted((x.numpy().tobytes(), int(y)) for x, y in pairs)

    per_epoch = []
    for epoch in (1, 2):
        got = [(x[0], y[0]) for x, y in make_loader(ds, 1, 2, 0, 0, 1, epoch, 0, None, False)]  # 2 workers
        ref.set_epoch(epoch)
        per_epoch.append(items(ref[i] for i in range(len(src))))
        assert len(got) == 30 and items(got) == per_epoch[-1], epoch
    assert per_epoch[0] != per_epoch[1]  # another epoch, other crops


@pytest.fixture(scope="module")
def fmnist_shards(tmp_path_factory):
    """The first 512 Fashion-MNIST training images and 256 test images as shards, via the CLI."""
    out = tmp_path_factory.mktemp("fmnist_shards")
    src = tmp_path_factory.mktemp("fmnist_subset")
    cfg = DataConfig(dataset="fashion_mnist", in_chans=1)
    for split, n in (("train", 512), ("test", 256)):  # a subset, written as IDX files the CLI reads
        images, labels = build_dataset(cfg, split).images[:n], build_dataset(cfg, split).targets[:n]
        prefix = "train" if split == "train" else "t10k"
        _write_idx(src / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(src / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
        beit("data", "shard", str(src), str(out), "--split", split, "--images-per-shard", "128")
    return out


def _write_idx(path: Path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def _losses(run_dir: Path) -> list[float]:
    from beit.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]


def test_pretraining_from_shards_resumes_exactly_and_tracks_idx(tmp_path, fmnist_shards):
    from beit.tasks import run

    shards = {"dataset": "webdataset", "root": str(fmnist_shards), "shards": "train-{000000..000003}.tar",
              "train_subset": None, "num_workers": 2}
    over = {"train": {"epochs": 1.5, "save_every_steps": 5, "log_every": 2}}  # 24 steps of 16 per epoch
    for name, data in (("idx", {}), ("full", shards), ("cut", shards)):
        (tmp_path / name).mkdir()
        extra = {"max_steps": 7} if name == "cut" else {}
        run("pretrain", load_config(write_config(tmp_path / name, data=data, train={**over["train"], **extra})))
    cut = tmp_path / "cut" / "runs" / "cfg"
    run("pretrain", load_config(write_config(tmp_path / "cut", data=shards, train=over["train"])), resume=True)
    a = torch.load(tmp_path / "full" / "runs" / "cfg" / "ckpt-00000024.pt", weights_only=True)["model"]
    b = torch.load(cut / "ckpt-00000024.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed 7 steps into epoch 0: bitwise identical
    idx, full = _losses(tmp_path / "idx" / "runs" / "cfg"), _losses(tmp_path / "full" / "runs" / "cfg")
    assert len(idx) == len(full) == 12  # 512 samples / batch 32 = 16 steps per epoch either way; logged every 2
    assert full[-1] < full[0] - 0.3 and idx[-1] < idx[0] - 0.3
    assert np.mean(full[-4:]) == pytest.approx(np.mean(idx[-4:]), abs=0.1)  # same data, other order


def test_finetuning_from_shards(tmp_path, fmnist_shards):
    from beit.tasks import run

    cfg = write_config(tmp_path, model={"name": "beit_fmnist_patch4_32", "depth": 2, "embed_dim": 64,
                                        "num_heads": 2},
                       data={"dataset": "webdataset", "root": str(fmnist_shards),
                             "shards": "train-{000000..000003}.tar", "eval_shards": "test-{000000..000001}.tar",
                             "train_subset": None, "auto_augment": None, "mixup": 0, "cutmix": 0, "reprob": 0},
                       train={"max_steps": 8, "eval_every_epochs": 100})
    run_dir = run("finetune", load_config(cfg))
    results = json.loads((run_dir / "results.json").read_text())
    # above chance (10% / 50%) after 8 steps: 19-21% top-1, 78-82% top-5 over seeds 0-1
    assert results["steps"] == 8 and results["top1"] > 15 and results["top5"] > 65, results
    # the shard test split is read as the IDX reader reads those 256 images: the same weights score the same
    from beit.train.eval_task import run_eval

    (tmp_path / "idx").mkdir()
    idx_cfg = write_config(tmp_path / "idx", model={"name": "beit_fmnist_patch4_32", "depth": 2, "embed_dim": 64,
                                                    "num_heads": 2, "pretrained": str(run_dir / "ckpt-00000008.pt")},
                           data={"eval_subset": 256}, train={"run_name": "eval"})
    idx = json.loads((run_eval(load_config(idx_cfg)) / "results.json").read_text())
    assert idx["num_samples"] == 256 and idx["top1"] == pytest.approx(results["top1"], abs=100 / 256 + 1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_bad_skipped"] == 0


# ------------------------------------------------------------------------------------------------ class index
LEVEL = {"a": 20, "b": 128, "c": 235, "d": 80}  # a sample's class is readable from its grey level


def _class_shards(out: Path, split: str, classes: list[str], n: int = 2):
    """`n` 32 px images per class, each filled with its class's grey level, written as `split` shards."""
    images = np.stack([np.full((32, 32), LEVEL[c], np.uint8) for c in classes for _ in range(n)])
    labels = np.repeat(np.arange(len(classes)), n)
    write_shards(ImageDataset(images, labels, "L"), out, split, 3, classes)


def test_eval_shards_are_read_with_the_training_shards_class_index(tmp_path):
    """test shards written from a split lacking 'b' (their own index: a=0, c=1), into the same folder as the
    training shards: read with the training index, 'c' keeps label 2; the training shards keep their names."""
    _class_shards(tmp_path, "train", ["a", "b", "c"])
    _class_shards(tmp_path, "test", ["a", "c"])
    cfg = DataConfig(dataset="webdataset", root=str(tmp_path), in_chans=1, shards="train-{000000..000001}.tar",
                     eval_shards="test-{000000..000001}.tar")
    test = build_dataset(cfg, "test")
    assert test.classes == ["a", "b", "c"] and test.num_classes == 3
    got = sorted((int(np.asarray(img)[0, 0]), label) for img, label in test)
    assert got == [(20, 0), (20, 0), (235, 2), (235, 2)]
    train = build_dataset(cfg, "train")
    assert train.classes == ["a", "b", "c"]
    assert sorted({(int(np.asarray(img)[0, 0]), label) for img, label in train}) == [(20, 0), (128, 1), (235, 2)]
    # a checkpoint's class index (`beit eval`) numbers them the same way
    assert build_dataset(cfg, "test", classes=["c", "a"]).classes == ["c", "a"]
    assert sorted(label for _, label in build_dataset(cfg, "test", classes=["c", "a"])) == [0, 0, 1, 1]


def test_eval_shards_with_a_class_training_lacks_are_one_line_before_training(tmp_path, capsys):
    from beit.cli import main

    _class_shards(tmp_path / "shards", "train", ["a", "b"], n=8)
    _class_shards(tmp_path / "shards", "test", ["a", "b", "d"])
    args = ["finetune", str(Path(__file__).resolve().parent.parent / "configs" / "finetune" / "fmnist_scratch.yaml"),
            "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "data.batch_size=8", "data.num_workers=0",
            "train.progress=false", "data.dataset=webdataset", f"data.root={tmp_path / 'shards'}",
            "data.shards=train-{000000..000005}.tar", "data.eval_shards=test-{000000..000001}.tar",
            "model.num_classes=2", f"train.out_dir={tmp_path / 'runs'}", "train.run_name=two"]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "['d']" in err and "['a', 'b']" in err and "test-{000000..000001}.tar" in err
    assert not (tmp_path / "runs").exists()  # nothing was trained or created


def test_a_truncated_shard_is_warned_once_per_run_not_every_epoch(tmp_path, capfd):
    """3 epochs over a shard that lost samples: one warning, in the main process and with loader workers
    (forked anew every epoch)."""
    import logging

    from beit.data.shards import log as shard_log

    handler = logging.StreamHandler()  # to stderr, which loader workers share (capfd reads the descriptor)
    shard_log.addHandler(handler)
    try:
        for workers in (0, 2):
            ds, _ = shards_of(tmp_path / str(workers), 12, per_shard=6, shuffle=False)
            shard = tmp_path / str(workers) / "train-000001.tar"
            shard.write_bytes(shard.read_bytes()[: 5 * 1024 + 100])  # cut inside the third sample
            for epoch in range(3):
                loader = make_loader(ds, 2, workers, 0, 0, 1, epoch, 0, collate_skip_bad, False)
                assert sum(batch.num_bad for batch in loader) >= 4  # every epoch draws the missing samples
            err = capfd.readouterr().err
            assert err.count("train-000001.tar': ") == 1 and "samples missing" in err, (workers, err)
    finally:
        shard_log.removeHandler(handler)


def test_beit_eval_reads_shards_with_the_checkpoints_class_index(tmp_path):
    from beit.config import ConfigError
    from beit.train.eval_task import eval_dataset

    _class_shards(tmp_path, "test", ["a", "c"])
    cfg = load_config(str(Path(__file__).resolve().parent.parent / "configs" / "finetune" / "fmnist_scratch.yaml"),
                      ["data.dataset=webdataset", f"data.root={tmp_path}",
                       "data.eval_shards=test-{000000..000001}.tar"])
    ds = eval_dataset(cfg, ["c", "b", "a"])
    assert ds.classes == ["c", "b", "a"]
    by_brightness = [label for _, label in sorted((float(x.mean()), int(y)) for x, y in ds)]  # eval transform
    assert by_brightness == [2, 2, 0, 0]  # the dark 'a' images are the checkpoint's class 2, the light 'c' 0
    with pytest.raises(ConfigError, match=r"differ from the checkpoint's.*\['c'\].*\['a', 'b'\]"):
        eval_dataset(cfg, ["a", "b"])

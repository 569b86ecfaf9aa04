"""Datasets people have: MNIST (IDX), torchvision:<Class> from a local root, HF `datasets` on disk
(save_to_disk and parquet), the ImageFolder val/ alias and the cached folder scan — all on small data made here."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit.config import ConfigError, DataConfig, load_config
from beit.data import build_dataset


def write_idx(path: Path, array: np.ndarray, compress: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def mnist_files(root: Path, compress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out["train" if prefix == "train" else "test"] = (images, labels)
    return out


def data_cfg(**kw) -> DataConfig:
    return load_config(None, [f"data.{k}={v}" for k, v in kw.items()]).data


def test_mnist_reads_idx_files(tmp_path):
    want = mnist_files(tmp_path, compress=True)
    for split in ("train", "test"):
        ds = build_dataset(data_cfg(dataset="mnist", root=tmp_path, in_chans=1), split)
        images, labels = want[split]
        assert len(ds) == len(labels) and ds.classes[3] == "3"
        img, label = ds[1]
        assert label == labels[1] and np.array_equal(np.asarray(img), images[1])


def test_torchvision_class_from_a_local_root(tmp_path):
    want = mnist_files(tmp_path / "MNIST" / "raw", compress=False)  # torchvision's own MNIST layout
    ds = build_dataset(data_cfg(dataset="torchvision:MNIST", root=tmp_path, in_chans=3), "test")
    img, label = ds[2]
    assert len(ds) == 5 and label == want["test"][1][2] and img.mode == "RGB"
    assert np.array_equal(np.asarray(img)[..., 0], want["test"][0][2])
    with pytest.raises(ConfigError, match="torchvision:<ClassName>"):
        data_cfg(dataset="imagenet")
    with pytest.raises(ValueError, match="no class 'NoSuchSet'"):
        build_dataset(data_cfg(dataset="torchvision:NoSuchSet", root=tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_dataset(data_cfg(dataset="torchvision:FashionMNIST", root=tmp_path), "train")


def tiny_hf_dataset(n: int, seed: int):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    return datasets.Dataset.from_dict({"img": images, "label": [i % 2 for i in range(n)]}, features=features)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_datasets_on_disk(tmp_path, layout):
    datasets = pytest.importorskip("datasets")
    train, val = tiny_hf_dataset(6, 0), tiny_hf_dataset(4, 1)
    if layout == "save_to_disk":
        datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "ds"))
    else:  # the hub's layout: data/<split>-XXXXX-of-XXXXX.parquet
        (tmp_path / "ds" / "data").mkdir(parents=True)
        train.to_parquet(str(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"))
        val.to_parquet(str(tmp_path / "ds" / "data" / "validation-00000-of-00001.parquet"))
    cfg = data_cfg(dataset="hf", root=tmp_path / "ds", in_chans=1)
    ds = build_dataset(cfg, "test")  # "test" falls back to the validation split
    img, label = ds[3]
    assert len(ds) == 4 and label == 1 and ds.classes == ["cat", "dog"] and img.mode == "L"
    assert np.array_equal(np.asarray(img), np.asarray(val[3]["img"].convert("L")))
    assert len(build_dataset(cfg, "train")) == 6
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        build_dataset(data_cfg(dataset="hf", root=tmp_path / "ds" / "nothing"), "test")


def make_folder(root: Path, classes=("a", "b"), n=2):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i * 50, 0, 0)).save(root / c / f"{i}.png")


def test_image_folder_val_alias_and_cached_scan(tmp_path, monkeypatch):
    from beit.data import datasets as ds_mod

    monkeypatch.setenv("BEIT_CACHE_DIR", str(tmp_path / "cache"))
    make_folder(tmp_path / "data" / "train")
    make_folder(tmp_path / "data" / "val", n=3)
    cfg = data_cfg(dataset="image_folder", root=tmp_path / "data")
    assert len(build_dataset(cfg, "test")) == 6  # val/ is the evaluation split
    assert list((tmp_path / "cache" / "scan").glob("*.tsv.gz"))

    def no_scan(root):
        raise AssertionError(f"rescanned {root}")

    real_scan = ds_mod._scan_folder
    monkeypatch.setattr(ds_mod, "_scan_folder", no_scan)
    ds = build_dataset(cfg, "test")  # from the cache
    assert len(ds) == 6 and ds.classes == ["a", "b"] and ds[5][1] == 1
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "val" / "b" / "new.png")  # changes b/'s mtime
    os.utime(tmp_path / "data" / "val" / "b", ns=(1, 10**18))  # make sure the mtime differs at any resolution
    monkeypatch.setattr(ds_mod, "_scan_folder", real_scan)
    assert len(build_dataset(cfg, "test")) == 7

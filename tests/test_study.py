"""`beit study` and the validation split it rests on."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit.config import ConfigError, load_config
from beit.data.build import build_dataset
from beit.data.datasets import stratified_holdout
from beit.experiments.study import knn_predict, load_study, paired_interval, run_study

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_holdout_is_stratified_fixed_and_disjoint_from_training():
    labels = np.repeat(np.arange(4), [30, 30, 20, 20])
    held = stratified_holdout(labels, 10)
    assert np.bincount(labels[held]).tolist() == [3, 3, 2, 2]
    assert held.tolist() == stratified_holdout(labels, 10).tolist()  # the same draw every time
    with pytest.raises(ValueError, match="data.val_size=100"):
        stratified_holdout(labels, 100)


def _folder(root: Path, per_class: dict[str, int], rng: np.random.Generator):
    """1-channel 32 px images: class c is a bright horizontal bar at row 4 + 10c, plus noise."""
    for split, n in per_class.items():
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32), dtype=np.uint8)
                img[4 + 10 * c: 8 + 10 * c] = 255
                Image.fromarray(img).save(d / f"{i}.png")


def test_val_split_never_meets_training_or_test(tmp_path):
    _folder(tmp_path, {"train": 20, "test": 5}, np.random.default_rng(0))
    over = ["data.dataset=image_folder", f"data.root={tmp_path}", "data.in_chans=1", "data.val_size=9",
            "data.label_fraction=0.5"]
    cfg = load_config(None, over)
    train, val, test = (build_dataset(cfg.data, s) for s in ("train", "val", "test"))
    # 3 per class held out leaves 17 per class; half of 17 rounds (half to even) to 8 per class
    assert (len(train), len(val), len(test)) == (24, 9, 15)
    assert not set(train.base.indices[train.indices]) & set(val.indices)
    assert np.bincount(val.targets).tolist() == [3, 3, 3]
    with pytest.raises(ConfigError, match="train.eval_split=val needs"):
        load_config(None, ["train.eval_split=val"])


def test_knn_predict_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 6, generator=g), torch.randn(20, 6, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    for k in (1, 5):
        want = []
        for q in queries:
            order = ((bank - q) ** 2).sum(1).argsort()[:k].tolist()
            votes = np.bincount(labels[order].numpy(), minlength=4)
            best = np.flatnonzero(votes == votes.max())
            want.append(next(int(labels[i]) for i in order if int(labels[i]) in best))  # nearest among tied
        assert knn_predict(bank, labels, queries, k).tolist() == want


def test_paired_interval_is_students_t():
    from scipy import stats

    a, b = [75.1, 74.2, 76.0, 75.5], [60.0, 61.5, 59.0, 62.2]
    d = np.subtract(a, b)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    got = paired_interval(a, b)
    assert got["mean"] == pytest.approx(d.mean())
    assert got["ci95"] == pytest.approx([lo, hi], abs=2e-3)
    assert statistics.mean(a) - statistics.mean(b) == pytest.approx(got["mean"])


def _study_files(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    _folder(data, {"train": 40, "test": 10}, np.random.default_rng(1))
    model = ["model.depth=1"]
    common = ["data.dataset=image_folder", f"data.root={data}", "data.batch_size=16", "data.num_workers=0",
              "train.progress=false", "train.compile=false"]
    pre = [*common, *model, "train.epochs=1", "train.max_steps=3", "optim.warmup_epochs=0"]
    study = {
        "config": "configs/finetune/fmnist.yaml", "pretrain": "configs/pretrain/fmnist.yaml",
        "pretrain_overrides": pre, "val_size": 30, "seeds": 2,
        "grid": {"optim.lr": [1e-3, 3e-3]},
        "fractions": {0.5: ["train.epochs=2", "train.eval_every_epochs=2", "optim.warmup_epochs=0"],
                      1.0: ["train.epochs=1", "train.eval_every_epochs=1", "optim.warmup_epochs=0"]},
        "knn_ks": [1, 3], "overrides": [*common, *model],
        "cnn": "cnn_fmnist_32", "cnn_overrides": ["model.depth=null", "model.drop_path_rate=null"],
        "cnn_grid": {"optim.weight_decay": [0.0, 0.05]},
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))  # JSON is YAML
    return path


def test_study_runs_end_to_end_on_an_image_folder_and_resumes(tmp_path):
    path, out = _study_files(tmp_path), tmp_path / "out"
    cmd = [sys.executable, "-m", "beit", "study", str(path), "--out", str(out)]
    first = subprocess.run(cmd + ["--fractions", "0.5"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    half, full = res["rows"]["50pct"], res["rows"]["100pct"]
    for arm in ("pretrained", "scratch", "cnn"):
        assert [g["val"] is not None for g in half["arms"][arm]["grid"]] == [True, True]
        best = half["arms"][arm]["selected"]
        assert best == max(half["arms"][arm]["grid"], key=lambda g: g["val"])["point"]
        assert half["arms"][arm]["test"]["n"] == 2
        # the grid never read the test split; the selected runs read it once, by `beit eval` into test/
        for g in half["arms"][arm]["grid"]:
            run = out / g["run"]
            assert yaml_split(run) == "val"
            assert (run / "test" / "results.json").exists() == (g["point"] == best)
        assert full["arms"][arm].get("test") is None  # not run yet: reported as pending
    assert set(half["gains"]) == {"scratch", "cnn", "pixel_knn"}
    gain = half["gains"]["scratch"]
    pre, scr = half["arms"]["pretrained"]["test"]["runs"], half["arms"]["scratch"]["test"]["runs"]
    assert gain["n"] == 2 and gain["mean"] == pytest.approx((pre[0] - scr[0] + pre[1] - scr[1]) / 2)
    assert half["pixel_knn"]["k"] in (1, 3)
    assert half["pixel_knn"]["test"]["mean"] > 90  # separable bars: the pixel baseline must get them right
    same = half["same_recipe_val"]
    assert same["pretrained"] == max(g["val"] for g in half["arms"]["pretrained"]["grid"])
    assert same["scratch"] == next(g["val"] for g in half["arms"]["scratch"]["grid"] if g["point"] == same["recipe"])
    assert (out / "study.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert "| 50% |" in md and "pending" in md and "small CNN" in md
    # --arms: only the named arm runs now (a second process may take the others).
    cnn_only = subprocess.run(cmd + ["--arms", "cnn"], capture_output=True, text=True, timeout=600)
    assert cnn_only.returncode == 0, cnn_only.stderr[-3000:]
    assert {p.name.split("_")[1] for p in out.glob("100pct_*")} == {"cnn"}
    bad = subprocess.run(cmd + ["--arms", "cnnn"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--arms cnnn: the study has the arms pretrained, scratch, cnn" in bad.stderr
    # Rerun: finished runs are skipped (their metrics are not appended to), the other fraction runs.
    before = (out / half["arms"]["scratch"]["grid"][0]["run"] / "metrics.jsonl").read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / half["arms"]["scratch"]["grid"][0]["run"] / "metrics.jsonl").read_text() == before
    res = json.loads((out / "results.json").read_text())
    assert res["rows"]["100pct"]["arms"]["pretrained"]["test"]["n"] == 2


def yaml_split(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["train"]["eval_split"]


def test_bad_study_files_are_one_line_errors(tmp_path):
    path = _study_files(tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_study(path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="seedz"):
        load_study(path, ["seedz=2"])
    listed = tmp_path / "list.yaml"
    listed.write_text("- seeds: 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping of study keys"):
        load_study(listed)
    with pytest.raises(ConfigError, match="same number of trials"):
        load_study(path, ["cnn_grid={optim.lr: [1, 2, 3]}"])
    r = subprocess.run([sys.executable, "-m", "beit", "study", str(tmp_path / "nope.yaml")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "study file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("path", sorted(Path("configs/study").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_study_files_follow_the_protocol(path):
    """Every shipped study holds out validation images and gives both ViT arms a grid that includes no layer
    decay; the 1% and 10% rows have 3 seeds (a full-data row may have fewer: it is said in its file)."""
    study = load_study(path)
    assert Path(study.config).is_file() and study.val_size == 5000
    assert any(v is None for v in study.grid["optim.layer_decay"]) and len(study.grid["optim.lr"]) >= 2
    assert study.seeds >= 3 or set(study.fractions) == {1.0}


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_study_smoke_on_the_fashion_mnist_idx_files(tmp_path):
    """The shipped study file, shrunk: the real IDX files, 1 seed, 1 grid point per arm, a few steps."""
    out = tmp_path / "out"
    small = ["seeds=1", "grid={optim.lr: [1.0e-3]}", "cnn_grid={optim.lr: [1.0e-3]}", "val_size=500",
             "fractions={0.01: [train.epochs=1, train.eval_every_epochs=1, optim.warmup_epochs=0]}",
             "knn_ks=[1]", "data.eval_subset=300", "train.compile=false", "data.batch_size=32"]
    r = subprocess.run([sys.executable, "-m", "beit", "study", "configs/study/fmnist.yaml", *small, "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((out / "results.json").read_text())["rows"]["1pct"]
    assert {a: row["arms"][a]["test"]["n"] for a in row["arms"]} == {"pretrained": 1, "scratch": 1, "cnn": 1}
    # 550 labelled images (1% of the 55,000 left after validation): a pixel 1-NN is far above chance
    assert row["pixel_knn"]["test"]["mean"] > 50


def test_webdataset_validation_comes_from_its_own_shards(tmp_path):
    from beit.data.shards import build_shard_dataset

    with pytest.raises(ValueError, match="data.val_shards"):
        build_dataset(load_config(None, ["data.dataset=webdataset", "data.val_size=10"]).data, "val")
    with pytest.raises(ConfigError, match="data.val_shards for webdataset"):
        load_config(None, ["data.dataset=webdataset", "train.eval_split=val"])
    cfg = load_config(None, ["data.dataset=webdataset", f"data.root={tmp_path}"])
    with pytest.raises(ValueError, match="needs data.val_shards for the 'val' split"):
        build_shard_dataset(cfg.data, "val")


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_scene_validation_draws_only_held_out_training_garments():
    from beit.data.segmentation import FashionScenes, build_seg_dataset

    held = stratified_holdout(FashionScenes(None, "train", 1).labels, 5000)
    val = FashionScenes(None, "val", 20, val_size=5000)
    train = FashionScenes(None, "train", 20, val_size=5000)
    full = FashionScenes(None, "train", 1)
    assert len(val.images) == 5000 and len(train.images) == 55000
    assert np.array_equal(val.images, full.images[held])  # val garments are exactly the held-out ones
    assert not np.array_equal(np.asarray(val.load_pair(0)[0]), np.asarray(train.load_pair(0)[0]))
    cfg = load_config("configs/segment/fmnist_scenes.yaml", ["data.val_size=5000", "train.eval_split=val",
                                                              "seg.scenes=[8,4]"], command="segment")
    assert len(build_seg_dataset(cfg, "val")) == 4 and len(build_seg_dataset(cfg, "test")) == 4
    with pytest.raises(ConfigError, match="data.val_size"):
        build_seg_dataset(load_config("configs/segment/fmnist_scenes.yaml", command="segment"), "val")


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_segmentation_study_selects_on_validation_miou_and_tests_once(tmp_path):
    """The scenes protocol: both arms' grids on validation scenes (held-out garments), test mIoU once per final run."""
    tiny = ["seg.scenes=[32,8]", "data.batch_size=8", "data.num_workers=0", "seg.eval_batch_size=8", "train.steps=2",
            "optim.warmup_steps=0", "train.progress=false", "train.compile=false", "train.save_every_steps=2"]
    study = {"config": "configs/segment/fmnist_scenes.yaml", "task": "segment",
             "pretrained": "beit/assets/fmnist_backbone.safetensors",
             "val_size": 500, "seeds": 2, "grid": {"optim.lr": [1e-4, 1e-3]}, "fractions": {1.0: []},
             "overrides": tiny, "cnn": "unet_fmnist_64",
             "cnn_overrides": ["model.drop_path_rate=null", "optim.layer_decay=null", "train.amp=none"],
             "cnn_grid": {"optim.lr": [1e-3, 3e-3]}, "knn_ks": [1, 3], "knn_windows": [4, 8], "knn_bank": 2000}
    path, out = tmp_path / "seg.yaml", tmp_path / "out"
    path.write_text(json.dumps(study))
    r = subprocess.run([sys.executable, "-m", "beit", "study", str(path), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    row = res["rows"]["100pct"]
    assert res["metric"] == "mIoU" and set(row["arms"]) == {"pretrained", "scratch", "cnn"}
    for arm in ("pretrained", "scratch", "cnn"):
        grid = row["arms"][arm]["grid"]
        assert all(yaml_split(out / g["run"]) == "val" for g in grid)
        val = json.loads((out / grid[0]["run"] / "results.json").read_text())
        assert grid[0]["val"] == val["mIoU"]
        assert row["arms"][arm]["test"]["n"] == 2
    assert set(row["gains"]) == {"scratch", "cnn", "pixel_knn"} and row["gains"]["cnn"]["n"] == 2
    knn = row["pixel_knn"]
    assert knn["window"] in (4, 8) and knn["k"] in (1, 3) and knn["bank_cells"] == 2000 and knn["test"]["n"] == 2
    # 11 classes: predicting background alone scores at most 100/11 mIoU; the pixel k-NN finds garments too
    assert knn["test"]["mean"] > 100 / 11
    assert knn["val_mIoU_by_window_k"][str(knn["window"])][str(knn["k"])] == max(
        v for by_k in knn["val_mIoU_by_window_k"].values() for v in by_k.values())
    assert "Pixel k-NN (2,000 training patches)" in (out / "results.md").read_text()

    # Another folder holding only this report (run directories deleted, or a committed study copied in to add an
    # arm): the report reuses each arm unchanged, and refuses an arm whose settings changed.
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    (copy / "pixel_knn_100pct.json").write_text((out / "pixel_knn_100pct.json").read_text())
    again = run_study(load_study(path), copy, report_only=True)["rows"]["100pct"]
    assert all(again["arms"][a]["carried"] and again["arms"][a]["test"] == row["arms"][a]["test"] for a in row["arms"])
    assert again["gains"] == row["gains"]
    assert "reused from this folder's earlier results.json" in (copy / "results.md").read_text()
    changed = run_study(load_study(path, ["cnn_grid={optim.lr: [1.0e-2, 3.0e-3]}"]), copy, report_only=True)
    cnn = changed["rows"]["100pct"]["arms"]["cnn"]
    assert "carried" not in cnn and cnn["selected"] is None and "cnn" not in changed["rows"]["100pct"]["gains"]
    assert changed["rows"]["100pct"]["arms"]["scratch"]["carried"]

    bad = dict(study, fractions={0.1: []})
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="task segment"):
        load_study(path)


def test_segmentation_pixel_knn_cells_are_the_patch_neighbourhoods():
    """`cell_windows` cuts each patch's centred neighbourhood (replicate-padded) and labels it by its majority
    class; a bank of exactly the test image's cells predicts it perfectly, at every window."""
    from beit.experiments.study import _centre, cell_windows, knn_votes

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 8, 12, generator=g)
    mask = torch.zeros(8, 12, dtype=torch.long)
    mask[:3, :4] = 2  # cell (0, 0): 12 of 16 pixels are class 2
    mask[4:, 8:] = 255  # cell (1, 2): all ignored
    feats, labels = cell_windows(image, mask, cell=4, window=8, num_classes=3, ignore_index=255)
    assert feats.shape == (6, 2, 8, 8) and labels.tolist() == [2, 0, 0, 0, 0, 255]
    padded = torch.nn.functional.pad(image[None], (2, 2, 2, 2), mode="replicate")[0]
    assert torch.equal(feats[4], padded[:, 4:12, 4:12])  # row 1, column 1 of the grid
    assert torch.equal(_centre(feats, 4).reshape(6, 2, 4, 4)[5], image[:, 4:8, 8:12])  # window 4 = the patch
    keep = labels != 255
    bank, bank_labels = _centre(feats, 8)[keep], labels[keep]
    assert torch.equal(knn_votes(bank, bank_labels, bank, [1])[1], bank_labels)

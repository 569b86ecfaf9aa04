"""Pictures a person reads without the code: `beit plot` (every axis labelled, accuracies in one percent
scale), `beit predict --attention` (predicted and true class per row, a colour scale), segmentation
predictions (a legend naming the class of each colour). Each test reads the matplotlib Figure back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ------------------------------------------------------------------------------------------------ beit plot
def _write_run(run: Path, acc: list[float], top1: list[float]):
    """metrics.jsonl as the loop writes it: training accuracy as a 0-1 fraction, evaluation in percent."""
    run.mkdir(parents=True)
    rows = [{"step": 10 * (i + 1), "split": "train", "time": 0.0, "loss": 2.0 - a, "acc": a, "lr": 1e-3,
             "img_per_s": 500.0, "epoch": i} for i, a in enumerate(acc)]
    rows += [{"step": 20 * (i + 1), "split": "eval", "time": 0.0, "top1": t, "top5": 99.0, "loss": 0.5}
             for i, t in enumerate(top1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.axison}


def test_plot_labels_every_axis_and_shows_train_and_eval_accuracy_in_percent(tmp_path):
    from beit.plot import curves_figure, plot_runs

    _write_run(tmp_path / "a", acc=[0.25, 0.5, 0.75], top1=[40.0])
    _write_run(tmp_path / "b", acc=[0.1, 0.2, 0.3], top1=[15.0])
    fig = curves_figure([tmp_path / "a", tmp_path / "b"])
    panels = _axes_by_title(fig)
    assert set(panels) == {"train loss", "accuracy", "learning rate", "throughput", "eval top5"}
    for title, ax in panels.items():
        assert ax.get_xlabel() == "step" and ax.get_ylabel(), title  # every axis says what it shows
    assert panels["throughput"].get_ylabel() == "images / s"
    assert panels["eval top5"].get_ylabel() == "accuracy (%)"

    acc = panels["accuracy"]
    assert acc.get_ylabel() == "accuracy (%)"
    lines = {(line.get_linestyle(), line.get_color()): list(line.get_ydata()) for line in acc.get_lines()}
    assert lines[("--", "C0")] == pytest.approx([25.0, 50.0, 75.0])  # run a's fractions, in percent
    assert lines[("--", "C1")] == pytest.approx([10.0, 20.0, 30.0])
    assert lines[("-", "C0")] == pytest.approx([40.0]) and lines[("-", "C1")] == pytest.approx([15.0])
    legend = {t.get_text(): h.get_linestyle() for t, h in zip(acc.get_legend().get_texts(),
                                                              acc.get_legend().legend_handles)}
    assert legend == {"train (training batches)": "--", "eval top-1": "-"}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]  # which colour is which run

    assert plot_runs([tmp_path / "a"], tmp_path / "one.png").stat().st_size > 10_000


def test_plot_labels_pretraining_and_segmentation_metrics():
    from beit.plot import eval_ylabel

    assert eval_ylabel("knn_top1") == eval_ylabel("ema_top1") == eval_ylabel("top1_layer3") == "accuracy (%)"
    assert eval_ylabel("mIoU") == "mIoU (%)" and eval_ylabel("best_layer") == "layer"
    assert eval_ylabel("ema_loss") == "loss"


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.fmnist
def test_attention_rows_name_the_predicted_and_true_class_and_share_a_colour_scale(tmp_path, monkeypatch):
    from beit.attention import attention_grid
    from beit.hub import command_config

    monkeypatch.chdir(tmp_path)
    res = attention_grid(command_config("fmnist-classifier", [], "predict"), tmp_path / "att.png", num=4)
    fig = res["figure"]
    assert (tmp_path / "att.png").stat().st_size > 10_000
    images = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    rows = [ax for ax in images if ax.get_subplotspec().colspan.start == 0]
    pairs = [re.fullmatch(r"predicted (.+)\ntrue (.+)", ax.get_title()) for ax in rows]
    assert len(pairs) == 4 and all(pairs), [ax.get_title() for ax in rows]
    assert all(p[1] in FASHION and p[2] in FASHION for p in pairs)
    assert sum(p[1] == p[2] for p in pairs) >= 3  # the shipped classifier scores ~90%: titles match the images

    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and "attention probability" in bars[0].get_ylabel()
    maps = [ax.get_images()[0] for ax in images if ax.get_subplotspec().colspan.start > 0]
    assert len(maps) == 4 * res["heads"]
    top = max(float(m.get_array().max()) for m in maps)
    assert all(m.get_clim() == (0.0, pytest.approx(top)) for m in maps)  # one scale for every head and image


@pytest.mark.fmnist
def test_attention_of_a_backbone_names_the_true_class_only(tmp_path, monkeypatch):
    from beit.attention import attention_grid
    from beit.hub import command_config

    monkeypatch.chdir(tmp_path)
    fig = attention_grid(command_config("fmnist-backbone", [], "predict"), tmp_path / "att.png", num=2)["figure"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"
              and ax.get_subplotspec().colspan.start == 0]
    assert len(titles) == 2 and all(re.fullmatch(r"true (.+)", t)[1] in FASHION for t in titles), titles


# ------------------------------------------------------------------------------------------------ segmentation
NAMES = ["sky", "road", "car", "tree"]
COLOURS = {0: (0.0, 0.0, 0.0), 1: (0.12, 0.47, 0.71), 2: (1.0, 0.5, 0.05), 3: (0.17, 0.63, 0.17)}  # tab10


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A tiny `beit segment` run directory (random weights) on a seg_folder whose test masks use classes
    1 and 3 and the ignore index only."""
    from beit.config import load_config
    from beit.models.segmentation import create_segmenter
    from beit.train import checkpoint as ckpt_io

    tmp = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for sub in ("images", "masks"):
            (tmp / "data" / split / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                tmp / "data" / split / "images" / f"{i}.png")
            mask = np.where(rng.random((64, 64)) < 0.5, 1, 3).astype(np.uint8)
            mask[:8] = 255
            Image.fromarray(mask, "L").save(tmp / "data" / split / "masks" / f"{i}.png")
    (tmp / "data" / "classes.txt").write_text("\n".join(NAMES) + "\n")
    arch = dict(img_size=64, embed_dim=32, depth=4, num_heads=2, num_classes=4, channels=32, aux_channels=16,
                out_indices=[0, 1, 2, 3], mlp_ratio=2.0)
    preset = "beit_base_patch16_512_upernet"
    cfg = load_config("configs/segment/fmnist_scenes.yaml", [
        f"model.name={preset}", "model.pretrained=null", *[f"model.{k}={json.dumps(v)}" for k, v in arch.items()],
        "data.dataset=seg_folder", f"data.root={tmp / 'data'}", "data.in_chans=3", "data.mean=[0.4,0.5,0.6]",
        "data.std=[0.2,0.25,0.3]", "data.num_workers=0", "seg.scale=[64,64]", "seg.eval_batch_size=2",
        f"train.out_dir={tmp / 'runs'}", "train.run_name=seg"])
    run = tmp / "runs" / "seg"
    run.mkdir(parents=True)
    model = create_segmenter(preset, **arch).eval()
    ckpt_io.save_training_checkpoint(run, {"model": model.state_dict(), "config": cfg.to_dict(),
                                           "class_names": NAMES}, 8, 1)
    return run, tmp / "data"


def test_segmentation_predictions_have_a_legend_of_the_classes_shown(seg_run, tmp_path):
    from beit.cli import main
    from beit.hub import command_config
    from beit.visualize import save_segmentation_grid, segmentation_columns

    run, data = seg_run
    columns, classes = segmentation_columns(command_config(str(run), [], "predict"), 2)
    assert classes == NAMES
    fig = save_segmentation_grid(columns, tmp_path / "seg.png", classes)
    legend = fig.legends[0]
    shown = {int(v) for col in list(columns.values())[1:] for m in col for v in torch.unique(m)}
    names = ["ignored" if i == 255 else NAMES[i] for i in sorted(shown)]
    assert [t.get_text() for t in legend.get_texts()] == names  # every label shown, named, in label order
    assert {"road", "tree", "ignored"} <= set(names)  # the ground truth's classes
    # each entry has the colour its class is drawn in: the ground truth's pixels of class 1 and 3 and 255
    truth = Image.open(data / "test" / "masks" / "0.png")
    gt_ax = next(ax for ax in fig.axes if ax.get_title() == "ground truth")  # row 0: the first test image
    drawn = gt_ax.get_images()[0].get_array()  # [H, W, 3] in [0, 1]
    mask = np.asarray(truth)
    assert drawn.shape[:2] == mask.shape
    colour = {t.get_text(): h.get_facecolor()[:3] for t, h in zip(legend.get_texts(), legend.legend_handles)}
    for label, name in ((1, "road"), (3, "tree"), (255, "ignored")):
        pixel = drawn[tuple(np.argwhere(mask == label)[0])]
        assert colour[name] == pytest.approx(tuple(pixel), abs=1e-6), name
    assert colour["road"] == pytest.approx(COLOURS[1], abs=0.01) and colour["ignored"] == (1.0, 1.0, 1.0)

    # `beit predict RUN` on a segmentation run writes that figure
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), "--out", str(tmp_path / "cli.png"), "--num", "2"])
    assert e.value.code == 0 and (tmp_path / "cli.png").stat().st_size > 10_000

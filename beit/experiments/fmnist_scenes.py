"""`beit reproduce fmnist-scenes`: BEiT pretraining helps semantic segmentation, on data we can get.

BEiT pretraining on Fashion-MNIST (or an existing pretraining run: --pretrained DIR)
-> BEiT + UperNet on Fashion-MNIST scenes (configs/segment/fmnist_scenes.yaml) from that backbone, and the
   same segmenter from scratch with the same recipe and budget
-> results.json (mIoU, mAcc, aAcc, per-class IoU), results.md, curves.png, predictions.png.

Each stage is an ordinary `beit` run in its own directory under the output folder; rerunning the command skips
finished stages and resumes an interrupted one (as `beit reproduce fashion-mnist`).
"""

from __future__ import annotations

import json
from pathlib import Path

from beit.config import load_config
from beit.experiments.fashion_mnist import (CONFIGS, Stage, _read_wall, run_stages, two_panel_figure,
                                           write_results_md)
from beit.train.metrics import read_metrics
from beit.train.runner import setup_logging
from beit.visualize import save_segmentation_grid, segmentation_columns

# Overrides per variant. `full` is sized from measured step times on a 2-core CPU (docs/results/segmentation.md);
# `smoke` checks the whole driver in a minute or two.
SCENE_VARIANTS = {
    # The segmentation gain grows with the pretraining's length (2, 4, 12, 20 epochs: docs/results/segmentation.md),
    # so `full` pretrains for 20 epochs (~1 h 50 min on 2 cores) where `beit reproduce fashion-mnist` runs 4.
    "full": dict(pretrain=["train.epochs=20", "train.compile=true"], segment=[]),
    "smoke": dict(pretrain=["train.epochs=1", "data.train_subset=512", "data.batch_size=64", "optim.warmup_epochs=0.1"],
                  segment=["seg.scenes=[200,50]", "train.steps=6", "optim.warmup_steps=2", "train.log_every=2",
                           "train.save_every_steps=3", "data.batch_size=16", "optim.recipe_batch_size=16",
                           "seg.eval_batch_size=25", "train.compile=false"]),
}
INITS = ("pretrained", "scratch")


def plan_scenes(out: Path, variant: str, pretrained: str | None = None) -> list[Stage]:
    v = SCENE_VARIANTS[variant]
    common = [f"train.out_dir={out}"]
    stages = []
    if pretrained is None:
        stages.append(Stage("pretrain", "pretrain", CONFIGS / "pretrain" / "fmnist.yaml",
                            common + ["tokenizer.name=fmnist_dvae", "train.run_name=pretrain"] + v["pretrain"]))
        pretrained = str(out / "pretrain")
    for init in INITS:
        name = f"segment_{init}"
        stages.append(Stage(name, "segment", CONFIGS / "segment" / "fmnist_scenes.yaml", common + [
            f"model.pretrained={pretrained if init == 'pretrained' else 'null'}", f"train.run_name={name}"]
            + v["segment"], done_file="results.json", init=init))
    return stages


def collect_scenes(out: Path, stages: list[Stage], wall: dict[str, float]) -> dict:
    results = {"runs": {}, "stage_wall_time_s": wall, "pending_stages": []}
    for s in stages:
        path = out / s.name / s.done_file
        if not path.exists():
            results["pending_stages"].append(s.name)
        elif s.command == "segment":
            r = json.loads(path.read_text())
            results["runs"][s.init] = {
                k: r.get(k) for k in ("mIoU", "mAcc", "aAcc", "best_mIoU", "steps", "per_class_iou", "pretrained")}
    runs = results["runs"]
    if all(i in runs for i in INITS):
        results["gain_mIoU"] = runs["pretrained"]["mIoU"] - runs["scratch"]["mIoU"]
    return results


def write_scenes_report(out: Path, results: dict) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    runs = results["runs"]
    names = next(iter(runs.values()))["per_class_iou"].keys() if runs else []
    lines = ["| init | mIoU | mAcc | aAcc | " + " | ".join(names) + " |", "|---" * (4 + len(names)) + "|"]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for init, r in runs.items():
        lines.append(f"| {init} | {fmt(r['mIoU'])} | {fmt(r['mAcc'])} | {fmt(r['aAcc'])} | "
                     + " | ".join(fmt(r["per_class_iou"][n]) for n in names) + " |")
    if "gain_mIoU" in results:
        lines += ["", f"Gain from BEiT pretraining: {results['gain_mIoU']:+.2f} mIoU"]
    table = write_results_md(out, lines, results["pending_stages"])
    _plot_scene_curves(out)
    return table


def _plot_scene_curves(out: Path):
    with two_panel_figure(out / "curves.png") as axes:
        for init, style in zip(INITS, ("-", "--")):
            path = out / f"segment_{init}" / "metrics.jsonl"
            if not path.exists():
                continue
            train, ev = read_metrics(path, "train"), read_metrics(path, "eval")
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], style, label=init)
            axes[1].plot([r["step"] for r in ev], [r["mIoU"] for r in ev], style + "o", label=init)
        for ax, ylabel, title in ((axes[0], "training loss (decode + 0.4 aux)", "segmentation training"),
                                  (axes[1], "test mIoU (%)", "Fashion-MNIST scenes: pretrained vs scratch")):
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()


def _draw_predictions(out: Path, stages: list[Stage], num: int = 6):
    """predictions.png: input | ground truth | pretrained | scratch on the first `num` test scenes, with a legend
    of the classes."""
    seg = {s.init: s for s in stages if s.command == "segment"}
    if not all((out / seg[i].name / seg[i].done_file).exists() for i in INITS):
        return
    cols, classes = {}, []
    for init in INITS:
        s = seg[init]
        cfg = load_config(s.config, s.overrides + [f"model.pretrained={out / s.name}"])
        columns, classes = segmentation_columns(cfg, num, label=init)
        cols.update(columns)
    save_segmentation_grid(cols, out / "predictions.png", classes)


def reproduce_scenes(out: Path, variant: str = "full", pretrained: str | None = None,
                     report_only: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(None, True)
    stages, wall = plan_scenes(out, variant, pretrained), _read_wall(out)
    if not report_only:
        run_stages(out, stages, wall)
    results = collect_scenes(out, stages, wall)
    table = write_scenes_report(out, results)
    _draw_predictions(out, stages)
    print(f"\n{table}\nresults: {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    return results

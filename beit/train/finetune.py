"""Fine-tuning a classifier (official `run_class_finetuning.py` recipe) on the shared training loop.

batch = (images [B, C, H, W] after RandAugment + random erasing, labels [B])
mixup on:  images, soft [B, K] = Mixup(images, labels)   (mixup / cutmix, label smoothing inside)
           loss = SoftTargetCrossEntropy(model(images), soft)
mixup off: loss = LabelSmoothingCrossEntropy(model(images), labels)   (plain CE when smoothing is 0)

The model starts from `model.pretrained` (any checkpoint layout, or a run directory: its newest ckpt-*.pt;
the shared rel-pos table is cloned into every layer on load) or from scratch with `model.pretrained: null`
and the identical recipe. Layer-wise lr decay comes from `optim.layer_decay` (see `param_groups` in
beit/train/loop.py), drop path from `model.drop_path_rate`, EMA from `train.ema_decay`; the loop evaluates
top-1/top-5 every `train.eval_every_epochs` and keeps best.pt (max test top-1) and the last checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from beit.builders import build_labeled_dataset, build_model
from beit.config import Config, ConfigError
from beit.data import collate_skip_bad, num_labels
from beit.export import export_run
from beit.train.evaluate import class_names, classifier_evaluate, read_summary, write_results
from beit.train.loop import Task

log = logging.getLogger("beit")


def build_mixup(cfg: Config, num_classes: int):
    """timm `Mixup` as the official script sets it up (prob 1, batch mode), or None when both alphas are 0."""
    d = cfg.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    if d.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pair each image with the flipped batch and need an even data.batch_size "
                          f"(got {d.batch_size}); use an even size or set data.mixup=0 data.cutmix=0")
    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=1.0, switch_prob=d.mixup_switch_prob,
                 mode="batch", label_smoothing=cfg.train.label_smoothing, num_classes=num_classes)


def make_classification_step(mixup, smoothing: float):
    if mixup is not None:
        criterion = SoftTargetCrossEntropy()
    elif smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    def classification_step(model: nn.Module, batch) -> dict:
        x, y = batch  # [B, C, H, W], [B]
        if mixup is None:
            logits = model(x)  # [B, K]
            loss = criterion(logits.float(), y)
            return {"loss": loss, "acc": (logits.argmax(-1) == y).float().mean()}
        if x.shape[0] % 2:  # an undecodable file was dropped from this batch; mixup needs pairs
            x, y = x[:-1], y[:-1]
        # timm's Mixup draws lambda and the cutmix box from numpy's global RNG, which checkpoints do not
        # save. Seeding it from torch's RNG (saved and restored) keeps resumed runs exact; the caller's
        # numpy state is put back afterwards, so nothing outside this step sees the reseed.
        outer = np.random.get_state()
        np.random.seed(int(torch.randint(0, 2**31 - 1, (1,))))
        x, soft = mixup(x, y)  # soft: [B, K], smoothed
        np.random.set_state(outer)
        logits = model(x)
        return {"loss": criterion(logits.float(), soft)}

    return classification_step


def build_finetune_task(cfg: Config, device: torch.device):
    # Data and recipe errors first: they are cheap to find, a large checkpoint is not cheap to load.
    dataset = build_labeled_dataset(cfg, "train", train_transform=True)
    build_mixup(cfg, 2)
    model = build_model(cfg)
    if model.num_classes <= 0:
        raise ConfigError(f"model {cfg.model.name} has no classification head; set model.num_classes "
                          f"(fine-tuning uses a classifier preset such as beit_base_patch16_224)")
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    labels = num_labels(dataset)
    if labels > model.num_classes:
        raise ConfigError(f"the data has {labels} classes but the model head has {model.num_classes}; "
                          f"set model.num_classes={labels}")
    mixup = build_mixup(cfg, model.num_classes)
    return Task(model=model, step=make_classification_step(mixup, cfg.train.label_smoothing), dataset=dataset,
                collate_fn=collate_skip_bad, evaluate=classifier_evaluate(cfg, device), best_metric="top1",
                class_names=class_names(dataset, cfg) or None)


def report_finetune(cfg: Config, run_dir: Path) -> None:
    """After `beit finetune`: the exports and results.json (last evaluation, best top-1, EMA scores)."""
    export_run(cfg, run_dir)
    summary = read_summary(run_dir)
    last = summary.get("eval", {})
    write_results(run_dir, {"command": "finetune", "pretrained": cfg.model.pretrained,
                            "label_fraction": cfg.data.label_fraction, "steps": summary.get("steps"),
                            "top1": last.get("top1"), "top5": last.get("top5"), "best_top1": summary.get("best"),
                            **{k: v for k, v in last.items() if k.startswith("ema_")}})

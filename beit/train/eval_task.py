"""`beit eval`: a checkpoint scored on the test split, read with the checkpoint's class index (classifiers:
top-1/top-5, per-class accuracy, confusion matrix; segmenters: `beit.train.segment.run_seg_eval`). What the
checkpoint holds decides which (`beit.hub.checkpoint_kind`)."""

from __future__ import annotations

import logging
from pathlib import Path

from beit.builders import build_eval_loader, build_labeled_dataset, build_model
from beit.config import Config, ConfigError
from beit.convert.runs import resolve_pretrained
from beit.hub import checkpoint_kind, read_source
from beit.train.distributed import DistInfo
from beit.train.evaluate import accuracy, class_names, confusion_matrix, plot_confusion, run_over, write_results
from beit.train.runner import evaluation_processes, open_run_dir
from beit.train.segment import run_seg_eval

log = logging.getLogger("beit")


def checkpoint_class_names(source: str | None) -> list[str]:
    """The class names a checkpoint was trained with (its run's class index), [] when it does not say."""
    try:
        return list(read_source(source).class_names) if source else []
    except (OSError, ValueError, ConfigError):  # a foreign layout or preset tag: no names to compare
        return []


def eval_dataset(cfg: Config, checkpoint_names: list[str], allow_other_classes: bool = False):
    """The test split numbered by the checkpoint's class index; class names that differ from the checkpoint's
    are an error showing both lists (unless `allow_other_classes`: then the data's own numbering is scored)."""
    hint = "pass --allow-other-classes if they are meant to differ (labels are then compared by index)"
    if allow_other_classes or not checkpoint_names:
        return build_labeled_dataset(cfg, "test")
    if cfg.data.dataset in ("image_folder", "webdataset"):  # matched by name: a subset of the classes is fine
        try:
            return build_labeled_dataset(cfg, "test", classes=checkpoint_names)
        except ConfigError as e:
            raise ConfigError(f"the data's class names differ from the checkpoint's: {e}; {hint}") from None
    dataset = build_labeled_dataset(cfg, "test")
    names = class_names(dataset, cfg)
    if names and names != checkpoint_names:
        raise ConfigError(f"the data's class names {names} differ from the checkpoint's {checkpoint_names} "
                          f"({cfg.model.pretrained}); {hint}")
    return dataset


def run_eval(cfg: Config, overwrite: bool = False, resume: bool = False,
             allow_other_classes: bool = False) -> Path | None:
    """Evaluate `model.pretrained` on the test split: results.json (top-1/top-5, per-class accuracy, confusion
    matrix) and confusion.png in runs/<run_name>/. A segmenter (a `beit segment` run): mIoU and friends.
    The data is read with the checkpoint's class index; other class names are an error unless
    `allow_other_classes`. Under torchrun the ranks split the images and rank 0 writes (the others return None)."""
    with evaluation_processes(cfg) as info:
        if checkpoint_kind(cfg.model) == "segmenter":
            return run_seg_eval(cfg, info, overwrite=overwrite or resume)
        return _eval_classifier(cfg, info, overwrite or resume, allow_other_classes)


def _eval_classifier(cfg: Config, info: DistInfo, overwrite: bool, allow_other_classes: bool) -> Path | None:
    device = info.device
    model = build_model(cfg, need_pretrained=True).to(device).eval()  # fails before any run directory exists
    if model.num_classes <= 0:
        raise ConfigError(f"model {cfg.model.name} has no classification head (num_classes=0); `beit eval` needs "
                          f"a fine-tuned classifier — use `beit knn` or `beit linprobe` for a pretrained backbone")
    own = checkpoint_class_names(cfg.model.pretrained)
    loader = build_eval_loader(cfg, "test", eval_dataset(cfg, own, allow_other_classes))
    run_dir = open_run_dir(cfg, overwrite=overwrite) if info.is_main else None
    logits, labels = run_over(loader, model, device, cfg.train.amp, "eval (test)", cfg.train.progress)
    k = model.num_classes
    if int(labels.max()) >= k:
        raise ConfigError(f"the data has label {int(labels.max())} but the model has {k} classes")
    if run_dir is None:
        return None
    cm = confusion_matrix(logits.argmax(-1), labels, k)
    names = own if own and not allow_other_classes else class_names(loader.dataset, cfg)
    names = names if len(names) == k else [str(i) for i in range(k)]
    per_class = {names[i]: (100.0 * cm[i, i].item() / cm[i].sum().item()) if cm[i].sum() else None for i in range(k)}
    results = {
        "checkpoint": resolve_pretrained(cfg.model.pretrained), "split": "test", "num_samples": len(labels),
        **accuracy(logits, labels), "per_class_top1": per_class, "class_names": names,
        "confusion_matrix": cm.tolist(),
    }
    plot_confusion(cm, names, run_dir / "confusion.png",
                   f"{cfg.model.name}: top-1 {results['top1']:.2f}% ({len(labels)} test images)")
    write_results(run_dir, results)
    log.info(f"top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  ({len(labels)} images)")
    return run_dir

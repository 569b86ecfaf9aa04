"""Sub-commands `finetune`, `segment`, `linprobe`, `knn`, `eval`: `register(subparsers)` adds them to `beit`.

Each takes `CONFIG [section.key=value ...] [--resume] [--overwrite]` like `beit pretrain`. `knn` and `eval`
train nothing: --resume is accepted for symmetry and, like --overwrite, replaces their run directory.
"""

from __future__ import annotations


def _finetune(cfg, **kw):
    from beit.train.finetune import run_finetune

    return run_finetune(cfg, **kw)


def _segment(cfg, **kw):
    from beit.train.segment import run_segment

    return run_segment(cfg, **kw)


def _linprobe(cfg, **kw):
    from beit.train.linprobe import run_linprobe

    return run_linprobe(cfg, **kw)


def _knn(cfg, **kw):
    from beit.train.knn import run_knn

    return run_knn(cfg, **kw)


def _eval(cfg, **kw):
    from beit.train.evaluate import run_eval

    return run_eval(cfg, **kw)


def register(subparsers) -> None:
    from beit.cli import add_train_command as _add_train_command

    _add_train_command(subparsers, "finetune", "fine-tune a classifier from model.pretrained (or from scratch)",
                       _finetune)
    _add_train_command(subparsers, "segment", "semantic segmentation: BEiT + UperNet from model.pretrained "
                       "(or from scratch)", _segment)
    _add_train_command(subparsers, "linprobe", "linear probe on every block of a frozen backbone", _linprobe)
    _add_train_command(subparsers, "knn", "k-NN accuracy of frozen features (k=20, T=0.07)", _knn)
    _add_train_command(subparsers, "eval", "top-1/top-5, per-class accuracy and confusion matrix of a checkpoint; "
                       "mIoU, mAcc, aAcc and per-class IoU of a segmentation run",
                       _eval)

"""Sub-commands `finetune`, `linprobe`, `knn`, `eval`: `register(subparsers)` adds them to `beit`.

Each takes `CONFIG [section.key=value ...] [--resume] [--overwrite]` like `beit pretrain`. `knn` and `eval`
train nothing: --resume is accepted for symmetry and, like --overwrite, replaces their run directory.
"""

from __future__ import annotations


def _finetune(cfg, **kw):
    from beit.train.finetune import run_finetune

    return run_finetune(cfg, **kw)


def _linprobe(cfg, **kw):
    from beit.train.linprobe import run_linprobe

    return run_linprobe(cfg, **kw)


def _knn(cfg, **kw):
    from beit.train.knn import run_knn

    return run_knn(cfg, **kw)


def _eval(cfg, **kw):
    from beit.train.evaluate import run_eval

    return run_eval(cfg, **kw)


CHECKPOINT_HELP = ("a checkpoint (run directory, ckpt-*.pt / best.pt, exported folder, shipped name): its stored "
                   "config describes the model and data; or a YAML config with model.pretrained")


def checkpoint_config_loader(command: str):
    """Config loader for commands that evaluate a checkpoint: SOURCE may be the checkpoint itself."""

    def loader(source, overrides):
        from beit.hub import command_config

        return command_config(source, overrides, command)

    return loader


def register(subparsers) -> None:
    from beit.cli import add_train_command as _add_train_command

    _add_train_command(subparsers, "finetune", "fine-tune a classifier from model.pretrained (or from scratch)",
                       _finetune)
    for name, help, run in (("linprobe", "linear probe on every block of a frozen backbone", _linprobe),
                            ("knn", "k-NN accuracy of frozen features (k=20, T=0.07)", _knn),
                            ("eval", "top-1/top-5, per-class accuracy and confusion matrix of a checkpoint", _eval)):
        _add_train_command(subparsers, name, help, run, checkpoint_config_loader(name), CHECKPOINT_HELP)

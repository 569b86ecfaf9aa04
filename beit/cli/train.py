"""Sub-commands `pretrain`, `finetune`, `segment`, `linprobe`, `knn`, `eval`: `register(subparsers)` adds them
to `beit`.

Each takes `CONFIG [section.key=value ...] [--resume] [--overwrite]`. `knn` and `eval` train nothing:
--resume is accepted for symmetry and, like --overwrite, replaces their run directory. The task modules are
imported only when a command runs, so `beit --help` does not load torch.
"""

from __future__ import annotations

from beit.config import load_config


def add_train_command(sub, name: str, help: str, run, config_loader=None, config_help=None):
    """`beit NAME CONFIG [key=value ...] [--resume | --overwrite]` calling `run(cfg, resume=, overwrite=)`.

    `config_loader(CONFIG, overrides) -> Config` reads CONFIG (default: the YAML file, with the command's
    `COMMAND_DEFAULTS`; for commands that evaluate a checkpoint, also the checkpoint itself, see
    `beit.hub.command_config`)."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("config", help=config_help or "YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue the run in its run directory, exactly")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    load = config_loader or (lambda path, overrides: load_config(path, overrides, command=name))
    p.set_defaults(func=lambda a: run(load(a.config, a.overrides), resume=a.resume, overwrite=a.overwrite))
    return p


def _pretrain(cfg, **kw):
    from beit.train.pretrain import run_pretrain

    return run_pretrain(cfg, **kw)



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
    from beit.train.eval_task import run_eval

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
    add_train_command(subparsers, "pretrain", "masked image modeling pretraining (BEiT)", _pretrain)
    add_train_command(subparsers, "finetune", "fine-tune a classifier from model.pretrained (or from scratch)",
                      _finetune)
    add_train_command(subparsers, "segment", "semantic segmentation: BEiT + UperNet from model.pretrained "
                      "(or from scratch)", _segment)
    for name, help, run in (("linprobe", "linear probe on every block of a frozen backbone", _linprobe),
                            ("knn", "k-NN accuracy of frozen features (k=20, T=0.07)", _knn),
                            ("eval", "top-1/top-5, per-class accuracy and confusion matrix of a checkpoint; mIoU, "
                             "mAcc, aAcc and per-class IoU of a segmentation run", _eval)):
        p = add_train_command(subparsers, name, help, run, checkpoint_config_loader(name), CHECKPOINT_HELP)
    p.add_argument("--allow-other-classes", action="store_true",
                   help="evaluate on data whose class names differ from the checkpoint's (scored by label index)")
    load = checkpoint_config_loader("eval")
    p.set_defaults(func=lambda a: _eval(load(a.config, a.overrides), resume=a.resume, overwrite=a.overwrite,
                                        allow_other_classes=a.allow_other_classes))

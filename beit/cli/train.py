"""The commands of `beit.tasks.TASKS` that stand alone (`pretrain`, `finetune`, `segment`, `linprobe`, `knn`,
`eval`, `predict`): `register(subparsers)` adds one sub-command per entry, `add_task_command` any one of them
(`beit tokenizer train` is added by beit/cli/tokenizer.py).

Each takes `CONFIG [section.key=value ...]` and the options its entry names. `knn` and `eval` train nothing:
--resume is accepted for symmetry and, like --overwrite, replaces their run directory.
"""

from __future__ import annotations

import argparse

from beit.cli.docs import module_doc
from beit.tasks import TASKS, TaskSpec

CONFIG_HELP = {
    "yaml": "YAML config file (see configs/)",
    "checkpoint": "a checkpoint (run directory, ckpt-*.pt / best.pt, exported folder, shipped name): its stored "
                  "config describes the model and data; or a YAML config with model.pretrained",
}
# One flag per option a task's run function takes: name -> (flag, argparse keywords).
OPTIONS: dict[str, tuple[str, dict]] = {
    "resume": ("--resume", dict(action="store_true", help="continue the run in its run directory, exactly")),
    "overwrite": ("--overwrite", dict(action="store_true", help="delete an existing run directory first")),
    "allow_other_classes": ("--allow-other-classes", dict(
        action="store_true",
        help="evaluate on data whose class names differ from the checkpoint's (scored by label index)")),
    "out": ("--out", dict(default="predictions.png")),
    "num": ("--num", dict(type=int, default=8)),
    "attention": ("--attention", dict(
        action="store_true",
        help="instead: per head, where the last block's [CLS] token attends (rel-pos bias included)")),
}
# Commands whose --help shows their library module's docstring (what the picture holds).
DESCRIBED_BY_MODULE = {"predict"}


def add_task_command(sub, spec: TaskSpec) -> argparse.ArgumentParser:
    """`beit NAME CONFIG [key=value ...] [options]` calling `spec.runner(spec.read_config(...), **options)`."""
    if spec.name in DESCRIBED_BY_MODULE:
        module = (spec.run or spec.build).partition(":")[0]
        p = sub.add_parser(spec.words[-1], help=spec.help, description=module_doc(module),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        p = sub.add_parser(spec.words[-1], help=spec.help, description=spec.help)
    p.add_argument("config", help=CONFIG_HELP[spec.config])
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 train.epochs=2")
    for option in spec.options:
        flag, kwargs = OPTIONS[option]
        p.add_argument(flag, **kwargs)
    p.set_defaults(func=lambda a: run_task(spec, a))
    return p


def run_task(spec: TaskSpec, a: argparse.Namespace):
    result = spec.runner(spec.read_config(a.config, a.overrides), **{o: getattr(a, o) for o in spec.options})
    if isinstance(result, str):  # a picture command: the line saying what it wrote
        print(result)
        return 0
    return result


def register(subparsers) -> None:
    for spec in TASKS.values():
        if len(spec.words) == 1:
            add_task_command(subparsers, spec)

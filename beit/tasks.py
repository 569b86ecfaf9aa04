"""Every command that runs on a config, declared once (in the spirit of torchtitan's `TrainSpec`): its name and
help, what its CONFIG argument names and how the config is read, the loop `Task` it builds and the function that
runs it.

    spec = TASKS["finetune"]
    cfg = spec.read_config("configs/finetune/fmnist.yaml", ["optim.lr=1e-3"])  # with COMMAND_DEFAULTS["finetune"]
    run_dir = spec.runner(cfg, resume=False, overwrite=False)

`beit/cli/train.py` makes one sub-command of each entry and the experiment drivers run their stages through it.
Functions are named as "module:function" and imported when first asked for, so that the CLI lists every command
without loading torch (`beit --help`); tests/test_architecture.py checks that every name resolves, to a module of
this layer or one below it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

from beit.config import Config, load_config

# How `beit eval|knn|linprobe|predict SOURCE` read SOURCE: a checkpoint (its stored config is the base) or a YAML file.
CHECKPOINT_CONFIG = "beit.hub:command_config"


def resolve(ref: str) -> Callable:
    """"package.module:function" -> the function (its module imported now)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class TaskSpec:
    """One command. `run(cfg, **options)` returns the run directory (a picture command: the line saying what it
    wrote); `options` are the keyword arguments the CLI passes on, one flag each."""

    name: str  # the command (`beit NAME`); also its key in config.COMMAND_DEFAULTS
    help: str
    config: Literal["yaml", "checkpoint"]  # what CONFIG names: a YAML file, or a checkpoint (a YAML file too)
    run: str  # "module:function": (Config, **options) -> Path | str
    # "module:function": (Config, torch.device) -> loop Task; None for commands that train nothing, and for the
    # tokenizer, whose Task is built inside `train_tokenizer` around the images it loads first.
    build: str | None = None
    options: tuple[str, ...] = ("resume", "overwrite")
    command: tuple[str, ...] = ()  # the words after `beit` when they are not just NAME

    @property
    def words(self) -> tuple[str, ...]:
        return self.command or (self.name,)

    @property
    def runner(self) -> Callable:
        return resolve(self.run)

    @property
    def builder(self) -> Callable | None:
        return resolve(self.build) if self.build else None

    def read_config(self, source: str, overrides: list[str]) -> Config:
        """The run's config: the YAML file with this command's defaults, or a checkpoint's stored config."""
        if self.config == "checkpoint":
            return resolve(CHECKPOINT_CONFIG)(source, overrides, self.name)
        return load_config(source, overrides, command=self.name)


_EVAL_HELP = ("top-1/top-5, per-class accuracy and confusion matrix of a checkpoint; mIoU, mAcc, aAcc and per-class "
              "IoU of a segmentation run")
_PREDICT_HELP = "draw what a model predicts: masked tokens (pretraining) or label maps (segmentation), as a PNG"

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("pretrain", "masked image modeling pretraining (BEiT)", "yaml",
             run="beit.train.pretrain:run_pretrain", build="beit.train.pretrain:build_pretrain_task"),
    TaskSpec("finetune", "fine-tune a classifier from model.pretrained (or from scratch)", "yaml",
             run="beit.train.finetune:run_finetune", build="beit.train.finetune:build_finetune_task"),
    TaskSpec("segment", "semantic segmentation: BEiT + UperNet from model.pretrained (or from scratch)", "yaml",
             run="beit.train.segment:run_segment", build="beit.train.segment:build_segment_task"),
    TaskSpec("linprobe", "linear probe on every block of a frozen backbone", "checkpoint",
             run="beit.train.linprobe:run_linprobe", build="beit.train.linprobe:build_linprobe_task"),
    TaskSpec("knn", "k-NN accuracy of frozen features (k=20, T=0.07)", "checkpoint", run="beit.train.knn:run_knn"),
    TaskSpec("eval", _EVAL_HELP, "checkpoint", run="beit.train.eval_task:run_eval",
             options=("resume", "overwrite", "allow_other_classes")),
    TaskSpec("predict", _PREDICT_HELP, "checkpoint", run="beit.visualize:predict", options=("out", "num", "attention")),
    # run(cfg, out_dir, **options): the run directory comes first (the CLI's --out, default train.out_dir/run_name)
    TaskSpec("tokenizer", "train a dVAE tokenizer from a config", "yaml", run="beit.train.tokenizer:train_tokenizer",
             options=("overwrite", "resume"), command=("tokenizer", "train")),
)}

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

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Literal

from beit.config import Config, load_config

# How `beit eval|knn|linprobe|predict SOURCE` read SOURCE: a checkpoint (its stored config is the base) or a YAML file.
CHECKPOINT_CONFIG = "beit.hub:command_config"
LOOP = "beit.train.runner:run_task"  # launch + the loop + report: every training command


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
    # A training command is its loop Task and its report; the loop itself (`beit.train.runner.run_task`) is shared:
    build: str | None = None  # "module:function": (Config, torch.device) -> loop Task
    report: str | None = None  # "module:function": (Config, run directory) -> None, on the main process at the end
    # Any other command (evaluation, pictures; the tokenizer, whose Task is built around the images it loads
    # first) names its own function: (Config, **options) -> Path | str.
    run: str | None = None
    options: tuple[str, ...] = ("resume", "overwrite")
    command: tuple[str, ...] = ()  # the words after `beit` when they are not just NAME

    @property
    def words(self) -> tuple[str, ...]:
        return self.command or (self.name,)

    @property
    def runner(self) -> Callable:
        """(Config, **options) -> what the command returns (a training command: its run directory)."""
        if self.run is not None:
            return resolve(self.run)
        build, report = resolve(self.build), resolve(self.report) if self.report else None
        return functools.partial(resolve(LOOP), build_task=build, report=report)

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
             build="beit.train.pretrain:build_pretrain_task", report="beit.train.pretrain:report_pretrain"),
    TaskSpec("finetune", "fine-tune a classifier from model.pretrained (or from scratch)", "yaml",
             build="beit.train.finetune:build_finetune_task", report="beit.train.finetune:report_finetune"),
    TaskSpec("segment", "semantic segmentation: BEiT + UperNet from model.pretrained (or from scratch)", "yaml",
             build="beit.train.segment:build_segment_task", report="beit.train.segment:report_segment"),
    TaskSpec("linprobe", "linear probe on every block of a frozen backbone", "checkpoint",
             build="beit.train.linprobe:build_linprobe_task", report="beit.train.linprobe:report_linprobe"),
    TaskSpec("knn", "k-NN accuracy of frozen features (k=20, T=0.07)", "checkpoint", run="beit.train.knn:run_knn"),
    TaskSpec("eval", _EVAL_HELP, "checkpoint", run="beit.train.eval_task:run_eval",
             options=("resume", "overwrite", "allow_other_classes")),
    TaskSpec("predict", _PREDICT_HELP, "checkpoint", run="beit.visualize:predict", options=("out", "num", "attention")),
    # run(cfg, out_dir, **options): the run directory comes first (the CLI's --out, default train.out_dir/run_name)
    TaskSpec("tokenizer", "train a dVAE tokenizer from a config", "yaml", run="beit.train.tokenizer:train_tokenizer",
             options=("overwrite", "resume"), command=("tokenizer", "train")),
)}


def run(name: str, cfg: Config, **options):
    """Run command `name` on a config as `beit NAME` does: `run("finetune", cfg, resume=True)`."""
    return TASKS[name].runner(cfg, **options)

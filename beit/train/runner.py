"""What every training command does around the loop: processes, seeds, the run directory, logging."""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml

from beit.config import Config, check_resume_config
from beit.train import checkpoint as ckpt_io
from beit.train.distributed import DistInfo, barrier, cleanup, init_distributed
from beit.train.evaluate import is_main_process
from beit.train.loop import Task, fit, steps_per_epoch_of

log = logging.getLogger("beit")


def setup_logging(run_dir: Path | None, is_main: bool):
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for h in list(log.handlers):
        log.removeHandler(h)
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / (cfg.train.run_name or "run")


def open_run_dir(cfg: Config, overwrite: bool) -> Path:
    """The run directory of a command that trains nothing (`eval`, `knn`): created, logged to, with the config
    beside the results. Its results are cheap to remake, so a rerun never needs a flag: it writes to the next
    free `<run_name>-N` (--overwrite replaces `<run_name>` instead)."""
    base, run_dir, n = cfg.train.run_name or "run", run_dir_of(cfg), 1
    while not overwrite and run_dir.exists() and any(run_dir.iterdir()):
        n += 1
        cfg.train.run_name = f"{base}-{n}"
        run_dir = run_dir_of(cfg)
    ckpt_io.prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
    setup_logging(run_dir, True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


@contextlib.contextmanager
def evaluation_processes(cfg: Config) -> Iterator[DistInfo]:
    """The processes of a command that trains nothing: one, or torchrun's (`torchrun -m beit eval ...`). Under
    torchrun each rank scores its share of the images (`beit.train.evaluate.forward_share`), every rank gets the
    combined result, and the caller lets rank 0 alone open the run directory and write."""
    info = init_distributed(cfg.train.device, cfg.dist.backend)
    if not info.is_main:
        setup_logging(None, False)  # warnings only; rank 0 logs as one process does
    try:
        yield info
    finally:
        cleanup()


def remove_if_unstarted(run_dir: Path):
    """A run that stops before its first checkpoint leaves nothing to resume: remove the directory it created,
    so that the same command, rerun, starts afresh (instead of "already exists" / "no checkpoint")."""
    if ckpt_io.list_checkpoints(run_dir) or (run_dir / "best.pt").exists():
        return
    setup_logging(None, True)  # close log.txt before its directory goes
    shutil.rmtree(run_dir, ignore_errors=True)
    log.warning(f"removed '{run_dir}': the run stopped before its first checkpoint; rerun the same command")


def launch(cfg: Config, build_task: Callable[[Config, torch.device], Task], resume=False, overwrite=False) -> Path:
    """Set up processes and the run directory, build the task, train. Returns the run directory."""
    info = init_distributed(cfg.train.device, cfg.dist.backend)
    try:
        run_dir = run_dir_of(cfg)
        ckpt_io.check_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if resume and (run_dir / "config.yaml").is_file():
            same = ckpt_io.stored_global_batch(run_dir) == cfg.global_batch(info.world_size)
            check_resume_config(yaml.safe_load((run_dir / "config.yaml").read_text()), cfg, str(run_dir / "config.yaml"),
                                same_global_batch=same)
        setup_logging(None, info.is_main)
        # Per-rank seeds: model-side randomness (drop path) differs across ranks; data randomness is
        # keyed by (seed, epoch, sample index) and so does not depend on the rank at all.
        torch.manual_seed(cfg.train.seed + info.rank)
        random.seed(cfg.train.seed + info.rank)
        # Build first: a bad checkpoint, dataset or config fails here and leaves no run directory behind.
        task = build_task(cfg, info.device)
        steps_per_epoch_of(cfg, task.dataset, info.world_size)  # a set smaller than one batch fails here, not in fit
        barrier()
        created = info.is_main and not resume  # a new (or replaced) directory: nothing in it predates this run
        if info.is_main:
            ckpt_io.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)  # rank 0 holds the run's lock
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        barrier()
        setup_logging(run_dir, info.is_main)
        try:
            summary = fit(cfg, task, run_dir, info, resume=resume)
        except BaseException:
            if created:
                remove_if_unstarted(run_dir)
            raise
        if info.is_main:
            log.info(f"done: {summary['steps']} steps in {summary['wall_time_s']:.0f}s; run directory {run_dir}")
        return run_dir
    finally:
        cleanup()


def run_task(cfg: Config, build_task: Callable[[Config, torch.device], Task],
             report: Callable[[Config, Path], None] | None = None, resume=False, overwrite=False) -> Path:
    """A training command (`beit.tasks.TASKS`): `launch`, then the main process's `report(cfg, run_dir)` writes
    what the run produced beyond its checkpoints (results.json, exports). Returns the run directory."""
    run_dir = launch(cfg, build_task, resume=resume, overwrite=overwrite)
    if report is not None and is_main_process():
        report(cfg, run_dir)
    return run_dir

"""The one training loop, shared by pretraining, fine-tuning and linear probing.

A `Task` says what differs (the model, a small step function, the data, an optional evaluation); the loop
owns everything else: AdamW with per-group lr scales, the per-step cosine schedule, gradient accumulation,
AMP (bf16 autocast on CPU and GPU; fp16 + dynamic loss scaling on GPU), global-norm clipping, DDP,
metrics, checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from beit.config import Config, ConfigError
from beit.data.datasets import BadFileTracker
from beit.models.vit import Block
from beit.data.loader import batches_per_rank, make_loader
from beit.train import checkpoint as ckpt_io
from beit.train.distributed import DistInfo, all_reduce_sum, barrier, wrap_ddp
from beit.train.metrics import MetricLogger, MetricWindow
from beit.train.optim import lr_at, param_groups

log = logging.getLogger("beit")


@dataclass
class Task:
    """What one kind of training needs beyond the shared loop."""

    model: nn.Module  # trained in place; parameters with requires_grad=False are frozen
    step: Callable[[nn.Module, dict], dict]  # (model, batch on device) -> {"loss": Tensor, **scalars}
    dataset: Dataset  # training data; `set_epoch(e)` is called when it exists
    collate_fn: Callable | None = None
    evaluate: Callable[[nn.Module], dict] | None = None  # (unwrapped model) -> {"top1": ..., ...}
    best_metric: str | None = None  # evaluation key whose maximum is kept as best.pt
    eval_every_epochs: float | None = None  # default: train.eval_every_epochs


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _check_batch(cfg: Config, info: DistInfo):
    global_batch = cfg.data.batch_size * cfg.optim.accum_steps * info.world_size
    want = cfg.optim.recipe_batch_size
    if want is not None and want != global_batch and info.is_main:
        bar = "!" * 78
        log.warning(
            f"\n{bar}\nGLOBAL BATCH {global_batch} (= {cfg.data.batch_size} per device x {cfg.optim.accum_steps} "
            f"accumulation x {info.world_size} processes) differs from the recipe's {want}, and optim.lr is "
            f"still {cfg.optim.lr:g}. BEiT results depend on the global batch (unilm#383, #676): raise "
            f"optim.accum_steps to reach {want}, or scale optim.lr (linearly: {cfg.optim.lr * global_batch / want:.3g}) "
            f"and set optim.recipe_batch_size={global_batch}.\n{bar}"
        )
    return global_batch


def fit(cfg: Config, task: Task, run_dir: Path | None, info: DistInfo, resume: bool = False) -> dict:
    """Train `task` as configured. Returns a summary dict (also written to run_dir/summary.json)."""
    device, amp = info.device, cfg.train.amp
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (dynamic loss scaling); use train.amp=bf16 on CPU")
    batch_size, accum = cfg.data.batch_size, cfg.optim.accum_steps
    global_batch = _check_batch(cfg, info)

    model = task.model.to(device)
    groups = param_groups(model, cfg.optim)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    trainable = [p for g in groups for p in g["params"]]
    ema = None
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)

    steps_per_epoch = batches_per_rank(task.dataset, batch_size, info.world_size, cfg.data.num_workers,
                                       cfg.train.epochs) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training set has {len(task.dataset)} samples, fewer than one global batch ({global_batch}); "
            f"lower data.batch_size or optim.accum_steps"
        )
    total_steps = math.ceil(cfg.train.epochs * steps_per_epoch)
    stop_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else round(cfg.optim.warmup_epochs * steps_per_epoch)
    eval_every = max(1, round((task.eval_every_epochs or cfg.train.eval_every_epochs) * steps_per_epoch))

    step, best, extra_summary = 0, None, {}
    if resume:
        found = ckpt_io.list_checkpoints(run_dir)
        if not found:
            raise ckpt_io.RunDirError(f"--resume: no ckpt-*.pt in '{run_dir}'")
        state = ckpt_io.load_training_checkpoint(found[-1])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        ckpt_io.set_rng_state(state["rng"])
        step, best = state["step"], state.get("best")
        if info.is_main:
            log.info(f"resumed from {found[-1]} at step {step}")
            _truncate_metrics(run_dir / "metrics.jsonl", step)

    if cfg.train.compile:
        # Compile block by block, from outside the model: shapes inside a block are static, while the
        # masked-token gather around them is data-dependent and would force recompilation.
        for m in model.modules():
            if isinstance(m, Block):
                m.compile()
    ddp_model = wrap_ddp(model, info, cfg.dist.find_unused_parameters)
    logger = MetricLogger(run_dir, enabled=info.is_main)
    window = MetricWindow()
    bar = tqdm(total=stop_step, initial=step, disable=not (info.is_main and cfg.train.progress),
               unit="step", dynamic_ncols=True)
    if info.is_main:
        log.info(f"{stop_step - step} steps to go ({steps_per_epoch}/epoch, global batch {global_batch}, "
                 f"warmup {warmup}, amp {amp}, device {device}, {info.world_size} process(es))")

    def save(at_step):
        if info.is_main and run_dir is not None:
            ckpt_io.save_training_checkpoint(run_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "rng": ckpt_io.rng_state(), "best": best, "config": cfg.to_dict(),
            }, at_step, cfg.train.keep_last)
        barrier()

    bad_files, skipped, t_start, last_eval = BadFileTracker(), 0, time.time(), {}
    model.train()
    it = None
    while step < stop_step:
        epoch, k = divmod(step, steps_per_epoch)
        if it is None or k == 0:
            # A loader that starts k steps into the epoch yields exactly what an uninterrupted run would.
            it = iter(make_loader(task.dataset, batch_size, cfg.data.num_workers, cfg.train.seed, info.rank,
                                  info.world_size, epoch, k * accum, task.collate_fn, device.type == "cuda"))

        lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, warmup, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        t0 = time.time()
        for micro in range(accum):
            batch = next(it)
            bad_files.update(batch)
            batch = _drop_bad(batch)
            if batch is None:  # every sample of this micro-batch failed to decode (logged by the dataset)
                continue
            batch = to_device(batch, device)
            sync = info.enabled and micro < accum - 1
            with ddp_model.no_sync() if sync else contextlib.nullcontext():
                with autocast(device, amp):
                    out = task.step(ddp_model, batch)
                loss = out["loss"]
                if not torch.isfinite(loss) and amp != "fp16":
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower optim.lr or check the data")
                scaler.scale(loss / accum).backward()
            window.add(**{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()})
        scaler.unscale_(optimizer)
        clip = cfg.optim.clip_grad if cfg.optim.clip_grad is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if amp == "fp16" and scaler.get_scale() < scale_before:
            skipped += 1  # overflow: the step was skipped; its inf/nan norm is not averaged (unilm#598)
        else:
            window.add(grad_norm=grad_norm)
        if ema is not None:
            ema.update(model, step=step)
        step += 1

        dt = time.time() - t0
        window.add(img_per_s=global_batch / dt)
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == stop_step:
            values = {**_mean_over_ranks(window.flush(), info, device), "lr": lr, "epoch": step / steps_per_epoch}
            if amp == "fp16":
                values.update(loss_scale=scaler.get_scale(), skipped_steps=skipped)
            logger.log(step, "train", values)
            bar.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "mlm_acc", "acc", "img_per_s") if k in values})
        if task.evaluate is not None and (step % eval_every == 0 or step == stop_step):
            last_eval = _evaluate(task, model, ema, info, logger, step)
            metric = last_eval.get(task.best_metric) if task.best_metric else None
            if metric is not None and (best is None or metric > best):
                best = metric
                if info.is_main and run_dir is not None:
                    ckpt_io.atomic_save({"model": model.state_dict(), "config": cfg.to_dict(), "step": step,
                                         task.best_metric: metric}, run_dir / "best.pt")
            model.train()
        if step % cfg.train.save_every_steps == 0 or step == stop_step:
            save(step)
    bar.close()

    wall = time.time() - t_start
    summary = {"steps": step, "total_steps": total_steps, "epochs": step / steps_per_epoch,
               "global_batch": global_batch, "wall_time_s": wall, **bad_files.summary(),
               "skipped_steps": skipped, "eval": last_eval, "best": best, **extra_summary}
    if bad_files.num_skipped and info.is_main:
        log.warning(f"{bad_files.num_skipped} undecodable files were skipped: {sorted(bad_files.paths)[:10]}")
    if info.is_main and run_dir is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    return summary


def _mean_over_ranks(values: dict[str, float], info: DistInfo, device) -> dict[str, float]:
    """Average logged scalars over processes, so the curve describes the global batch."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def _drop_bad(batch):
    """Strip the bad-file bookkeeping from a collated batch; None when nothing usable is left."""
    if isinstance(batch, dict):
        batch = {k: v for k, v in batch.items() if k not in ("num_bad", "bad_paths")}
        return batch or None
    return None if batch[0] is None else tuple(batch)


def _evaluate(task: Task, model, ema, info: DistInfo, logger: MetricLogger, step: int) -> dict:
    results = {}
    if info.is_main:
        model.eval()
        with torch.no_grad():
            results = task.evaluate(model)
            if ema is not None:
                results.update({f"ema_{k}": v for k, v in task.evaluate(ema.module).items()})
        logger.log(step, "eval", results)
        log.info(f"step {step} eval: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()
                                                   if isinstance(v, (int, float))))
    barrier()
    return results


def _truncate_metrics(path: Path, step: int):
    """Drop rows a killed run logged after its last checkpoint, so the resumed curve has no duplicates."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))

"""The one training loop, shared by pretraining, fine-tuning and linear probing.

A `Task` says what differs (the model, a small step function, the data, an optional evaluation); the loop
owns everything else: AdamW with per-group lr scales (`param_groups`: weight decay and layer-wise lr decay), the
per-step cosine or poly schedule (`lr_at`, a function of the step), gradient accumulation, AMP (bf16 autocast on
CPU and GPU; fp16 + dynamic loss scaling on GPU), global-norm clipping, DDP or FSDP2, metrics, checkpoints and
exact resume.

The step never waits on the device: loss, metrics, the gradient norm and the non-finite check stay as
device tensors until `train.log_every` (or a checkpoint save) reads them, so a GPU queue stays full.
Throughput is measured as torchtitan does: `img_per_s` = images since the last log row / wall time since
then, the device synchronised only at that log step; `data_wait_s` is the part of that time spent waiting
for the data loader (`data_wait_frac` the same as a fraction).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from timm.utils import ModelEmaV3
from tqdm import tqdm

from beit.config import Config, ConfigError, OptimConfig
from beit.data.datasets import BadFileTracker
from beit.models.vit import Block
from beit.data.loader import make_loader, optimizer_steps_per_epoch
from beit.train import checkpoint as ckpt_io
from beit.train.distributed import (DistInfo, all_reduce_sum, barrier, env_world_size, full_state, full_tensor,
                                    load_full_state, no_sync, wrap_ddp, wrap_fsdp)
from beit.train.metrics import MetricLogger, MetricWindow

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
    # Per-step extras after each optimizer step: (unwrapped model, optimizer, steps done) -> None
    # (the tokenizer re-initialises dead codes here).
    after_step: Callable[[nn.Module, torch.optim.Optimizer, int], None] | None = None
    extra_state: Any = None  # has state_dict()/load_state_dict(): task state that checkpoints keep and resume restores
    class_names: list[str] | None = None  # the run's class index (training split), stored in every checkpoint


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@functools.cache
def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here. CPUs without AVX512-BF16 or AMX emulate them: measured on an
    AVX2-only CPU, the Fashion-MNIST fine-tuning step ran 16x slower under bf16 autocast than in fp32
    (docs/performance.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu  # private probes, absent from some builds: then assume emulation
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_amp(amp: str, device: torch.device) -> str:
    """`train.amp` as it runs on `device`: "auto" is bf16 where the hardware has it, fp32 ("none") elsewhere."""
    if amp == "auto":
        return "bf16" if fast_bf16(device) else "none"
    if amp == "bf16" and not fast_bf16(device):
        _warn_emulated_bf16(device)
    return amp


@functools.cache
def _warn_emulated_bf16(device: torch.device):
    log.warning(f"train.amp=bf16 on {device}, which has no native bf16 (AVX512-BF16 or AMX on a CPU): it is emulated "
                f"and can be over 10x slower than fp32 here; train.amp=auto runs fp32 on this machine")


def autocast(device: torch.device, amp: str):
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _check_batch(cfg: Config, info: DistInfo):
    global_batch = cfg.global_batch(info.world_size)
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


def steps_per_epoch_of(cfg: Config, dataset: Dataset, world_size: int) -> int:
    """Optimizer steps per epoch (drop_last; for shards what every rank holds, see `batches_per_rank`); a
    training set smaller than one global batch is a ConfigError."""
    d = cfg.data
    steps = optimizer_steps_per_epoch(dataset, d.batch_size, cfg.optim.accum_steps, world_size, d.num_workers,
                                      cfg.train.epochs, cfg.train.steps)
    if steps == 0:
        raise ConfigError(
            f"the training set has {len(dataset)} samples, fewer than one global batch "
            f"({cfg.global_batch(world_size)}, from each loader worker for shards); "
            f"lower data.batch_size or optim.accum_steps"
        )
    return steps


@dataclass
class _Run:
    """What `fit` builds once and then advances step by step: the whole training state of one run."""

    cfg: Config
    task: Task
    info: DistInfo
    run_dir: Path | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    trainable: list[torch.Tensor]
    global_batch: int
    steps_per_epoch: int
    total_steps: int  # the schedule's length (train.steps, else train.epochs)
    stop_step: int  # where this run stops (train.max_steps may stop earlier)
    warmup: int
    eval_every: int
    ddp_model: nn.Module | None = None
    step: int = 0
    best: float | None = None
    skipped: int = 0  # fp16 overflow steps
    loader: Any = None
    data_iter: Any = None
    first_bad: torch.Tensor | None = None  # on device: first step whose loss was not finite (-1: none yet)
    first_bad_loss: torch.Tensor | None = None  # on device: that loss
    checked_step: int = 0  # steps before this one passed the finite check
    window: MetricWindow = field(default_factory=MetricWindow)
    bad_files: BadFileTracker = field(default_factory=BadFileTracker)
    last_eval: dict = field(default_factory=dict)
    throughput: Throughput = field(default_factory=lambda: Throughput())
    # Training time across resumes: the earlier processes' seconds up to the checkpoint this one resumed from
    # (time a killed process spent after its last checkpoint is redone, so it is not counted), plus this one's.
    # None: resumed from a checkpoint that predates the record, so only this process's time is known.
    wall_before: float | None = 0.0
    t_start: float = 0.0

    def wall(self) -> float:
        return (self.wall_before or 0.0) + time.time() - self.t_start

    @property
    def model(self) -> nn.Module:
        return self.task.model


class Throughput:
    """Images and data-loader wait between two log rows, on the host clock (torchtitan's definition).

    The interval starts at the first step after a log row (evaluation and checkpoint saving excluded) and
    ends at the next log row, after the device has finished the queued work: per-step host timings on a
    GPU measure how fast work is queued, not how fast it runs."""

    def __init__(self):
        self.t0: float | None = None
        self.images = 0
        self.data_wait = 0.0

    def start_step(self):
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def wait_for(self, it):
        """`next(it)`, counting the time it blocks as data wait."""
        t = time.perf_counter()
        try:
            return next(it)
        finally:
            self.data_wait += time.perf_counter() - t

    def flush(self, device: torch.device) -> dict[str, float]:
        """{img_per_s, data_wait_s, data_wait_frac} since the interval started; starts a new one."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
        out = {"img_per_s": self.images / elapsed, "data_wait_s": self.data_wait,
               "data_wait_frac": self.data_wait / elapsed} if elapsed > 0 else {}
        self.t0, self.images, self.data_wait = None, 0, 0.0
        return out


def fit(cfg: Config, task: Task, run_dir: Path | None, info: DistInfo, resume: bool = False) -> dict:
    """Train `task` as configured. Returns a summary dict (also written to run_dir/summary.json)."""
    run = _setup(cfg, task, info, run_dir)
    if resume:
        _resume(run)
    if cfg.dist.strategy == "ddp":
        run.ddp_model = wrap_ddp(run.model, info, cfg.dist.find_unused_parameters)
    else:
        run.ddp_model = run.model  # FSDP2 wrapped in place by _setup
    logger = MetricLogger(run_dir, enabled=info.is_main)
    bar = tqdm(total=run.stop_step, initial=run.step, disable=not (info.is_main and cfg.train.progress),
               unit="step", dynamic_ncols=True)
    if info.is_main:
        log.info(f"{run.stop_step - run.step} steps to go ({run.steps_per_epoch}/epoch, global batch "
                 f"{run.global_batch}, warmup {run.warmup}, amp {resolve_amp(cfg.train.amp, info.device)}, device {info.device}, "
                 f"{info.world_size} process(es))")

    run.t_start = time.time()
    run.model.train()
    with _StopSignals() as stop:
        while run.step < run.stop_step:
            lr = _train_one_step(run)
            bar.update(1)
            _log_and_evaluate(run, logger, bar, lr)
            # SIGTERM / SIGINT: the step is finished; checkpoint and leave
            stopping = stop.agreed(info, check=run.step % cfg.train.log_every == 0)
            if stopping or run.step % cfg.train.save_every_steps == 0 or run.step == run.stop_step:
                _save(run)
            if stopping:
                bar.close()
                logger.close()
                raise Preempted(stop.name, run.step, ckpt_io.list_checkpoints(run_dir)[-1] if run_dir else None)
    bar.close()
    return _finish(run, logger)


class Preempted(Exception):
    """Training stopped on SIGTERM / SIGINT after finishing a step and writing a checkpoint."""

    exit_code = 75  # EX_TEMPFAIL: "try again" (--resume); distinct from errors (1, 2)

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} written")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf (bf16/fp32: fp16 skips such steps through its loss scaler)."""


class _StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (handlers restored on exit)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def agreed(self, info: DistInfo, check: bool) -> bool:
        """Whether any process was signalled, so that all ranks stop after the same step. Across processes the
        flags are compared only when `check` (every `train.log_every` steps, where logging syncs anyway): an
        all-reduce read on the host every step would make the CPU wait for the GPU every step."""
        if not info.enabled:
            return self.signum is not None
        if not check:
            return False
        flag = torch.tensor([float(self.signum is not None)], device=info.device)
        all_reduce_sum(flag)
        return bool(flag.item() > 0)

    def __exit__(self, exc_type, *exc):
        # Under torchrun the first worker to exit makes the agent SIGTERM the others, which may still be on their
        # way out after writing the same checkpoint: they ignore it and exit 75 ("resume me"), not -15. SIG_IGN,
        # unlike a Python handler, holds until the process ends (Python resets its own handlers as it finalises).
        stopping = exc_type is Preempted and env_world_size() > 1
        for s, h in self.previous.items():
            signal.signal(s, signal.SIG_IGN if stopping and s == signal.SIGTERM else h)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Official grouping: no weight decay for 1-D params, biases and `model.no_weight_decay()`
    (pos_embed, cls_token). mask_token and rel-pos tables are decayed unless the config says otherwise.
    With `layer_decay`, each group carries `lr_scale = decay ** (depth + 1 - layer_id)`; `head_lr_scale`
    multiplies it for the top layer id (what sits above the backbone: classifier, or neck and decode heads).
    """
    # Models without a ViT's hooks (the dVAE tokenizer): no named exemptions, one layer.
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    top = getattr(model, "depth", 0) + 1
    by_layer = hasattr(model, "layer_id") and (cfg.layer_decay is not None or cfg.head_lr_scale != 1.0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (
            p.ndim == 1
            or name.endswith(".bias")
            or name in skip
            or (name == "mask_token" and not cfg.decay_mask_token)
            or ("relative_position_bias_table" in name and not cfg.decay_rel_pos_bias)
        )
        lid = model.layer_id(name) if by_layer else top
        key = (lid, no_decay)
        if key not in groups:
            scale = cfg.layer_decay ** (top - lid) if cfg.layer_decay is not None else 1.0
            scale *= cfg.head_lr_scale if by_layer and lid == top else 1.0
            groups[key] = {
                "name": f"layer_{lid}_{'no_decay' if no_decay else 'decay'}",
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", power: float = 1.0) -> float:
    """Linear warmup from 0, then cosine (official BEiT, per step) or poly (mmseg `PolyLR`, segmentation) to
    exactly `min_lr` at the last step."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "poly":
        return min_lr + (base_lr - min_lr) * (1 - progress) ** power
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block, from outside the model: shapes inside a block are static,
    while the masked-token gather around them is data-dependent and would force recompilation."""
    for m in model.modules():
        if isinstance(m, Block):
            m.compile()


def _setup(cfg: Config, task: Task, info: DistInfo, run_dir: Path | None) -> _Run:
    """Optimizer, loss scaler, EMA and the step counts of the schedule."""
    global_batch = _check_batch(cfg, info)
    model = task.model.to(info.device)
    if cfg.train.compile:
        compile_blocks(model)
    if cfg.dist.strategy == "fsdp":  # shards the parameters in place: before the optimizer sees them
        bf16 = resolve_amp(cfg.train.amp, info.device) == "bf16"
        wrap_fsdp(model, info, bf16=bf16, cpu_offload=cfg.dist.fsdp_cpu_offload)
    groups = param_groups(model, cfg.optim)
    # fused: one kernel for the whole update (CUDA and CPU; +3% on the Fashion-MNIST CPU step, docs/performance.md).
    # Not with FSDP's CPU offload, whose parameters live on the CPU while the step runs on the GPU.
    fused = not cfg.dist.fsdp_cpu_offload
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  **({"fused": True} if fused else {}))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema_decay else None

    steps_per_epoch = steps_per_epoch_of(cfg, task.dataset, info.world_size)
    total_steps = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    stop_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    every = task.eval_every_epochs or cfg.train.eval_every_epochs
    # A cadence of at least the run's length evaluates once, at the end (rounding could add one a step before it)
    eval_every = total_steps if not cfg.train.steps and every >= cfg.train.epochs else max(1, round(every * steps_per_epoch))
    return _Run(cfg, task, info, run_dir, optimizer, scaler, ema, [p for g in groups for p in g["params"]],
                global_batch, steps_per_epoch, total_steps, stop_step, warmup, eval_every)


def _resume(run: _Run):
    """Load the newest intact checkpoint of the run directory: weights, optimizer, scaler, EMA, RNG, step and
    the metric window not yet logged."""
    path, state = ckpt_io.load_latest_intact(run.run_dir)
    load_full_state(run.model, run.optimizer, state["model"], state["optimizer"])  # FSDP: each rank its shard
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.module.load_state_dict(state["ema"])
    ckpt_io.set_rng_state(state["rng"])
    run.step, run.best = state["step"], state.get("best")
    run.wall_before = state.get("wall_time_s")
    run.checked_step = run.step
    if state.get("metric_window") is not None:
        run.window.load_state_dict(state["metric_window"])
    if run.task.extra_state is not None and state.get("task_state") is not None:
        run.task.extra_state.load_state_dict(state["task_state"])
    if run.info.is_main:
        log.info(f"resumed from {path} at step {run.step}")
        _truncate_metrics(run.run_dir / "metrics.jsonl", run.step)


def _epoch_iterator(run: _Run):
    """A data iterator that starts exactly where an uninterrupted run would be at `run.step`."""
    cfg, info = run.cfg, run.info
    epoch, k = divmod(run.step, run.steps_per_epoch)
    run.loader = make_loader(run.task.dataset, cfg.data.batch_size, cfg.data.num_workers, cfg.train.seed, info.rank,
                             info.world_size, epoch, k * cfg.optim.accum_steps, run.task.collate_fn,
                             pin_memory=info.device.type == "cuda", reuse=run.loader)
    return iter(run.loader)


def _train_one_step(run: _Run) -> float:
    """One optimizer step over `accum_steps` micro-batches (forward, backward, clip, step). Returns its lr."""
    cfg, info = run.cfg, run.info
    amp, accum = cfg.train.amp, cfg.optim.accum_steps
    if run.data_iter is None or run.step % run.steps_per_epoch == 0:
        run.throughput.start_step()  # starting the loader's workers is data wait too
        t = time.perf_counter()
        run.data_iter = _epoch_iterator(run)
        run.throughput.data_wait += time.perf_counter() - t
    lr = lr_at(run.step, cfg.optim.lr, cfg.optim.min_lr, run.warmup, run.total_steps, cfg.optim.schedule,
               cfg.optim.poly_power)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    run.throughput.start_step()
    for micro in range(accum):
        batch = run.throughput.wait_for(run.data_iter)
        run.bad_files.update(batch)
        batch = _drop_bad(batch)
        if batch is None:  # every sample of this micro-batch failed to decode (logged by the dataset)
            continue
        batch = to_device(batch, info.device)
        with no_sync(run.ddp_model, skip=info.enabled and micro < accum - 1):
            with autocast(info.device, amp):
                out = run.task.step(run.ddp_model, batch)
            loss = out["loss"]
            if amp != "fp16":  # fp16 overflows are the scaler's business (the step is skipped)
                _note_nonfinite(run, loss)
            run.scaler.scale(loss / accum).backward()
        run.window.add(**{k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()})
    run.scaler.unscale_(run.optimizer)
    clip = cfg.optim.clip_grad if cfg.optim.clip_grad is not None else float("inf")
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.trainable, clip)).detach()
    scale_before = run.scaler.get_scale()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if amp == "fp16" and run.scaler.get_scale() < scale_before:
        run.skipped += 1  # overflow: the step was skipped; its inf/nan norm is not averaged (unilm#598)
    else:
        run.window.add(grad_norm=grad_norm)
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
    run.step += 1
    if run.task.after_step is not None:
        run.task.after_step(run.model, run.optimizer, run.step)
    run.throughput.images += run.global_batch
    return lr


def _note_nonfinite(run: _Run, loss: torch.Tensor):
    """Remember, on the device, the first step whose loss is NaN/inf and that loss; `_check_finite` reads it."""
    if run.first_bad is None:
        run.first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        run.first_bad_loss = torch.zeros((), device=loss.device)
    bad = ~torch.isfinite(loss.detach()) & (run.first_bad < 0)
    run.first_bad = torch.where(bad, run.step, run.first_bad)
    run.first_bad_loss = torch.where(bad, loss.detach().float(), run.first_bad_loss)


def _check_finite(run: _Run):
    """Raise if a loss since the last check was not finite (read at log steps and before every save)."""
    if run.first_bad is not None and int(run.first_bad) >= 0:
        raise _non_finite(run, float(run.first_bad_loss), int(run.first_bad) + 1)
    run.checked_step = run.step


def _log_and_evaluate(run: _Run, logger: MetricLogger, bar, lr: float):
    """Every train.log_every steps: the window's means; every eval period: the task's evaluation (+ best.pt)."""
    cfg, info, step = run.cfg, run.info, run.step
    if step % cfg.train.log_every == 0 or step == run.stop_step:
        _check_finite(run)
        rates = run.throughput.flush(info.device)  # syncs the device: the interval ends when its work is done
        values = {**_mean_over_ranks({**run.window.flush(), **rates}, info, info.device), "lr": lr,
                  "epoch": step / run.steps_per_epoch}
        if cfg.train.amp == "fp16":
            values.update(loss_scale=run.scaler.get_scale(), skipped_steps=run.skipped)
        logger.log(step, "train", values)
        bar.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "mlm_acc", "acc", "img_per_s") if k in values})
    if run.task.evaluate is None or not (step % run.eval_every == 0 or step == run.stop_step):
        return
    run.last_eval = _evaluate(run.task, run.model, run.ema, info, logger, step)
    name = run.task.best_metric
    metric = run.last_eval.get(name) if name else None
    if metric is not None and (run.best is None or metric > run.best):
        run.best = metric
        model_sd, _ = full_state(run.model)  # every rank: FSDP gathers the shards to rank 0
        if info.is_main and run.run_dir is not None:
            ckpt_io.atomic_save({"model": model_sd, "config": cfg.to_dict(), "step": step, name: metric,
                                 "class_names": run.task.class_names}, run.run_dir / "best.pt")
    run.model.train()


def _non_finite(run: _Run, loss: float, step: int) -> NonFiniteLossError:
    found = ckpt_io.list_checkpoints(run.run_dir) if run.run_dir is not None else []
    last = f"the last good checkpoint is {found[-1]} (--resume continues from it)" if found else "no checkpoint yet"
    return NonFiniteLossError(
        f"loss is {loss} at step {step}; {last}. Lower optim.lr, raise optim.warmup_epochs or check the data "
        f"(the check is read every train.log_every={run.cfg.train.log_every} steps and before saves; this one "
        f"covered steps {run.checked_step + 1}-{run.step})")


def _save(run: _Run):
    _check_finite(run)  # never checkpoint weights a non-finite loss has already touched
    model_sd, optim_sd = full_state(run.model, run.optimizer)  # every rank: FSDP gathers to rank 0
    if run.info.is_main and run.run_dir is not None:
        ckpt_io.save_training_checkpoint(run.run_dir, {
            "model": model_sd, "optimizer": optim_sd,
            "scaler": run.scaler.state_dict(), "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "rng": ckpt_io.rng_state(), "best": run.best, "config": run.cfg.to_dict(), "wall_time_s": run.wall(),
            "metric_window": run.window.state_dict(), "global_batch": run.global_batch,
            "class_names": run.task.class_names,
            "task_state": run.task.extra_state.state_dict() if run.task.extra_state is not None else None,
        }, run.step, run.cfg.train.keep_last)
    barrier()


def _finish(run: _Run, logger: MetricLogger) -> dict:
    summary = {"steps": run.step, "total_steps": run.total_steps, "epochs": run.step / run.steps_per_epoch,
               "global_batch": run.global_batch, "wall_time_s": run.wall(),
               "wall_time_before_resume_s": run.wall_before, **run.bad_files.summary(),
               "skipped_steps": run.skipped, "eval": run.last_eval, "best": run.best}
    if run.bad_files.paths and run.info.is_main:
        paths = sorted(run.bad_files.paths)
        log.warning(f"{len(paths)} undecodable files were skipped (each in every epoch; listed in summary.json): "
                    f"{paths[:10]}")
    if run.info.is_main and run.run_dir is not None:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
    """Every rank evaluates its share of the eval set (`evaluate.run_over` shards and gathers), so all
    ranks return the same results; the main process logs them.

    The training RNG streams are put back afterwards: evaluation draws from them (a DataLoader without a
    generator draws its seed from torch's), and a run stopped by `train.max_steps` evaluates at a step
    where the uninterrupted run does not, so its checkpoint would hold other RNG states."""
    model.eval()
    rng = ckpt_io.rng_state()
    with torch.no_grad():
        results = task.evaluate(model)
        if ema is not None:
            results.update({f"ema_{k}": v for k, v in task.evaluate(ema.module).items()})
    ckpt_io.set_rng_state(rng)
    if info.is_main:
        logger.log(step, "eval", results)
        log.info(f"step {step} eval: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()
                                                   if isinstance(v, (int, float))))
    return results


def _truncate_metrics(path: Path, step: int):
    """Drop rows a killed run logged after its last checkpoint, so the resumed curve has no duplicates."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))

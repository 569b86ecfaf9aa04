"""BEiT pretraining: predict the frozen tokenizer's visual tokens at block-masked positions.

batch = {image [B, C, H, W] (patch view), tok_image [B, C, h, w] in [0, 1] (tokenizer view, same crop),
         mask [B, gh, gw] bool}
targets = tokenizer.encode(tok_image)[mask]          # [num_masked]   frozen, inference mode, fp32
logits  = model(image, mask)                         # [num_masked, vocab]
loss    = cross-entropy over all masked tokens of the batch
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.builders import build_mim_dataset, build_model, build_tokenizer
from beit.config import Config, ConfigError
from beit.data import collate_mim_skip_bad
from beit.export import export_run
from beit.train.knn import knn_evaluate
from beit.train.loop import Task

log = logging.getLogger("beit")


def make_mim_step(tokenizer: nn.Module):
    def mim_step(model: nn.Module, batch: dict) -> dict:
        mask = batch["mask"].flatten(1)  # [B, N]
        # The tokenizer is a frozen target generator: no grad, outside autocast (targets are argmaxes, so
        # low precision could flip them), never in the optimizer.
        with torch.inference_mode(), torch.autocast(batch["image"].device.type, enabled=False):
            # check_range=False: TwoViewTransform clamps tok_image to [0, 1], and the check is a host sync.
            tokens = tokenizer.encode(batch["tok_image"].float(), check_range=False).flatten(1)  # [B, N]
        targets = tokens[mask].clone()  # [num_masked]; clone leaves inference mode
        logits = model(batch["image"], mask)  # [num_masked, vocab]
        loss = F.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            mlm_acc = (logits.argmax(-1) == targets).float().mean()
        return {"loss": loss, "mlm_acc": mlm_acc, "mask_frac": mask.float().mean()}

    return mim_step


def check_compatible(model, tokenizer, cfg: Config):
    """Fail before any work if the model and tokenizer disagree on grid, vocabulary or channels (the model
    and data are checked by `build_model`)."""
    tok_grid = cfg.tokenizer.image_size // tokenizer.downsample
    problems = []
    if model.vocab_size != tokenizer.vocab_size:
        problems.append(f"model vocab_size {model.vocab_size} != tokenizer vocab_size {tokenizer.vocab_size} "
                        f"(set model.vocab_size={tokenizer.vocab_size})")
    if model.grid != (tok_grid, tok_grid):
        problems.append(f"model patch grid {model.grid} != tokenizer grid {tok_grid}x{tok_grid} "
                        f"(tokenizer.image_size {cfg.tokenizer.image_size} / downsample {tokenizer.downsample})")
    if tokenizer.in_chans != cfg.data.in_chans:
        problems.append(f"tokenizer expects {tokenizer.in_chans} channels, data.in_chans is {cfg.data.in_chans}")
    if problems:
        raise ConfigError("model, tokenizer and data disagree: " + "; ".join(problems))


def build_pretrain_task(cfg: Config, device: torch.device) -> Task:
    tokenizer = build_tokenizer(cfg, device)  # channels-last, see FrozenTokenizer.freeze
    model = build_model(cfg)  # create_model + pretrained (file or run directory) + image size/channel checks
    if model.lm_head is None:
        raise ConfigError(f"model.name={cfg.model.name} has no lm_head; pretraining needs a *_vocab preset")
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    check_compatible(model, tokenizer, cfg)

    dataset = build_mim_dataset(cfg, model.grid)
    evaluate = None
    if cfg.train.knn_every_epochs:  # a cheap signal of representation quality while pretraining
        evaluate = lambda m: knn_evaluate(m, cfg)  # noqa: E731
    return Task(model=model, step=make_mim_step(tokenizer), dataset=dataset, collate_fn=collate_mim_skip_bad,
                evaluate=evaluate, best_metric=None, eval_every_epochs=cfg.train.knn_every_epochs)


def report_pretrain(cfg: Config, run_dir: Path) -> None:
    """After `beit pretrain`: the exports (train.export)."""
    export_run(cfg, run_dir)

"""Linear probing, official protocol (unilm `run_linear_eval.py`) on the shared loop.

frozen backbone (eval mode, no grad)  ->  raw output of every block (before the final norm)  [B, N+1, D] x L
feature_l = concat(cls token, mean of patch tokens)                                         [B, L, 2D]
logits_l  = Linear_l(feature_l)       (one classifier per layer, N(0, 0.01) weights, zero bias)  [B, L, K]
loss      = sum over layers of CE(logits_l, labels)

Every layer's top-1 is reported; the probe's result is the best layer. Two data modes:
- `train.probe_cache_features: true`: features are computed ONCE with the eval transform (no augmentation)
  for the train and test splits, and the heads train on them. On CPU this is ~50x faster (the heads are
  tiny; the backbone forward is all the cost). Deviation from the official protocol: no augmentation.
- false (default, official): RandomResizedCrop (bilinear) + horizontal flip every epoch through the frozen
  backbone; evaluation with the eval transform.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms as T

from beit.builders import build_eval_loader, build_labeled_dataset, build_model
from beit.config import Config, ConfigError
from beit.data import build_dataset, collate_skip_bad, keyed_items, num_labels
from beit.data.transforms import pil_mode, to_mode
from beit.train.evaluate import accuracy, read_summary, run_over, write_results
from beit.train.loop import Task

log = logging.getLogger("beit")


class LinearProbe(nn.Module):
    """Frozen backbone + one linear head per block. Input: images [B, C, H, W] or cached features [B, L, 2D]."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.depth = backbone.depth  # read by param_groups
        dim = 2 * backbone.embed_dim
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(self.depth))
        for h in self.heads:
            nn.init.normal_(h.weight, std=0.01)
            nn.init.zeros_(h.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: no drop path, no dropout, even while the heads train
        return self

    # param_groups interface: heads only (the backbone is frozen, so it is skipped), no layer decay.
    def no_weight_decay(self) -> set[str]:
        return set()

    def layer_id(self, name: str) -> int:
        return self.depth + 1

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> [B, L, 2D]: concat(cls, mean patches) of each block's raw output."""
        layers = self.backbone.get_intermediate_layers(x)  # L x [B, N+1, D]
        return torch.stack([torch.cat([t[:, 0], t[:, 1:].mean(1)], dim=-1) for t in layers], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x) if x.ndim == 4 else x  # [B, L, 2D]
        feats = feats.to(self.heads[0].weight.dtype)
        return torch.stack([h(feats[:, i]) for i, h in enumerate(self.heads)], dim=1)  # [B, L, K]


def probe_step(model: nn.Module, batch) -> dict:
    x, y = batch[0], batch[1]
    logits = model(x).float()  # [B, L, K]
    L = logits.shape[1]
    loss = sum(F.cross_entropy(logits[:, i], y) for i in range(L))
    with torch.no_grad():
        acc = (logits.argmax(-1) == y[:, None]).float().mean(0)  # [L]
    return {"loss": loss, "acc": acc.max()}


def per_layer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """logits [B, L, K] -> {"top1_layer1": ..., "top5_layer1": ..., "top1": best, "best_layer": 1-based}."""
    out = {}
    for i in range(logits.shape[1]):
        acc = accuracy(logits[:, i], labels)
        out[f"top1_layer{i + 1}"], out[f"top5_layer{i + 1}"] = acc["top1"], acc["top5"]
    top1 = [out[f"top1_layer{i + 1}"] for i in range(logits.shape[1])]
    best = int(np.argmax(top1))
    out.update(top1=top1[best], top5=out[f"top5_layer{best + 1}"], best_layer=best + 1)
    return out


def _augment_transform(cfg: Config):
    """Official probe augmentation: RandomResizedCrop (bilinear) + horizontal flip, then normalise."""
    mode = pil_mode(cfg.data.in_chans)
    return T.Compose([T.Lambda(lambda im: to_mode(im, mode)),
                      T.RandomResizedCrop(cfg.data.img_size, interpolation=T.InterpolationMode.BILINEAR),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg.data.mean, cfg.data.std)])


def _cache(probe: LinearProbe, cfg: Config, split: str, device) -> TensorDataset:
    t0 = time.time()
    feats, labels = run_over(build_eval_loader(cfg, split), probe.features, device, cfg.train.amp,
                             f"features ({split})", cfg.train.progress)
    log.info(f"cached {split} features {list(feats.shape)} in {time.time() - t0:.0f}s")
    return TensorDataset(feats.half(), labels)  # fp16 halves the memory; the heads upcast


def build_linprobe_task(cfg: Config, device: torch.device):
    if cfg.optim.layer_decay is not None:
        raise ConfigError("linear probing trains only the heads: set optim.layer_decay=null")
    if not cfg.model.pretrained:
        log.warning("model.pretrained is null: probing a randomly initialised backbone (a floor, not a result)")
    backbone = build_model(cfg)
    split = cfg.train.eval_split
    test = build_labeled_dataset(cfg, split)
    if cfg.train.probe_cache_features:
        train = build_labeled_dataset(cfg, "train")
    else:
        try:
            train = keyed_items(build_dataset(cfg.data, "train", _augment_transform(cfg), label_seed=cfg.train.seed),
                                cfg.train.seed)  # crop and flip keyed by (seed, epoch, index): exact resumes
        except ValueError as e:
            raise ConfigError(str(e)) from None
    num_classes = max(num_labels(train), num_labels(test))
    probe = LinearProbe(backbone, num_classes).to(device)

    if cfg.train.probe_cache_features:
        train, test_feats = _cache(probe, cfg, "train", device), _cache(probe, cfg, split, device)
        test_loader = DataLoader(test_feats, batch_size=4096)
        collate = None
    else:
        test_loader, collate = build_eval_loader(cfg, split, test), collate_skip_bad

    def evaluate(model: nn.Module) -> dict:
        logits, labels = run_over(test_loader, model, device, cfg.train.amp, f"eval ({split})", cfg.train.progress)
        return per_layer_accuracy(logits, labels)

    return Task(model=probe, step=probe_step, dataset=train, collate_fn=collate, evaluate=evaluate,
                best_metric="top1")


def report_linprobe(cfg: Config, run_dir: Path) -> None:
    """After `beit linprobe`: results.json with every block's top-1/top-5 and the best block."""
    summary = read_summary(run_dir)
    last = summary.get("eval", {})
    layers = sorted(int(k[len("top1_layer"):]) for k in last if k.startswith("top1_layer"))
    write_results(run_dir, {
        "command": "linprobe", "pretrained": cfg.model.pretrained, "label_fraction": cfg.data.label_fraction,
        "cached_features": cfg.train.probe_cache_features, "steps": summary.get("steps"),
        "per_layer_top1": {str(i): last[f"top1_layer{i}"] for i in layers},
        "per_layer_top5": {str(i): last[f"top5_layer{i}"] for i in layers},
        "best_layer": last.get("best_layer"), "top1": last.get("top1"), "top5": last.get("top5"),
        "best_top1_over_evals": summary.get("best"),
    })

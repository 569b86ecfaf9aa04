"""Parameter groups (weight decay, layer-wise lr decay) and the lr schedule as a function of the step."""

from __future__ import annotations

import math

import torch.nn as nn

from beit.config import OptimConfig


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

"""Where the last block attends (`beit predict RUN --attention`): the paper's Figure 2 for your own model.

    tokens  = blocks[:-1](embed(image))                        [B, N+1, D]
    q, k    = the last block's projections of norm1(tokens)   [B, H, N+1, hd]
    attn    = softmax(q k^T / sqrt(hd) + rel-pos bias)        [B, H, N+1, N+1]   (shared and per-layer tables)

The PNG has one row per image: the image (titled with the class a classifier predicts and the true class),
then per head the [CLS] token's attention over the patch grid (upsampled to the image), every map on one
colour scale (the colorbar). Works for classifiers and MIM models (no mask; no predicted class).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.config import Config
from beit.data import build_dataset, build_finetune_transform
from beit.hub import load
from beit.train.evaluate import class_names


@torch.no_grad()
def last_block_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the last block, relative-position bias included: [B, H, N+1, N+1]."""
    return model.forward_intermediates(x, [-1], attention=True, stop_early=True).attentions[0]


def _name(names: list[str], i: int) -> str:
    return names[i] if i < len(names) else f"class {i}"


def _labels(model: nn.Module, x: torch.Tensor, targets: list[int], data_names: list[str]) -> list[str]:
    """Per image "predicted <name>" (classifiers) and "true <name>" (where the data names it)."""
    model_names = list(getattr(model, "class_names", []) or data_names)
    pred = model(x).argmax(-1).tolist() if getattr(model, "num_classes", 0) else [None] * len(targets)
    return ["\n".join(([f"predicted {_name(model_names, p)}"] if p is not None else [])
                      + ([f"true {_name(data_names, t)}"] if data_names else [])) for p, t in zip(pred, targets)]


def attention_figure(images: torch.Tensor, maps: torch.Tensor, labels: list[str]):
    """Figure: per row an image (titled with `labels[r]`) and its heads' attention maps, all on one colour
    scale from 0 to the largest probability shown, with a colorbar. images [n, C, H, W] in [0, 1], maps
    [n, heads, H, W]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, heads = maps.shape[:2]
    fig, axes = plt.subplots(n, heads + 1, figsize=(1.8 * (heads + 1) + 0.8, 1.9 * n + 0.4), squeeze=False,
                             layout="constrained")
    vmax = float(maps.max())  # one scale: heads and images compare by colour
    for r in range(n):
        img = images[r].permute(1, 2, 0).numpy()
        axes[r, 0].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(labels[r] or "image", fontsize=7)
        for h in range(heads):
            shown = axes[r, h + 1].imshow(maps[r, h].numpy(), cmap="inferno", vmin=0.0, vmax=vmax)
            if r == 0:
                axes[r, h + 1].set_title(f"head {h}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    bar = fig.colorbar(shown, ax=axes[:, 1:], shrink=0.9)
    bar.set_label("attention probability ([CLS] to patch)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.suptitle("last block: [CLS] attention per head (rel-pos bias included)", fontsize=9)
    return fig


@torch.no_grad()
def attention_grid(cfg: Config, out: Path, num: int = 4, seed: int = 0) -> dict:
    """PNG of the [CLS] token's last-block attention per head for `num` test images of the configured data,
    each row titled with the predicted class (classifiers) and the true one. Returns {"png", "heads",
    "images", "figure"}."""
    import matplotlib.pyplot as plt

    model = load(cfg.model.pretrained)
    # read with the model's class index where the data is matched by name (folders, shards)
    data = build_dataset(cfg.data, "test", build_finetune_transform(cfg.data, train=False),
                         classes=list(getattr(model, "class_names", [])) or None)
    idx = np.random.default_rng(seed).choice(len(data), min(num, len(data)), replace=False)
    items = [data[int(i)] for i in idx]
    x = torch.stack([img for img, _ in items])  # [n, C, H, W] normalised
    attn = last_block_attention(model, x)[:, :, 0, 1:]  # [n, H, N]: [CLS] -> patches
    gh, gw = model.patch_embed.grid
    maps = F.interpolate(attn.reshape(len(idx), -1, gh, gw), size=x.shape[-2:], mode="nearest")  # [n, H, H, W]
    mean, std = torch.tensor(cfg.data.mean)[:, None, None], torch.tensor(cfg.data.std)[:, None, None]
    labels = _labels(model, x, [int(y) for _, y in items], class_names(data, cfg))
    fig = attention_figure((x * std + mean).clamp(0, 1), maps, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"png": str(out), "heads": maps.shape[1], "images": len(idx), "figure": fig}

"""Where the last block attends (`beit predict RUN --attention`): the paper's Figure 2 for your own model.

    tokens  = blocks[:-1](embed(image))                        [B, N+1, D]
    q, k    = the last block's projections of norm1(tokens)   [B, H, N+1, hd]
    attn    = softmax(q k^T / sqrt(hd) + rel-pos bias)        [B, H, N+1, N+1]   (shared and per-layer tables)

The PNG has one row per image: the image, then per head the [CLS] token's attention over the patch grid
(upsampled to the image). Works for classifiers and MIM models (no mask).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.config import Config


@torch.no_grad()
def last_block_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the last block, relative-position bias included: [B, H, N+1, N+1]."""
    tokens = model.embed(x)
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for blk in model.blocks[:-1]:
        tokens = blk(tokens, shared)
    blk = model.blocks[-1]
    return blk.attn.attention_probs(blk.norm1(tokens), shared)


@torch.no_grad()
def attention_grid(cfg: Config, out: Path, num: int = 4, seed: int = 0) -> dict:
    """PNG of the [CLS] token's last-block attention per head for `num` test images of the configured data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from beit.data import build_dataset, build_finetune_transform
    from beit.hub import load

    model = load(cfg.model.pretrained)
    data = build_dataset(cfg.data, "test", build_finetune_transform(cfg.data, train=False))
    idx = np.random.default_rng(seed).choice(len(data), min(num, len(data)), replace=False)
    x = torch.stack([data[int(i)][0] for i in idx])  # [n, C, H, W] normalised
    attn = last_block_attention(model, x)[:, :, 0, 1:]  # [n, H, N]: [CLS] -> patches
    gh, gw = model.patch_embed.grid
    maps = F.interpolate(attn.reshape(len(idx), -1, gh, gw), size=x.shape[-2:], mode="nearest")  # [n, H, H, W]
    mean, std = torch.tensor(cfg.data.mean)[:, None, None], torch.tensor(cfg.data.std)[:, None, None]
    images = (x * std + mean).clamp(0, 1)
    heads = maps.shape[1]
    fig, axes = plt.subplots(len(idx), heads + 1, figsize=(1.8 * (heads + 1), 1.8 * len(idx)), squeeze=False)
    for r in range(len(idx)):
        img = images[r].permute(1, 2, 0).numpy()
        axes[r, 0].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        for h in range(heads):
            axes[r, h + 1].imshow(maps[r, h].numpy(), cmap="inferno")
            if r == 0:
                axes[r, h + 1].set_title(f"head {h}", fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("last block: [CLS] attention per head (rel-pos bias included)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"png": str(out), "heads": heads, "images": len(idx)}

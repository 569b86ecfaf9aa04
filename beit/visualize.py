"""What a model predicts, as a PNG grid with one row per sample.

Pretraining (MIM) checkpoints:
    input | masked input | tokenizer reconstruction of the true tokens | reconstruction with the model's
    predictions at the masked positions (visible positions keep the true tokens)
so one can see whether the model fills the masked blocks with plausible content. Needs a tokenizer with a
decoder (the shipped `fmnist_dvae` has one; DALL-E needs `decoder_weights`).

Segmentation checkpoints (a `beit segment` run, or any whole segmenter `beit.load` reads):
    input | ground truth | prediction, labels drawn with a fixed palette (0 black, ignored pixels white) and a
    legend naming the class of each colour shown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from beit.attention import attention_grid
from beit.builders import build_mim_dataset, build_model, build_tokenizer
from beit.config import Config, ConfigError
from beit.data.segmentation import build_seg_dataset
from beit.hub import checkpoint_kind
from beit.train.segment import build_eval_loader, build_segmenter, evaluate_segmenter


@torch.no_grad()
def prediction_grid(cfg: Config, out: Path, num: int = 8, seed: int = 0) -> dict:
    model = build_model(cfg, need_pretrained=True).eval()  # first: what the checkpoint is decides the message
    if getattr(model, "lm_head", None) is None:
        raise ConfigError(f"{cfg.model.pretrained} is a {'classifier' if model.num_classes else 'backbone'} "
                          f"({cfg.model.name}), not a pretraining checkpoint: masked-token predictions need one "
                          f"(a `beit pretrain` run); for this model use `beit predict ... --attention` (where it "
                          f"looks) or `beit eval` (its accuracy)")
    tokenizer = build_tokenizer(cfg)
    if getattr(tokenizer, "decoder", None) is None:
        raise ConfigError(f"tokenizer '{cfg.tokenizer.name}' has no decoder, so predictions cannot be drawn")
    data = build_mim_dataset(cfg, model.grid, split="test", seed=seed)
    items = [data[i] for i in np.random.default_rng(seed).choice(len(data), num, replace=False)]
    image = torch.stack([it["image"] for it in items])  # [n, C, H, W] normalised
    tok_image = torch.stack([it["tok_image"] for it in items])  # [n, C, h, w] in [0, 1]
    mask = torch.stack([it["mask"] for it in items])  # [n, gh, gw]

    tokens = tokenizer.encode(tok_image)  # [n, gh, gw]
    pred = tokens.clone()
    logits = model(image, mask.flatten(1))  # [num_masked, vocab]
    pred[mask] = logits.argmax(-1)
    acc = (pred[mask] == tokens[mask]).float().mean().item()

    true_rec = tokenizer.decode(tokens)  # [n, C, h, w]
    pred_rec = tokenizer.decode(pred)
    cell = tok_image.shape[-1] // mask.shape[-1]
    pixel_mask = mask.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, None]  # [n, 1, h, w]
    masked = torch.where(pixel_mask, torch.full_like(tok_image, 0.5), tok_image)
    _save_grid([tok_image, masked, true_rec, pred_rec], out,
               ["input", "masked input", "tokenizer reconstruction", f"model prediction (token acc {acc:.0%})"])
    return {"masked_token_acc": acc, "png": str(out)}


def grid_figure(columns: list, titles: list[str]):
    """A Figure with one column of images per entry of `columns` (each a batch tensor or a list of [C, H, W]
    tensors in [0, 1], sizes may differ) and one row per sample; `titles` head the columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(columns[0])
    fig, axes = plt.subplots(n, len(columns), figsize=(2.2 * len(columns), 2.2 * n), squeeze=False,
                             layout="constrained")
    for r in range(n):
        for c, col in enumerate(columns):
            img = col[r].clamp(0, 1).permute(1, 2, 0).numpy()
            axes[r, c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=8)
    return fig


def save_figure(fig, out: Path):
    """Write `fig` as a PNG and free it (the Figure object stays readable, e.g. by tests)."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def _save_grid(columns: list, out: Path, titles: list[str]):
    return save_figure(grid_figure(columns, titles), out)


def palette(num: int = 256) -> np.ndarray:
    """Fixed label colours [num, 3] in [0, 1]: 0 black, 1-10 matplotlib's tab10, then seeded random colours;
    255 (the usual ignore index) white."""
    from matplotlib import colormaps

    colours = np.random.default_rng(0).uniform(0.15, 1.0, (max(num, 256), 3))
    colours[0] = 0.0
    colours[1:11] = colormaps["tab10"].colors
    colours[255] = 1.0
    return colours


def colourize(labels: torch.Tensor) -> torch.Tensor:
    """Label map [H, W] -> RGB [3, H, W] with `palette`."""
    return torch.from_numpy(palette()[labels.clamp(0, 255).numpy()]).permute(2, 0, 1).float()


@torch.no_grad()
def segmentation_columns(cfg: Config, num: int = 8, label: str = "") -> tuple[dict[str, list], list[str]]:
    """({"input": [C, H, W] images, "ground truth": [H, W] label maps, "<label> prediction": [H, W] label maps},
    the class names) for the first `num` test images of a segmentation run (`model.pretrained`: a
    `beit segment` run directory or checkpoint)."""
    test = build_seg_dataset(cfg, "test")
    model = build_segmenter(cfg, len(test.classes), load="all")
    loader = build_eval_loader(cfg, Subset(test, range(min(num, len(test)))))
    metrics, kept = evaluate_segmenter(model, loader, cfg, torch.device("cpu"), list(test.classes), keep=num)
    mean, std = torch.tensor(cfg.data.mean)[:, None, None], torch.tensor(cfg.data.std)[:, None, None]
    images = [torch.nn.functional.interpolate((x * std + mean)[None], y.shape, mode="bilinear")[0] for x, y, _ in kept]
    columns = {"input": images, "ground truth": [y for _, y, _ in kept],
               f"{label} prediction (mIoU {metrics['mIoU']:.1f})".strip(): [p for _, _, p in kept]}
    return columns, list(test.classes)


def class_legend_handles(label_maps: list, classes: list[str]) -> list:
    """Legend entries (a patch of `palette` colour each) for the labels that occur in `label_maps`, in label
    order; the ignore index 255 as "ignored"."""
    from matplotlib.patches import Patch

    present = torch.unique(torch.cat([m.flatten().long() for m in label_maps])).tolist()
    colours = palette()
    return [Patch(facecolor=colours[i], edgecolor="0.5", linewidth=0.5,
                  label="ignored" if i == 255 else classes[i] if i < len(classes) else f"class {i}")
            for i in present]


def save_segmentation_grid(columns: dict[str, list], out: Path, classes: list[str]):
    """input | ground truth | prediction(s) as a PNG, the label maps in `palette` colours with a legend naming
    the class of every colour shown. Returns the Figure."""
    label_maps = [m for col in columns.values() for m in col if m.ndim == 2]  # [H, W] each
    fig = grid_figure([[colourize(m) if m.ndim == 2 else m for m in col] for col in columns.values()],
                      list(columns))
    handles = class_legend_handles(label_maps, classes)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=7,
               title="classes (colour of the label maps)", title_fontsize=7)
    return save_figure(fig, out)


def predict(cfg: Config, out: str | Path, num: int = 8, attention: bool = False) -> str:
    """`beit predict`: the PNG for `model.pretrained`, by what the checkpoint holds (a segmenter: label maps;
    else `attention_grid` with `attention`, else `prediction_grid`); returns the line that says what was written."""
    out = Path(out)
    if checkpoint_kind(cfg.model) == "segmenter":
        columns, classes = segmentation_columns(cfg, num)
        save_segmentation_grid(columns, out, classes)
        return f"wrote {out} (input | ground truth | prediction, with a legend of the classes shown)"
    if attention:
        res = attention_grid(cfg, out, num)
        return f"wrote {res['png']} ({res['images']} images x {res['heads']} heads)"
    res = prediction_grid(cfg, out, num)
    return f"wrote {res['png']} (masked-token accuracy on these samples: {res['masked_token_acc']:.1%})"

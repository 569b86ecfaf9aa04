"""Everything a command builds from a `Config`, in one place: model, tokenizer, datasets with their transforms.

    model     = build_model(cfg)                        # preset + overrides + model.pretrained, checked vs data
    tokenizer = build_tokenizer(cfg, device)            # frozen target generator (pretraining)
    train     = build_mim_dataset(cfg, model.grid)      # two views + block mask per image (pretraining)
    train     = build_labeled_dataset(cfg, "train", train_transform=True)   # fine-tuning / probing
    loader    = build_eval_loader(cfg, "test")          # sequential, eval transform

Each task (`beit.train.pretrain`, `finetune`, `linprobe`) turns these into a `Task` for the shared loop.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from beit.config import SEG_DATASETS, Config, ConfigError
from beit.convert.runs import resolve_pretrained
from beit.data import (MIMDataset, MIMItem, ShardDataset, build_dataset, build_finetune_transform,
                       build_mask_generator, build_two_view_transform, collate_skip_bad, keyed_items)
from beit.data.segmentation import build_seg_dataset
from beit import models
from beit.convert import load_pretrained
from beit.convert.segmentation import load_pretrained_backbone
from beit.hub import PRETRAINED_TAGS, ZOO, resolve_path
from beit.models.segmentation import BeitSegmenter
from beit.models.segmentation import create_segmenter as _segmenter_architecture
from beit.tokenizers import FrozenTokenizer, create_tokenizer

log = logging.getLogger("beit")


def create_model(name: str, pretrained: str | None = None, **overrides) -> nn.Module:
    """Build preset `name` with keyword overrides (`beit.models.create_model`); `pretrained=PATH` loads a checkpoint
    of any supported layout (ours, official/timm, HF, OpenMMLab), adapting rel-pos tables and position
    embeddings, or names a shipped model (`pretrained="fmnist"` for `beit_fmnist_patch4_32`, see
    `beit.hub.PRETRAINED_TAGS`)."""
    model = models.create_model(name, **overrides)
    if pretrained:
        if (name, pretrained) in PRETRAINED_TAGS:  # a shipped model, e.g. pretrained="fmnist"
            pretrained = resolve_path(PRETRAINED_TAGS[name, pretrained])
        elif str(pretrained) in ZOO:  # e.g. pretrained="fmnist-backbone"
            pretrained = resolve_path(pretrained)
        load_pretrained(model, pretrained)
    return model


def create_segmenter(name: str, pretrained: str | None = None, **overrides) -> BeitSegmenter:
    """Build segmentation preset `name` (beit.models.presets.SEG_PRESETS) with keyword overrides; `pretrained`
    loads a backbone or a whole segmenter of any supported layout (`beit.convert.segmentation.load_segmenter`)."""
    model = _segmenter_architecture(name, **overrides)
    if pretrained:
        load_pretrained_backbone(model, pretrained)
    return model


def build_model(cfg: Config, need_pretrained: bool = False) -> nn.Module:
    """`create_model(cfg.model.name, pretrained, **overrides)` checked against the data config."""
    if need_pretrained and not cfg.model.pretrained:
        raise ConfigError("model.pretrained must name a checkpoint (file or run directory) for this command")
    pretrained = resolve_pretrained(cfg.model.pretrained)
    if pretrained:
        log.info(f"loading {pretrained}")
    model = create_model(cfg.model.name, pretrained, **cfg.model.overrides())
    problems = []
    inp = getattr(model, "patch_embed", model)  # a ViT's input sizes live on its patch embedding; a CNN's on itself
    if cfg.data.img_size != inp.img_size:
        problems.append(f"data.img_size {cfg.data.img_size} != model img_size {inp.img_size}")
    if cfg.data.in_chans != inp.in_chans:
        problems.append(f"data.in_chans {cfg.data.in_chans} != model in_chans {inp.in_chans}")
    if problems:
        raise ConfigError("model and data disagree: " + "; ".join(problems))
    return model


def build_tokenizer(cfg: Config, device: torch.device | str = "cpu") -> FrozenTokenizer:
    return create_tokenizer(cfg.tokenizer.name, weights=cfg.tokenizer.weights).to(device)


def build_mim_dataset(cfg: Config, grid: tuple[int, int], split: str = "train",
                      seed: int | None = None) -> MIMDataset | ShardDataset:
    """The pretraining set: (patch view, tokenizer view, block mask) per image, keyed by (seed, epoch, index).
    From shards (data.dataset=webdataset) the reader's workers make the same items."""
    seed = cfg.train.seed if seed is None else seed
    if cfg.data.dataset in SEG_DATASETS:  # pretraining on a segmentation set's own images (masks unused)
        base = build_seg_dataset(cfg, split)
    else:
        base = build_dataset(cfg.data, split)
    item = MIMItem(build_two_view_transform(cfg.data, cfg.tokenizer.image_size), build_mask_generator(cfg.data, grid),
                   seed)
    if isinstance(base, ShardDataset):
        return base.with_items(item, seed)
    return MIMDataset(base, item.two_view, item.mask_gen, seed=seed)


def build_labeled_dataset(cfg: Config, split: str, train_transform: bool = False, classes: list[str] | None = None):
    """`build_dataset` with the fine-tuning (train) or eval transform; bad label fractions become ConfigErrors.
    `classes` numbers an ImageFolder split by a checkpoint's class index (default: the training split's)."""
    try:
        ds = build_dataset(cfg.data, split, build_finetune_transform(cfg.data, train=train_transform),
                           label_seed=cfg.train.seed, classes=classes)
    except ValueError as e:  # e.g. a label fraction that leaves a class empty
        raise ConfigError(str(e)) from None
    # timm's random transforms draw from the global RNGs: key them by (seed, epoch, index) for exact resumes
    return keyed_items(ds, cfg.train.seed) if train_transform else ds


def build_eval_loader(cfg: Config, split: str = "test", dataset=None) -> DataLoader:
    """Sequential loader over `split` with the eval transform (Resize(size / crop_pct) + CenterCrop)."""
    dataset = dataset if dataset is not None else build_labeled_dataset(cfg, split)
    return DataLoader(dataset, batch_size=cfg.data.batch_size * 2, shuffle=False, num_workers=cfg.data.num_workers,
                      collate_fn=collate_skip_bad, pin_memory=torch.cuda.is_available())

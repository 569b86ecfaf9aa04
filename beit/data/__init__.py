"""Data pipeline: block-wise masking, the two-view pretraining transform, datasets, samplers, loaders."""

from __future__ import annotations

from .datasets import (
    BadFileTracker,
    BadSample,
    ImageDataset,
    ImageFolderDataset,
    KeyedItems,
    LabeledBatch,
    MIMDataset,
    MIMItem,
    SubsetDataset,
    balanced_subset,
    collate_mim_skip_bad,
    collate_skip_bad,
    keyed_items,
    load_fashion_mnist,
    num_labels,
)
from .build import build_dataset
from .loader import ResumableSampler, batches_per_rank, make_loader, optimizer_steps_per_epoch
from .masking import MaskingGenerator, proportional_min_patches
from .shards import ShardDataset, write_shards
from .transforms import TwoViewTransform, build_finetune_transform, eval_crop_pct, random_resized_crop_box


def build_mask_generator(cfg, grid: tuple[int, int]) -> MaskingGenerator:
    """`MaskingGenerator` for a `DataConfig` and patch grid (gh, gw)."""
    return MaskingGenerator(
        grid=grid,
        num_masking_patches=cfg.num_mask_patches,
        min_num_patches=cfg.min_mask_patches,
        max_num_patches=cfg.max_mask_patches,
        min_aspect=cfg.mask_min_aspect,
        mode=cfg.mask_mode,
    )


def build_two_view_transform(cfg, tokenizer_size_px: int) -> TwoViewTransform:
    """`TwoViewTransform` for a `DataConfig` (patch view cfg.img_size, tokenizer view `tokenizer_size_px`)."""
    return TwoViewTransform(
        patch_size_px=cfg.img_size,
        tokenizer_size_px=tokenizer_size_px,
        scale=cfg.crop_scale,
        ratio=cfg.crop_ratio,
        color_jitter=cfg.color_jitter,
        hflip=cfg.hflip,
        mean=cfg.mean,
        std=cfg.std,
        in_chans=cfg.in_chans,
    )


__all__ = [
    "BadFileTracker",
    "BadSample",
    "ImageDataset",
    "ImageFolderDataset",
    "KeyedItems",
    "LabeledBatch",
    "MIMDataset",
    "MIMItem",
    "MaskingGenerator",
    "ResumableSampler",
    "ShardDataset",
    "SubsetDataset",
    "TwoViewTransform",
    "balanced_subset",
    "batches_per_rank",
    "build_dataset",
    "build_finetune_transform",
    "build_mask_generator",
    "build_two_view_transform",
    "collate_mim_skip_bad",
    "collate_skip_bad",
    "eval_crop_pct",
    "keyed_items",
    "load_fashion_mnist",
    "make_loader",
    "num_labels",
    "optimizer_steps_per_epoch",
    "proportional_min_patches",
    "random_resized_crop_box",
    "write_shards",
]

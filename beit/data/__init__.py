"""Data pipeline: block-wise masking, the two-view pretraining transform, datasets, samplers, loaders."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .datasets import (
    ArrayImageDataset,
    BadFileTracker,
    BadSample,
    ImageFolderDataset,
    LabeledBatch,
    MIMDataset,
    MIMItem,
    SubsetDataset,
    balanced_subset,
    build_dataset,
    collate_mim_skip_bad,
    collate_skip_bad,
    load_fashion_mnist,
    num_labels,
)
from .loader import batches_per_rank, make_loader
from .masking import MaskingGenerator, proportional_min_patches
from .sampler import ResumableSampler
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


def build_mim_dataset(base, two_view: TwoViewTransform, mask_gen: MaskingGenerator, seed: int):
    """Pretraining items from `build_dataset(cfg, "train")`: a `MIMDataset`, or for shards the same
    `ShardDataset` making `MIMItem`s (views and mask drawn from (seed, epoch, sample index) either way)."""
    if isinstance(base, ShardDataset):
        base.make_item, base.seed = MIMItem(two_view, mask_gen, seed), int(seed)
        return base
    return MIMDataset(base, two_view, mask_gen, seed)


def build_pretrain_loader(
    cfg,
    grid: tuple[int, int],
    tokenizer_size_px: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_sample: int = 0,
    epoch: int = 0,
) -> tuple[DataLoader, ResumableSampler, MIMDataset]:
    """(loader, sampler, dataset) for BEiT pretraining on the "train" split.

    `start_sample` is the number of GLOBAL samples (all ranks together) already consumed in `epoch`; each rank
    skips start_sample // world_size of its own. It must be a multiple of world_size. Batches are dicts
    (see `collate_mim_skip_bad`) of cfg.batch_size per rank, drop_last. For the next epoch call
    `dataset.set_epoch(e)` and `sampler.set_epoch(e)` before iterating the loader again.
    """
    if start_sample % world_size:
        raise ValueError(f"start_sample={start_sample} must be a multiple of world_size={world_size}")
    dataset = MIMDataset(
        build_dataset(cfg, "train"),
        build_two_view_transform(cfg, tokenizer_size_px),
        build_mask_generator(cfg, grid),
        seed,
    )
    sampler = ResumableSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size, drop_last=True)
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    sampler.set_start(start_sample // world_size)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_mim_skip_bad,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers must re-copy the dataset to see set_epoch
        drop_last=True,
    )
    return loader, sampler, dataset


__all__ = [
    "ArrayImageDataset",
    "BadFileTracker",
    "BadSample",
    "ImageFolderDataset",
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
    "build_mim_dataset",
    "build_mask_generator",
    "build_pretrain_loader",
    "build_two_view_transform",
    "collate_mim_skip_bad",
    "collate_skip_bad",
    "eval_crop_pct",
    "load_fashion_mnist",
    "make_loader",
    "num_labels",
    "proportional_min_patches",
    "random_resized_crop_box",
    "write_shards",
]

"""Checkpoints in, checkpoints out: read any supported layout, load it into our `Beit` or `BeitSegmenter` with
the official fine-tuning surgery, and write official / HF / OpenMMLab files.

    read_checkpoint(path) -> dict                 # safetensors, or torch.load(weights_only=True); never unpickles
    load_pretrained(model, path_or_sd) -> LoadReport
    save_checkpoint_as(sd, path, layout)          # official | hf | mmpretrain
    write_weights(tensors, path, config=None)     # the one writer of weight files (and of their config.json)

The ViT loader lives in beit/convert/weights.py (its docstring lists the surgery, step by step), segmenter
checkpoints in beit/convert/segmentation.py, key tables in beit/convert/layouts.py, resizing in
beit/convert/resize.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from beit.convert.layouts import LAYOUTS, detect_layout, from_official, to_official, unwrap_checkpoint, unwrap_state_dict
from beit.convert.segmentation import load_segmenter
from beit.convert.weights import (LoadReport, hf_checkpoint, hf_config_from_state_dict, load_vit, read_checkpoint,
                                  save_checkpoint_as, write_weights)

__all__ = [
    "LAYOUTS",
    "LoadReport",
    "detect_layout",
    "from_official",
    "hf_checkpoint",
    "hf_config_from_state_dict",
    "load_pretrained",
    "read_checkpoint",
    "save_checkpoint_as",
    "to_official",
    "unwrap_checkpoint",
    "unwrap_state_dict",
    "write_weights",
]


def load_pretrained(
    model: torch.nn.Module,
    path_or_sd: str | os.PathLike | Mapping,
    strict_shapes: bool = True,
    checkpoint_grid: tuple[int, int] | None = None,
) -> LoadReport:
    """Load a checkpoint of any supported layout into our `Beit` (`load_vit`), or into a `BeitSegmenter` (a
    backbone or a whole-segmenter checkpoint: `beit.convert.segmentation.load_segmenter`). Missing/unexpected
    keys are logged and returned by name; a shape mismatch raises ValueError (or, with `strict_shapes=False`,
    is skipped and reported). `checkpoint_grid` is the checkpoint's patch grid when it is not square."""
    if hasattr(model, "decode_head"):  # a BeitSegmenter: backbone or whole-segmenter checkpoints
        return load_segmenter(model, path_or_sd, strict_shapes)
    return load_vit(model, path_or_sd, strict_shapes, checkpoint_grid)

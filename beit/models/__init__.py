"""Model construction: `create_model(name, **overrides)` over the explicit PRESETS dict (architecture only: loading
weights is `beit.create_model(name, pretrained=...)`, in beit/builders.py)."""

from __future__ import annotations

import difflib

from beit.models.cnn import SmallCNN, SmallUNet, create_cnn
from beit.models.presets import CNN_PRESETS, PRESETS, SEG_CNN_PRESETS, SEG_PRESETS
from beit.models.segmentation import BeitSegmenter, create_segmenter
from beit.models.vit import Beit

# ModelConfig fields that only a BeitSegmenter takes.
SEG_HEAD_FIELDS = ("out_indices", "channels", "pool_scales", "use_aux_head", "aux_channels", "aux_num_convs",
                   "neck_scales")


def create_model(name: str, **overrides) -> Beit | SmallCNN:
    """Build preset `name` with keyword overrides, freshly initialised. Weights (a checkpoint of any layout, a
    run directory, a shipped model) load with `beit.create_model(name, pretrained=...)`
    (`beit.builders.create_model`), which builds the model here first."""
    if "pretrained" in overrides:
        raise TypeError("beit.models.create_model builds the architecture only; load weights with "
                        "beit.create_model(name, pretrained=PATH)")
    if name in SEG_PRESETS or name in SEG_CNN_PRESETS:
        raise KeyError(f"'{name}' is a segmentation preset: build it with create_segmenter('{name}')")
    if name in CNN_PRESETS:
        model = create_cnn(SmallCNN, name, CNN_PRESETS[name], overrides)
    elif name not in PRESETS:
        names = [*PRESETS, *CNN_PRESETS]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model preset '{name}'.{hint} Available: {', '.join(names)}")
    else:
        seg_only = [k for k in SEG_HEAD_FIELDS if k in overrides]
        if seg_only:
            raise ValueError(f"model.{seg_only[0]} sets a segmentation head; '{name}' is not a segmentation preset "
                             f"({', '.join(SEG_PRESETS)}): remove it")
        kwargs = {**PRESETS[name], **overrides}
        if kwargs.get("vocab_size"):
            kwargs.setdefault("use_mask_token", True)
        model = Beit(**kwargs)
    return model


__all__ = ["Beit", "BeitSegmenter", "CNN_PRESETS", "PRESETS", "SEG_CNN_PRESETS", "SEG_PRESETS", "SmallCNN", "SmallUNet",
           "create_model", "create_segmenter"]

"""Model construction: `create_model(name, pretrained=None, **overrides)` over the explicit PRESETS dict."""

from __future__ import annotations

import difflib

from beit.models.presets import PRESETS, SEG_PRESETS
from beit.models.segmentation import BeitSegmenter, create_segmenter
from beit.models.vit import Beit


def create_model(name: str, pretrained: str | None = None, **overrides) -> Beit:
    """Build preset `name` with keyword overrides; `pretrained=PATH` loads a checkpoint of any supported
    layout (ours, official/timm, HF, OpenMMLab), adapting rel-pos tables and position embeddings, or names
    a shipped model (`pretrained="fmnist"` for `beit_fmnist_patch4_32`, see `beit.hub.PRETRAINED_TAGS`)."""
    if name in SEG_PRESETS:
        raise KeyError(f"'{name}' is a segmentation preset: build it with create_segmenter('{name}')")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model preset '{name}'.{hint} Available: {', '.join(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    if kwargs.get("vocab_size"):
        kwargs.setdefault("use_mask_token", True)
    model = Beit(**kwargs)
    if pretrained:
        from beit.convert import load_pretrained
        from beit.hub import PRETRAINED_TAGS, ZOO, resolve_path

        if (name, pretrained) in PRETRAINED_TAGS:  # a shipped model, e.g. pretrained="fmnist"
            pretrained = resolve_path(PRETRAINED_TAGS[name, pretrained])
        elif str(pretrained) in ZOO:  # e.g. pretrained="fmnist-backbone"
            pretrained = resolve_path(pretrained)

        load_pretrained(model, pretrained)
    return model


__all__ = ["Beit", "BeitSegmenter", "PRESETS", "SEG_PRESETS", "create_model", "create_segmenter"]

"""A dVAE trained by `beit tokenizer train` as a frozen tokenizer, from its config and state dict (the files are
found and read by `beit.builders.create_tokenizer`)."""

from __future__ import annotations

import torch
from pydantic import ValidationError

from beit.config import TokenizerConfig
from beit.tokenizers.base import FrozenTokenizer, TokenizerError, check_state_dict
from beit.tokenizers.dvae import DVAE

ARCH_FIELDS = ("vocab_size", "hidden", "blocks_per_group", "downsample", "in_chans", "recon_loss")


class DVAETokenizer(FrozenTokenizer):
    """Frozen wrapper of a trained `DVAE`: encode images in [0, 1] -> [B, H/ds, W/ds] ids."""

    def __init__(self, model: DVAE, source: str = ""):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.vocab_size, self.downsample, self.in_chans = model.cfg.vocab_size, model.cfg.downsample, model.cfg.in_chans
        self.decoder = model.decoder
        self.source = source
        self.freeze()

    def logits(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        return self.model.logits(self.check_images(images, check_range))  # map_pixels happens inside

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode_ids(ids)


def tokenizer_config(raw: dict, source: str, weight_path: str, trained_as: dict | None = None) -> TokenizerConfig:
    """The config that `raw` (read from `source`, overrides applied) describes, checked against `trained_as`: the
    architecture the weights at `weight_path` say they were trained with (their stored config), if they say."""
    raw = {k: v for k, v in raw.items() if k != "weights"}
    try:
        cfg = TokenizerConfig.model_validate(raw)
    except ValidationError as e:
        raise TokenizerError(f"{source}: bad tokenizer config: {e.errors()[0]['loc']} {e.errors()[0]['msg']}") from None
    if trained_as is not None:  # the weights say what they were trained as; a config that disagrees is a mix-up
        diff = [f"{k}: config {getattr(cfg, k)!r} vs checkpoint {trained_as[k]!r}" for k in ARCH_FIELDS
                if k in trained_as and trained_as[k] != getattr(cfg, k)]
        if diff:
            raise TokenizerError(f"'{weight_path}' was trained with a different architecture than {source} (+ overrides) asks for: {'; '.join(diff)}")
    return cfg


def dvae_tokenizer(cfg: TokenizerConfig, state: dict[str, torch.Tensor], weight_path: str) -> DVAETokenizer:
    """The frozen tokenizer of a `DVAE(cfg)` holding `state` (read from `weight_path`); a misfit names each key."""
    model = DVAE(cfg)
    check_state_dict(model, state, f"'{weight_path}'")
    model.load_state_dict(state)
    return DVAETokenizer(model, source=weight_path)

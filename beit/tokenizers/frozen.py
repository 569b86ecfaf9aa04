"""Frozen tokenizers: what every tokenizer shares (frozen-module behaviour, input checks, state-dict checks),
and a dVAE trained by `beit tokenizer train` as one, from its config and state dict (the files are found and read
by `beit.builders.create_tokenizer`). `beit/tokenizers/dalle.py` builds the DALL-E tokenizer on the same base."""

from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import ValidationError

from beit.config import TokenizerConfig
from beit.tokenizers.dvae import DVAE

PIXEL_TOL = 1e-6  # rounding slack on the [0, 1] input range
# The TokenizerConfig fields a trained dVAE's weights fix; its stored config must agree on them.
ARCH_FIELDS = ("vocab_size", "hidden", "blocks_per_group", "downsample", "in_chans", "recon_loss")


class TokenizerError(ValueError):
    """Bad weights or a mismatch between a checkpoint and its config; the message names what and where."""


class FrozenTokenizer(nn.Module):
    """Base class: an image tokenizer that is never trained by its user.

    Subclasses set `vocab_size`, `downsample`, `in_chans`, implement `logits(images)` (preprocessing
    included) and, if they have a decoder, `_decode(ids)`.
    """

    vocab_size: int
    downsample: int
    in_chans: int
    # Subclasses set self.decoder (a module, or None). No class-level default: nn.Module keeps
    # submodules in _modules, and a class attribute would shadow them.

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)
        # Channels-last (NHWC) convolutions: on a 2-core AVX512 CPU, encoding a batch of 128 Fashion-MNIST
        # crops took 85 instead of 166 ms, with 99.986% of tokens equal to the NCHW result (fp32 both; only
        # the summation order differs). docs/performance.md
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> FrozenTokenizer:
        # A parent's model.train() must not switch the tokenizer to training behaviour.
        return super().train(False)

    def check_images(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """[B, C, H, W] float in [0, 1] with C == in_chans and H, W divisible by the downsample factor.

        The pixel-range check reads the data on the host (a device sync on a GPU); `check_range=False` is for
        callers whose images are in [0, 1] by construction, like the pretraining step (TwoViewTransform clamps)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"tokenizer expects images as a [B, C, H, W] tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"tokenizer expects float images in [0, 1], got dtype {images.dtype} (for uint8 use images.float() / 255)")
        b, c, h, w = images.shape
        if c != self.in_chans:
            raise ValueError(f"tokenizer expects {self.in_chans} channel(s), got {c} (images of shape {tuple(images.shape)})")
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by the tokenizer's downsample factor {self.downsample}")
        if check_range:
            lo, hi = torch.stack(torch.aminmax(images)).tolist()  # one host read
            if lo < -PIXEL_TOL or hi > 1 + PIXEL_TOL:
                raise ValueError(f"tokenizer expects pixel values in [0, 1] (it applies its own map_pixels), got min {lo:.4g}, max {hi:.4g}; "
                                 "pass images before mean/std normalisation")
        return images.float().contiguous(memory_format=torch.channels_last)  # as the weights (freeze)

    def logits(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:  # [B, V, h, w]
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> LongTensor [B, H/ds, W/ds] of token ids."""
        return self.logits(images, check_range).argmax(1)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, h, w] -> images [B, C, h·ds, w·ds] in [0, 1]."""
        if getattr(self, "decoder", None) is None:
            raise RuntimeError(f"{type(self).__name__} was loaded without decoder weights, so it cannot decode")
        if ids.dim() != 3 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"decode expects integer ids of shape [B, h, w], got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got min {ids.min().item()}, max {ids.max().item()}")
        return self._decode(ids.long())

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fail with the first few missing/unexpected keys and every shape mismatch, each named."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    problems = []
    if wrong:
        problems.append("shape mismatch (vocab size or width differs from the config?) " + "; ".join(wrong[:4]))
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if problems:
        raise TokenizerError(f"{source} does not fit the tokenizer architecture: " + " | ".join(problems))


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

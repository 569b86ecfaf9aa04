"""A small trainable discrete VAE: DALL-E's dVAE recipe, scaled down.

Same shape of network as OpenAI's dVAE (see `dalle.py`): residual conv groups whose residual branch is
scaled by 1/n_layers², max-pool between encoder groups, nearest upsampling between decoder groups, and an
encoder that ends in logits over the vocabulary. Training relaxes the argmax with Gumbel-softmax; a
frozen tokenizer uses the argmax.

Differences from DALL-E (on purpose, for 28-32 px single-channel images on a CPU):
- widths start at `hidden` instead of 256 and there are log2(downsample)+1 groups (3 for ÷4, 4 for ÷8);
- the encoder stem is a 3×3 conv (DALL-E: 7×7), which is enough at 32 px;
- the decoder's input 1×1 conv over the one-hot vocabulary is written as a codebook matrix
  [vocab, code_dim] (the same linear map, stored the other way round).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.config import TokenizerConfig

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's map_pixels margin: pixels live in [0.1, 0.9] so logit(x) stays finite


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [0.1, 0.9] (DALL-E's logit-Laplace preprocessing)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0.1, 0.9] -> [0, 1], clamped."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def _conv(n_in: int, n_out: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2)
    # DALL-E's init: N(0, 1/fan_in), zero bias.
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * k * k))
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """x -> id_path(x) + post_gain * res_path(x); kernels (3,3,3,1) in the encoder, (1,3,3,3) in the decoder."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = max(n_out // 4, 8)
        self.post_gain = 1 / n_layers**2  # keeps the sum of all residual branches O(1) at init
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        chans = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(chans[i], chans[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _widths(cfg: TokenizerConfig) -> list[int]:
    """Group widths: hidden, 2·hidden, 4·hidden(, 8·hidden); one group per resolution."""
    n_groups = int(math.log2(cfg.downsample)) + 1
    return [cfg.hidden * 2**i for i in range(n_groups)]


class DVAEEncoder(nn.Module):
    """[B, C, H, W] pixels in [0.1, 0.9] -> [B, vocab, H/ds, W/ds] logits."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = _widths(cfg)
        n_layers = len(widths) * cfg.blocks_per_group
        blocks: list[tuple[str, nn.Module]] = [("input", _conv(cfg.in_chans, widths[0], 3))]
        n_in = widths[0]
        for g, w in enumerate(widths):
            group = []
            for b in range(cfg.blocks_per_group):
                group.append((f"block_{b + 1}", ResBlock(n_in, w, n_layers, (3, 3, 3, 1))))
                n_in = w
            if g < len(widths) - 1:
                group.append(("pool", nn.MaxPool2d(2)))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        blocks.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _conv(n_in, cfg.vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden map before the vocabulary projection: [B, C_top, h, w]."""
        return self.blocks[:-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        # The vocabulary projection runs in fp32 even under autocast (DALL-E does the same): bf16 logits
        # tie often, argmax then always picks the lower index, and near-duplicate codes can never win.
        with torch.autocast(x.device.type, enabled=False):
            return self.blocks.output(h.float())


class DVAEDecoder(nn.Module):
    """[B, code_dim, h, w] code embeddings -> [B, 2C (laplace: mu, log b) or C (mse), H, W]."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = _widths(cfg)[::-1]  # widest first, like DALL-E's decoder
        n_layers = len(widths) * cfg.blocks_per_group
        out_chans = 2 * cfg.in_chans if cfg.recon_loss == "laplace" else cfg.in_chans
        blocks: list[tuple[str, nn.Module]] = []
        n_in = code_dim(cfg)
        for g, w in enumerate(widths):
            group = []
            for b in range(cfg.blocks_per_group):
                group.append((f"block_{b + 1}", ResBlock(n_in, w, n_layers, (1, 3, 3, 3))))
                n_in = w
            if g < len(widths) - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        blocks.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _conv(n_in, out_chans, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(blocks))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


def code_dim(cfg: TokenizerConfig) -> int:
    """Width of a code embedding: DALL-E uses n_init=128 for n_hid=256, i.e. half the first width."""
    return max(cfg.hidden // 2, 16)


class DVAE(nn.Module):
    """Encoder, codebook and decoder. `forward` is the training path; `encode`/`decode` use hard tokens."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg.model_copy()
        self.encoder = DVAEEncoder(cfg)
        # One row per token; the soft one-hot times this matrix is DALL-E's decoder input 1×1 conv.
        self.codebook = nn.Parameter(torch.randn(cfg.vocab_size, code_dim(cfg)) / math.sqrt(cfg.vocab_size))
        self.decoder = DVAEDecoder(cfg)

    def forward(self, x01: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training path: images [B, C, H, W] in [0, 1] -> (logits [B, V, h, w], Gumbel-softmax relaxed
        one-hot [B, V, h, w] at temperature `tau`, decoder output)."""
        logits = self.logits(x01)
        # The relaxation is computed in fp32: bf16 noise/softmax at tau=1/16 would round codes together.
        soft = F.gumbel_softmax(logits.float(), tau=tau, hard=False, dim=1)
        return logits, soft, self.decode_stats(soft)

    def embed(self, onehot: torch.Tensor) -> torch.Tensor:
        # [B, V, h, w] x [V, D] -> [B, D, h, w]; a soft one-hot gives a weighted mix of codes.
        return torch.einsum("bvhw,vd->bdhw", onehot, self.codebook.to(onehot.dtype))

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> [B, V, h, w] logits (map_pixels applied here)."""
        return self.encoder(map_pixels(x01))

    def decode_stats(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embed(onehot))

    def stats_to_image(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [0, 1]: unmap(sigmoid(mu)) for laplace, clamp for mse."""
        c = self.cfg.in_chans
        if self.cfg.recon_loss == "laplace":
            return unmap_pixels(torch.sigmoid(stats[:, :c].float()))
        return stats[:, :c].float().clamp(0, 1)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, h, w] token ids -> [B, C, H, W] images in [0, 1]."""
        onehot = F.one_hot(ids, self.cfg.vocab_size).permute(0, 3, 1, 2).float()  # [B, V, h, w]
        return self.stats_to_image(self.decode_stats(onehot))


def recon_nll(stats: torch.Tensor, x01: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pixel reconstruction loss, averaged. stats: decoder output; x01: targets in [0, 1]."""
    stats = stats.float()
    c = x01.shape[1]
    if kind == "mse":
        return F.mse_loss(stats, x01)
    # Logit-Laplace (DALL-E eq. 2): density of x in (0, 1) whose logit is Laplace(mu, b).
    x = map_pixels(x01)
    mu, log_b = stats[:, :c], stats[:, c:]
    nll = (torch.logit(x) - mu).abs() * torch.exp(-log_b) + log_b + math.log(2) + torch.log(x * (1 - x))
    return nll.mean()


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) per token position, averaged: log V - H(q). logits: [B, V, h, w]."""
    logq = F.log_softmax(logits.float(), dim=1)
    return (logq.exp() * logq).sum(1).mean() + math.log(logits.shape[1])

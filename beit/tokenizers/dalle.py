"""OpenAI's DALL-E dVAE (the BEiT tokenizer), re-declared with plain nn.Conv2d.

Architecture-compatible with `dall_e.Encoder` / `dall_e.Decoder` (PyPI DALL-E 0.1): the module tree
`blocks.{input, group_1..4.block_1..2.{id_path, res_path.conv_1..4}, output.conv}` is the same, only
the parameter names differ (`weight`/`bias` here, `w`/`b` there), so a rename is the whole key map.

Weights load from a state dict, never from a pickled module:
- OpenMMLab's `dalle_encoder.pth` (keys `blocks.….w/b`, possibly under `target_generator.`);
- a `dall_e.Encoder().state_dict()` / `dall_e.Decoder().state_dict()` (the same `w`/`b` layout);
- safetensors, e.g. written by `beit.builders.convert_dalle_pickle` (keys `encoder.…`, `decoder.…` or bare).

Numerics: dall_e's convs run in fp16 on CUDA; we run fp32 everywhere, so GPU fp16 tokens of the
original can differ from ours in a few near-tied positions.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.tokenizers.frozen import FrozenTokenizer, check_state_dict
from beit.tokenizers.dvae import map_pixels, unmap_pixels

N_HID, N_INIT, N_BLK, GROUPS, VOCAB = 256, 128, 2, 4, 8192


class _Block(nn.Module):
    """DALL-E Encoder/DecoderBlock: id_path(x) + 1/n_layers² · res_path(x)."""

    def __init__(self, n_in: int, n_out: int, kernels: tuple[int, ...], n_layers: int = GROUPS * N_BLK):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        chans = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", nn.Conv2d(chans[i], chans[i + 1], k, padding=(k - 1) // 2))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(widths_in: list[int], w_out: int, kernels: tuple[int, ...], resample: nn.Module | None) -> nn.Sequential:
    parts = [(f"block_{i + 1}", _Block(n_in, w_out, kernels)) for i, n_in in enumerate(widths_in)]
    if resample is not None:
        parts.append(("pool" if isinstance(resample, nn.MaxPool2d) else "upsample", resample))
    return nn.Sequential(OrderedDict(parts))


class DalleEncoder(nn.Module):
    """[B, 3, H, W] map_pixels'd images -> [B, 8192, H/8, W/8] logits."""

    def __init__(self, in_chans: int = 3, vocab_size: int = VOCAB):
        super().__init__()
        h = N_HID
        self.blocks = nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(in_chans, h, 7, padding=3)),
            ("group_1", _group([h, h], h, (3, 3, 3, 1), nn.MaxPool2d(2))),
            ("group_2", _group([h, 2 * h], 2 * h, (3, 3, 3, 1), nn.MaxPool2d(2))),
            ("group_3", _group([2 * h, 4 * h], 4 * h, (3, 3, 3, 1), nn.MaxPool2d(2))),
            ("group_4", _group([4 * h, 8 * h], 8 * h, (3, 3, 3, 1), None)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(8 * h, vocab_size, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class DalleDecoder(nn.Module):
    """[B, 8192, h, w] one-hot tokens -> [B, 6, 8h, 8w] logit-Laplace statistics (mu, log b) per channel."""

    def __init__(self, out_chans: int = 3, vocab_size: int = VOCAB):
        super().__init__()
        h = N_HID
        up = lambda: nn.Upsample(scale_factor=2, mode="nearest")  # noqa: E731
        self.blocks = nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(vocab_size, N_INIT, 1)),
            ("group_1", _group([N_INIT, 8 * h], 8 * h, (1, 3, 3, 3), up())),
            ("group_2", _group([8 * h, 4 * h], 4 * h, (1, 3, 3, 3), up())),
            ("group_3", _group([4 * h, 2 * h], 2 * h, (1, 3, 3, 3), up())),
            ("group_4", _group([2 * h, h], h, (1, 3, 3, 3), None)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(h, 2 * out_chans, 1))]))),
        ]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


# -------------------------------------------------------------------------------------------- key map
_PREFIXES = ("module.", "target_generator.", "tokenizer.", "d_vae.")


def dalle_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dall_e / OpenMMLab names (`….w`, `….b`) -> nn.Conv2d names (`….weight`, `….bias`); others unchanged."""
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        if k.endswith(".w"):
            k = k[:-2] + ".weight"
        elif k.endswith(".b"):
            k = k[:-2] + ".bias"
        out[k] = v
    return out


def split_encoder_decoder(state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """One file may hold the encoder, the decoder, or both under `encoder.` / `decoder.` prefixes.
    Bare `blocks.*` keys are told apart by the input conv: the encoder's takes 3 channels, the decoder's 8192."""
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    dec = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    bare = {k: v for k, v in state.items() if k.startswith("blocks.")}
    if bare:
        w = bare.get("blocks.input.weight")
        if w is None:
            raise KeyError(f"{source}: has 'blocks.*' keys but no 'blocks.input.w' / 'blocks.input.weight'; not a DALL-E dVAE state dict")
        (dec if w.shape[1] == VOCAB and w.shape[2] == 1 else enc).update(bare)
    if not enc and not dec:
        sample = ", ".join(list(state)[:5])
        raise KeyError(f"{source}: no DALL-E dVAE keys found (expected 'blocks.input.w' or 'encoder.blocks.…'); first keys: {sample}")
    return enc, dec


class DalleTokenizer(FrozenTokenizer):
    """Frozen DALL-E dVAE: encode [B, 3, H, W] in [0, 1] -> [B, H/8, W/8] ids in [0, 8192)."""

    vocab_size = VOCAB
    downsample = 8
    in_chans = 3

    def __init__(self, encoder_state: dict, decoder_state: dict | None = None, source: str = "dall-e weights"):
        super().__init__()
        self.encoder = DalleEncoder()
        check_state_dict(self.encoder, encoder_state, f"{source} (encoder)")
        self.encoder.load_state_dict(encoder_state)
        self.decoder = None
        if decoder_state:
            self.decoder = DalleDecoder()
            check_state_dict(self.decoder, decoder_state, f"{source} (decoder)")
            self.decoder.load_state_dict(decoder_state)
        self.freeze()

    def logits(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        x = self.check_images(images, check_range)
        return self.encoder(map_pixels(x))  # [B, 8192, h, w]

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(ids, VOCAB).permute(0, 3, 1, 2).float()  # [B, 8192, h, w]
        stats = self.decoder(onehot)  # [B, 6, H, W]
        return unmap_pixels(torch.sigmoid(stats[:, :3]))


def dalle_tokenizer(state: dict, source: str, decoder_state: dict | None = None,
                    decoder_source: str = "") -> DalleTokenizer:
    """A DalleTokenizer from the state dict read from `source` (the encoder, or encoder and decoder) and, for
    decoding, a separate decoder's (read from `decoder_source`)."""
    enc, dec = split_encoder_decoder(dalle_to_ours(state), source)
    if decoder_state is not None:
        _, dec2 = split_encoder_decoder(dalle_to_ours(decoder_state), decoder_source)
        if not dec2:
            raise KeyError(f"decoder_weights '{decoder_source}' holds no decoder keys (its input conv is not 8192 -> 128)")
        dec = dec2
    if not enc:
        raise KeyError(f"'{source}' holds no DALL-E encoder keys (only a decoder); pass the encoder file as weights=")
    return DalleTokenizer(enc, dec or None, source=source)

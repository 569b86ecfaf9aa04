"""Visual tokenizers: images in [0, 1] -> grids of discrete token ids (BEiT's MIM targets).

    tok = create_tokenizer("fmnist_dvae")                 # shipped: 1 x 32 x 32 -> 8 x 8 ids, vocab 512
    tok = create_tokenizer("dall-e", weights="dalle.safetensors")   # 3 x 112 x 112 -> 14 x 14, vocab 8192
    tok = create_tokenizer("runs/tokenizer/my_run")       # a directory written by `beit tokenizer train`
    ids = tok.encode(images)                               # LongTensor [B, H/ds, W/ds]
    rec = tok.decode(ids)                                  # [B, C, H, W] in [0, 1] (if it has a decoder)

Every tokenizer is frozen: eval mode that `.train()` cannot undo, no gradients, and `encode` runs
under `torch.inference_mode()`. Preprocessing (DALL-E's map_pixels) happens inside.
"""

from __future__ import annotations

from pathlib import Path

from beit.tokenizers.base import FrozenTokenizer, TokenizerError
from beit.tokenizers.dalle import DalleTokenizer, convert_dalle_pickle, load_dalle
from beit.tokenizers.trained import DVAETokenizer, load_trained

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"fmnist_dvae": ASSETS / "fmnist_dvae.yaml"}  # name -> config; weights beside it (.safetensors)

__all__ = ["create_tokenizer", "convert_dalle_pickle", "FrozenTokenizer", "DalleTokenizer", "DVAETokenizer",
           "TokenizerError", "SHIPPED"]


def create_tokenizer(name_or_path: str | Path, weights: str | Path | None = None, **overrides) -> FrozenTokenizer:
    """Build a frozen tokenizer.

    name_or_path: "dall-e" (needs `weights=`; optional `decoder_weights=` for decode), a shipped name
        (see SHIPPED), or a path to a trained tokenizer (run directory, tokenizer.yaml or tokenizer.safetensors).
    weights: weight file; for trained/shipped tokenizers it replaces the default file.
    overrides: TokenizerConfig fields for trained tokenizers (a mismatch with the weights is an error).
    """
    name = str(name_or_path)
    if name in ("dall-e", "dalle", "dall_e"):
        if weights is None:
            raise ValueError("the 'dall-e' tokenizer needs weights=PATH: OpenMMLab's dalle_encoder.pth, a dall_e "
                             "state dict, or a safetensors file from `beit tokenizer convert encoder.pkl DST --trust-pickle`")
        decoder_weights = overrides.pop("decoder_weights", None)
        if overrides:
            raise TypeError(f"the 'dall-e' tokenizer has a fixed architecture; unexpected options {sorted(overrides)}")
        return load_dalle(weights, decoder_weights)
    if name in SHIPPED:
        return load_trained(SHIPPED[name], weights=weights, **overrides)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"unknown tokenizer '{name}': not 'dall-e', not a shipped name ({', '.join(SHIPPED)}), "
                                "and no such file or directory")
    return load_trained(path, weights=weights, **overrides)

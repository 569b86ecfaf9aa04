"""Visual tokenizers: images in [0, 1] -> grids of discrete token ids (BEiT's MIM targets).

    tok = beit.create_tokenizer("fmnist_dvae")            # shipped: 1 x 32 x 32 -> 8 x 8 ids, vocab 512
    tok = beit.create_tokenizer("dall-e", weights="dalle.safetensors")   # 3 x 112 x 112 -> 14 x 14, vocab 8192
    tok = beit.create_tokenizer("runs/tokenizer/my_run")  # a directory written by `beit tokenizer train`
    ids = tok.encode(images)                               # LongTensor [B, H/ds, W/ds]
    rec = tok.decode(ids)                                  # [B, C, H, W] in [0, 1] (if it has a decoder)

This package holds the networks only; `beit.builders.create_tokenizer` (`beit.create_tokenizer`) finds and reads
their config and weight files. Every tokenizer is frozen: eval mode that `.train()` cannot undo, no gradients,
and `encode` runs under `torch.inference_mode()`. Preprocessing (DALL-E's map_pixels) happens inside.
"""

from __future__ import annotations

from beit.tokenizers.dalle import DalleTokenizer, dalle_tokenizer
from beit.tokenizers.frozen import DVAETokenizer, FrozenTokenizer, TokenizerError, dvae_tokenizer, tokenizer_config

__all__ = ["FrozenTokenizer", "DalleTokenizer", "DVAETokenizer", "TokenizerError", "dalle_tokenizer",
           "dvae_tokenizer", "tokenizer_config"]

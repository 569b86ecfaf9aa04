"""Does a Fashion-MNIST BEiT pretraining still work at another input size after the rel-pos resize?

Loads a pretraining checkpoint into the MIM model at 32 px (its own grid, 8x8) and at 64 px (16x16, the
shared rel-pos table resized on load, as for the segmenter), and prints the masked-token accuracy on the
first 256 Fashion-MNIST test images, each shown three ways: at 32 px, at 64 px (the garment drawn 2x
larger than in pretraining), and at 32 px in the middle of a black 64 px canvas (the garment at its
pretraining scale, as in the Fashion-MNIST scenes). Chance is 1/512.

    python scripts/mim_resize_check.py runs/reproduce_fmnist_full/pretrain/ckpt-00001872.pt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from beit.convert import load_pretrained
from beit.data.datasets import FASHION_MNIST_DEBIAN, load_fashion_mnist
from beit.models import create_model
from beit.tokenizers import create_tokenizer

MEAN, STD = 0.2860, 0.3530  # configs/pretrain/fmnist.yaml


def masked_token_accuracy(ckpt: str, images: torch.Tensor, size: int, tokenizer) -> float:
    model = create_model("beit_fmnist_patch4_32_512_vocab", img_size=size).eval()
    load_pretrained(model, ckpt)
    grid = size // 4
    with torch.inference_mode():
        targets = tokenizer.encode(images).flatten(1)  # [B, grid*grid]
        mask = torch.rand(images.shape[0], grid * grid, generator=torch.Generator().manual_seed(0)) < 0.4
        logits = model((images - MEAN) / STD, mask)  # [num_masked, 512]
    return (logits.argmax(-1) == targets[mask]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a Fashion-MNIST pretraining checkpoint (ckpt-*.pt)")
    p.add_argument("--data-root", default=FASHION_MNIST_DEBIAN)
    a = p.parse_args()
    images, _ = load_fashion_mnist(a.data_root, "test")
    x28 = torch.from_numpy(images[:256].copy()).float()[:, None] / 255  # [256, 1, 28, 28]
    x32 = F.interpolate(x28, size=32, mode="bilinear", antialias=True).clamp(0, 1)
    x64 = F.interpolate(x28, size=64, mode="bilinear", antialias=True).clamp(0, 1)
    canvas = F.pad(x32, [16, 16, 16, 16])  # black border: the garment keeps its 32 px size
    tok = create_tokenizer("fmnist_dvae")
    for name, x in (("32 px (pretraining size)", x32), ("64 px, garment 2x larger", x64),
                    ("64 px, 32 px garment on a black canvas", canvas)):
        print(f"{name:40s} masked-token accuracy {masked_token_accuracy(a.checkpoint, x, x.shape[-1], tok):.3f}")


if __name__ == "__main__":
    main()
